"""ModelConfig: the blueprint of a LLaMA-family transformer."""
import math
from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class ModelConfig:
    dim: int  # width of the residual stream
    hidden_dim: int  # width of the feed-forward layer
    n_layers: int
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (fewer than n_heads: grouped-query attention)
    vocab_size: int
    seq_len: int  # context length: positions 0 .. seq_len - 1
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    bos_id: int = 1
    eos_id: int = 2
    # RoPE frequency divisors, one per pair of a head (Llama 3's rope scaling, linear scaling);
    # None means plain RoPE with rope_theta
    rope_freq_factors: Optional[Tuple[float, ...]] = None

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size

    @property
    def kv_mul(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    def n_params(self, shared_classifier: bool = True) -> int:
        d, h, kv = self.dim, self.hidden_dim, self.kv_dim
        per_layer = 2 * d + d * d + 2 * d * kv + d * d + 3 * d * h
        return (self.vocab_size * d * (1 if shared_classifier else 2)
                + self.n_layers * per_layer + d)


def check_heads(where: str, dim: int, n_heads: int, n_kv_heads: int) -> None:
    """The head counts every reader must check: heads divide the width, kv heads divide the
    heads, and the head size is even (RoPE rotates pairs)."""
    from pecca.errors import ModelFormatError

    if dim % n_heads:
        raise ModelFormatError(f"{where}: dim {dim} is not a multiple of n_heads {n_heads}")
    if n_heads % n_kv_heads:
        raise ModelFormatError(f"{where}: n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")
    if (dim // n_heads) % 2:
        raise ModelFormatError(f"{where}: head size {dim // n_heads} is odd; RoPE needs pairs")


def llama3_rope_factors(head_size: int, theta: float, factor: float, low_freq_factor: float,
                        high_freq_factor: float, original_context: int) -> Tuple[float, ...]:
    """Divisors of the RoPE frequencies for rope_scaling type "llama3" (as transformers'
    _compute_llama3_parameters and llama.cpp's rope_freqs tensor): long wavelengths are
    slowed by `factor`, short ones kept, the band between interpolated."""
    low_wavelen = original_context / low_freq_factor
    high_wavelen = original_context / high_freq_factor
    out = []
    for i in range(0, head_size, 2):
        freq = 1.0 / theta ** (i / head_size)
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(float(factor))
        else:
            smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return tuple(out)
