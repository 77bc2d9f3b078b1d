"""Export: turn the checkpoints people have into pecca's model file (GGUF) or llama2.c files.

`open_source(path)` picks the reader from what `path` is:
  - a directory with config.json: a HuggingFace Llama checkpoint (export.hf), GPTQ-quantized
    when it has a quantization config (export.gptq)
  - a directory with params.json and consolidated.*.pth: a Meta checkpoint (export.meta)
  - a llama2.c .bin file, versions 0 and 1 (export.llama2c)
  - a GGUF file (export.gguf.GGUFSource), to write it again in another type
`write_gguf(out, source, dtype)` (export.gguf) writes it tensor by tensor.
"""
import os

from pecca.errors import ModelFormatError, ModelNotFoundError


def open_source(path: str, tokenizer: str = None):
    if not os.path.exists(path):
        raise ModelNotFoundError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            from pecca.formats.gptq import is_gptq_dir

            if is_gptq_dir(path):
                from export.gptq import GPTQSource
                return GPTQSource(path, tokenizer)
            from export.hf import HFSource
            return HFSource(path, tokenizer)
        if os.path.isfile(os.path.join(path, "params.json")):
            from export.meta import MetaSource
            return MetaSource(path, tokenizer)
        raise ModelFormatError(f"{path}: neither a HuggingFace (config.json) nor a Meta (params.json) "
                               "checkpoint directory")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":  # re-export, e.g. f32 -> q8_0
        from export.gguf import GGUFSource
        return GGUFSource(path)
    from export.llama2c import Llama2cSource
    from pecca.formats import llama2c
    from pecca.llm import find_tokenizer

    if tokenizer is None:
        tokenizer = find_tokenizer(path, llama2c.read(path).config.vocab_size).path
    return Llama2cSource(path, tokenizer)


def export(src: str, out: str, dtype: str = None, tokenizer: str = None) -> None:
    """dtype None: the source's default (f16 beside a GPTQ checkpoint's 4-bit tensors, else f32)."""
    from export.gguf import write_gguf

    source = open_source(src, tokenizer)
    write_gguf(out, source, dtype or getattr(source, "default_dtype", "f32"))
