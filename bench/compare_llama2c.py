"""pecca against llama2.c's run.c on random-weight llama2.c (version 0) models.

For each model shape and thread count, runs alternate (pecca, run.c, pecca, run.c, ...) so
that drift of the machine (clock, other load) hits both engines alike. Both engines do the
same work: P prompt positions then G greedy decode positions, fp32, one token at a time.

run.c has no batched prefill and only prints one figure, "achieved tok/s", over positions
1 .. steps-1 (the first forward is left out of its timer). So it runs twice per repetition:
  short: steps = P      -> run.c pp tok/s (positions 1 .. P-1)
  long:  steps = P + G  -> run.c tg tok/s = G / (time_long - time_short), i.e. exactly the
                           positions P .. P+G-1 that pecca's decode figure covers.
Timings are wall clock in ms inside run.c; the short run at the smallest model is ~30 ms,
so expect ~3% quantisation there.

run.c stops when it samples BOS (id 1). With random weights greedy decoding could hit it,
so the BOS embedding row (which is also the shared classifier row) is scaled down: its logit
stays near 0 while the best of 32000 random logits is far above it. As a check, pecca's
greedy continuation of run.c's prompt is compared with run.c's printed text.

The machine may be shared. Each repetition reads /proc/stat around itself; if other
processes used more than 0.1 core on average it is redone (up to 3 times), since with as
many threads as cores a single stray process stalls OpenMP's barriers for both engines.

Usage: python bench/compare_llama2c.py [--models stories15M,stories110M] [--threads 1,2]
       [--reps 3] [--prompt-tokens 32] [--gen-tokens 128] [--out-dir bench/out] [--json]
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `export` is a top-level package of the repo, not installed

import numpy as np  # noqa: E402

import pecca  # noqa: E402
from export.llama2c import STORIES_SHAPES, random_weights, write_llama2c  # noqa: E402
from pecca.bench import time_model  # noqa: E402
from pecca.config import ModelConfig  # noqa: E402
from pecca.threads import machine_busy_seconds  # noqa: E402

BOS = 1
BOS_ROW_SCALE = 1e-3
FOREIGN_LIMIT = 0.1  # other processes' CPU, in cores on average, above which a rep is redone
RETRIES = 3
PROMPT_WORDS = ("one two three four five six seven eight nine ten red blue green cat dog "
                "sun moon tree house river").split()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- setup

def shared_dir() -> Path:
    return Path(os.environ.get("PECCA_SHARED") or REPO.parent / "shared")


def missing_prerequisites(shared: Path) -> str:
    """Why the comparison cannot run here ('' when it can)."""
    if shutil.which("gcc") is None:
        return "gcc not found"
    for p in (shared / "models/llama2c/tokenizer.bin", shared / "reference/llama2c-src/run.c"):
        if not p.is_file():
            return f"{p} not found (set PECCA_SHARED to the shared data directory)"
    return ""


def build_run_c(src: Path, out_dir: Path) -> Path:
    """Compile run.c as its README recommends; the source stays where it is (read-only)."""
    exe = out_dir / "run"
    cmd = ["gcc", "-Ofast", "-fopenmp", "-march=native", str(src), "-lm", "-o", str(exe)]
    subprocess.run(cmd, check=True)
    return exe


def bos_safe_weights(c: ModelConfig, seed: int):
    """random_weights, with the BOS row of the (shared) embedding scaled down so greedy
    decoding never picks BOS and run.c never stops early."""
    get = random_weights(c, seed)

    def patched(name: str) -> np.ndarray:
        arr = get(name)
        if name == "tok_embeddings":
            arr[BOS] *= BOS_ROW_SCALE
        return arr

    return patched


def write_model(name: str, out_dir: Path, seed: int) -> Path:
    # Rewritten every run (~2 s for 110M) so it never goes stale against the writer.
    path = out_dir / f"{name}-random-s{seed}.bin"
    c = STORIES_SHAPES[name]
    write_llama2c(str(path), c, bos_safe_weights(c, seed), version=0, shared=True)
    return path


def prompt_with_tokens(tok, n_tokens: int) -> str:
    """A text that run.c's encoder turns into exactly n_tokens ids (BOS included)."""
    words = []
    for i in range(4 * n_tokens):
        words.append(PROMPT_WORDS[i % len(PROMPT_WORDS)])
        n = len(tok.encode(" ".join(words), add_bos=True))
        if n == n_tokens:
            return " ".join(words)
        if n > n_tokens:
            words.pop()
    raise RuntimeError(f"could not build a prompt of {n_tokens} tokens")


def weight_bytes_per_token(c: ModelConfig) -> int:
    """fp32 bytes a decode step streams: every layer matrix plus the classifier (the
    embedding lookup reads one row, the norms are negligible)."""
    d, h, kv = c.dim, c.hidden_dim, c.kv_dim
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * h  # wq wo, wk wv, w1 w2 w3
    return 4 * (c.n_layers * per_layer + c.vocab_size * d)


# ---------------------------------------------------------------- run.c

def run_c(exe: Path, model: Path, tokenizer: Path, prompt: str, steps: int, threads: int):
    """(achieved tok/s, stdout bytes) of one run.c greedy run."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [str(exe), str(model), "-z", str(tokenizer), "-t", "0", "-n", str(steps), "-i", prompt]
    p = subprocess.run(cmd, env=env, capture_output=True, check=True)
    m = re.search(rb"achieved tok/s: ([0-9.]+)", p.stderr)
    if not m:
        raise RuntimeError(f"run.c printed no tok/s: {p.stderr.decode(errors='replace')}")
    return float(m.group(1)), p.stdout


def run_c_rates(exe, model, tokenizer, prompt, n_p, n_g, threads):
    """(pp tok/s, tg tok/s, long-run achieved tok/s, long-run stdout) from a short and a
    long run; tg is the difference of the two, i.e. positions n_p .. n_p+n_g-1 only."""
    pp, _ = run_c(exe, model, tokenizer, prompt, n_p, threads)
    whole, out = run_c(exe, model, tokenizer, prompt, n_p + n_g, threads)
    t_short = (n_p - 1) / pp  # seconds over positions 1 .. n_p-1
    t_long = (n_p + n_g - 1) / whole  # seconds over positions 1 .. n_p+n_g-1
    tg = n_g / (t_long - t_short) if t_long > t_short else float("nan")  # nan: a disturbed run
    return pp, tg, whole, out


# ---------------------------------------------------------------- cross-check

def run_c_pieces(tok, ids) -> bytes:
    """What run.c prints for each token of `ids` after the first (its decode(prev, token)),
    a single unprintable byte dropped as its safe_printf does."""
    out, prev = [], ids[0]
    for t in ids[1:]:
        b = tok.token_bytes(prev, t)
        if len(b) == 1 and not (0x20 <= b[0] < 0x7F or b[0] in b"\t\n\v\f\r"):
            b = b""
        out.append(b)
        prev = t
    return out


def greedy_agreement(m, prompt_ids, steps: int, c_stdout: bytes):
    """How many generated tokens of pecca's greedy run print the same as run.c's output,
    and whether pecca ever picked BOS. Positions as in run.c: 0 .. steps-1."""
    ids = list(prompt_ids)
    for pos in range(steps):
        logits = m.model.forward(ids[pos], pos)
        if pos + 1 >= len(ids):
            ids.append(int(np.argmax(logits)))
    pieces = run_c_pieces(m.tokenizer, ids)
    printed = b"".join(pieces[: len(prompt_ids) - 1])
    agree = 0
    for piece in pieces[len(prompt_ids) - 1:]:
        if not c_stdout.startswith(printed + piece):
            break
        printed += piece
        agree += 1
    return agree, len(ids) - len(prompt_ids), BOS in ids[len(prompt_ids):]


# ---------------------------------------------------------------- measurement

def cpu_seconds():
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its waited-for
    children), or None off Linux. Busy counts steal: the hypervisor's other guests."""
    busy = machine_busy_seconds()  # the thread governor's own reading
    if busy is None:
        return None
    t = os.times()
    return busy, t.user + t.system + t.children_user + t.children_system


def foreign_load(before, after, wall: float) -> float:
    """Average cores used by other processes between two cpu_seconds() readings. With 2
    cores and 2 threads, any of it stalls OpenMP's barriers, so such a rep is redone."""
    if before is None or after is None:
        return 0.0
    return max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / wall


def mean_std(xs):
    return statistics.mean(xs), statistics.pstdev(xs)


def bench_case(m, exe, model_path, tok_path, prompt, n_p, n_g, threads, reps):
    """Alternating repetitions at one thread count; returns a dict of raw samples."""
    m.threads = threads
    time_model(m, min(n_p, 8), min(n_g, 8))  # warm-up: page in weights, start the pool
    run_c(exe, model_path, tok_path, prompt, min(n_p + n_g, 16), threads)
    s = {k: [] for k in ("pecca_pp", "pecca_tg", "c_pp", "c_tg", "c_all")}
    redone, kept_busy, c_out = 0, 0, b""
    for r in range(reps):
        for attempt in range(RETRIES + 1):
            before, t0 = cpu_seconds(), time.perf_counter()
            pp, tg, got_p, got_g = time_model(m, n_p, n_g, r)
            c_pp, c_tg, c_all, c_out = run_c_rates(exe, model_path, tok_path, prompt, n_p, n_g,
                                                   threads)
            load = foreign_load(before, cpu_seconds(), time.perf_counter() - t0)
            log(f"  threads={threads} rep {r + 1}/{reps}: pecca pp {pp:.1f} tg {tg:.1f} | "
                f"run.c pp {c_pp:.1f} tg {c_tg:.1f} (all {c_all:.1f}) tok/s | "
                f"other load {load:.2f} cores")
            if load <= FOREIGN_LIMIT and c_tg > 0:
                break
            if attempt < RETRIES:
                redone += 1
                log("    machine busy: redoing this rep")
                time.sleep(2.0)
        else:
            kept_busy += 1  # still busy after all retries: kept, but flagged in the table
        assert (got_p, got_g) == (n_p, n_g), "pecca clamped the positions"
        for k, v in zip(s, (pp, tg, c_pp, c_tg, c_all)):
            s[k].append(v)
    return s, c_out, redone, kept_busy


def summarize(name, c, threads, n_p, n_g, s, redone, kept_busy):
    bpt = weight_bytes_per_token(c)
    ratios = [a / b for a, b in zip(s["pecca_tg"], s["c_tg"])]  # paired by repetition
    row = {"model": name, "threads": threads, "prompt_tokens": n_p, "gen_tokens": n_g,
           "reps": len(ratios), "weight_bytes_per_token": bpt, "samples": s,
           "reps_redone": redone, "reps_kept_busy": kept_busy}
    for k, xs in s.items():
        row[k], row[k + "_std"] = mean_std(xs)
    row["tg_ratio"], row["tg_ratio_std"] = mean_std(ratios)
    row["pecca_gb_s"] = row["pecca_tg"] * bpt / 1e9
    row["c_gb_s"] = row["c_tg"] * bpt / 1e9
    return row


def bench_model(name, exe, tok_path, args):
    c = STORIES_SHAPES[name]
    log(f"{name}: writing random weights")
    path = write_model(name, args.out_dir, args.seed)
    refresh_page_cache(path)  # large folios whatever brought the file in (compare.py's docstring)
    m = pecca.load(str(path), threads=1, tokenizer=str(tok_path))
    n_p = max(2, min(args.prompt_tokens, c.seq_len - 1))
    n_g = max(1, min(args.gen_tokens, c.seq_len - n_p))
    prompt = prompt_with_tokens(m.tokenizer, n_p)
    rows, c_out = [], b""
    for nt in args.threads:
        s, c_out, redone, busy = bench_case(m, exe, path, tok_path, prompt, n_p, n_g, nt,
                                            args.reps)
        rows.append(summarize(name, c, nt, n_p, n_g, s, redone, busy))
    agree, n_gen, bos = greedy_agreement(m, m.tokenizer.encode(prompt), n_p + n_g, c_out)
    check = {"model": name, "agree": agree, "generated": n_gen, "pecca_picked_bos": bos}
    return rows, check


# ---------------------------------------------------------------- output

def refresh_page_cache(path) -> None:
    """Drop the file's cached pages (those no process maps) and read it front to back: readahead
    then brings it in as large folios, the same for every engine and every session."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        while os.read(fd, 16 << 20):
            pass
    finally:
        os.close(fd)


def read_bandwidth(threads, mib: int = 512, reps: int = 5) -> float:
    """STREAM-style read bandwidth, GB/s: pecca's f32 matvec over a matrix far larger than
    any cache (the same access pattern as a decode step). The ceiling for f32 decode."""
    from pecca._kernels import f32

    n = 4096
    w = np.ones((mib * 2**20 // (4 * n), n), np.float32)
    x = np.ones(n, np.float32)
    out = np.empty(w.shape[0], np.float32)
    f32.matvec(w, x, out, threads)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f32.matvec(w, x, out, threads)
        best = min(best, time.perf_counter() - t)
    return w.nbytes / best / 1e9


def fmt(mean, std, prec=1):
    return f"{mean:.{prec}f} ± {std:.{prec}f}"


def format_table(rows, checks, n_p, n_g, reps, bandwidth=None) -> str:
    cols = ["model", "thr", "pecca pp", "pecca tg", "run.c pp", "run.c tg", "tg pecca/run.c",
            "pecca GB/s", "run.c GB/s"]
    widths = [12, 3, 15, 15, 15, 15, 15, 10, 10]
    line = lambda cells: "  ".join(  # noqa: E731
        f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths)))
    out = [f"tok/s, mean ± std of {reps} alternating reps; pp{n_p} = {n_p} prompt positions, "
           f"tg{n_g} = {n_g} decode positions; fp32 random weights", line(cols),
           "-" * (sum(widths) + 2 * (len(widths) - 1))]
    for r in rows:
        rates = [fmt(r[k], r[k + "_std"]) for k in ("pecca_pp", "pecca_tg", "c_pp", "c_tg")]
        out.append(line([r["model"], str(r["threads"]), *rates,
                         fmt(r["tg_ratio"], r["tg_ratio_std"], 3),
                         f"{r['pecca_gb_s']:.1f}", f"{r['c_gb_s']:.1f}"])
                   + (f"  ({r['reps_kept_busy']} reps on a busy machine)"
                      if r["reps_kept_busy"] else ""))
    out.append("GB/s = fp32 bytes of all layer matrices + classifier per token x decode tok/s")
    if bandwidth:
        out.append("memory read bandwidth (512 MiB matvec, best of 5): " + ", ".join(
            f"{t} thread{'s' if t > 1 else ''} {gbs:.1f} GB/s" for t, gbs in bandwidth.items()))
    redone = sum(r["reps_redone"] for r in rows)
    if redone:
        out.append(f"{redone} reps were redone because other processes used the CPU")
    for k in checks:
        out.append(f"greedy check {k['model']}: pecca and run.c print the same text for "
                   f"{k['agree']}/{k['generated']} generated tokens"
                   + ("; pecca picked BOS (run.c stopped early)" if k["pecca_picked_bos"] else ""))
    return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="stories15M,stories110M")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0, help="random-weight seed")
    p.add_argument("--out-dir", type=Path, default=REPO / "bench" / "out")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = p.parse_args(argv)
    args.models = [s for s in args.models.split(",") if s]
    args.threads = [int(s) for s in args.threads.split(",") if s]
    unknown = [s for s in args.models if s not in STORIES_SHAPES]
    if unknown:
        p.error(f"unknown model {unknown}; known: {', '.join(STORIES_SHAPES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    shared = shared_dir()
    why = missing_prerequisites(shared)
    if why:
        print(f"compare_llama2c: skipped: {why}")
        return 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tok_path = shared / "models/llama2c/tokenizer.bin"
    exe = build_run_c(shared / "reference/llama2c-src/run.c", args.out_dir)
    t0 = time.perf_counter()
    rows, checks = [], []
    for name in args.models:
        r, k = bench_model(name, exe, tok_path, args)
        rows += r
        checks.append(k)
    bandwidth = {t: read_bandwidth(t) for t in args.threads}
    log(f"done in {time.perf_counter() - t0:.0f} s")
    result = {"pecca": pecca.__version__, "rows": rows, "greedy_checks": checks,
              "read_bandwidth_gb_s": bandwidth}
    (args.out_dir / "compare_llama2c.json").write_text(json.dumps(result, indent=1))
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        n_p, n_g = (rows[0]["prompt_tokens"], rows[0]["gen_tokens"]) if rows else (0, 0)
        print(format_table(rows, checks, n_p, n_g, args.reps, bandwidth))
    return 0


if __name__ == "__main__":
    sys.exit(main())
