"""pecca's own GGUF parser (pecca.formats.gguf_file) against gguf.GGUFReader, and on bad input.

- metadata and tensors (type, shape, byte range, numpy view) equal GGUFReader's on pecca's
  exports (f32, f16, q8_0, q4_0, q4_1, GPTQ's I32/I8/F16 tensors), on a file of every value
  type and tensor kind written by gguf.GGUFWriter (BF16 included), and on the real SmolLM2
  GGUF; the open times of both are printed;
- malformed files (wrong magic, versions 1 and 99, big-endian, truncations, huge lengths and
  counts, bad offsets, dims and types, duplicates) are each a ModelFormatError, raised at once.
"""
import struct
import time

import gguf
import numpy as np
import pytest

import pecca
from export import export
from pecca.errors import ModelFormatError
from pecca.formats.gguf import Metadata
from pecca.formats.gguf_file import open_gguf
from shared_data import shared_file, smollm2_gguf

VT = gguf.GGUFValueType
QT = gguf.GGMLQuantizationType


def reader_fields(r):
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def assert_same_as_gguf_reader(path):
    """Every field and tensor of `path` as GGUFReader reads it; returns both open times."""
    t0 = time.perf_counter()
    r = gguf.GGUFReader(str(path))
    t1 = time.perf_counter()
    f = open_gguf(str(path))
    t2 = time.perf_counter()
    want = reader_fields(r)
    assert list(f.fields) == list(want)
    for k, v in want.items():
        assert f.fields[k] == v and type(f.fields[k]) is type(v), k
    assert f.data_offset == r.data_offset and f.alignment == r.alignment
    assert [t.name for t in f.tensors] == [t.name for t in r.tensors]
    for a, b in zip(r.tensors, f.tensors):
        assert b.tensor_type == a.tensor_type and list(b.shape) == a.shape.tolist(), a.name
        assert (b.n_elements, b.n_bytes, b.data_offset) == (a.n_elements, a.n_bytes, a.data_offset), a.name
        assert b.data.dtype == a.data.dtype and b.data.shape == a.data.shape, a.name
        assert np.array_equal(b.data, a.data, equal_nan=b.data.dtype.kind == "f"), a.name
        assert not b.data.flags.writeable and isinstance(b.data, np.memmap)
    return t1 - t0, t2 - t1


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf_reader")
    out = []
    for dtype in ("f32", "f16", "q8_0", "q4_0", "q4_1"):
        out.append(d / f"s260k-{dtype}.gguf")
        export(str(shared_file("models", "hf", "stories260K-f32")), str(out[-1]), dtype)
    out.append(d / "gptq.gguf")
    export(str(shared_file("models", "gptq", "stories260K-gptq-4bit-g32-actorder")), str(out[-1]))
    return out


def test_pecca_exports_read_as_gguf_reader_reads_them(exports):
    for path in exports:
        assert_same_as_gguf_reader(path)
    kinds = {t.tensor_type.name for p in exports for t in open_gguf(str(p)).tensors}
    assert {"F32", "F16", "Q8_0", "Q4_0", "Q4_1", "I32", "I8"} <= kinds


def test_every_value_type_and_tensor_kind(tmp_path):
    path = tmp_path / "all.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 1e-5)
    w.add_uint64("t.u64", 1 << 63)
    w.add_int64("t.i64", -(1 << 62))
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.true", True)
    w.add_bool("t.false", False)
    w.add_string("t.str", "héllo ▁wörld 🙂")
    w.add_string("t.empty", "")
    w.add_array("t.strs", ["a", "", "ü b", "<|im_end|>"])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.25])
    w.add_key_value("t.bools", [True, False, True], VT.ARRAY, VT.BOOL)
    w.add_key_value("t.u64s", [1, 1 << 63], VT.ARRAY, VT.UINT64)
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16_3d", rng.standard_normal((2, 3, 4)).astype(np.float16))
    w.add_tensor("f64_4d", rng.standard_normal((2, 1, 3, 2)))
    w.add_tensor("i8", np.arange(-5, 5, dtype=np.int8))
    w.add_tensor("i16", np.arange(6, dtype=np.int16).reshape(2, 3))
    w.add_tensor("i32", np.arange(6, dtype=np.int32).reshape(3, 2))
    w.add_tensor("i64", np.arange(4, dtype=np.int64))
    w.add_tensor("bf16", rng.integers(0, 255, (4, 16), dtype=np.uint8), raw_dtype=QT.BF16)
    w.add_tensor("q8_0", rng.integers(0, 255, (2, 2 * 34), dtype=np.uint8), raw_dtype=QT.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_same_as_gguf_reader(path)
    f = open_gguf(str(path))
    assert f.fields["t.strs"] == ["a", "", "ü b", "<|im_end|>"] and f.fields["t.bools"] == [True, False, True]
    bf16 = next(t for t in f.tensors if t.name == "bf16")
    assert bf16.data.dtype == np.uint8 and bf16.data.shape == (4, 16) and list(bf16.shape) == [8, 4]


def test_smollm2_reads_as_gguf_reader_reads_it():
    slow, fast = assert_same_as_gguf_reader(smollm2_gguf())
    print(f"\nSmolLM2-135M GGUF open: GGUFReader {slow * 1000:.0f} ms, pecca {fast * 1000:.0f} ms")


# --- malformed files, built byte by byte ---

def gstr(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype, payload):
    return gstr(key) + struct.pack("<I", vtype) + payload


def tinfo(name, dims, ttype=QT.F32, offset=0):
    return gstr(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ttype, offset)


ARCH = kv("general.architecture", VT.STRING, gstr("llama"))
ONE_TENSOR = (tinfo("a", [8]),)


def build(kvs=(ARCH,), infos=ONE_TENSOR, data=bytes(32), version=3, magic=b"GGUF", counts=None,
          alignment=32):
    n_tensors, n_kv = counts or (len(infos), len(kvs))
    head = magic + struct.pack("<IQQ", version, n_tensors, n_kv) + b"".join(kvs) + b"".join(infos)
    return head + bytes(-len(head) % alignment) + data


def refused(tmp_path, blob, *words):
    p = tmp_path / "bad.gguf"
    p.write_bytes(blob)
    t0 = time.perf_counter()
    with pytest.raises(ModelFormatError) as e:
        open_gguf(str(p))
    assert time.perf_counter() - t0 < 2, "a malformed file must be refused at once"
    msg = str(e.value)
    assert str(p) in msg and all(w in msg for w in words), msg
    return msg


def test_the_byte_builder_makes_a_valid_file(tmp_path):
    p = tmp_path / "ok.gguf"
    empty = kv("empty", VT.ARRAY, struct.pack("<IQ", VT.INT32, 0))  # GGUFWriter cannot write one
    p.write_bytes(build(kvs=(ARCH, empty), data=np.arange(8, dtype=np.float32).tobytes()))
    f = open_gguf(str(p))
    assert f.fields == {"general.architecture": "llama", "empty": []}
    assert f.tensors[0].data.tolist() == list(range(8))
    assert_same_as_gguf_reader(p)


@pytest.mark.parametrize("blob, words", [
    (build(magic=b"GGUX"), ["magic"]),
    (build(version=1), ["version 1"]),
    (build(version=99), ["version 99"]),
    (build(version=3 << 24), ["big-endian"]),
    (b"GGUF", ["too short"]),
    (b"", ["too short"]),
], ids=["magic", "v1", "v99", "big-endian", "magic-only", "empty"])
def test_header_refused(tmp_path, blob, words):
    refused(tmp_path, blob, *words)


HUGE = 1 << 63


@pytest.mark.parametrize("blob, words", [
    (build(counts=(1, 1 << 40)), ["metadata pairs"]),
    (build(counts=(1 << 40, 1)), ["tensor infos"]),
    (build(kvs=(struct.pack("<Q", HUGE) + b"k",)), ["a metadata key", str(HUGE)]),
    (build(kvs=(kv("s", VT.STRING, struct.pack("<Q", HUGE)),)), ["s (", str(HUGE)]),
    (build(kvs=(kv("a", VT.ARRAY, struct.pack("<IQ", VT.STRING, 1 << 40)),)), ["strings of a"]),
    (build(kvs=(kv("a", VT.ARRAY, struct.pack("<IQ", VT.FLOAT64, 1 << 40)),)), ["values of a"]),
    (build(kvs=(kv("a", VT.ARRAY, struct.pack("<IQ", VT.UINT8, HUGE)),)), ["values of a"]),
    (build(kvs=(kv("a", VT.ARRAY, struct.pack("<IQQ", VT.STRING, 2, 1) + b"x" + struct.pack("<Q", HUGE)),)),
     ["a[1] has length"]),
    (build(infos=(gstr("t") + struct.pack("<I", 1) + struct.pack("<Q", HUGE) + struct.pack("<IQ", 0, 0),)),
     ["overflow"]),
], ids=["kv-count", "tensor-count", "key-length", "string-length", "string-array-count",
        "number-array-count", "byte-array-count", "string-in-array-length", "dim-2^63"])
def test_huge_lengths_and_counts_refused_without_allocating(tmp_path, blob, words):
    refused(tmp_path, blob, *words)


@pytest.mark.parametrize("blob, words", [
    (build(kvs=(kv("x", 13, b"\0" * 8),)), ["unknown value type 13"]),
    (build(kvs=(kv("x", VT.ARRAY, struct.pack("<IQ", VT.ARRAY, 0)),)), ["array of unsupported type"]),
    (build(kvs=(ARCH, ARCH)), ["general.architecture", "twice"]),
    (build(kvs=(kv(b"\xff\xfe", VT.UINT8, b"\0"),)), ["not UTF-8"]),
    (build(kvs=(kv("general.alignment", VT.UINT32, struct.pack("<I", 24)),)), ["power of two"]),
    (build(kvs=(kv("general.alignment", VT.UINT32, struct.pack("<I", 0)),)), ["power of two"]),
    (build(kvs=(kv("general.alignment", VT.UINT64, struct.pack("<Q", 32)),)), ["UINT32"]),
    (build(infos=(tinfo("a", [8], offset=32),)), ["past the end"]),
    (build(infos=(tinfo("a", [8], offset=HUGE),)), ["past the end"]),
    (build(infos=(tinfo("a", [8], offset=4),)), ["not a multiple of the alignment"]),
    (build(infos=(tinfo("a", [4], offset=0), tinfo("b", [4], offset=16)),
           kvs=(kv("general.alignment", VT.UINT32, struct.pack("<I", 64)),), alignment=64),
     ["tensor b", "alignment 64"]),
    (build(infos=(tinfo("a", [1, 1, 1, 1, 8]),)), ["5 dimensions"]),
    (build(infos=(tinfo("a", []),)), ["0 dimensions"]),
    (build(infos=(tinfo("a", [8, 0]),)), ["positive"]),
    (build(infos=(tinfo("a", [1 << 32, 1 << 32, 1 << 32]),)), ["overflow"]),
    (build(infos=(tinfo("a", [8]), tinfo("a", [8]))), ["tensor name 'a' appears twice"]),
    (build(infos=(tinfo("a", [8], ttype=4),)), ["unknown type 4"]),
    (build(infos=(tinfo("a", [8], ttype=999),)), ["unknown type 999"]),
    (build(infos=(tinfo("a", [16], ttype=QT.Q8_0),)), ["blocks of 32"]),
    (build(infos=(tinfo("a", [64], ttype=QT.Q8_0),)), ["past the end"]),
], ids=["value-type", "nested-array", "duplicate-key", "key-not-utf8", "alignment-24", "alignment-0",
        "alignment-u64", "offset-past-end", "offset-2^63", "misaligned", "misaligned-64", "n_dims-5",
        "n_dims-0", "dim-0", "dims-overflow", "duplicate-tensor", "removed-type", "unknown-type",
        "partial-block", "data-too-short"])
def test_malformed_files_refused(tmp_path, blob, words):
    refused(tmp_path, blob, *words)


def test_undecodable_value_is_refused_when_asked_for(tmp_path):
    """As with GGUFReader, a value that is not UTF-8 fails only where it is read."""
    p = tmp_path / "v.gguf"
    bad = kv("bad", VT.STRING, gstr(b"\xff")), kv("bad.list", VT.ARRAY, struct.pack("<IQ", VT.STRING, 2)
                                                     + gstr("ok") + gstr(b"\xc3"))
    p.write_bytes(build(kvs=(ARCH,) + bad))
    meta = Metadata(str(p), open_gguf(str(p)))
    assert meta.get("general.architecture") == "llama"
    for key in ("bad", "bad.list"):
        with pytest.raises(ModelFormatError, match=f"metadata {key} cannot be read"):
            meta.get(key)


def test_every_truncation_is_refused(tmp_path, exports):
    """An export cut every 97 bytes through its header (vocabulary included), then in its data."""
    whole = exports[0].read_bytes()
    data_start = open_gguf(str(exports[0])).data_offset
    cuts = list(range(0, data_start + 1, 97)) + [data_start - 1, data_start + 1, len(whole) - 1]
    for cut in cuts:
        refused(tmp_path, whole[:cut])
    p = tmp_path / "cut.gguf"
    p.write_bytes(whole[:len(whole) - 1])
    with pytest.raises(ModelFormatError, match="past the end"):
        pecca.load(str(p))
