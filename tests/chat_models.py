"""Small real model files for the tokenizer, chat and CLI tests, made once per test module.

- `stories_gguf(dir)`: stories260K exported by pecca to GGUF (f32, its tok512 vocabulary in the
  file): a real model that writes real text, at a few thousand tokens per second.
- `vocab_gguf(dir, tokenizer, vocab_size)`: a one-layer model of random weights around a real
  vocabulary (e.g. Llama 2's 32000-piece tokenizer.model), exported to GGUF: only its
  tokenizer matters.
- CHATML: a small ChatML-like template (SmolLM2's form, without its default system prompt).
"""
from pathlib import Path

from export import export
from export.llama2c import random_weights, write_llama2c
from pecca.config import ModelConfig
from shared_data import llama2c_model

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
          "+ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")


def stories_gguf(d: Path) -> Path:
    out = d / "stories260K.gguf"
    if not out.exists():
        export(str(llama2c_model()), str(out), "f32", str(llama2c_model("tok512.bin")))
    return out


def vocab_gguf(d: Path, tokenizer: Path, vocab_size: int, name: str = "vocab") -> Path:
    out = d / f"{name}.gguf"
    if not out.exists():
        c = ModelConfig(dim=8, hidden_dim=16, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=vocab_size,
                        seq_len=64)
        src = d / f"{name}.bin"
        write_llama2c(str(src), c, random_weights(c, 1))
        export(str(src), str(out), "f32", str(tokenizer))
    return out


def chatml_file(d: Path) -> Path:
    p = d / "chatml.jinja"
    p.write_text(CHATML, encoding="utf-8")
    return p


class TalkativeSource:
    """An export source: random weights big enough to take seconds per reply (tens of MB per
    token), with tok512's vocabulary and a classifier that can only pick text pieces (its rows
    for <unk>, BOS, EOS and the 256 byte tokens are zero, and with greedy sampling a zero logit
    never wins): a reply runs until the context or max_tokens. For Ctrl-C tests."""

    def __init__(self, dim=768, hidden_dim=2048, n_layers=6, seq_len=1024):
        from export.gguf import tensor_plan
        from export.vocab import vocab_from_llama2c

        self.vocab = vocab_from_llama2c(str(llama2c_model("tok512.bin")))
        self.name, self.tied = "talkative", False
        self.config = ModelConfig(dim=dim, hidden_dim=hidden_dim, n_layers=n_layers, n_heads=dim // 64,
                                  n_kv_heads=dim // 64, vocab_size=512, seq_len=seq_len)
        self.shapes = dict(tensor_plan(self.config, False))

    def tensor(self, name):
        import numpy as np

        from pecca.formats.tensors import RawTensor

        shape = self.shapes[name]
        rng = np.random.default_rng(sum(map(ord, name)) * 7 + len(name))
        if len(shape) == 1:
            x = np.ones(shape, np.float32)
        else:
            x = (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[1])).astype(np.float32)
        if name == "output.weight":
            x[:259] = 0
        return RawTensor(x, "f32")


def talkative_gguf(d: Path) -> Path:
    from export.gguf import write_gguf

    out = d / "talkative.gguf"
    if not out.exists():
        write_gguf(str(out), TalkativeSource(), "f16")
    return out
