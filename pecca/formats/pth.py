"""Reader for PyTorch `.pth` checkpoints (torch.save's zip format, e.g. Meta's
`consolidated.NN.pth`), without torch and without running any pickle code.

The file is a zip archive (written by torch's own miniz writer) of one top-level folder:
    <prefix>/data.pkl            the pickled object (a state dict: name -> tensor)
    <prefix>/data/<key>          one member per storage: its raw little-endian bytes
    <prefix>/byteorder           "little" (absent in files from before torch 1.10)
    <prefix>/version, .format_version, .storage_alignment, .data/serialization_id
Storage members are stored uncompressed (ZIP_STORED), their data 64-byte aligned; a member's
data starts after its local file header: 30 bytes + file name length + extra field length.

In data.pkl each tensor is a call
    torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride,
                                    requires_grad, backward_hooks[, metadata])
where `storage` is a persistent id ("storage", torch.FloatStorage, key, location, numel).
The unpickler here resolves only those few globals, to stand-ins of its own; any other global
(os.system, builtins.eval, ...) is refused before anything is called.

Every tensor is a view into one read-only np.memmap of the file: opening a 70B shard costs
no copy. bf16 is held as uint16 bits (see tensors.py).
"""
import collections
import io
import os
import pickle
import struct
import zipfile
import zlib
from typing import Dict

import numpy as np

from pecca.errors import ModelFormatError, PeccaError, UnsupportedModelError
from pecca.formats.tensors import NUMPY_DTYPES, RawTensor, map_readonly

# torch storage class name -> our dtype name
STORAGE_DTYPES = {"FloatStorage": "f32", "HalfStorage": "f16", "BFloat16Storage": "bf16"}
# Storage types torch can write that pecca does not read: named in the error.
OTHER_STORAGES = {"DoubleStorage": "float64", "LongStorage": "int64", "IntStorage": "int32",
                  "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
                  "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
                  "ComplexDoubleStorage": "complex128", "UntypedStorage": "untyped bytes"}

LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # 30 bytes; the last two: name and extra lengths
LOCAL_HEADER_MAGIC = 0x04034B50


def read_pth(path: str) -> Dict[str, RawTensor]:
    """The state dict in the torch.save zip at `path`: name -> RawTensor (memmap views), in the
    file's order. Raises ModelFormatError / UnsupportedModelError naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelFormatError(f"{path}: no such file")
    file_size = os.path.getsize(path)
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:1] == b"\x80":
            raise UnsupportedModelError(
                f"{path}: a legacy (pre-1.6, not zip) torch.save file; re-save it with a current "
                "torch (torch.save(torch.load(p), p)) to read it") from e
        raise ModelFormatError(f"{path}: not a torch.save zip archive, or truncated ({e})") from e
    except ZIP_ERRORS as e:  # a name that is not UTF-8, sizes that overflow ...
        raise ModelFormatError(f"{path}: not a readable zip archive ({type(e).__name__}: {e})") from None
    with zf, open(path, "rb") as raw:
        prefix = _record_prefix(path, zf)
        _check_byteorder(path, zf, prefix)
        pkl = _read_member(path, zf, f"{prefix}/data.pkl", file_size)
        mm = map_readonly(path)
        loader = _Loader(path, pkl, zf, raw, prefix, mm, file_size)
        return loader.state_dict()


# what zipfile raises on a corrupt archive besides BadZipFile (UnicodeDecodeError is a ValueError;
# RuntimeError: an encrypted member)
ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError,
              zlib.error, struct.error, OverflowError, RuntimeError)


def _read_member(path, zf, name, file_size) -> bytes:
    """A small member's bytes (data.pkl, byteorder). Its declared size is checked first: a
    compressed member could otherwise inflate to any size (a zip bomb)."""
    try:
        size = zf.getinfo(name).file_size
        if size > file_size:
            raise ModelFormatError(f"{path}: {name} claims {size} bytes, more than the whole file "
                                   f"({file_size}); torch.save stores members uncompressed")
        return zf.read(name)
    except ZIP_ERRORS as e:
        raise ModelFormatError(f"{path}: cannot read {name} ({type(e).__name__}: {e})") from None


def _record_prefix(path, zf: zipfile.ZipFile) -> str:
    """The one top-level folder holding data.pkl (torch names it after the saved file)."""
    prefixes = [n[: -len("/data.pkl")] for n in zf.namelist()
                if n.endswith("/data.pkl") and n.count("/") == 1]
    if not prefixes:
        raise ModelFormatError(f"{path}: a zip without <name>/data.pkl; not a torch.save file")
    if len(prefixes) > 1:
        raise ModelFormatError(f"{path}: several data.pkl records ({', '.join(prefixes)}); "
                               "not a torch.save file")
    return prefixes[0]


def _check_byteorder(path, zf, prefix):
    name = f"{prefix}/byteorder"
    if name in zf.namelist():
        order = _read_member(path, zf, name, os.path.getsize(path)).strip()
        if order != b"little":
            raise UnsupportedModelError(f"{path}: byteorder {order!r}; pecca reads little-endian "
                                        "checkpoints only")


class _StorageType:
    """Stand-in for torch.FloatStorage & co.: only its dtype matters."""

    __slots__ = ("torch_name", "dtype")

    def __init__(self, torch_name, dtype):
        self.torch_name, self.dtype = torch_name, dtype

    def __repr__(self):
        return f"torch.{self.torch_name}"


_STORAGE_TYPES = {name: _StorageType(name, dt) for name, dt in STORAGE_DTYPES.items()}


class _Storage:
    """One storage: a 1-D view of `numel` elements of its zip member's bytes."""

    __slots__ = ("key", "dtype", "array")

    def __init__(self, key, dtype, array):
        self.key, self.dtype, self.array = key, dtype, array


class _TensorRef:
    """What the pickle sees for a tensor: an identity and nothing else (no __dict__, no slots,
    so the pickle cannot BUILD onto it); the tensor itself lives in _Loader.tensors."""

    __slots__ = ()


class _Loader(pickle.Unpickler):
    def __init__(self, path, pkl, zf, raw, prefix, mm, file_size):
        super().__init__(io.BytesIO(pkl))
        self.path, self.zf, self.raw, self.prefix = path, zf, raw, prefix
        self.mm, self.file_size = mm, file_size
        self.members = {info.filename: info for info in zf.infolist()}
        self.storages: Dict[str, _Storage] = {}
        self.tensors: Dict[int, tuple] = {}  # id(ref) -> (ref, RawTensor)

    # --- what the pickle may name ---------------------------------------------------------
    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor_v2
        if module == "torch._utils" and name == "_rebuild_parameter":
            return self._rebuild_parameter
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_TYPES:
            return _STORAGE_TYPES[name]
        if module == "torch" and name in OTHER_STORAGES:
            raise UnsupportedModelError(
                f"{self.path}: holds {OTHER_STORAGES[name]} tensors (torch.{name}); pecca reads "
                "float32, float16 and bfloat16 checkpoints")
        raise ModelFormatError(
            f"{self.path}: data.pkl refers to {module}.{name}, which a tensor checkpoint never "
            "needs; refused (nothing was run)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ModelFormatError(f"{self.path}: unknown persistent record {pid!r:.80} in data.pkl")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise ModelFormatError(f"{self.path}: storage record with type {stype!r:.80}")
        if not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise ModelFormatError(f"{self.path}: malformed storage record {pid!r:.120}")
        known = self.storages.get(key)
        if known is not None:
            if known.dtype != stype.dtype or known.array.shape[0] != numel:
                raise ModelFormatError(f"{self.path}: storage {key} is referenced as both "
                                       f"{known.dtype}[{known.array.shape[0]}] and {stype.dtype}[{numel}]")
            return known
        storage = _Storage(key, stype.dtype, self._map_member(key, stype.dtype, numel))
        self.storages[key] = storage
        return storage

    # --- the storage members --------------------------------------------------------------
    def _map_member(self, key, dtype, numel) -> np.ndarray:
        name = f"{self.prefix}/data/{key}"
        info = self.members.get(name)
        if info is None:
            raise ModelFormatError(f"{self.path}: storage member {name} is missing")
        if info.compress_type != zipfile.ZIP_STORED:
            raise UnsupportedModelError(
                f"{self.path}: member {name} is compressed (method {info.compress_type}); torch.save "
                "stores tensors uncompressed, and pecca maps them in place")
        if info.flag_bits & 0x1:
            raise UnsupportedModelError(f"{self.path}: member {name} is encrypted")
        self.raw.seek(info.header_offset)
        head = self.raw.read(LOCAL_HEADER.size)
        if len(head) < LOCAL_HEADER.size:
            raise ModelFormatError(f"{self.path}: truncated: local header of {name} at "
                                   f"{info.header_offset} is past the end of the file")
        fields = LOCAL_HEADER.unpack(head)
        name_len, extra_len = fields[-2], fields[-1]
        if fields[0] != LOCAL_HEADER_MAGIC or self.raw.read(name_len) != name.encode():
            raise ModelFormatError(f"{self.path}: bad local header for {name} at {info.header_offset}")
        start = info.header_offset + LOCAL_HEADER.size + name_len + extra_len
        end = start + info.compress_size
        if end > self.file_size:
            raise ModelFormatError(
                f"{self.path}: truncated: {name} needs bytes {start}..{end}, the file has {self.file_size}")
        itemsize = np.dtype(NUMPY_DTYPES[dtype]).itemsize
        if info.file_size != numel * itemsize:
            raise ModelFormatError(
                f"{self.path}: {name} is {info.file_size} bytes, but its record says {numel} "
                f"{dtype} elements ({numel * itemsize} bytes)")
        return self.mm[start:end].view(NUMPY_DTYPES[dtype])

    # --- the tensor rebuild functions (stand-ins for torch._utils') -------------------------
    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad=False,
                           backward_hooks=None, metadata=None):
        if not isinstance(storage, _Storage):
            raise ModelFormatError(f"{self.path}: tensor built from {storage!r:.80}, not a storage")
        if not (_ints(size) and _ints(stride) and len(size) == len(stride)
                and type(storage_offset) is int and storage_offset >= 0 and min(size, default=0) >= 0):
            raise ModelFormatError(f"{self.path}: tensor with malformed offset/size/stride "
                                   f"{storage_offset!r:.40} {size!r:.80} {stride!r:.80}")
        size, stride = tuple(size), tuple(stride)
        n = int(np.prod(size, dtype=object)) if size else 1
        if n and not _is_contiguous(size, stride):
            raise UnsupportedModelError(
                f"{self.path}: a tensor of size {size} has non-contiguous stride {stride} (a saved "
                "view such as a transpose); save .contiguous() tensors")
        have = storage.array.shape[0]
        if n and storage_offset + n > have:
            raise ModelFormatError(
                f"{self.path}: a tensor of size {size} at offset {storage_offset} needs "
                f"{storage_offset + n} elements; storage {storage.key} holds {have}")
        data = storage.array[storage_offset:storage_offset + n].reshape(size)
        ref = _TensorRef()
        self.tensors[id(ref)] = (ref, RawTensor(data, storage.dtype))
        return ref

    def _rebuild_parameter(self, data, requires_grad=False, backward_hooks=None):
        if not isinstance(data, _TensorRef):
            raise ModelFormatError(f"{self.path}: parameter built from {data!r:.80}, not a tensor")
        return data

    # --- the result -----------------------------------------------------------------------
    def state_dict(self) -> Dict[str, RawTensor]:
        try:
            obj = self.load()
        except PeccaError:
            raise
        except Exception as e:  # any malformed pickle: truncated, bad opcode, wrong arity, ...
            raise ModelFormatError(f"{self.path}: data.pkl is malformed ({type(e).__name__}: {e})") from e
        if not isinstance(obj, dict):
            raise ModelFormatError(f"{self.path}: holds a {type(obj).__name__}, not a state dict")
        out = {}
        for name, ref in obj.items():
            entry = self.tensors.get(id(ref))
            if not isinstance(name, str) or entry is None or entry[0] is not ref:
                raise ModelFormatError(f"{self.path}: state dict entry {name!r:.80} is not a tensor")
            out[name] = entry[1]
        return out


def _ints(xs) -> bool:
    return isinstance(xs, (tuple, list)) and all(type(x) is int for x in xs)


def _is_contiguous(size, stride) -> bool:
    """Row-major contiguous; the stride of a dimension of size 1 does not matter (torch
    writes arbitrary values there)."""
    expected = 1
    for s, st in zip(reversed(size), reversed(stride)):
        if s != 1 and st != expected:
            return False
        expected *= s
    return True
