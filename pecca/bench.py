"""Speed measurement, in the spirit of llama-bench: prefill (pp) and decode (tg) tok/s.

Prefill feeds `prompt_tokens` fixed pseudo-random tokens at positions 0..N-1 (in batches,
as `pecca generate` does); decode then
generates `gen_tokens` greedily. Each (threads) case is repeated and reported as mean and
standard deviation. Nothing here asserts a speed: it measures.
"""
import statistics
import time
from typing import List, Optional

import numpy as np

import pecca
from pecca._kernels import runtime
from pecca.progress import progress
from pecca.sampling import Sampler


def time_model(m: "pecca.LLM", prompt_tokens: int, gen_tokens: int, rng_seed: int = 0):
    """(prefill tok/s, decode tok/s) of one run."""
    model = m.model
    n_p = max(1, min(prompt_tokens, model.seq_len - 1))
    n_g = max(1, min(gen_tokens, model.seq_len - n_p))
    ids = np.random.default_rng(rng_seed).integers(3, m.config.vocab_size, n_p).tolist()
    sampler = Sampler(m.config.vocab_size, temperature=0.0)
    t0 = time.perf_counter()
    logits = model.prefill(ids, 0)
    t1 = time.perf_counter()
    tok = sampler.sample(logits)
    for pos in range(n_p, n_p + n_g):
        tok = sampler.sample(model.forward(tok, pos))
    t2 = time.perf_counter()
    return n_p / (t1 - t0), n_g / (t2 - t1), n_p, n_g


def run_bench(model_path: str, threads: List[int], prompt_tokens: int, gen_tokens: int,
              reps: int = 3, tokenizer: Optional[str] = None, kv_type: str = "f32") -> List[dict]:
    m = pecca.load(model_path, threads=threads[0], tokenizer=tokenizer, kv_type=kv_type)
    info = m.info()
    results = []
    reps = max(1, reps)
    with progress(f"bench {info['path'].rsplit('/', 1)[-1]}", len(threads) * reps) as advance:
        for nt in threads:
            results.append(_bench_threads(m, info, nt, prompt_tokens, gen_tokens, reps, advance))
    return results


def _touch_cache(model, positions: int) -> None:
    """Write the KV-cache rows the timed runs will use: fresh pages cost a fault each on first
    use (~9 us a 4 KiB page on a VM here), which llama.cpp pays when it creates its context."""
    s = model.state
    for cache in (s.key_cache, s.value_cache):
        cache[:, :positions] = 0.0
    if hasattr(model, "cache_tokens"):  # what those rows held is gone
        model.cache_tokens.clear()


def _bench_threads(m, info, nt, prompt_tokens, gen_tokens, reps, advance) -> dict:
    m.threads = nt
    time_model(m, min(prompt_tokens, 8), min(gen_tokens, 8))  # warm-up: page in weights
    _touch_cache(m.model, prompt_tokens + gen_tokens)
    pp, tg = [], []
    for r in range(reps):
        a, b, n_p, n_g = time_model(m, prompt_tokens, gen_tokens, r)
        pp.append(a)
        tg.append(b)
        advance()
    return {
        "model": info["path"], "format": info["format"], "precision": info["precision"],
        "kv_type": info["kv_type"],
        "n_params": info["n_params"], "threads": m.threads, "simd": runtime.simd_path(),
        "openmp": runtime.openmp_enabled(), "pecca": pecca.__version__,
        "prompt_tokens": n_p, "gen_tokens": n_g, "reps": len(pp),
        "pp_tok_s": statistics.mean(pp), "pp_std": statistics.pstdev(pp),
        "tg_tok_s": statistics.mean(tg), "tg_std": statistics.pstdev(tg),
        "weights_gb_s": statistics.mean(tg) * m.loaded.weights.nbytes / 1e9,
    }


def format_table(results: List[dict]) -> str:
    head = f"{'model':<28} {'prec':<5} {'kv':<3} {'threads':>7} {'simd':<8} {'test':<8} {'tok/s':>18}  {'GB/s':>6}"
    lines = [head, "-" * len(head)]
    for r in results:
        name = r["model"].rsplit("/", 1)[-1][:28]
        for test, mean, std, gbs in (
                (f"pp{r['prompt_tokens']}", r["pp_tok_s"], r["pp_std"], ""),
                (f"tg{r['gen_tokens']}", r["tg_tok_s"], r["tg_std"], f"{r['weights_gb_s']:.1f}")):
            lines.append(f"{name:<28} {r['precision']:<5} {r['kv_type']:<3} {r['threads']:>7} {r['simd']:<8} "
                         f"{test:<8} {mean:>10.1f} ± {std:>5.1f}  {gbs:>6}")
    lines.append(f"pecca {results[0]['pecca'] if results else ''}")
    return "\n".join(lines)
