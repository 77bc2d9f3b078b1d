"""RawTensor: a tensor as stored in a checkpoint (a view, never a copy), and its dtype.

numpy has no bfloat16, so bf16 data is held as uint16 bit patterns; `to_f32()` converts
(a copy: only for export and tests, never on the inference path).
"""
import mmap
from dataclasses import dataclass
from typing import Tuple

import numpy as np

NUMPY_DTYPES = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16, "i32": np.int32}


@dataclass
class RawTensor:
    data: np.ndarray  # float32, float16, uint16 (bf16 bits), or int32 (GPTQ's packed tensors)
    dtype: str  # "f32", "f16", "bf16" or "i32"

    def __post_init__(self):
        if self.dtype not in NUMPY_DTYPES or self.data.dtype != NUMPY_DTYPES[self.dtype]:
            raise ValueError(f"RawTensor: {self.dtype} data must be {NUMPY_DTYPES.get(self.dtype)}, "
                             f"got {self.data.dtype}")

    @property
    def shape(self) -> Tuple[int, ...]:
        return self.data.shape

    def to_f32(self) -> np.ndarray:
        if self.dtype == "bf16":
            return (self.data.astype(np.uint32) << 16).view(np.float32)
        return self.data.astype(np.float32)


def bf16_from_f32(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), rounding to nearest even, as torch does."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    out = (rounded >> 16).astype(np.uint16)
    nan = np.isnan(x)
    out[nan] = 0x7FC0
    return out


def map_readonly(path) -> np.memmap:
    """The whole file memory-mapped read-only (bytes), advised for huge pages: a page not yet
    in the page cache then comes in as part of a 2 MiB folio mapped by one TLB entry, where a
    plain mapping's page faults bring small folios in 4 KiB pages. Decoding streams every weight
    at every token; over a 7B-layer GPTQ file whose pages came in by plain faults it ran 5-8%
    slower at 1 thread (the same bytes: 53.7-55.0 tok/s against 56.3-59.5 with the advice, the
    mapping then 96% in 2 MiB pages). Pages already cached keep their folios; kernels whose
    transparent huge pages are off ignore the advice."""
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    raw = mm._mmap
    if isinstance(raw, mmap.mmap) and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            raw.madvise(mmap.MADV_HUGEPAGE)
        except (OSError, ValueError):  # not supported here: plain pages
            pass
    return mm


def release_pages(view: np.ndarray) -> None:
    """Drop the source pages just converted from this process's resident set: a memory-mapped
    70B checkpoint read front to back would otherwise count in full towards its RSS (the
    pages stay in the page cache; nothing is re-read)."""
    base = view
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None) if not isinstance(base, np.memmap) else base._mmap
    if base is None or not hasattr(base, "madvise") or not view.flags.c_contiguous:
        return
    start = view.__array_interface__["data"][0]
    origin = np.frombuffer(base, dtype=np.uint8).__array_interface__["data"][0]
    page = mmap.PAGESIZE
    lo = (start - origin) // page * page
    hi = start - origin + view.nbytes
    if hi - lo >= page:
        try:
            base.madvise(mmap.MADV_DONTNEED, lo, (hi - lo) // page * page)
        except (OSError, ValueError):  # not supported here: only the RSS figure suffers
            pass
