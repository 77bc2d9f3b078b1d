"""Where a decode step's time goes: matrix products, attention, the small ops, embedding
and sampling, and the Python around them.

cProfile cannot see inside Cython functions compiled without profiling hooks, so this wraps
them instead: every kernel module function that pecca.model calls (pecca._kernels.ops) and
every Linear's call are replaced by timing wrappers (time.perf_counter around the call), and
the embedding lookup and the sampler likewise. "Python" is the rest of the wall time of the
decode loop: the forward pass's own bytecode, attribute lookups, argument passing. Each
wrapper adds ~0.2 us per call to the kernel it times; the Python share is therefore a lower
bound by that much. The wrapped products run one call each: the instrumented pass does not
take matvec_same_input's one-call path (Q8_0, Q4_0, Q4_1, q4g q/k/v and gate/up), which the header's
uninstrumented tok/s does.

Usage: python bench/profile_decode.py MODEL [--threads 2] [--tokens 64] [--prompt-tokens 16]
       [--kv-type f32|f16]
"""
import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

import pecca  # noqa: E402
import pecca.model as model_module  # noqa: E402
from pecca.sampling import Sampler  # noqa: E402

SPENT = defaultdict(float)
CATEGORY = {"attention": "attention", "rmsnorm": "rmsnorm", "rope": "rope (incl. its table)",
            "rope_table": "rope (incl. its table)", "swiglu": "swiglu + residual adds",
            "add": "swiglu + residual adds"}


def timed(fn, category):
    def wrapper(*args, **kw):
        t = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            SPENT[category] += time.perf_counter() - t
    return wrapper


class TimedOps:
    """pecca._kernels.ops with every function timed under its category."""

    def __init__(self, ops):
        self._ops = ops

    def __getattr__(self, name):
        return timed(getattr(self._ops, name), CATEGORY.get(name, "other kernels"))


class TimedLinear:
    def __init__(self, lin, category):
        self.lin, self.category = lin, category

    def __call__(self, x, out, threads=1):
        t = time.perf_counter()
        self.lin(x, out, threads)
        SPENT[self.category] += time.perf_counter() - t

    def batch(self, x, out, threads=1):
        self.lin.batch(x, out, threads)


def instrument(m):
    w = m.loaded.weights
    for layer in w.layers:
        for name in ("wq", "wk", "wv", "wo"):
            setattr(layer, name, TimedLinear(getattr(layer, name), "matrix products: attention q/k/v/o"))
        for name in ("w1", "w2", "w3"):
            setattr(layer, name, TimedLinear(getattr(layer, name), "matrix products: MLP"))
    w.output = TimedLinear(w.output, "matrix products: classifier")
    model_module.ops = TimedOps(model_module.ops)
    model_module.embed = timed(model_module.embed, "embedding lookup")


def decode(m, sampler, start: int, tokens: int) -> None:
    tok = 3
    for pos in range(start, start + tokens):
        tok = sampler.sample(m.model.forward(tok, pos))


def profile(m, prompt_tokens: int, tokens: int):
    ids = np.random.default_rng(0).integers(3, m.config.vocab_size, prompt_tokens).tolist()
    sampler = Sampler(m.config.vocab_size, temperature=0.0)
    m.model.prefill(ids, 0)
    decode(m, sampler, prompt_tokens, 4)  # warm: page in the weights, start the thread pool
    t0 = time.perf_counter()
    decode(m, sampler, prompt_tokens, tokens)
    plain = time.perf_counter() - t0
    instrument(m)
    sampler.sample = timed(sampler.sample, "sampling (greedy)")
    SPENT.clear()
    t0 = time.perf_counter()
    decode(m, sampler, prompt_tokens, tokens)
    wall = time.perf_counter() - t0
    shares = dict(SPENT)
    shares["Python (forward loop, calls)"] = wall - sum(SPENT.values())
    return plain, wall, shares


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--kv-type", default="f32", choices=["f32", "f16"])
    args = p.parse_args(argv)
    m = pecca.load(args.model, threads=args.threads, kv_type=args.kv_type)
    precision = m.info()["precision"]
    plain, wall, shares = profile(m, args.prompt_tokens, args.tokens)
    print(f"{Path(args.model).name}: {precision}, threads {args.threads}, "
          f"{args.tokens} decode tokens: {args.tokens / plain:.1f} tok/s "
          f"({1000 * plain / args.tokens:.3f} ms/token; instrumented {1000 * wall / args.tokens:.3f})")
    print(f"  {'per token':<44} {'ms':>8} {'share':>6}")
    for name, t in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<44} {1000 * t / args.tokens:>8.3f} {100 * t / wall:>5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
