"""The fuzz worker: a subprocess that loads mutated model files, so that a crash in a kernel
kills it and not the test session.

It reads one JSON request a line on stdin: {"path": ..., "tokenizer": ... or null,
"export": bool}; with "export" the path (a HuggingFace or Meta directory) is first exported
to GGUF, as `pecca export` does. It answers one JSON line per request:
    {"outcome": "ran", "finite": bool, "rss_mb": ...}     loaded, and the forward pass ran
    {"outcome": "refused", "stage": ..., "error": ..., "message": ...}   a pecca error
    {"outcome": "crash", "stage": ..., "error": ..., "traceback": ...}   anything else
Anything pecca prints goes to stderr: stdout carries the answers only.
"""
import json
import os
import resource
import sys
import traceback

PROMPT = "Once upon a time, Lily saw a big dog."
ADDRESS_SPACE = 8 << 30  # a reader that tries to allocate more fails here with MemoryError


def exercise(llm) -> bool:
    """A prefill batch, a few single-token steps and a short generation; whether every
    logit came out finite (non-finite logits are allowed: the weights are mutated)."""
    import numpy as np

    from pecca.errors import NonFiniteLogitsError

    m = llm.model
    ids = llm.tokenizer.encode(PROMPT, add_bos=True)[:min(m.seq_len, 12)]
    if len(ids) < 2 and m.seq_len >= 2:
        ids = (ids + [llm.tokenizer.bos_id, llm.tokenizer.eos_id])[:2]
    logits = m.prefill(ids)
    finite = bool(np.isfinite(logits).all())
    pos = len(ids)
    while pos < min(m.seq_len, len(ids) + 3):
        token = int(np.argmax(np.nan_to_num(logits, nan=-np.inf)))
        logits = m.forward(token, pos)
        finite &= bool(np.isfinite(logits).all())
        pos += 1
    try:
        if len(llm.tokenizer.encode("Once", add_bos=True)) < m.seq_len:  # else a ContextLengthError
            llm.generate("Once", max_tokens=3, temperature=0)
        llm.tokenizer.decode(list(range(min(llm.tokenizer.vocab_size, 300))))
    except NonFiniteLogitsError:
        finite = False
    return finite


def handle(req: dict) -> dict:
    import pecca
    from pecca.errors import PeccaError

    stage = "load"
    try:
        path = req["path"]
        if req.get("export"):
            from export import export

            stage = "export"
            out = path.rstrip("/") + ".gguf"
            export(path, out)
            path, stage = out, "load"
        llm = pecca.load(path, threads=req.get("threads", 1), tokenizer=req.get("tokenizer"))
        stage = "run"
        return {"outcome": "ran", "finite": exercise(llm)}
    except PeccaError as e:
        return {"outcome": "refused", "stage": stage, "error": type(e).__name__, "message": str(e)[:400]}
    except BaseException as e:  # MemoryError, a Rust panic (a BaseException), RecursionError ...
        return {"outcome": "crash", "stage": stage, "error": type(e).__name__, "message": str(e)[:400],
                "traceback": traceback.format_exc()[-4000:]}


def peak_rss_mb() -> int:
    """This process's peak RSS since its exec (VmHWM). Not ru_maxrss: Linux carries that over
    exec from the forking parent, so a worker started by a large pytest process would report
    the parent's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def main():
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # progress bars and prints: stderr
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    import export  # noqa: F401 (imported once, before the first request is timed)
    import pecca  # noqa: F401

    for line in sys.stdin:
        result = handle(json.loads(line))
        result["rss_mb"] = peak_rss_mb()
        answers.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
