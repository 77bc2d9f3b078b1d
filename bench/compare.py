"""pecca against llama.cpp on the same model files, every precision, alternating runs.

Cases (--cases, comma-separated):
  smollm2     the real SmolLM2-135M-Instruct: llama.cpp's Q4_1 GGUF as shipped (pecca and
              llama.cpp), pecca's export of the GPTQModel checkpoint of it (4-bit, group 64,
              act-order; ../shared/models/gptq), and pecca's f32, q8_0 and q4_0 re-exports of the
              Q4_1 file (pecca and llama.cpp). Every 4-bit file has a Q8_0 embedding and classifier.
  7B-layers   random weights with Llama-2-7B's layer shapes (dim 4096, hidden 11008, 32 heads,
              vocab 32000), --layers of them: a GPTQ checkpoint (group 128, act-order, written by
              bench/make_gptq_checkpoint.py) exported by pecca (Q8_0 embedding and classifier, as
              llama.cpp's Q4_0 files here), and re-exports of that file's dequantized weights as
              Q4_0, Q8_0, F16 and F32 (pecca and llama.cpp on each)
  stories15M  random weights of stories15M's shape, as F32, F16, Q8_0 and Q4_0

Every engine does the same work per run: P prompt positions in one batch, then G greedy decode
positions (pecca.bench.time_model; for llama.cpp: eval(prompt) then eval of one token at a time,
compare_q8.time_llama). Each timed run follows an untimed 4 + 2 token run of the same engine,
and within a repetition the engines run in turn, so drift of the machine hits all alike. A
repetition during which other processes used more than 0.1 core is redone (up to 3 times).

GB/s = bytes the decode streams per token (every layer matrix and the classifier, as pecca
reads the file: Weights.nbytes) x decode tok/s; the same bytes are counted for llama.cpp on
the same file. The STREAM-style read bandwidth (a 512 MiB f32 matvec, best of 2) is measured
just before and just after every engine's run: the ceiling for every decode here. This VM's
bandwidth moves 10-40% from minute to minute (at 2 threads it flips between ~45 and ~80 GB/s),
so "of BW" is the mean of each run's decode GB/s over that run's own bandwidth (the higher of
its two readings), and a rep in which any engine's two readings differ by more than 15% is
redone like a loaded one (up to 3 times): the machine changed state under that engine.

Before a case's engines open its files, each file's cached pages are dropped and the file is
read front to back (refresh_page_cache), so that both engines stream it from large page-cache
folios whatever brought its pages in before: over pages that came in by mmap faults (small
folios) the same GPTQ file decoded 5-8% slower at 1 thread.

pecca runs with --kv-type's KV cache, f16 by default: llama.cpp's default, so both engines
read the same cache bytes at every token (f32: pecca's own default, llama2.c's arithmetic).

Files go to --out-dir (default bench/out/, gitignored); 7B-layers needs ~10 GB of disk.
Usage: python bench/compare.py [--cases smollm2,7B-layers] [--threads 1,2] [--reps 3]
       [--prompt-tokens 128] [--gen-tokens 32] [--layers 4] [--kv-type f16] [--json]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `export` is a top-level package of the repo, not installed
sys.path.insert(0, str(REPO / "bench"))

import pecca  # noqa: E402
from compare_llama2c import (cpu_seconds, fmt, foreign_load, log, mean_std,  # noqa: E402
                             read_bandwidth, refresh_page_cache, shared_dir)
from compare_q8 import load_llama, set_llama_threads, time_llama  # noqa: E402
from export import export  # noqa: E402
from pecca.bench import time_model  # noqa: E402

FOREIGN_LIMIT = 0.1
RETRIES = 3
BANDWIDTH_MOVED = 0.15  # a rep in which an engine's read bandwidth moved more than this is redone


# ---------------------------------------------------------------- files

def smollm2_files(out: Path, args) -> list:
    """(label, engine, path) of the smollm2 case."""
    q4_1 = Path(subprocess.run(["bash", str(shared_dir() / "models/gguf/fetch-smollm2.sh")],
                               check=True, capture_output=True, text=True).stdout.strip())
    gptq_dir = shared_dir() / "models/gptq/SmolLM2-135M-Instruct-gptq-4bit-g64-actorder"
    files = {"gptq": out / "smollm2-gptq-g64.gguf", "q4_0": out / "smollm2-q4_0.gguf",
             "q8_0": out / "smollm2-q8_0.gguf", "f32": out / "smollm2-f32.gguf"}
    if not files["gptq"].exists():  # Q8_0 embedding and classifier, as in the Q4_1 file
        export(str(gptq_dir), str(files["gptq"]), "q8_0")
    for dtype in ("q4_0", "q8_0", "f32"):
        if not files[dtype].exists():
            export(str(q4_1), str(files[dtype]), dtype)
    return [("GPTQ g64 act-order", "pecca", files["gptq"]), ("Q4_1 (llama.cpp's)", "pecca", q4_1),
            ("Q4_1 (llama.cpp's)", "llama.cpp", q4_1), ("Q4_0", "pecca", files["q4_0"]),
            ("Q4_0", "llama.cpp", files["q4_0"]), ("Q8_0", "pecca", files["q8_0"]),
            ("Q8_0", "llama.cpp", files["q8_0"]), ("F32", "pecca", files["f32"]),
            ("F32", "llama.cpp", files["f32"])]


def seven_b_files(out: Path, args) -> list:
    ckpt = out / f"7B-layers{args.layers}-gptq"
    gptq = out / f"7B-layers{args.layers}-gptq.gguf"
    if not gptq.exists():
        subprocess.run([sys.executable, str(REPO / "bench/make_gptq_checkpoint.py"), str(ckpt),
                        "--preset", "7b", "--layers", str(args.layers), "--group-size", "128"],
                       check=True)
        export(str(ckpt), str(gptq), "q8_0")  # Q8_0 embedding and classifier, as in Q4_0 files
    rows = [("GPTQ g128 act-order", "pecca", gptq)]
    for dtype in ("q4_0", "q8_0", "f16", "f32"):
        path = out / f"7B-layers{args.layers}-{dtype}.gguf"
        if not path.exists():
            export(str(gptq), str(path), dtype)  # the GPTQ weights, dequantized
        rows += [(dtype.upper(), "pecca", path), (dtype.upper(), "llama.cpp", path)]
    return rows


def stories15m_files(out: Path, args) -> list:
    from export.gguf import write_gguf
    from export.llama2c import Llama2cSource, STORIES_SHAPES, write_llama2c
    from compare_llama2c import bos_safe_weights

    c = STORIES_SHAPES["stories15M"]
    bin_path = out / "stories15M-random.bin"
    if not bin_path.exists():
        write_llama2c(str(bin_path), c, bos_safe_weights(c, 0), version=0, shared=True)
    tok = shared_dir() / "models/llama2c/tokenizer.bin"
    rows = []
    for dtype in ("q4_0", "q8_0", "f16", "f32"):
        path = out / f"stories15M-random-{dtype}.gguf"
        if not path.exists():
            write_gguf(str(path), Llama2cSource(str(bin_path), str(tok)), dtype)
        rows += [(dtype.upper(), "pecca", path), (dtype.upper(), "llama.cpp", path)]
    return rows


CASES = {"smollm2": smollm2_files, "7B-layers": seven_b_files, "stories15M": stories15m_files}


# ---------------------------------------------------------------- engines

class Engine:
    """One (engine, file): pecca.load or llama_cpp.Llama, timed the same way."""

    def __init__(self, label, kind, path, n_p, n_g, kv_type="f16"):
        self.label, self.kind, self.path, self.n_p, self.n_g = label, kind, path, n_p, n_g
        self.m = pecca.load(str(path), threads=1, kv_type=kv_type)  # also for llama.cpp: the byte count
        self.bytes_per_token = self.m.loaded.weights.nbytes
        self.vocab = self.m.config.vocab_size
        self.llm = load_llama(path, n_ctx=n_p + n_g + 16, n_batch=max(n_p, 32)) if kind == "llama.cpp" else None

    def set_threads(self, threads):
        if self.llm is None:
            self.m.threads = threads
        else:
            set_llama_threads(self.llm, threads)

    def run(self, r):
        if self.llm is None:
            time_model(self.m, min(self.n_p, 4), 2)
            return time_model(self.m, self.n_p, self.n_g, r)[:2]
        time_llama(self.llm, self.vocab, min(self.n_p, 4), 2, r)
        return time_llama(self.llm, self.vocab, self.n_p, self.n_g, r)[:2]


def bench_threads(case, engines, threads, reps):
    for e in engines:
        e.set_threads(threads)
        e.run(0)  # warm: page in, start thread pools
    samples = [[] for _ in engines]
    # the read bandwidth just before and just after each engine's run: the machine's drifts by
    # 10-40% within a minute, so each decode is paired with its own readings
    bandwidth = [[] for _ in engines]
    redone = 0
    for r in range(reps):
        for attempt in range(RETRIES + 1):
            before, t0 = cpu_seconds(), time.perf_counter()
            rep, bws = [], []
            for e in engines:
                bw0 = read_bandwidth(threads, reps=2)
                rep.append(e.run(r))
                bws.append((bw0, read_bandwidth(threads, reps=2)))
            load = foreign_load(before, cpu_seconds(), time.perf_counter() - t0)
            moved = [abs(b1 - b0) > BANDWIDTH_MOVED * max(b0, b1) for b0, b1 in bws]
            log(f"  {case} threads={threads} rep {r + 1}/{reps}: " + " | ".join(
                f"{e.kind} {e.label} {tg:.1f} ({b0:.0f}->{b1:.0f} GB/s)"
                for e, (_, tg), (b0, b1) in zip(engines, rep, bws))
                + f" (tg tok/s, read bandwidth) | other load {load:.2f} cores")
            if (load <= FOREIGN_LIMIT and not any(moved)) or attempt == RETRIES:
                break
            redone += 1
            time.sleep(2.0)
        for s, x, b, bw in zip(samples, rep, bandwidth, bws):
            s.append(x)
            b.append(max(bw))
    return samples, bandwidth, redone


def summarize(case, engines, threads, samples, redone, bandwidth):
    """One row per engine; "of_bandwidth" pairs each rep's decode GB/s with the read bandwidth
    measured around that engine's run in that rep (the higher of the two readings)."""
    rows = []
    for e, s, bw in zip(engines, samples, bandwidth):
        pp, tg = [p for p, _ in s], [t for _, t in s]
        gbs = statistics.mean(tg) * e.bytes_per_token / 1e9
        rows.append({"case": case, "threads": threads, "label": e.label, "engine": e.kind,
                     "file": str(e.path), "bytes_per_token": e.bytes_per_token,
                     "pp": mean_std(pp), "tg": mean_std(tg), "gb_s": gbs,
                     "of_bandwidth": mean_std([t * e.bytes_per_token / 1e9 / b
                                               for t, b in zip(tg, bw)]),
                     "bandwidth_gb_s": mean_std(bw), "reps_redone": redone,
                     "pecca_kernels": kernel_paths()})
    # paired ratios: each pecca row against llama.cpp on the same file, and against llama.cpp's
    # first row of the case (e.g. GPTQ against llama.cpp's Q4_0)
    cpp = [(e, s) for e, s in zip(engines, samples) if e.kind == "llama.cpp"]
    for row, e, s in zip(rows, engines, samples):
        if e.kind != "pecca":
            continue
        for ce, cs in cpp:
            if ce.path == e.path or ce is cpp[0][0]:
                key = "vs llama.cpp same file" if ce.path == e.path else f"vs llama.cpp {ce.label}"
                row[key] = mean_std([a[1] / b[1] for a, b in zip(s, cs)])
    return rows


def format_table(rows, n_p, n_g, reps, kv_type="f16") -> str:
    out = [f"tok/s, mean ± std of {reps} alternating reps; pp{n_p} prefill, tg{n_g} greedy decode",
           f"{'case':<10} {'thr':>3}  {'engine':<9} {'weights':<20} {'pp tok/s':>16} {'tg tok/s':>14} "
           f"{'GB/s':>6} {'of BW':>10}  tg ratios (paired)", "-" * 134]
    for r in rows:
        ratios = ", ".join(f"{k} {fmt(*v, prec=2)}" for k, v in r.items() if k.startswith("vs "))
        out.append(f"{r['case']:<10} {r['threads']:>3}  {r['engine']:<9} {r['label']:<20} "
                   f"{fmt(*r['pp']):>16} {fmt(*r['tg']):>14} {r['gb_s']:>6.1f} "
                   f"{100 * r['of_bandwidth'][0]:>4.0f} ± {100 * r['of_bandwidth'][1]:>2.0f}%  {ratios}")
    seen = {}
    for r in rows:
        seen.setdefault((r["case"], r["threads"]), []).append(r["bandwidth_gb_s"][0])
    out.append("read bandwidth (512 MiB f32 matvec, best of 2, just before and just after each "
               "engine's run; 'of BW' pairs each decode with the higher of its two), range of the "
               "engines' means: " + ", ".join(
                   f"{c} {t} thr {min(b):.1f}-{max(b):.1f} GB/s" for (c, t), b in seen.items()))
    import llama_cpp

    paths = rows[0].get("pecca_kernels", kernel_paths()) if rows else kernel_paths()
    out.append(f"llama-cpp-python {llama_cpp.__version__} (prebuilt wheel, f16 KV cache); pecca "
               f"{pecca.__version__}: {paths}, {kv_type} KV cache")
    return "\n".join(out)


def kernel_paths() -> str:
    """The code pecca's kernels run in this process (PECCA_SIMD may force a lower path)."""
    from pecca._kernels import runtime

    return f"{runtime.simd_path()} f32 kernels, {runtime.int8_path()} int8 kernels"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="smollm2,7B-layers")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--layers", type=int, default=4, help="7B-layers: how many layers")
    p.add_argument("--kv-type", default="f16", choices=["f16", "f32"], help="pecca's KV cache")
    p.add_argument("--out-dir", type=Path, default=REPO / "bench" / "out")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    args.threads = [int(t) for t in args.threads.split(",") if t]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        p.error(f"unknown case {unknown}; known: {', '.join(CASES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("compare: skipped: llama_cpp (llama-cpp-python) is not installed")
        return 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in args.cases:
        log(f"{case}: preparing files")
        files = CASES[case](args.out_dir, args)
        os.sync()
        for path in sorted({str(f[2]) for f in files}):
            refresh_page_cache(path)
        engines = [Engine(*f, args.prompt_tokens, args.gen_tokens, args.kv_type) for f in files]
        for t in args.threads:
            samples, bandwidth, redone = bench_threads(case, engines, t, args.reps)
            rows += summarize(case, engines, t, samples, redone, bandwidth)
        del engines
    result = {"rows": rows, "pecca_kv_type": args.kv_type}
    (args.out_dir / "compare.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2) if args.json else
          format_table(rows, args.prompt_tokens, args.gen_tokens, args.reps, args.kv_type))
    return 0


if __name__ == "__main__":
    sys.exit(main())
