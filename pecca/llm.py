"""`pecca.load(path)`: a model with its tokenizer, ready to generate text."""
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, List, Optional, Union

import numpy as np

from pecca import hub
from pecca._kernels import runtime
from pecca.errors import (ContextLengthError, ModelFormatError, ModelNotFoundError, PeccaError,
                          TokenizerMismatchError)
from pecca.formats import LoadedModel, open_model
from pecca.generate import (CachedModel, GenerationOptions, GenerationStats, generate_ids, prompt_tokens,
                            stream_text)
from pecca.model import kv_dtype
from pecca.sampling import Sampler
from pecca.threads import resolve_threads
from pecca.tokenizers import Tokenizer, load_tokenizer

if TYPE_CHECKING:
    from pecca.chat import Chat


def find_tokenizer(model_path: str, vocab_size: int) -> Tokenizer:
    """A tokenizer beside the model whose vocabulary fits it (run.c's `-z` made automatic), or
    inside it when the model is a checkpoint directory (HF's tokenizer.json first there)."""
    d = Path(model_path)
    if d.is_dir():
        names = ["tokenizer.json", "tokenizer.model"]
    else:
        d = d.parent
        names = ["tokenizer.bin", f"tok{vocab_size}.bin", "tokenizer.model", f"tok{vocab_size}.model"]
    tried = []
    for name in names:
        p = d / name
        if not p.is_file():
            continue
        tok = load_tokenizer(str(p))
        if tok.vocab_size == vocab_size:
            return tok
        tried.append(f"{name} ({tok.vocab_size} tokens)")
    found = "; found " + ", ".join(tried) if tried else ""
    raise ModelNotFoundError(
        f"{model_path}: no tokenizer with {vocab_size} tokens beside the model (looked for "
        f"{', '.join(names)} in {d}{found}); pass one with --tokenizer / tokenizer=")


def check_tokenizer(tok: Tokenizer, loaded: LoadedModel) -> None:
    if tok.vocab_size != loaded.config.vocab_size:
        raise TokenizerMismatchError(
            f"{tok.path}: tokenizer has {tok.vocab_size} tokens but the model {loaded.path} "
            f"has vocab_size {loaded.config.vocab_size}")


class GenerationLock:
    """One generation at a time on a model: its KV cache and buffers exist once. Other threads
    wait their turn. A stream holds the lock from its first piece until it ends or is closed
    (a stream abandoned but still referenced keeps other threads waiting: close it). The thread
    that holds the lock never waits on itself: a new call there (after a stream left open, or
    an interrupted one still on a traceback) takes the model over, and the old stream raises
    if it is resumed."""

    def __init__(self):
        self._lock = threading.Lock()
        self._owner = None  # the thread holding the lock (only that thread sets it to itself)
        self._holder = None  # the call holding it

    @contextmanager
    def hold(self):
        ticket = object()
        if self._owner != threading.get_ident():
            self._lock.acquire()
            self._owner = threading.get_ident()
        self._holder = ticket
        try:
            yield ticket
        finally:
            if self._holder is ticket:
                self._holder = self._owner = None
                self._lock.release()

    def held_here(self) -> bool:
        return self._owner == threading.get_ident()

    def check(self, ticket) -> None:
        if self._holder is not ticket:
            raise PeccaError("this stream was interrupted: another call used the model since "
                             "(finish or close a stream before the next call)")


class LLM:
    """A loaded model: `generate`, `chat`, `chat_session`, `forward`, `tokenizer`, `config`,
    `info()`. Safe to share between threads: generation calls run one at a time."""

    def __init__(self, loaded: LoadedModel, tokenizer: Tokenizer, threads: int, ctx=None,
                 load_seconds: float = 0.0, kv_type: str = "f32"):
        self.loaded = loaded
        self.config = loaded.config
        self.tokenizer = tokenizer
        self.model = CachedModel(loaded.config, loaded.weights, threads, ctx, kv_type)
        self.load_seconds = load_seconds
        self.last_stats: Optional[GenerationStats] = None
        self.lock = GenerationLock()

    @property
    def threads(self) -> int:
        return self.model.threads

    @threads.setter
    def threads(self, n: int) -> None:
        n = resolve_threads(n)
        if self.lock.held_here():  # between a stream's pieces in this thread: nothing runs now
            self.model.threads = n
            return
        with self.lock.hold():  # not in the middle of another thread's generation
            self.model.threads = n

    @property
    def stop_ids(self) -> frozenset:
        """BOS ends a llama2.c story; EOS and end-of-turn tokens (<|eot_id|>...) end a reply."""
        return frozenset({self.tokenizer.bos_id, self.tokenizer.eos_id} | set(self.tokenizer.eot_ids))

    def forward(self, token: int, pos: int) -> np.ndarray:
        """Logits (float32, vocab_size) after feeding `token` at position `pos`. Positions
        before `pos` must have been fed already (they fill the KV cache)."""
        with self.lock.hold():
            return self.model.forward(int(token), int(pos)).copy()

    def generate(self, prompt: str = "", max_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 0.9, top_k: int = 0, seed: Optional[int] = None,
                 stream: bool = False, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 repeat_last_n: int = 64, stop=None) -> Union[str, Iterator[str]]:
        """Continue `prompt`. Returns the new text, or with stream=True yields it in pieces.
        stop: a string or list of strings; the text ends before the first one found.
        Statistics of the last call are in `self.last_stats`."""
        opts = GenerationOptions(max_tokens, temperature, top_p, top_k, min_p, repetition_penalty,
                                 repeat_last_n, seed, stop)
        prompt_ids = prompt_tokens(self.tokenizer, prompt)
        stats = GenerationStats()
        limit = opts.token_limit(self.model.seq_len)
        ids = self.stream_ids(prompt_ids, opts.sampler(self.config.vocab_size), limit, stats)
        pieces = stream_text(self.tokenizer, prompt_ids[-1], ids, opts.stop, stats)
        return pieces if stream else _joined(pieces, ids)

    def stream_ids(self, prompt_ids: List[int], sampler: Sampler, max_tokens: int,
                   stats: GenerationStats, reuse_cache: bool = False) -> Iterator[int]:
        """New token ids after `prompt_ids`, fed from position 0 (or, with reuse_cache, from
        where the KV cache stops holding the prompt)."""
        self.last_stats = stats
        return self._locked(generate_ids(self.model, prompt_ids, sampler, max_tokens, self.stop_ids, stats,
                                         reuse_cache=reuse_cache))

    def _locked(self, ids: Iterator[int]) -> Iterator[int]:
        """`ids`, run while holding the model's lock (taken at the first id, not before)."""
        with self.lock.hold() as ticket:
            try:
                while True:
                    self.lock.check(ticket)
                    try:
                        token = next(ids)
                    except StopIteration:
                        return
                    yield token
            finally:
                ids.close()

    def reply_stream(self, prompt_ids: List[int], sampler: Sampler, opts: GenerationOptions,
                     stats: GenerationStats) -> Iterator[str]:
        """The text of a reply to a chat prompt, reusing the KV cache."""
        limit = opts.token_limit(self.model.seq_len)
        ids = self.stream_ids(prompt_ids, sampler, limit, stats, reuse_cache=True)
        return stream_text(self.tokenizer, prompt_ids[-1], ids, opts.stop, stats)

    def chat(self, messages: List[dict], stream: bool = False, chat_template: Optional[str] = None,
             **options) -> Union[str, Iterator[str]]:
        """The assistant's reply to `messages` ([{"role": "user", "content": ...}, ...]),
        rendered with the model's chat template (or `chat_template`, a file or Jinja source).
        Options as `generate` (max_tokens default: until the end of the turn), with chat
        defaults (pecca.chat.CHAT_DEFAULTS). Calls with a growing conversation reuse the KV
        cache for the part already fed. For a conversation that keeps itself, see chat_session."""
        from pecca.chat import chat_options
        from pecca.chat_template import ChatTemplate, chat_ids

        template = ChatTemplate.for_tokenizer(self.tokenizer, chat_template)
        prompt = chat_ids(self.tokenizer, template.render(messages, add_generation_prompt=True))
        if len(prompt) >= self.model.seq_len:
            raise ContextLengthError(f"the conversation is {len(prompt)} tokens; the context holds "
                                     f"{self.model.seq_len} (leave room for the reply)")
        opts = chat_options(**options)
        pieces = self.reply_stream(prompt, opts.sampler(self.config.vocab_size), opts, GenerationStats())
        return pieces if stream else _joined(pieces)

    def chat_session(self, system: Optional[str] = None, chat_template: Optional[str] = None,
                     **options) -> "Chat":
        """A pecca.chat.Chat: send(text) turn after turn; the KV cache is kept between turns."""
        from pecca.chat import Chat

        return Chat(self, system, chat_template, **options)

    def info(self) -> dict:
        c = self.config
        config = {k: getattr(c, k) for k in c.__dataclass_fields__ if k != "rope_freq_factors"}
        factors = c.rope_freq_factors
        extra = self.loaded.extra
        return {
            "path": self.loaded.path,
            "format": self.loaded.format,
            "architecture": extra.get("architecture", "llama"),
            "precision": self.loaded.weights.precision,
            "tensor_types": extra.get("tensor_types", {self.loaded.weights.precision.upper(): None}),
            "file_size": self.loaded.file_size,
            "n_params": c.n_params(self.loaded.weights.shared_classifier),
            "config": config,
            "rope_scaling": ("none" if factors is None else
                             f"per-pair frequency divisors {min(factors):g}..{max(factors):g}"),
            "vocab": f"{extra.get('vocab_kind') or type(self.tokenizer).__name__}, "
                     f"{self.tokenizer.vocab_size} tokens",
            "head_size": c.head_size,
            "shared_classifier": self.loaded.weights.shared_classifier,
            "context": self.model.seq_len,
            "kv_type": self.model.kv_type,
            "tokenizer": self.tokenizer.path,
            "threads": self.threads,
            "openmp": runtime.openmp_enabled(),
            "simd": runtime.simd_path(),
            "simd_supported": runtime.simd_supported(),
            "int8_path": runtime.int8_path(),
            **({"gptq": extra["gptq"]} if extra.get("gptq") else {}),  # the checkpoint's settings
        }


def _joined(*streams) -> str:
    """The text of a stream of pieces; every generator closed even on an exception (Ctrl-C),
    so the model's lock is free at once, not when the traceback goes."""
    try:
        return "".join(streams[0])
    finally:
        for s in streams:
            s.close()


def resolve_model_path(path: str):
    """(model file, tokenizer file or None) for a path or a known model name."""
    if os.path.exists(path):
        return path, None
    return hub.resolve_name(path)


def is_gguf(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def open_tokenizer(path: str, tokenizer: Optional[str] = None) -> Tokenizer:
    """The tokenizer of a model file or name (found as pecca.load finds it), or of a tokenizer
    file given as `path`, without loading any weights."""
    if tokenizer:
        return load_tokenizer(str(tokenizer))
    model_path, tok_path = resolve_model_path(str(path))
    if tok_path:
        return load_tokenizer(str(tok_path))
    if os.path.isdir(model_path) or model_path.endswith((".json", ".model")) or is_gguf(model_path):
        return load_tokenizer(model_path)
    try:  # a llama2.c model file, or a llama2.c tokenizer.bin (neither has a magic number)
        loaded = open_model(model_path)
    except ModelFormatError:
        return load_tokenizer(model_path)
    return find_tokenizer(model_path, loaded.config.vocab_size)


def load(path: str, threads: Optional[int] = None, tokenizer: Optional[str] = None,
         ctx: Optional[int] = None, kv_type: str = "f32") -> LLM:
    """Open a model file (or a known name such as "stories260K") with its tokenizer.

    threads: kernel threads (default: OMP_NUM_THREADS or the physical cores).
    tokenizer: a tokenizer file; default: the one found beside the model.
    ctx: context length to allocate (default: the model's seq_len).
    kv_type: the KV cache's element type, "f32" (default: llama2.c's arithmetic, token for
        token) or "f16" (llama.cpp's default: half the cache's memory and of the bytes each
        token's attention reads; each key and value rounded to half).
    """
    t0 = time.perf_counter()
    kv_dtype(kv_type)  # an unknown type fails before the model is opened
    nthreads = resolve_threads(threads)
    model_path, tok_path = resolve_model_path(str(path))
    loaded = open_model(model_path)
    tok_path = tokenizer or tok_path
    if tok_path:
        tok = load_tokenizer(str(tok_path))
    elif loaded.extra.get("tokenizer") is not None:  # a GGUF carries its own
        tok = loaded.extra["tokenizer"]
    else:
        tok = find_tokenizer(model_path, loaded.config.vocab_size)
    check_tokenizer(tok, loaded)
    return LLM(loaded, tok, nthreads, ctx, load_seconds=time.perf_counter() - t0, kv_type=kv_type)
