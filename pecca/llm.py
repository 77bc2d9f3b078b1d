"""`pecca.load(path)`: a model with its tokenizer, ready to generate text."""
import os
import time
from pathlib import Path
from typing import Iterator, List, Optional, Union

import numpy as np

from pecca import hub
from pecca._kernels import runtime
from pecca.errors import ModelFormatError, ModelNotFoundError, TokenizerMismatchError
from pecca.formats import LoadedModel, open_model
from pecca.generate import GenerationStats, generate_ids, prompt_tokens, stream_text
from pecca.model import Model
from pecca.sampling import Sampler
from pecca.threads import resolve_threads
from pecca.tokenizers import Tokenizer, load_tokenizer


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


class LLM:
    """A loaded model: `generate`, `forward`, `tokenizer`, `config`, `info()`."""

    def __init__(self, loaded: LoadedModel, tokenizer: Tokenizer, threads: int, ctx=None,
                 load_seconds: float = 0.0):
        self.loaded = loaded
        self.config = loaded.config
        self.tokenizer = tokenizer
        self.model = Model(loaded.config, loaded.weights, threads, ctx)
        self.load_seconds = load_seconds
        self.last_stats: Optional[GenerationStats] = None

    @property
    def threads(self) -> int:
        return self.model.threads

    @threads.setter
    def threads(self, n: int) -> None:
        self.model.threads = resolve_threads(n)

    def forward(self, token: int, pos: int) -> np.ndarray:
        """Logits (float32, vocab_size) after feeding `token` at position `pos`. Positions
        before `pos` must have been fed already (they fill the KV cache)."""
        return self.model.forward(int(token), int(pos)).copy()

    def generate(self, prompt: str = "", max_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 0.9, top_k: int = 0, seed: Optional[int] = None,
                 stream: bool = False) -> Union[str, Iterator[str]]:
        """Continue `prompt`. Returns the new text, or with stream=True yields it in pieces.
        Statistics of the last call are in `self.last_stats`."""
        sampler = Sampler(self.config.vocab_size, temperature, top_p, top_k, seed)
        prompt_ids = prompt_tokens(self.tokenizer, prompt)
        pieces = self._stream(prompt_ids, sampler, max_tokens)
        if stream:
            return pieces
        return "".join(pieces)

    def stream_ids(self, prompt_ids: List[int], sampler: Sampler, max_tokens: int,
                   stats: GenerationStats) -> Iterator[int]:
        # BOS ends a llama2.c story; EOS and end-of-turn tokens (<|eot_id|>...) end a reply
        stops = {self.tokenizer.bos_id, self.tokenizer.eos_id} | set(self.tokenizer.eot_ids)
        self.last_stats = stats
        return generate_ids(self.model, prompt_ids, sampler, max_tokens, stops, stats)

    def _stream(self, prompt_ids, sampler, max_tokens) -> Iterator[str]:
        stats = GenerationStats()
        ids = self.stream_ids(prompt_ids, sampler, max_tokens, stats)
        return stream_text(self.tokenizer, prompt_ids[-1], ids)

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
            "tokenizer": self.tokenizer.path,
            "threads": self.threads,
            "openmp": runtime.openmp_enabled(),
            "simd": runtime.simd_path(),
            "simd_supported": runtime.simd_supported(),
            "int8_path": runtime.int8_path(),
            **({"gptq": extra["gptq"]} if extra.get("gptq") else {}),  # the checkpoint's settings
        }


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
         ctx: Optional[int] = None) -> LLM:
    """Open a model file (or a known name such as "stories260K") with its tokenizer.

    threads: kernel threads (default: OMP_NUM_THREADS or the physical cores).
    tokenizer: a tokenizer file; default: the one found beside the model.
    ctx: context length to allocate (default: the model's seq_len).
    """
    t0 = time.perf_counter()
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
    return LLM(loaded, tok, nthreads, ctx, load_seconds=time.perf_counter() - t0)
