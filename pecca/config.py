"""ModelConfig: the blueprint of a LLaMA-family transformer."""
from dataclasses import dataclass


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
