"""GGUF's container, parsed by pecca: header, metadata key-value pairs and tensor infos, with
the data section memory-mapped read-only (np.memmap), so tensors are numpy views, never copies.

Why not gguf.GGUFReader: it turns every metadata value, every string of a 49152-token
vocabulary included, into numpy arrays; opening a file then takes seconds (measured: 1.2 s for
a 32000-token vocabulary, 1.9-2.2 s for SmolLM2-135M's 49152 tokens + 48900 merges), against
~0.05 s here. The `gguf` package still gives the constants (GGMLQuantizationType,
GGML_QUANT_SIZES, GGUFValueType) and writes pecca's exports.

GGUF v2 and v3, little-endian. The file is untrusted input: every count and length is
checked against the bytes left before anything is allocated or looped over, tensor dims and
byte ranges against overflow and the file's end, offsets against general.alignment. Any
failure is a ModelFormatError naming the file and what is wrong.

Values come out as plain Python: int, float, bool, str, and lists of them (arrays of numbers
too, as GGUFReader's contents() gives them). Strings are strict UTF-8, as GGUFReader's; a
metadata string that is not is kept as an Undecodable, which Metadata reports when that key is
asked for (GGUFReader too fails only then), while keys and tensor names must decode at once.
"""
import os
import struct

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from pecca.errors import ModelFormatError
from pecca.formats.tensors import map_readonly

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
INT64_MAX = (1 << 63) - 1

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# value type -> (struct format of a scalar, numpy dtype of an array of them)
_SCALARS = {
    GGUFValueType.UINT8: ("<B", "u1"), GGUFValueType.INT8: ("<b", "i1"),
    GGUFValueType.UINT16: ("<H", "<u2"), GGUFValueType.INT16: ("<h", "<i2"),
    GGUFValueType.UINT32: ("<I", "<u4"), GGUFValueType.INT32: ("<i", "<i4"),
    GGUFValueType.FLOAT32: ("<f", "<f4"), GGUFValueType.BOOL: ("<B", "u1"),
    GGUFValueType.UINT64: ("<Q", "<u8"), GGUFValueType.INT64: ("<q", "<i8"),
    GGUFValueType.FLOAT64: ("<d", "<f8"),
}
_STRUCTS = {t: struct.Struct(fmt) for t, (fmt, _) in _SCALARS.items()}

_KINDS = {int(k): k for k in GGMLQuantizationType}

# tensor types whose data GGUFReader views as numbers; every other type is rows of bytes
_ELEMENT_DTYPES = {
    GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}

# the fewest bytes one metadata pair (key length, type, a 1-byte value) and one tensor info
# (name length, n_dims, one dim, type, offset) take: counts are checked against these
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8


class Undecodable:
    """A metadata string (or array of strings) that is not valid UTF-8."""

    def __init__(self, reason: str):
        self.reason = reason

    def __repr__(self):
        return f"Undecodable({self.reason!r})"


class GGUFTensor:
    """One tensor: shape in GGUF's order (ne: fastest-varying first), data a read-only numpy
    view of the file shaped as GGUFReader shapes it (numpy order; block types as uint8 rows)."""

    __slots__ = ("name", "tensor_type", "shape", "n_elements", "n_bytes", "data_offset", "data")

    def __init__(self, name, tensor_type, shape, n_elements, n_bytes, data_offset, data):
        self.name, self.tensor_type, self.shape = name, tensor_type, shape
        self.n_elements, self.n_bytes, self.data_offset, self.data = n_elements, n_bytes, data_offset, data

    def __repr__(self):
        return f"GGUFTensor({self.name!r}, {self.tensor_type.name}, {list(self.shape)})"


class GGUFFile:
    """A parsed GGUF file: `fields` (key -> plain value, in file order), `tensors` (in file
    order), `version`, `alignment`, `data_offset` (where the data section starts)."""

    def __init__(self, path, version, fields, tensors, alignment, data_offset):
        self.path, self.version, self.fields, self.tensors = path, version, fields, tensors
        self.alignment, self.data_offset = alignment, data_offset


class _Cursor:
    """Bounds-checked little-endian reads over the mapped file."""

    def __init__(self, path, mm, buf, size):
        self.path, self.mm, self.buf, self.size, self.pos = path, mm, buf, size, 0

    def fail(self, what):
        raise ModelFormatError(f"{self.path}: not a valid GGUF file: {what}")

    def need(self, n, what):
        if n > self.size - self.pos:
            self.fail(f"truncated: {what} needs {n} bytes at offset {self.pos}, "
                      f"the file has {self.size - self.pos} left")

    def unpack(self, st, what):
        self.need(st.size, what)
        (v,) = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return v

    def u32(self, what):
        return self.unpack(_U32, what)

    def u64(self, what):
        return self.unpack(_U64, what)

    def raw_string(self, what):
        n = self.u64(f"the length of {what}")
        self.need(n, f"{what} ({n} bytes)")
        s = self.buf[self.pos:self.pos + n]
        self.pos += n
        return s

    def name(self, what):
        """A key or tensor name: must be UTF-8 now."""
        v = self.string_value(what)
        if isinstance(v, Undecodable):
            self.fail(v.reason)
        return v

    def string_value(self, what):
        raw = self.raw_string(what)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as e:
            return Undecodable(f"{what} at offset {self.pos - len(raw)} is not UTF-8 ({e})")


def open_gguf(path: str) -> GGUFFile:
    """Parse `path`'s header, metadata and tensor infos; map its data read-only."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        if size < 4 + 4 + 8 + 8:
            raise ModelFormatError(f"{path}: not a valid GGUF file: {size} bytes is too short for a header")
        mm = map_readonly(path)
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot be read ({e})") from None
    buf = memoryview(mm)
    try:
        return _parse(path, mm, _Cursor(path, mm, buf, size))
    finally:
        buf.release()


def _parse(path, mm, cur: _Cursor) -> GGUFFile:
    if bytes(cur.buf[:4]) != MAGIC:
        cur.fail(f"the magic is {bytes(cur.buf[:4])!r}, not {MAGIC!r}")
    cur.pos = 4
    version = _version(cur)
    n_tensors = cur.u64("the tensor count")
    n_kv = cur.u64("the metadata count")
    _check_count(cur, n_kv, _MIN_KV_BYTES, "metadata pairs")
    fields = _read_fields(cur, n_kv)
    alignment = _alignment(cur, fields)
    _check_count(cur, n_tensors, _MIN_TENSOR_INFO_BYTES, "tensor infos")
    infos = [_read_tensor_info(cur) for _ in range(n_tensors)]
    data_offset = -(-cur.pos // alignment) * alignment
    tensors = _tensors(cur, mm, infos, data_offset, alignment)
    return GGUFFile(path, version, fields, tensors, alignment, data_offset)


def _version(cur: _Cursor) -> int:
    v = cur.u32("the version")
    if v not in VERSIONS and v & 0xFFFF == 0 and _U32.unpack(struct.pack(">I", v))[0] in VERSIONS:
        cur.fail("it is big-endian; pecca reads little-endian GGUF only")
    if v not in VERSIONS:
        cur.fail(f"version {v}; pecca reads GGUF versions {' and '.join(map(str, VERSIONS))}")
    return v


def _check_count(cur: _Cursor, count, min_bytes, what):
    """Refuse a count the rest of the file cannot hold, before looping over it."""
    if count > (cur.size - cur.pos) // min_bytes:
        cur.fail(f"{count} {what} cannot fit in the {cur.size - cur.pos} bytes left at offset {cur.pos}")


def _read_fields(cur: _Cursor, n_kv) -> dict:
    fields = {}
    for _ in range(n_kv):
        at = cur.pos
        key = cur.name("a metadata key")
        if key in fields:
            cur.fail(f"metadata key {key!r} appears twice (again at offset {at})")
        vtype = cur.u32(f"the type of {key}")
        if key == "general.alignment" and vtype != GGUFValueType.UINT32:
            cur.fail(f"general.alignment has value type {vtype}, not UINT32")
        fields[key] = _value(cur, vtype, key)
    return fields


def _value(cur: _Cursor, vtype, key):
    if vtype == GGUFValueType.STRING:
        return cur.string_value(key)
    if vtype == GGUFValueType.ARRAY:
        return _array(cur, key)
    st = _STRUCTS.get(vtype)
    if st is None:
        cur.fail(f"metadata {key} has unknown value type {vtype}")
    v = cur.unpack(st, key)
    return v != 0 if vtype == GGUFValueType.BOOL else v


def _array(cur: _Cursor, key):
    itype = cur.u32(f"the element type of {key}")
    n = cur.u64(f"the length of {key}")
    if itype == GGUFValueType.STRING:
        _check_count(cur, n, 8, f"strings of {key}")
        return _string_array(cur, n, key)
    if itype not in _SCALARS:  # nested arrays too: llama.cpp refuses them as well
        cur.fail(f"metadata {key} is an array of unsupported type {itype}")
    dtype = np.dtype(_SCALARS[itype][1])
    _check_count(cur, n, dtype.itemsize, f"values of {key}")
    a = cur.mm[cur.pos:cur.pos + n * dtype.itemsize].view(dtype)
    cur.pos += n * dtype.itemsize
    return (a != 0).tolist() if itype == GGUFValueType.BOOL else a.tolist()


def _string_array(cur: _Cursor, n, key):
    """n length-prefixed strings: a plain loop (measured: ~14 ms for SmolLM2's 49152 tokens)."""
    buf, pos, size, unpack = cur.buf, cur.pos, cur.size, _U64.unpack_from
    out = []
    append = out.append
    bad = None
    for i in range(n):
        if size - pos < 8:
            cur.pos = pos
            cur.fail(f"truncated: {key}[{i}] at offset {pos}")
        (ln,) = unpack(buf, pos)
        pos += 8
        if ln > size - pos:
            cur.pos = pos
            cur.fail(f"{key}[{i}] has length {ln}, past the end of the file (offset {pos})")
        try:
            append(str(buf[pos:pos + ln], "utf-8"))
        except UnicodeDecodeError as e:
            bad = bad or Undecodable(f"{key}[{i}] is not UTF-8 ({e})")
            append(None)
        pos += ln
    cur.pos = pos
    return bad or out


def _alignment(cur: _Cursor, fields) -> int:
    a = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(a, bool) or not isinstance(a, int) or a <= 0 or a & (a - 1):
        cur.fail(f"general.alignment {a!r} is not a power of two")
    return a


def _read_tensor_info(cur: _Cursor):
    at = cur.pos
    name = cur.name("a tensor name")
    n_dims = cur.u32(f"the dimension count of tensor {name}")
    if not 1 <= n_dims <= MAX_DIMS:
        cur.fail(f"tensor {name} has {n_dims} dimensions; GGUF allows 1 to {MAX_DIMS}")
    cur.need(8 * n_dims, f"the dimensions of tensor {name}")
    dims = struct.unpack_from(f"<{n_dims}Q", cur.buf, cur.pos)
    cur.pos += 8 * n_dims
    raw_type = cur.u32(f"the type of tensor {name}")
    offset = cur.u64(f"the data offset of tensor {name}")
    return at, name, dims, raw_type, offset


def _tensors(cur: _Cursor, mm, infos, data_offset, alignment):
    tensors, seen = [], set()
    for at, name, dims, raw_type, offset in infos:
        if name in seen:
            cur.fail(f"tensor name {name!r} appears twice (again at offset {at})")
        seen.add(name)
        tensors.append(_tensor(cur, mm, name, dims, raw_type, offset, data_offset, alignment))
    return tensors


def _tensor(cur: _Cursor, mm, name, dims, raw_type, offset, data_offset, alignment):
    kind = _KINDS.get(raw_type)
    if kind not in GGML_QUANT_SIZES:
        cur.fail(f"tensor {name} has unknown type {raw_type}")
    block, type_size = GGML_QUANT_SIZES[kind]
    n = _element_count(cur, name, dims)
    if dims[0] % block:
        cur.fail(f"tensor {name}: a row of {dims[0]} values is not whole {kind.name} blocks of {block}")
    n_bytes = n // block * type_size
    start = data_offset + offset
    if offset % alignment:
        cur.fail(f"tensor {name}'s offset {offset} is not a multiple of the alignment {alignment}")
    if offset > cur.size or n_bytes > cur.size - start:
        cur.fail(f"tensor {name} ({n_bytes} bytes at offset {start}) lies past the end of the "
                 f"file ({cur.size} bytes)")
    shape = tuple(reversed(dims))
    dtype = _ELEMENT_DTYPES.get(kind)
    if dtype is None:
        dtype, shape = np.uint8, shape[:-1] + (shape[-1] // block * type_size,)
    data = mm[start:start + n_bytes].view(dtype).reshape(shape)
    return GGUFTensor(name, kind, dims, n, n_bytes, start, data)


def _element_count(cur: _Cursor, name, dims) -> int:
    n = 1
    for d in dims:
        if d <= 0:
            cur.fail(f"tensor {name} has dimensions {list(dims)}; each must be positive")
        n *= d
        if n > INT64_MAX:
            cur.fail(f"tensor {name}'s dimensions {list(dims)} overflow 64 bits")
    return n
