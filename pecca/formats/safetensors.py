"""Safetensors files, memory-mapped: every tensor a numpy view, never a copy.

Parsed here rather than with `safetensors.safe_open`: numpy has no bfloat16 (safe_open refuses
it) and we want memory-mapped views. The format is an 8-byte little-endian header length, a JSON
header {name: {dtype, shape, data_offsets}} (plus an optional "__metadata__"), then the data.
"""
import json
import os
import struct
from typing import Dict

import numpy as np

from pecca.errors import ModelFormatError, UnsupportedModelError
from pecca.formats.tensors import RawTensor, map_readonly

# I32 holds GPTQ's packed 4-bit codes, zero points and group indices
SAFETENSORS_DTYPES = {"F32": ("f32", np.float32), "F16": ("f16", np.float16), "BF16": ("bf16", np.uint16),
                      "I32": ("i32", np.int32)}
MAX_HEADER = 100 << 20
MAX_DIM = 1 << 40  # far beyond any real tensor; numpy refuses dimensions near 2^63


def read_header(path: str):
    """(header dict, data start offset, file size) of a safetensors file, checked."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFormatError(f"{path}: too short for a safetensors file")
        n = struct.unpack("<Q", head)[0]
        if not 2 <= n <= min(MAX_HEADER, size - 8):
            raise ModelFormatError(f"{path}: safetensors header length {n} does not fit the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: absurd nesting
            raise ModelFormatError(f"{path}: safetensors header is not JSON ({str(e)[:100]})") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: safetensors header is not a JSON object")
    return header, 8 + n, size


def read_safetensors(path: str, ints: bool = False) -> Dict[str, RawTensor]:
    """Every tensor of a .safetensors file as a memory-mapped RawTensor; I32 tensors only with
    `ints` (GPTQ checkpoints: elsewhere an integer weight is a mistake)."""
    header, start, size = read_header(path)
    mm = map_readonly(path) if size > start else None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, end = _entry(path, name, info, ints)
        kind, np_dtype = SAFETENSORS_DTYPES[dtype]
        nbytes = np.dtype(np_dtype).itemsize
        for d in shape:  # Python ints: no overflow, however large the claim
            nbytes *= d
        if end - begin != nbytes:
            raise ModelFormatError(f"{path}: tensor {name}: offsets {begin}..{end} do not match shape {shape}")
        if start + end > size:
            raise ModelFormatError(f"{path}: tensor {name} lies past the end of the file (truncated?)")
        data = mm[start + begin:start + end].view(np_dtype).reshape(shape) if nbytes else np.zeros(shape, np_dtype)
        out[name] = RawTensor(data, kind)
    return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _entry(path, name, info, ints):
    """(dtype, shape, begin, end) of one header entry, each of the type the format says."""
    if not isinstance(info, dict):
        raise ModelFormatError(f"{path}: tensor {name}: header entry is not a JSON object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or not isinstance(shape, list) or not isinstance(offsets, list):
        raise ModelFormatError(f"{path}: tensor {name}: malformed header entry (dtype, shape and "
                               "data_offsets must be a string and two lists)")
    if dtype not in SAFETENSORS_DTYPES or (dtype == "I32" and not ints):
        raise UnsupportedModelError(f"{path}: tensor {name} has dtype {dtype[:20]}; pecca reads F32, F16 and "
                                    "BF16 (and I32 in GPTQ checkpoints)")
    if not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape) or len(shape) > 8:
        raise ModelFormatError(f"{path}: tensor {name}: shape {shape!r:.60} is not a list of non-negative "
                               "integers")
    if len(offsets) != 2 or not all(_is_int(o) for o in offsets) or not 0 <= offsets[0] <= offsets[1]:
        raise ModelFormatError(f"{path}: tensor {name}: data_offsets {offsets!r:.60} are not two increasing "
                               "non-negative integers")
    return dtype, shape, offsets[0], offsets[1]
