"""The generation loop: prompt ids in, token ids and text pieces out, with timings.

Positions follow llama2.c: the prompt's tokens are fed at positions 0..P-1; the token
sampled after position p is fed at p + 1. Generation ends after `max_tokens` new tokens,
at a stop token (BOS/EOS: llama2.c's stories end a text with BOS; end-of-turn tokens), at a
stop string (`stream_text`), or when the context is full (the last token may be sampled at
position seq_len - 1 and is then never fed back).

The model remembers which tokens its KV cache holds (`CachedModel.cache_tokens`), so a chat
can feed only what follows the part of the new prompt that is already there
(`reuse_cache=True`). Plain generation always starts from position 0, which keeps it
bit-identical to llama2.c whatever ran before.
"""
import codecs
import time
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence

from pecca.errors import ContextLengthError, InvalidArgumentError
from pecca.model import Model
from pecca.sampling import Sampler
from pecca.tokenizers.base import Tokenizer


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys/values were already in the cache
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stop_reason: str = ""  # "length", "eos", "context", "stop" (a stop string)
    token_ids: List[int] = field(default_factory=list)

    @property
    def prefill_tok_s(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        """New tokens after the first (which comes out of the prefill), per second."""
        n = self.generated_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0


class CachedModel(Model):
    """A Model that records which tokens fill its KV cache: `cache_tokens[p]` was fed at
    position p. Feeding position p makes every later position stale, so the record is cut
    there first (an interrupted call leaves a record that is short, never wrong)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cache_tokens: List[int] = []

    def _feeding(self, tokens, pos0: int) -> None:
        if pos0 > len(self.cache_tokens):  # positions before pos0 fed by someone else: unknown
            pos0 = 0
        del self.cache_tokens[pos0:]

    def _fed(self, tokens, pos0: int) -> None:
        if pos0 == len(self.cache_tokens):
            self.cache_tokens.extend(int(t) for t in tokens)

    def forward(self, token: int, pos: int):
        self._feeding([token], pos)
        logits = super().forward(token, pos)
        self._fed([token], pos)
        return logits

    def prefill(self, tokens, pos0: int = 0):
        tokens = list(tokens)
        self._feeding(tokens, pos0)
        logits = super().prefill(tokens, pos0)
        self._fed(tokens, pos0)
        return logits

    def logits_all(self, tokens, pos0: int = 0):
        tokens = list(tokens)
        self._feeding(tokens, pos0)
        out = super().logits_all(tokens, pos0)
        self._fed(tokens, pos0)
        return out


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prompt_tokens(tokenizer: Tokenizer, text: str) -> List[int]:
    """The ids a prompt starts from: BOS when the model wants it, and at least one token
    (BOS) even for an empty prompt of a model that adds none."""
    ids = tokenizer.encode(text, add_bos=tokenizer.add_bos_default)
    return ids or [tokenizer.bos_id]


def check_prompt(prompt_ids: List[int], seq_len: int) -> None:
    if not prompt_ids:
        raise InvalidArgumentError("the prompt has no tokens (not even BOS)")
    if len(prompt_ids) > seq_len:
        raise ContextLengthError(
            f"the prompt is {len(prompt_ids)} tokens, longer than the context of {seq_len}")


def check_max_tokens(max_tokens) -> None:
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        raise InvalidArgumentError(f"max_tokens must be an integer >= 0, got {max_tokens}")


def generate_ids(model: Model, prompt_ids: List[int], sampler: Sampler, max_tokens: int,
                 stop_ids=(), stats: Optional[GenerationStats] = None,
                 reuse_cache: bool = False) -> Iterator[int]:
    """Yield new token ids. `stats` (if given) is filled in as generation goes.
    reuse_cache: keep the part of the KV cache that already holds a prefix of the prompt
    (needs a CachedModel) and feed only the rest."""
    check_max_tokens(max_tokens)
    check_prompt(prompt_ids, model.seq_len)
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt_ids)
    if max_tokens == 0:
        stats.stop_reason = "length"
        return
    start = 0
    if reuse_cache:  # the last prompt token is fed again in any case: its logits are needed
        start = min(common_prefix(getattr(model, "cache_tokens", ()), prompt_ids), len(prompt_ids) - 1)
    stats.cached_tokens = start
    t0 = time.perf_counter()
    logits = model.prefill(prompt_ids[start:], start)
    stats.prefill_seconds = time.perf_counter() - t0
    previous = list(prompt_ids)  # for the repetition penalty
    pos = len(prompt_ids) - 1
    t1 = time.perf_counter()
    try:
        while True:
            token = sampler.sample(logits, previous)
            if token in stop_ids:
                stats.stop_reason = "eos"
                break
            stats.generated_tokens += 1
            stats.token_ids.append(token)
            previous.append(token)
            stats.decode_seconds = time.perf_counter() - t1
            yield token
            if stats.generated_tokens >= max_tokens:
                stats.stop_reason = "length"
                break
            pos += 1
            if pos >= model.seq_len:
                stats.stop_reason = "context"
                break
            logits = model.forward(token, pos)
    finally:  # also when the consumer stops early (a stop string, Ctrl-C)
        stats.decode_seconds = time.perf_counter() - t1


@dataclass
class GenerationOptions:
    """What a caller may set for one generation; validated on creation."""
    max_tokens: Optional[int] = 256  # None: until a stop token or the end of the context
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: Optional[int] = None
    stop: Sequence[str] = ()

    def __post_init__(self):
        if self.max_tokens is not None:
            check_max_tokens(self.max_tokens)
        self.stop = check_stop(self.stop)
        self.sampler(1)  # validates the sampling values and the seed

    def sampler(self, vocab_size: int) -> Sampler:
        return Sampler(vocab_size, self.temperature, self.top_p, self.top_k, self.seed, min_p=self.min_p,
                       repetition_penalty=self.repetition_penalty, repeat_last_n=self.repeat_last_n)

    def token_limit(self, seq_len: int) -> int:
        return seq_len if self.max_tokens is None else self.max_tokens


def check_stop(stop) -> List[str]:
    """Stop strings as a list: None, one string, or a list of non-empty strings."""
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise InvalidArgumentError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return list(stop)


class StopStrings:
    """Cuts a stream of text at the first stop string, even one that spans pieces: `push`
    returns the text that is safe to show (what could still be the start of a stop string is
    held back) and whether a stop string was found."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.held = ""

    def push(self, text: str):
        buf = self.held + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held = ""
            return buf[:cut], True
        keep = self._partial(buf)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def _partial(self, buf: str) -> int:
        """Length of the longest end of `buf` that begins some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


def stream_text(tokenizer: Tokenizer, prev: int, ids, stop: Sequence[str] = (),
                stats: Optional[GenerationStats] = None) -> Iterator[str]:
    """Text pieces for `ids` (following token `prev`). Never yields broken UTF-8: the bytes of
    a character split across tokens are held until it is complete. With stop strings, the
    text ends before the first one (stats.stop_reason becomes "stop") and generation stops."""
    dec = codecs.getincrementaldecoder("utf-8")("replace")
    stops = StopStrings(stop)
    for t in ids:
        text, found = stops.push(dec.decode(tokenizer.token_bytes(prev, t)))
        prev = t
        if text:
            yield text
        if found:
            if stats is not None:
                stats.stop_reason = "stop"
            if hasattr(ids, "close"):
                ids.close()
            return
    text, found = stops.push(dec.decode(b"", final=True))
    text = text if found else text + stops.flush()
    if found and stats is not None:
        stats.stop_reason = "stop"
    if text:
        yield text
