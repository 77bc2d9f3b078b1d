"""Aggregate decode throughput of `pecca serve` at 1, 2, 4, 8 concurrent streams (loopback only).

Starts `pecca serve MODEL --port 0 --parallel MAX` as a subprocess on 127.0.0.1 (or uses --url),
then for each concurrency level N sends N streamed greedy completions at once and reports
  aggregate tok/s = all completion tokens / wall time from the first request to the last [DONE]
  per stream      = aggregate / N
  client cpu      = CPU seconds this client process spent per 1000 tokens
and the speed-up over one stream. The client shares the machine with the server, so by default
it is a thin one (httpx, each server-sent event parsed with json.loads); --client openai uses
the official `openai` async client instead (on SmolLM2: 0.17 against 0.13 ms of CPU a token at 4
streams, 0.35 against 0.3 at 1). Every level runs --reps
times (best kept); each request is bounded by --max-tokens and a timeout, so the script always
ends.

Usage: python bench/serve_load.py [--model PATH] [--streams 1,2,4,8] [--max-tokens 128]
       [--threads N] [--reps 2] [--url http://127.0.0.1:PORT] [--client httpx|openai] [--json]
Default model: stories260K exported to GGUF (f32) in bench/out/.
"""
import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Once upon a time", "Lily had a red ball", "Tom and his dog", "The sun was hot",
           "A little bird sang", "Sam found a box", "It was a rainy day", "The cat jumped"]


def default_model() -> str:
    out = ROOT / "bench" / "out" / "stories260K-f32.gguf"
    if not out.exists():
        src = ROOT.parent / "shared" / "models" / "llama2c"
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pecca", "export", str(src / "stories260K.bin"), str(out),
                        "--dtype", "f32", "-z", str(src / "tok512.bin")], check=True)
    return str(out)


def start_server(model: str, parallel: int, threads: int):
    proc = subprocess.Popen([sys.executable, "-m", "pecca", "serve", model, "--port", "0", "--parallel",
                             str(parallel), "--threads", str(threads), "--model-name", "bench"],
                            stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
    if m is None:
        proc.kill()
        raise SystemExit(f"pecca serve did not start: {line}{proc.stderr.read()[-2000:]}")
    print(line.strip(), file=sys.stderr)
    return proc, m.group(1)


async def one_stream(client, prompt: str, max_tokens: int) -> int:
    usage, chunks = None, 0
    stream = await client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        elif chunk.choices and chunk.choices[0].text:
            chunks += 1  # a server without usage in streams (llama-cpp-python's): one token a chunk
    return usage if usage is not None else chunks


async def one_stream_httpx(client, prompt: str, max_tokens: int) -> int:
    """one_stream's work with httpx: the same request, events parsed with json.loads."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    usage, chunks = None, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
            elif event.get("choices") and event["choices"][0].get("text"):
                chunks += 1
    return usage if usage is not None else chunks


def client_for(kind: str, url: str):
    if kind == "openai":
        import openai
        return openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600), one_stream
    try:  # the openai client's own HTTP library (httpx, or its successor httpx2)
        import httpx
    except ImportError:
        import httpx2 as httpx
    return httpx.AsyncClient(base_url=url, headers={"Authorization": "Bearer bench"}, timeout=600,
                             limits=httpx.Limits(max_connections=64)), one_stream_httpx


def cpu_seconds() -> float:
    return time.process_time()  # this process, all threads, ns resolution (os.times: 10 ms)


async def level(url: str, n: int, max_tokens: int, kind: str = "httpx") -> dict:
    client, stream = client_for(kind, url)
    async with client:
        # warm the connection pool and the engine: as many requests as will be timed, so that
        # each KV-cache slot has been used once (a VM backs fresh memory slowly: ~3 ms per 2 MiB)
        await asyncio.gather(*(stream(client, PROMPTS[i % len(PROMPTS)], 4) for i in range(n)))
        t0, c0 = time.perf_counter(), cpu_seconds()
        counts = await asyncio.wait_for(
            asyncio.gather(*(stream(client, PROMPTS[i % len(PROMPTS)], max_tokens) for i in range(n))), 900)
        dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return {"streams": n, "tokens": sum(counts), "seconds": dt, "tok_s": sum(counts) / dt,
            "client_cpu_ms_per_1k": 1e6 * cpu / max(1, sum(counts))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--url", help="an already running server (its model must be named 'bench')")
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--client", choices=("httpx", "openai"), default="httpx")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    levels = [int(s) for s in a.streams.split(",")]
    proc, url = (None, a.url) if a.url else start_server(a.model or default_model(), max(levels), a.threads)
    try:
        rows = []
        for n in levels:
            runs = [asyncio.run(level(url, n, a.max_tokens, a.client)) for _ in range(a.reps)]
            rows.append(max(runs, key=lambda r: r["tok_s"]))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
    base = rows[0]["tok_s"]
    for r in rows:
        r["speedup"] = r["tok_s"] / base
    if a.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"client: {a.client}")
    print("| streams | tokens | seconds | aggregate tok/s | per stream | x one stream | client cpu ms / 1k tok |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['streams']} | {r['tokens']} | {r['seconds']:.2f} | {r['tok_s']:.0f} | "
              f"{r['tok_s'] / r['streams']:.0f} | {r['speedup']:.2f} | {r['client_cpu_ms_per_1k']:.0f} |")


if __name__ == "__main__":
    main()
