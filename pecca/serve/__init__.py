"""`pecca serve`: an OpenAI-compatible HTTP server with continuous batching.

- pecca.serve.batch: KV-cache slots and the batched decode step (one pass over the weights
  for every sequence);
- pecca.serve.engine: the engine thread that joins, steps and retires requests;
- pecca.serve.protocol: OpenAI's request fields, responses, chunks and errors;
- pecca.serve.app: the Starlette routes (`PeccaServer`) and uvicorn;
- pecca.serve.ray: the same routes as a Ray Serve deployment, N replicas.

The HTTP side needs the `server` extra (pip install "pecca[server]"), Ray the `ray` extra.
"""
from pecca.serve.engine import Engine, Job, QueueFullError, Usage

__all__ = ["Engine", "Job", "QueueFullError", "Usage", "PeccaServer", "BackgroundServer"]


def __getattr__(name):  # the HTTP side imports starlette: only when asked for
    if name in ("PeccaServer", "BackgroundServer"):
        from pecca.serve import app

        return getattr(app, name)
    raise AttributeError(name)
