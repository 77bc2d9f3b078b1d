"""`pecca serve` on Ray Serve: N replicas of one model behind Ray's HTTP proxy and router.

Each replica is a Ray actor holding a whole PeccaServer (the model, its KV-cache slots and its
engine thread) and answering the same OpenAI routes; Ray spreads requests over the replicas,
on one machine or a cluster. Run it with Ray's CLI:

    serve run pecca.serve.ray:app_builder model=stories260K num_replicas=2 parallel=4

or from a config file (`serve run config.yaml`, see the README), or from Python:

    from ray import serve
    from pecca.serve.ray import deployment
    serve.run(deployment(num_replicas=2).bind("stories260K", parallel=4), route_prefix="/")

Ray needs the `ray` extra: pip install "pecca[ray]".
"""
import os
from typing import Optional

from ray import serve

_replica = None  # this process's PeccaServer (a Ray replica is a process of its own)


class ReplicaApp:
    """The ASGI app Ray's ingress wraps: it hands each request to this process's server. Ray
    pickles the app when the deployment is defined, before any model is loaded, so the app
    itself holds nothing."""

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        await _replica.app(scope, receive, send)


async def lifespan(receive, send):
    """Nothing to start or stop: the replica's constructor loads the model, Ray ends the actor."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


@serve.ingress(ReplicaApp())
class PeccaDeployment:
    """One replica: MODEL loaded and served as `pecca serve` serves it (same options)."""

    def __init__(self, model: str, parallel: int = 4, ctx_size: Optional[int] = None,
                 api_key: Optional[str] = None, model_name: Optional[str] = None,
                 chat_template: Optional[str] = None, max_queue: Optional[int] = None,
                 threads: Optional[int] = None, tokenizer: Optional[str] = None, kv_type: str = "f32"):
        global _replica
        from pecca.serve.app import PeccaServer

        _replica = PeccaServer.load(model, threads=threads, tokenizer=tokenizer, kv_type=kv_type, parallel=parallel,
                                    ctx_size=ctx_size, api_key=api_key, model_name=model_name,
                                    chat_template=chat_template, max_queue=max_queue).start()
        self.server = _replica
        self.pid = os.getpid()


def deployment(num_replicas: int = 1, num_cpus: float = 1.0, **options):
    """The deployment with its Ray options (num_replicas, CPUs per replica, and any of
    serve.deployment's options); bind it to the model: deployment(...).bind(MODEL, parallel=4)."""
    ray_actor_options = {"num_cpus": num_cpus, **options.pop("ray_actor_options", {})}
    return serve.deployment(PeccaDeployment, name="pecca", num_replicas=num_replicas,
                            ray_actor_options=ray_actor_options, **options)


INT_ARGS = ("parallel", "ctx_size", "max_queue", "threads", "num_replicas")


def app_builder(args: dict):
    """For `serve run pecca.serve.ray:app_builder model=PATH [num_replicas=N] [num_cpus=C]
    [parallel=N] [ctx_size=N] [threads=N] [kv_type=f16] [api_key=KEY] [model_name=NAME]
    [chat_template=FILE]`:
    Ray passes the key=value pairs (and a config file's `args:`) as strings."""
    args = dict(args)
    if "model" not in args:
        raise ValueError("pecca.serve.ray:app_builder needs model=PATH (a model file or known name)")
    for k in INT_ARGS:
        if k in args and args[k] is not None:
            args[k] = int(args[k])
    num_replicas = args.pop("num_replicas", 1)
    num_cpus = float(args.pop("num_cpus", 1.0))
    model = args.pop("model")
    return deployment(num_replicas, num_cpus).bind(model, **args)
