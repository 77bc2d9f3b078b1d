"""The `pecca` command: generate, chat, tokenize, info, export, perplexity, bench, serve.

Errors pecca raises on purpose (bad files, bad arguments, missing models) are printed as
one line on stderr with a non-zero exit, never as a traceback.
"""
import itertools
import json
import os
import sys
from typing import List, Optional

import typer

import pecca
from pecca import generate as gen
from pecca._kernels import runtime
from pecca.errors import InvalidArgumentError, PeccaError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="Run LLaMA-family language models on the CPU.")


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sampling_options(max_tokens, temperature, top_p, top_k, min_p, repeat_penalty, repeat_last_n, seed, stop):
    """The options shared by generate and chat, validated (with the CLI's own names)."""
    if max_tokens is not None and max_tokens < 0:
        raise InvalidArgumentError(f"--max-tokens must be >= 0, got {max_tokens}")
    return gen.GenerationOptions(max_tokens, temperature, top_p, top_k, min_p, repeat_penalty,
                                 repeat_last_n, seed, list(stop or ()))


STOP_HELP = "stop before this text (repeat the option for several)"
KV_HELP = ("KV-cache type: f32, or f16 (llama.cpp's default: half the cache's memory and faster "
           "decoding of long contexts; each key and value rounded to half)")


@app.command()
def generate(
    model: str = typer.Argument(..., help="model file or known name (e.g. stories260K)"),
    prompt: str = typer.Argument("", help="text to continue"),
    max_tokens: int = typer.Option(256, "-n", "--max-tokens", help="new tokens at most"),
    temperature: float = typer.Option(1.0, "-t", "--temperature", help="0 = greedy"),
    top_p: float = typer.Option(0.9, "--top-p", help="nucleus sampling, in (0, 1]; 1 = off"),
    top_k: int = typer.Option(0, "--top-k", help="keep the k most likely tokens; 0 = off"),
    min_p: float = typer.Option(0.0, "--min-p", help="drop tokens less likely than min-p times the "
                                "most likely one; 0 = off"),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty", help="penalize recent tokens; 1 = off"),
    repeat_last_n: int = typer.Option(64, "--repeat-last-n", help="tokens the penalty looks back over "
                                      "(-1: all)"),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help=STOP_HELP),
    seed: Optional[int] = typer.Option(None, "--seed", "-s", help="RNG seed (default: random)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="kernel threads"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", "-z", help="tokenizer file"),
    ctx: Optional[int] = typer.Option(None, "--ctx", help="context length (default: the model's)"),
    kv_type: str = typer.Option("f32", "--kv-type", help=KV_HELP),
    echo: bool = typer.Option(True, "--echo/--no-echo", help="print the prompt first"),
):
    """Continue PROMPT, streaming text to stdout; timings go to stderr."""
    opts = sampling_options(max_tokens, temperature, top_p, top_k, min_p, repeat_penalty, repeat_last_n,
                            seed, stop)
    m = pecca.load(model, threads=threads, tokenizer=tokenizer, ctx=ctx, kv_type=kv_type)
    prompt_ids = gen.prompt_tokens(m.tokenizer, prompt)
    stats = gen.GenerationStats()
    ids = m.stream_ids(prompt_ids, opts.sampler(m.config.vocab_size), max_tokens, stats)
    pieces = gen.stream_text(m.tokenizer, prompt_ids[-1], ids, opts.stop, stats)
    if echo:  # the prompt as the tokens print it (stop strings apply to the new text only)
        pieces = itertools.chain(echo_text(m.tokenizer, prompt_ids), pieces)
    out = sys.stdout
    for piece in pieces:
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    _err(f"load: {m.load_seconds * 1000:.0f} ms | prefill: {stats.prompt_tokens} tokens, "
         f"{stats.prefill_tok_s:.1f} tok/s | decode: {stats.generated_tokens} tokens, "
         f"{stats.decode_tok_s:.1f} tok/s | threads {m.threads}, {runtime.simd_path()}, {m.model.kv_type} KV cache")
    if stats.stop_reason == "context":
        _err(f"stopped: the context of {m.model.seq_len} positions is full")


def echo_text(tok, prompt_ids):
    """The prompt as its tokens print: after a BOS as llama2.c prints it (BOS itself silent),
    and from the first token on when the tokenizer adds none (Llama 3, SmolLM2)."""
    if prompt_ids and prompt_ids[0] == tok.bos_id:
        return gen.stream_text(tok, prompt_ids[0], prompt_ids[1:])
    return gen.stream_text(tok, -1, prompt_ids)


@app.command()
def chat(
    model: str = typer.Argument(..., help="model file or known name"),
    system: Optional[str] = typer.Option(None, "--system", help="system prompt"),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help="Jinja template file "
                                                "(or a tokenizer_config.json); default: the model's"),
    max_tokens: Optional[int] = typer.Option(None, "-n", "--max-tokens", help="new tokens per reply at "
                                             "most (default: until the end of the turn)"),
    temperature: float = typer.Option(0.8, "-t", "--temperature", help="0 = greedy"),
    top_p: float = typer.Option(0.95, "--top-p", help="nucleus sampling, in (0, 1]; 1 = off"),
    top_k: int = typer.Option(40, "--top-k", help="keep the k most likely tokens; 0 = off"),
    min_p: float = typer.Option(0.05, "--min-p", help="drop tokens less likely than min-p times the "
                                "most likely one; 0 = off"),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty", help="penalize recent tokens; 1 = off"),
    repeat_last_n: int = typer.Option(64, "--repeat-last-n", help="tokens the penalty looks back over "
                                      "(-1: all)"),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help=STOP_HELP),
    seed: Optional[int] = typer.Option(None, "--seed", "-s", help="RNG seed (default: random)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="kernel threads"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", "-z", help="tokenizer file"),
    ctx: Optional[int] = typer.Option(None, "--ctx", help="context length (default: the model's)"),
    kv_type: str = typer.Option("f32", "--kv-type", help=KV_HELP),
):
    """Talk with MODEL: type a message, the reply streams. Ctrl-C stops a reply, Ctrl-D or /exit
    quits, /reset starts the conversation again."""
    from pecca.chat import Chat
    from pecca.repl import run_repl

    opts = sampling_options(max_tokens, temperature, top_p, top_k, min_p, repeat_penalty, repeat_last_n,
                            seed, stop)
    m = pecca.load(model, threads=threads, tokenizer=tokenizer, ctx=ctx, kv_type=kv_type)
    session = Chat(m, system, chat_template, **vars(opts))
    run_repl(session)


@app.command()
def tokenize(
    model: str = typer.Argument(..., help="model file or name, or a tokenizer file (tokenizer.json, "
                                "tokenizer.model, tokenizer.bin, GGUF)"),
    text: str = typer.Argument(..., help="text to tokenize"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", "-z", help="tokenizer file"),
    bos: Optional[bool] = typer.Option(None, "--bos/--no-bos",
                                       help="put BOS in front (default: the tokenizer's add_bos_token)"),
    special: Optional[bool] = typer.Option(None, "--special/--no-special",
                                           help="read special-token names in TEXT as those tokens "
                                           "(default: yes for tokenizer.json, no for sentencepiece)"),
    ids_only: bool = typer.Option(False, "--ids", help="print only the ids, as a JSON list"),
):
    """Print the token ids of TEXT, one per line with its piece."""
    from pecca.llm import open_tokenizer

    tok = open_tokenizer(model, tokenizer)
    ids = tok.encode(text, add_bos=bos, parse_special=special)
    if ids_only:
        print(json.dumps(ids))
        return
    for t in ids:
        print(f"{t:>8}  {json.dumps(tok.token_text(t), ensure_ascii=False)}")
    _err(f"{len(ids)} tokens ({type(tok).__name__}, vocabulary of {tok.vocab_size})")


@app.command()
def info(
    model: str = typer.Argument(..., help="model file or known name"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", "-z"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
):
    """Print the model's config, format, precision, size and the kernel features in use."""
    m = pecca.load(model, threads=threads, tokenizer=tokenizer)
    d = m.info()
    if as_json:
        print(json.dumps(d, indent=2))
        return
    c = d.pop("config")
    for k, v in c.items():
        print(f"{k:>20}: {v}")
    d["file_size"] = f"{d['file_size']:,} bytes ({d['file_size'] / 2**20:.1f} MiB)"
    d["n_params"] = f"{d['n_params']:,}"
    d["openmp"] = "yes" if d["openmp"] else "NO (built without OpenMP: single-threaded)"
    for k, v in d.items():
        print(f"{k:>20}: {v}")


@app.command("export")
def export_cmd(
    src: str = typer.Argument(..., help="HF directory (GPTQ too), Meta directory, or llama2.c .bin"),
    out: str = typer.Argument(..., help="the GGUF file to write"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="f32, f16, q8_0, q4_0 or q4_1 (norms stay "
                                        "f32; default f32, or f16 beside a GPTQ checkpoint's 4-bit tensors)"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", "-z", help="tokenizer file"),
):
    """Convert a checkpoint into pecca's model file (GGUF, readable by llama.cpp too)."""
    import time

    from export import export as run_export

    t0 = time.perf_counter()
    run_export(src, out, dtype, tokenizer)
    size = os.path.getsize(out)
    dt = time.perf_counter() - t0
    _err(f"wrote {out}: {size / 2**20:.1f} MiB in {dt:.1f} s ({size / 2**20 / max(dt, 1e-9):.0f} MiB/s)")


@app.command()
def perplexity(
    model: str = typer.Argument(..., help="model file or known name"),
    textfile: str = typer.Argument(..., help="UTF-8 text to score"),
    ctx: int = typer.Option(0, "--ctx", help="window length in tokens (default: the model's context)"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", "-z"),
    kv_type: str = typer.Option("f32", "--kv-type", help=KV_HELP),
):
    """Perplexity of MODEL on TEXTFILE, in windows of --ctx tokens (compare quantizations)."""
    from pecca.perplexity import perplexity as compute

    try:
        with open(textfile, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise InvalidArgumentError(f"{textfile}: not UTF-8 text ({e.reason})") from None
    m = pecca.load(model, threads=threads, tokenizer=tokenizer, kv_type=kv_type)
    r = compute(m, text, ctx)
    print(f"perplexity: {r.perplexity:.4f} over {r.tokens} tokens ({r.windows} windows of up to "
          f"{r.ctx} positions)")


def parse_threads(spec: str) -> List[int]:
    try:
        out = [int(t) for t in spec.split(",") if t.strip()]
    except ValueError:
        raise InvalidArgumentError(f"--threads must be a comma-separated list of integers, got {spec!r}")
    if not out or any(t <= 0 for t in out):
        raise InvalidArgumentError(f"--threads must list positive integers, got {spec!r}")
    return out


@app.command()
def bench(
    model: str = typer.Argument(..., help="model file or known name"),
    threads: str = typer.Option("1,2", "--threads", help="comma-separated thread counts"),
    prompt_tokens: int = typer.Option(128, "--prompt-tokens", "-p"),
    gen_tokens: int = typer.Option(128, "--gen-tokens", "-n"),
    reps: int = typer.Option(3, "--reps", "-r"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", "-z"),
    kv_type: str = typer.Option("f32", "--kv-type", help=KV_HELP),
    as_json: bool = typer.Option(False, "--json"),
):
    """Measure prefill (pp) and decode (tg) tok/s, like llama-bench."""
    from pecca.bench import run_bench, format_table

    thread_list = parse_threads(threads)
    results = run_bench(model, thread_list, prompt_tokens, gen_tokens, reps, tokenizer, kv_type)
    print(json.dumps(results, indent=2) if as_json else format_table(results))


@app.command()
def serve(
    model: str = typer.Argument(..., help="model file or known name"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on"),
    port: int = typer.Option(8000, "--port", help="port (0: any free one, printed at start)"),
    parallel: int = typer.Option(4, "--parallel", "-np", help="sequences decoding together (KV-cache slots)"),
    ctx_size: Optional[int] = typer.Option(None, "--ctx-size", "-c", help="positions per slot (default: the "
                                           "model's context, at most 4096)"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="PECCA_API_KEY",
                                          help="require 'Authorization: Bearer KEY' on /v1 routes"),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="the model id clients use "
                                             "(default: the file name without extension)"),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help="Jinja template file (or a "
                                                "tokenizer_config.json); default: the model's"),
    max_queue: Optional[int] = typer.Option(None, "--max-queue", help="requests waiting for a slot before "
                                            "the server answers 503 (default: 4 x --parallel)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="kernel threads"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", "-z", help="tokenizer file"),
    kv_type: str = typer.Option("f32", "--kv-type", help=KV_HELP),
):
    """Serve MODEL over HTTP with OpenAI's API (/v1/completions, /v1/chat/completions,
    /v1/models, /health), decoding up to --parallel requests together."""
    try:
        from pecca.serve.app import PeccaServer, bind
    except ImportError as e:
        raise PeccaError(f"pecca serve needs the server extra: pip install 'pecca[server]' ({e})") from None
    if parallel < 1:
        raise InvalidArgumentError(f"--parallel must be >= 1, got {parallel}")
    server = PeccaServer.load(model, threads=threads, tokenizer=tokenizer, kv_type=kv_type, parallel=parallel,
                              ctx_size=ctx_size, api_key=api_key, model_name=model_name,
                              chat_template=chat_template, max_queue=max_queue)
    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    e = server.engine
    _err(f"pecca serve: '{server.model_name}' on http://{shown}:{sock.getsockname()[1]}/v1 | {e.parallel} slots "
         f"of {e.ctx} positions, {server.llm.model.kv_type} KV cache | threads {server.llm.threads}, {runtime.simd_path()}"
         f" | chat template: {server.template.origin if server.template else 'none (chat answers 400)'}"
         f"{' | API key required' if api_key else ''}")
    server.run(sock=sock)


def main(argv=None) -> int:
    """Entry point: click handles usage errors (exit 2); pecca's errors become one line."""
    try:
        app(args=argv)
    except SystemExit as e:  # click ends by exiting, also on success
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except PeccaError as e:
        _err(f"error: {e}")
        return 1
    except (OSError, MemoryError) as e:
        _err(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
