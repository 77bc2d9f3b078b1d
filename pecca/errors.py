"""The errors pecca raises. Every reader and command uses these; the CLI prints them as
one line and exits non-zero. Messages name the file, the field and what was expected."""


class PeccaError(Exception):
    """Base class of every error pecca raises on purpose."""


class ModelFormatError(PeccaError):
    """A model file is malformed: wrong magic, truncated, sizes that disagree."""


class UnsupportedModelError(PeccaError):
    """A well-formed file of a kind or version pecca does not (yet) run."""


class TokenizerMismatchError(PeccaError):
    """The tokenizer does not fit the model (e.g. vocabulary sizes differ)."""


class TokenizerFormatError(PeccaError):
    """A tokenizer file is malformed or of an unknown kind."""


class ModelNotFoundError(PeccaError):
    """A model path or name could not be found locally nor downloaded."""


class InvalidArgumentError(PeccaError, ValueError):
    """A nonsense argument: negative temperature, top-p outside (0, 1], ..."""


class ContextLengthError(InvalidArgumentError):
    """The prompt does not fit the model's context window."""


class ChatTemplateError(PeccaError):
    """No chat template, one that is not valid Jinja, or one that refuses a conversation
    (its raise_exception message, e.g. roles out of order, is in the error)."""


class NonFiniteLogitsError(PeccaError):
    """The model produced NaN or infinite logits (broken weights, or an overflow)."""


class InsufficientMemoryError(PeccaError):
    """The buffers a model needs (the KV cache for the context asked for) do not fit this
    machine's memory; the message gives the size and says to pass a smaller context."""
