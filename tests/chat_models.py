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
