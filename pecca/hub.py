"""Finding a model by name: local directories first, then the HuggingFace hub.

Known names are karpathy/tinyllamas' llama2.c models. Search order: each directory in
PECCA_MODELS (os.pathsep-separated), then the cache (PECCA_CACHE, default ~/.cache/pecca).
Only then is a download tried, with short timeouts; when it fails the error names every
path searched.
"""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from pecca.errors import ModelNotFoundError

HUB_REPO = "karpathy/tinyllamas"


@dataclass(frozen=True)
class KnownModel:
    name: str
    model_file: str  # path inside HUB_REPO
    tokenizer_file: str  # local name of the tokenizer beside the model
    tokenizer_hub_file: Optional[str]  # path inside HUB_REPO, None when it lives in llama2.c's repo


KNOWN_MODELS = {
    "stories260K": KnownModel("stories260K", "stories260K/stories260K.bin", "tok512.bin",
                              "stories260K/tok512.bin"),
    "stories15M": KnownModel("stories15M", "stories15M.bin", "tokenizer.bin", None),
    "stories42M": KnownModel("stories42M", "stories42M.bin", "tokenizer.bin", None),
    "stories110M": KnownModel("stories110M", "stories110M.bin", "tokenizer.bin", None),
}


def cache_dir() -> Path:
    return Path(os.environ.get("PECCA_CACHE") or Path.home() / ".cache" / "pecca")


def search_dirs() -> List[Path]:
    dirs = [Path(p) for p in os.environ.get("PECCA_MODELS", "").split(os.pathsep) if p]
    return dirs + [cache_dir()]


def find_local(known: KnownModel) -> Optional[Tuple[str, Optional[str]]]:
    """(model path, tokenizer path or None) from the search directories."""
    fname = Path(known.model_file).name
    for d in search_dirs():
        for cand in (d / fname, d / known.name / fname):
            if cand.is_file():
                tok = cand.parent / known.tokenizer_file
                return str(cand), str(tok) if tok.is_file() else None
    return None


def resolve_name(name: str) -> Tuple[str, Optional[str]]:
    """Path of the model called `name` and of its tokenizer (None: look beside the model)."""
    known = KNOWN_MODELS.get(name)
    searched = ", ".join(str(d) for d in search_dirs())
    if known is None:
        raise ModelNotFoundError(
            f"{name}: no such file, and not a known model name "
            f"(known: {', '.join(KNOWN_MODELS)}); searched {searched}")
    found = find_local(known)
    if found:
        return found
    return download(known, searched)


def download(known: KnownModel, searched: str) -> Tuple[str, Optional[str]]:
    """Fetch `known` from the hub into the cache; a clear error when that is impossible."""
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    target = cache_dir() / known.name
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import disable_progress_bars  # noqa: F401  (bar stays on)

        model = hf_hub_download(HUB_REPO, known.model_file, local_dir=str(target))
        tok = None
        if known.tokenizer_hub_file:
            tok = hf_hub_download(HUB_REPO, known.tokenizer_hub_file, local_dir=str(target))
    except Exception as e:  # network, DNS, offline mode, HTTP errors: all end the same way
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(
            f"{known.name}: not found locally (searched {searched}) and the download from "
            f"huggingface.co/{HUB_REPO} failed: {reason[:200]}. Put {Path(known.model_file).name} "
            f"and {known.tokenizer_file} in a directory listed in PECCA_MODELS") from None
    return model, tok
