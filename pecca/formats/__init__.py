"""Model file readers. Each returns a LoadedModel: config, weights (views into a memmap),
and facts about the file; all validation happens here, before any kernel sees the data."""
import os
from dataclasses import dataclass, field

from pecca.config import ModelConfig
from pecca.errors import ModelFormatError, ModelNotFoundError
from pecca.weights import Weights


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: Weights
    path: str
    format: str  # e.g. "llama2c-v0"
    file_size: int
    extra: dict = field(default_factory=dict)


def open_model(path: str) -> LoadedModel:
    """Read the model file at `path`, choosing the reader from its contents."""
    from pecca.formats import gguf, llama2c

    if not os.path.exists(path):
        raise ModelNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        return _open_dir(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == gguf.GGUF_MAGIC:
        return gguf.read(path)
    return llama2c.read(path)


def _open_dir(path: str) -> LoadedModel:
    """A GPTQ directory loads as it is; any other checkpoint directory is exported first."""
    from pecca.formats import gptq

    if os.path.isfile(os.path.join(path, "config.json")):
        if gptq.is_gptq_dir(path):
            return gptq.read(path)
        raise ModelFormatError(f"{path}: an unquantized HuggingFace checkpoint; convert it into a model "
                               f"file first: pecca export {path} model.gguf")
    if os.path.isfile(os.path.join(path, "params.json")):
        raise ModelFormatError(f"{path}: a Meta checkpoint; convert it into a model file first: "
                               f"pecca export {path} model.gguf")
    raise ModelFormatError(f"{path}: is a directory; give a model file (or a GPTQ checkpoint directory)")
