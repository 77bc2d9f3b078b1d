"""pecca: LLaMA-family language models on the CPU, with Cython kernels.

    import pecca
    m = pecca.load("stories260K")
    print(m.generate("Once upon a time", max_tokens=64, temperature=0))
"""
__version__ = "0.1.0"

from pecca.config import ModelConfig
from pecca.errors import (ContextLengthError, InvalidArgumentError, ModelFormatError,
                          ModelNotFoundError, PeccaError, TokenizerFormatError,
                          TokenizerMismatchError, UnsupportedModelError, InsufficientMemoryError)
from pecca.chat import Chat
from pecca.chat_template import ChatTemplate, ChatTemplateError
from pecca.llm import LLM, load
from pecca.sampling import NonFiniteLogitsError
from pecca.tokenizers import Tokenizer

__all__ = ["load", "LLM", "ModelConfig", "Tokenizer", "Chat", "ChatTemplate", "ChatTemplateError",
           "PeccaError", "ModelFormatError", "UnsupportedModelError", "TokenizerMismatchError", "TokenizerFormatError",
           "ModelNotFoundError", "InvalidArgumentError", "ContextLengthError", "NonFiniteLogitsError",
           "InsufficientMemoryError",
           "__version__"]
