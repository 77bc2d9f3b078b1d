"""Writers that turn checkpoints into files pecca runs.

Now: llama2.c `.bin` files (versions 0 and 1), used for random-weight benchmark models and
for test fixtures. The GGUF writers and the HF / Meta / GPTQ converters come next.
"""
from export.llama2c import random_weights, write_llama2c

__all__ = ["random_weights", "write_llama2c"]
