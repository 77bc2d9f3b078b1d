"""pecca's int8 paths against llama2.c's runq.c and llama.cpp, on random-weight models.

For each model shape and thread count, one repetition runs, in this order:
  pecca      on the llama2.c version-2 file (int8, float32 scale per group of gs)
  runq.c     on the same file (two runs, see below)
  pecca      on a GGUF Q8_0 file of the same weights (int8, f16 scale per block of 32)
  llama.cpp  on the same GGUF, through llama_cpp.Llama
  pecca      on the fp32 llama2.c version-0 file (for the q8 / f32 decode ratio)
and repetitions alternate these so that drift of the machine hits every engine alike.

Every engine does the same work: P prompt positions, then G greedy decode positions.
- pecca: pecca.bench.time_model (batched prefill, then one token at a time).
- llama.cpp: eval(prompt ids) in one batch (n_batch >= P), then eval of one token at a time,
  each the argmax of the last logits; the prompt ids are time_model's.
- runq.c: no batched prefill and a single printed figure over positions 1 .. steps-1, so its
  rates come from a short run (steps = P: pp) and a long one (steps = P + G: tg = G / time
  difference), as bench/compare_llama2c.py does for run.c. Its prompt is text encoding to
  exactly P tokens; the BOS row of the embedding is scaled down so it never stops early.
Each timed pecca and llama.cpp run follows an untimed 4 + 2 token run of the same engine, so
all start warm (runq.c's own timer leaves its first forward out).

The group size is 64 (llama2.c's default), halved until it divides dim and hidden_dim as
llama2.c's export.py does (stories15M: dim 288 -> 32).

Files are written into --out-dir (default bench/out/, gitignored) and removed after each
model unless --keep; the 7B-layers shape needs ~3.3 GB of disk while it runs. runq.c is
compiled there too (the source is not copied): `runq` with llama2.c's `make runomp` flags for
timing, `runq-exact` (gcc -O3) for the greedy check.

Usage: python bench/compare_q8.py [--models stories15M,stories110M,7B-layers]
       [--threads 1,2] [--reps 5] [--prompt-tokens 32] [--gen-tokens 64] [--keep] [--json]
"""
import argparse
import ctypes
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `export` is a top-level package of the repo, not installed
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402

import pecca  # noqa: E402
from compare_llama2c import (bos_safe_weights, cpu_seconds, fmt, foreign_load,  # noqa: E402
                             greedy_agreement, log, mean_std, prompt_with_tokens,
                             read_bandwidth, refresh_page_cache, run_c, run_c_rates, shared_dir)
from export.gguf import write_gguf  # noqa: E402
from export.llama2c import STORIES_SHAPES, Llama2cSource, write_llama2c  # noqa: E402
from pecca.bench import time_model  # noqa: E402
from pecca.config import ModelConfig  # noqa: E402

SHAPES = {
    "stories15M": STORIES_SHAPES["stories15M"],
    "stories110M": STORIES_SHAPES["stories110M"],
    # Two layers of LLaMA-7B: per-token work dominated by 4096 x 11008 matrices.
    "7B-layers": ModelConfig(dim=4096, hidden_dim=11008, n_layers=2, n_heads=32, n_kv_heads=32,
                             vocab_size=32000, seq_len=512),
}
ENGINES = ("pecca_q8", "runq", "pecca_q8_0", "llama_cpp", "pecca_f32")
LABELS = {"pecca_q8": "pecca      llama2.c v2 gs{gs}", "runq": "runq.c     llama2.c v2 gs{gs}",
          "pecca_q8_0": "pecca      GGUF Q8_0", "llama_cpp": "llama.cpp  GGUF Q8_0",
          "pecca_f32": "pecca      llama2.c v0 f32"}
# Decode ratios, each kept per repetition (paired): (name, numerator, denominator).
RATIOS = (("v2/runq.c", "pecca_q8", "runq"), ("Q8_0/llama.cpp", "pecca_q8_0", "llama_cpp"),
          ("Q8_0/f32", "pecca_q8_0", "pecca_f32"), ("v2/f32", "pecca_q8", "pecca_f32"))
FOREIGN_LIMIT = 0.1  # other processes' CPU, in cores on average, above which a rep is redone
RETRIES = 3


# ---------------------------------------------------------------- setup

def missing_prerequisites(shared: Path) -> str:
    """Why the comparison cannot run here ('' when it can)."""
    import shutil

    if shutil.which("gcc") is None:
        return "gcc not found"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama_cpp (llama-cpp-python) is not installed"
    for p in (shared / "models/llama2c/tokenizer.bin", shared / "reference/llama2c-src/runq.c"):
        if not p.is_file():
            return f"{p} not found (set PECCA_SHARED to the shared data directory)"
    return ""


def build_runq(src: Path, out_dir: Path, exact: bool = False) -> Path:
    """Compile runq.c as llama2.c's `make runomp` does (the timed build), or with plain -O3
    (exact: sequential float sums, no FMA, as pecca's portable path computes; for the greedy
    check). The source stays where it is."""
    import subprocess

    exe = out_dir / ("runq-exact" if exact else "runq")
    flags = ["-O3"] if exact else ["-Ofast", "-march=native"]
    subprocess.run(["gcc", *flags, "-fopenmp", str(src), "-lm", "-o", str(exe)], check=True)
    return exe


def group_size_for(c: ModelConfig, want: int) -> int:
    """export.py's back-off: halve until the group divides the row lengths."""
    gs = want
    while c.dim % gs or c.hidden_dim % gs:
        gs //= 2
    return gs


def write_files(name: str, c: ModelConfig, gs: int, tok_path: Path, args) -> dict:
    """The three files of one shape, all from the same (BOS-safe) random weights."""
    stem = args.out_dir / f"{name}-random-s{args.seed}"
    paths = {"f32": Path(f"{stem}.bin"), "q8": Path(f"{stem}-q80-gs{gs}.bin"),
             "q8_0": Path(f"{stem}-q8_0.gguf")}
    get = bos_safe_weights(c, args.seed)
    write_llama2c(str(paths["f32"]), c, get, version=0, shared=True)
    write_llama2c(str(paths["q8"]), c, get, version=2, shared=True, group_size=gs)
    # The GGUF quantizes the same fp32 weights, read back from the version-0 file.
    write_gguf(str(paths["q8_0"]), Llama2cSource(str(paths["f32"]), str(tok_path)), dtype="q8_0")
    os.sync()  # flush now: background writeback during timing would read as foreign load
    return paths


def weight_bytes_per_token(c: ModelConfig, fmt_name: str, gs: int) -> float:
    """Bytes of all layer matrices plus the classifier that one decode step streams."""
    d, h, kv = c.dim, c.hidden_dim, c.kv_dim
    values = c.n_layers * (2 * d * d + 2 * d * kv + 3 * d * h) + c.vocab_size * d
    per_value = {"f32": 4.0, "q8": 1.0 + 4.0 / gs, "q8_0": 34 / 32}[fmt_name]
    return values * per_value


# ---------------------------------------------------------------- llama.cpp

def load_llama(path: Path, n_ctx: int, n_batch: int):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                           n_threads=1, n_threads_batch=1, seed=0, verbose=False)


def set_llama_threads(llm, threads: int) -> None:
    import llama_cpp

    llama_cpp.llama_set_n_threads(llm.ctx, threads, threads)


def llama_argmax(llm) -> int:
    """Greedy pick from the last evaluated token's logits (llm.scores is not filled unless
    logits_all, which would also compute the classifier for every prompt token)."""
    ptr = llm._ctx.get_logits_ith(-1)
    logits = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                   shape=(llm.n_vocab(),))
    return int(np.argmax(logits))


def time_llama(llm, n_vocab: int, n_p: int, n_g: int, rng_seed: int):
    """(pp tok/s, tg tok/s, generated ids): time_model's work, done by llama.cpp."""
    ids = np.random.default_rng(rng_seed).integers(3, n_vocab, n_p).tolist()  # time_model's
    llm.reset()  # n_tokens = 0: the next eval clears the KV cache
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    tok, out = llama_argmax(llm), []
    for _ in range(n_g):
        out.append(tok)
        llm.eval([tok])
        tok = llama_argmax(llm)
    t2 = time.perf_counter()
    return n_p / (t1 - t0), n_g / (t2 - t1), out


def pecca_greedy(m, n_p: int, n_g: int, rng_seed: int):
    """pecca's greedy ids for time_llama's prompt (for the agreement line)."""
    model = m.model
    ids = np.random.default_rng(rng_seed).integers(3, m.config.vocab_size, n_p).tolist()
    tok, out = int(np.argmax(model.prefill(ids, 0))), []
    for pos in range(n_p, n_p + n_g):
        out.append(tok)
        tok = int(np.argmax(model.forward(tok, pos)))
    return out


def leading_agreement(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ---------------------------------------------------------------- measurement

class Case:
    """Everything one model shape needs: files, loaded engines, prompt sizes."""

    def __init__(self, name, c, gs, paths, tok_path, runq_exes, n_p, n_g):
        self.name, self.c, self.gs, self.paths = name, c, gs, paths
        self.tok_path, self.n_p, self.n_g = tok_path, n_p, n_g
        self.runq_exe, self.runq_exact = runq_exes
        for p in paths.values():  # large folios whatever brought the files in (compare.py's docstring)
            refresh_page_cache(p)
        self.q8 = pecca.load(str(paths["q8"]), threads=1, tokenizer=str(tok_path))
        self.q8_0 = pecca.load(str(paths["q8_0"]), threads=1)
        self.f32 = pecca.load(str(paths["f32"]), threads=1, tokenizer=str(tok_path))
        self.llm = load_llama(paths["q8_0"], n_ctx=n_p + n_g + 8, n_batch=max(n_p, 32))
        self.prompt = prompt_with_tokens(self.q8.tokenizer, n_p)
        self.llama_ids, self.llama_seed = [], 0

    def set_threads(self, threads: int) -> None:
        self.threads = threads
        for m in (self.q8, self.q8_0, self.f32):
            m.threads = threads
        set_llama_threads(self.llm, threads)

    def runq(self, n_p, n_g):
        return run_c_rates(self.runq_exe, self.paths["q8"], self.tok_path, self.prompt, n_p, n_g,
                           self.threads)

    def warm_up(self) -> None:
        """One untimed repetition: pages in every file, starts every thread pool and sizes
        every buffer."""
        self.one_rep(0)

    def pecca(self, m, r: int):
        """(pp, tg) of pecca, after an untimed 4 + 2 token run (runq.c's timer, likewise,
        starts after its first forward). Without it the first prefill after this process sat
        idle while runq.c ran waits on sleeping OpenMP workers and cold caches: 2x to 200x
        slower on a 2-core VM."""
        time_model(m, min(self.n_p, 4), 2)
        return time_model(m, self.n_p, self.n_g, r)[:2]

    def llama(self, r: int):
        time_llama(self.llm, self.c.vocab_size, min(self.n_p, 4), 2, r)  # as in pecca()
        pp, tg, self.llama_ids = time_llama(self.llm, self.c.vocab_size, self.n_p, self.n_g, r)
        self.llama_seed = r
        return pp, tg

    def one_rep(self, r: int) -> dict:
        """(pp, tg) of every engine, in the alternating order of ENGINES."""
        out = {"pecca_q8": self.pecca(self.q8, r), "runq": self.runq(self.n_p, self.n_g)[:2],
               "pecca_q8_0": self.pecca(self.q8_0, r), "llama_cpp": self.llama(r),
               "pecca_f32": self.pecca(self.f32, r)}
        assert tuple(out) == ENGINES
        return out


def bench_threads(case: Case, threads: int, reps: int):
    """Alternating repetitions at one thread count; samples[engine] = [(pp, tg), ...]."""
    case.set_threads(threads)
    case.warm_up()
    samples = {e: [] for e in ENGINES}
    redone = kept_busy = 0
    for r in range(reps):
        for attempt in range(RETRIES + 1):
            before, t0 = cpu_seconds(), time.perf_counter()
            rep = case.one_rep(r)
            load = foreign_load(before, cpu_seconds(), time.perf_counter() - t0)
            log(f"  {case.name} threads={threads} rep {r + 1}/{reps}: " + " | ".join(
                f"{e} {pp:.1f}/{tg:.1f}" for e, (pp, tg) in rep.items())
                + f" (pp/tg tok/s) | other load {load:.2f} cores")
            if load <= FOREIGN_LIMIT and rep["runq"][1] > 0:
                break
            if attempt < RETRIES:
                redone += 1
                log("    machine busy: redoing this rep")
                time.sleep(2.0)
        else:
            kept_busy += 1  # still busy after all retries: kept, but flagged in the table
        for e in ENGINES:
            samples[e].append(rep[e])
    return samples, redone, kept_busy


def summarize(case: Case, threads: int, samples: dict, redone: int, kept_busy: int) -> dict:
    row = {"model": case.name, "threads": threads, "group_size": case.gs,
           "prompt_tokens": case.n_p, "gen_tokens": case.n_g, "reps": len(samples["runq"]),
           "reps_redone": redone, "reps_kept_busy": kept_busy, "engines": {}, "ratios": {}}
    fmt_of = {"pecca_q8": "q8", "runq": "q8", "pecca_q8_0": "q8_0", "llama_cpp": "q8_0",
              "pecca_f32": "f32"}
    for e, pairs in samples.items():
        pp, tg = [p for p, _ in pairs], [t for _, t in pairs]
        bpt = weight_bytes_per_token(case.c, fmt_of[e], case.gs)
        row["engines"][e] = {"pp": mean_std(pp), "tg": mean_std(tg), "pp_samples": pp,
                             "tg_samples": tg, "gb_s": statistics.mean(tg) * bpt / 1e9}
    for name, a, b in RATIOS:
        row["ratios"][name] = mean_std([x[1] / y[1] for x, y in zip(samples[a], samples[b])])
    return row


def bench_model(name: str, tok_path: Path, runq_exes, args):
    c = SHAPES[name]
    gs = group_size_for(c, args.group_size)
    log(f"{name}: writing random weights (fp32 v0, v2 gs{gs}, GGUF Q8_0)")
    paths = write_files(name, c, gs, tok_path, args)
    n_p = max(2, min(args.prompt_tokens, c.seq_len - 1))
    n_g = max(1, min(args.gen_tokens, c.seq_len - n_p))
    try:
        case = Case(name, c, gs, paths, tok_path, runq_exes, n_p, n_g)
        rows = []
        for nt in args.threads:
            samples, redone, busy = bench_threads(case, nt, args.reps)
            rows.append(summarize(case, nt, samples, redone, busy))
        check = checks(case)
        del case  # close the memory maps before the files go
    finally:
        if not args.keep:
            for p in paths.values():
                p.unlink(missing_ok=True)
    return rows, check


def checks(case: Case) -> dict:
    """Did the engines run the same model? The text of the exact runq.c build against pecca's
    greedy run on the v2 file on its portable path, which does runq.c's float arithmetic:
    int8 activations turn any last-bit difference (-Ofast's reassociated sums, FMA, SIMD
    sums) into other tokens within a few dozen steps on random weights. And llama.cpp's
    greedy ids against pecca's on the GGUF, last rep's prompt (informational: different
    arithmetic, f16 KV cache)."""
    from pecca import _kernels

    steps = case.n_p + case.n_g
    _, text = run_c(case.runq_exact, case.paths["q8"], case.tok_path, case.prompt, steps,
                    case.threads)
    before = os.environ.get("PECCA_SIMD")
    _kernels.set_simd_path("portable")
    try:
        agree, n_gen, bos = greedy_agreement(case.q8, case.q8.tokenizer.encode(case.prompt),
                                             steps, text)
    finally:
        _kernels.set_simd_path(before)
    ours = pecca_greedy(case.q8_0, case.n_p, case.n_g, case.llama_seed)
    return {"model": case.name, "runq_agree": agree, "runq_generated": n_gen,
            "pecca_picked_bos": bos,
            "llama_agree": leading_agreement(ours, case.llama_ids), "llama_generated": len(ours)}


# ---------------------------------------------------------------- output

def format_table(rows, checks_, bandwidth) -> str:
    cols = ["model", "thr", "engine     file", "pp tok/s", "tg tok/s", "GB/s", "tg ratios (paired)"]
    widths = [11, 3, 29, 15, 15, 6, 0]
    line = lambda cells: "  ".join(  # noqa: E731
        f"{c:<{w}}" if i in (0, 2, 6) else f"{c:>{w}}"
        for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    r0 = rows[0]
    out = [f"tok/s, mean ± std of {r0['reps']} alternating reps; pp{r0['prompt_tokens']} prefill, "
           f"tg{r0['gen_tokens']} greedy decode; random weights", line(cols), "-" * 120]
    ratio_at = {"pecca_q8": ["v2/runq.c", "v2/f32"], "pecca_q8_0": ["Q8_0/llama.cpp", "Q8_0/f32"]}
    for r in rows:
        for e in ENGINES:
            s = r["engines"][e]
            ratios = ", ".join(f"{k} {fmt(*r['ratios'][k], prec=2)}" for k in ratio_at.get(e, []))
            out.append(line([r["model"], str(r["threads"]), LABELS[e].format(gs=r["group_size"]),
                             fmt(*s["pp"]), fmt(*s["tg"]), f"{s['gb_s']:.1f}", ratios]))
        if r["reps_kept_busy"]:
            out.append(f"  ({r['reps_kept_busy']} reps of this case ran on a busy machine)")
        out.append("")
    out.append("GB/s = bytes of all layer matrices + classifier per token (int8 + scales for q8) "
               "x decode tok/s")
    out.append("memory read bandwidth (512 MiB f32 matvec, best of 5): " + ", ".join(
        f"{t} thread{'s' if t > 1 else ''} {gbs:.1f} GB/s" for t, gbs in bandwidth.items()))
    out.append("llama.cpp: llama-cpp-python " + llama_cpp_version() + ", a wheel built for AVX2 "
               "(no AVX-512 / VNNI paths), f16 KV cache; pecca: " + pecca_simd())
    redone = sum(r["reps_redone"] for r in rows)
    if redone:
        out.append(f"{redone} reps were redone because other processes used the CPU")
    for k in checks_:
        out.append(f"greedy check {k['model']}: runq.c (gcc -O3) prints the text of pecca "
                   f"(portable path) on the v2 file for "
                   f"{k['runq_agree']}/{k['runq_generated']} generated tokens"
                   + ("; pecca picked BOS (runq.c stopped early)" if k["pecca_picked_bos"] else "")
                   + f"; llama.cpp's first {k['llama_agree']}/{k['llama_generated']} greedy ids "
                   "equal pecca's on the GGUF (informational)")
    return "\n".join(out)


def llama_cpp_version() -> str:
    import llama_cpp

    return llama_cpp.__version__


def pecca_simd() -> str:
    from pecca._kernels import runtime

    return f"{runtime.simd_path()} f32 kernels, {runtime.int8_path()} int8 kernels, f32 KV cache"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(SHAPES))
    p.add_argument("--threads", default="1,2")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--group-size", type=int, default=64, help="llama2.c v2 group (backs off)")
    p.add_argument("--seed", type=int, default=0, help="random-weight seed")
    p.add_argument("--out-dir", type=Path, default=REPO / "bench" / "out")
    p.add_argument("--keep", action="store_true", help="keep the model files in --out-dir")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = p.parse_args(argv)
    args.models = [s for s in args.models.split(",") if s]
    args.threads = [int(s) for s in args.threads.split(",") if s]
    unknown = [s for s in args.models if s not in SHAPES]
    if unknown:
        p.error(f"unknown model {unknown}; known: {', '.join(SHAPES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    shared = shared_dir()
    why = missing_prerequisites(shared)
    if why:
        print(f"compare_q8: skipped: {why}")
        return 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tok_path = shared / "models/llama2c/tokenizer.bin"
    src = shared / "reference/llama2c-src/runq.c"
    runq_exes = build_runq(src, args.out_dir), build_runq(src, args.out_dir, exact=True)
    t0 = time.perf_counter()
    rows, checks_ = [], []
    for name in args.models:
        r, k = bench_model(name, tok_path, runq_exes, args)
        rows += r
        checks_.append(k)
    bandwidth = {t: read_bandwidth(t) for t in args.threads}
    log(f"done in {time.perf_counter() - t0:.0f} s")
    result = {"pecca": pecca.__version__, "llama_cpp": llama_cpp_version(), "rows": rows,
              "greedy_checks": checks_, "read_bandwidth_gb_s": bandwidth}
    (args.out_dir / "compare_q8.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1) if args.json else format_table(rows, checks_, bandwidth))
    return 0


if __name__ == "__main__":
    sys.exit(main())
