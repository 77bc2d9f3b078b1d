"""Threads under a busy neighbour: pecca's prefill and decode at 1 and 2 threads, with the
machine quiet and with one other process spinning on a core.

On these 2-core machines every 2-thread OpenMP/ggml engine measured (llama2.c, llama.cpp,
OpenBLAS) became slower than 1 thread, some 10x, as soon as another process used the second
core: threads that finish their share spin at the barrier for their partner, whose core the
neighbour now shares. This script shows whether pecca degrades gracefully (2 threads no slower
than 1) and compares OpenMP wait settings, each in a fresh process (libgomp reads them once).

Usage: python bench/contention.py MODEL [--prompt-tokens 64] [--gen-tokens 32]
       [--env "OMP_WAIT_POLICY=active" --env "GOMP_SPINCOUNT=300000"]
Every configuration runs `--reps` times (alternating); the table gives the median.
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

WORKER = r"""
import json, sys
import pecca
from pecca.bench import time_model
path, n_p, n_g = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
m = pecca.load(path, threads=1)
out = {}
for t in (1, 2):
    m.threads = t
    time_model(m, 4, 2)
    pp, tg = time_model(m, n_p, n_g)[:2]
    out[t] = (pp, tg)
print(json.dumps(out))
"""


def run_worker(model, n_p, n_g, env_extra, busy: bool):
    env = dict(os.environ, **env_extra)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        if hog:
            time.sleep(0.3)
        res = subprocess.run([sys.executable, "-c", WORKER, str(model), str(n_p), str(n_g)],
                             env=env, check=True, capture_output=True, text=True, cwd=REPO)
    finally:
        if hog:
            hog.kill()
            hog.wait()
    return {int(k): v for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--env", action="append", default=[],
                   help="NAME=VALUE settings to compare with pecca's defaults (repeatable; "
                        "several in one flag separated by spaces)")
    args = p.parse_args(argv)
    settings = [("pecca defaults", {})]
    for spec in args.env:
        settings.append((spec, dict(kv.split("=", 1) for kv in spec.split())))
    results = {}
    for rep in range(args.reps):
        for name, env in settings:
            for busy in (False, True):
                r = run_worker(args.model, args.prompt_tokens, args.gen_tokens, env, busy)
                results.setdefault((name, busy), []).append(r)
                print(f"rep {rep + 1}: {name}, {'busy' if busy else 'quiet'}: "
                      + ", ".join(f"{t} thr pp {v[0]:.1f} tg {v[1]:.1f}" for t, v in r.items()),
                      file=sys.stderr)
    print(f"{Path(args.model).name}: median of {args.reps}; pp{args.prompt_tokens} / tg{args.gen_tokens} tok/s")
    print(f"{'setting':<34} {'neighbour':<10} {'pp 1 thr':>9} {'pp 2 thr':>9} {'tg 1 thr':>9} "
          f"{'tg 2 thr':>9} {'tg 2/1':>7}")
    for (name, busy), rs in results.items():
        med = {t: [statistics.median(r[t][i] for r in rs) for i in (0, 1)] for t in (1, 2)}
        print(f"{name:<34} {'busy' if busy else 'quiet':<10} {med[1][0]:>9.1f} {med[2][0]:>9.1f} "
              f"{med[1][1]:>9.1f} {med[2][1]:>9.1f} {med[2][1] / med[1][1]:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
