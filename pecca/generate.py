"""The generation loop: prompt ids in, token ids and text pieces out, with timings.

Positions follow llama2.c: the prompt's tokens are fed at positions 0..P-1; the token
sampled after position p is fed at p + 1. Generation ends after `max_tokens` new tokens,
at BOS/EOS (llama2.c's stories end a text with BOS), or when the context is full (the last
token may be sampled at position seq_len - 1 and is then never fed back).
"""
import codecs
import time
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

from pecca.errors import ContextLengthError, InvalidArgumentError
from pecca.model import Model
from pecca.sampling import Sampler
from pecca.tokenizers.base import Tokenizer


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stop_reason: str = ""  # "length", "eos", "context"
    token_ids: List[int] = field(default_factory=list)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        """New tokens after the first (which comes out of the prefill), per second."""
        n = self.generated_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0


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


def generate_ids(model: Model, prompt_ids: List[int], sampler: Sampler, max_tokens: int,
                 stop_ids=(), stats: Optional[GenerationStats] = None) -> Iterator[int]:
    """Yield new token ids. `stats` (if given) is filled in as generation goes."""
    if not isinstance(max_tokens, int) or max_tokens < 0:
        raise InvalidArgumentError(f"max_tokens must be an integer >= 0, got {max_tokens}")
    check_prompt(prompt_ids, model.seq_len)
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt_ids)
    if max_tokens == 0:
        stats.stop_reason = "length"
        return
    t0 = time.perf_counter()
    logits = model.prefill(prompt_ids, 0)
    stats.prefill_seconds = time.perf_counter() - t0
    pos = len(prompt_ids) - 1
    t1 = time.perf_counter()
    while True:
        token = sampler.sample(logits)
        if token in stop_ids:
            stats.stop_reason = "eos"
            break
        stats.generated_tokens += 1
        stats.token_ids.append(token)
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
    stats.decode_seconds = time.perf_counter() - t1


def stream_text(tokenizer: Tokenizer, prev: int, ids) -> Iterator[str]:
    """Text pieces for `ids` (following token `prev`), holding back incomplete UTF-8."""
    dec = codecs.getincrementaldecoder("utf-8")("replace")
    for t in ids:
        piece = dec.decode(tokenizer.token_bytes(prev, t))
        prev = t
        if piece:
            yield piece
    tail = dec.decode(b"", final=True)
    if tail:
        yield tail
