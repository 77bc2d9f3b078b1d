"""Finding a model by name: local directories first, then the HuggingFace hub.

Known names are karpathy/tinyllamas' llama2.c models. Search order: each directory in
PECCA_MODELS (os.pathsep-separated), then the cache (PECCA_CACHE, default ~/.cache/pecca).
Only then is a download tried, with short timeouts; when it fails the error names every
path searched.
"""
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple
from urllib.parse import urlparse

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


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def check_reachable(endpoint: str, timeout: float = 3.0) -> None:
    """Raise OSError at once when the hub cannot be reached (huggingface_hub itself would
    retry with back-off for half a minute before giving up)."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    socket.create_connection((url.hostname, port), timeout=timeout).close()


def download(known: KnownModel, searched: str) -> Tuple[str, Optional[str]]:
    """Fetch `known` from the hub into the cache; a clear error when that is impossible."""
    endpoint = hub_endpoint()
    target = cache_dir() / known.name
    hint = (f"Put {Path(known.model_file).name} and {known.tokenizer_file} in a directory "
            "listed in PECCA_MODELS")
    where = f"{known.name}: not found locally (searched {searched})"
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise ModelNotFoundError(f"{where} and HF_HUB_OFFLINE is set. {hint}")
    try:
        check_reachable(endpoint)
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        raise ModelNotFoundError(f"{where} and {endpoint} cannot be reached ({reason}). {hint}") from None
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        model = hf_hub_download(HUB_REPO, known.model_file, local_dir=str(target))
        tok = None
        if known.tokenizer_hub_file:
            tok = hf_hub_download(HUB_REPO, known.tokenizer_hub_file, local_dir=str(target))
    except Exception as e:  # network, HTTP and hub errors all end the same way
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(
            f"{where} and the download from {endpoint}/{HUB_REPO} failed: {reason[:200]}. {hint}") from None
    return model, tok
