"""Structural mutations of model files, drawn with hypothesis.

Two levels, combined in one case:
- semantic edits, made on a parsed copy of the valid file and written back consistently (a
  GGUF key given another type or value, a tensor retyped, reshaped, renamed or dropped, a
  safetensors header entry edited, a pickle's integer replaced, a JSON config field made
  huge, negative, zero, of the wrong type, or removed), so that the reader's own checks are
  reached rather than only its first length check;
- raw edits on the bytes, guided by a `Layout`, the named fields and region boundaries of the
  written file: set a size/count/offset/dim field to 0, -1, 2^31, 2^63 ..., flip header bytes,
  truncate at every boundary and at random points, append garbage.
"""
import copy
import io
import json
import math
import pickletools
import struct
import zipfile
from dataclasses import dataclass, field
from typing import List, Tuple

from hypothesis import strategies as st

SPECIAL_INTS = [0, 1, -1, 2, 3, 7, 8, 31, 32, 33, 255, 256, 4096, 65535, 65536, (1 << 31) - 1, 1 << 31,
                (1 << 32) - 1, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, -(1 << 31), -(1 << 63)]
SPECIAL_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, 1e-30, 1e30, 3.4e38, 1e300, float("nan"), float("inf"),
                  float("-inf")]


# --- raw edits ------------------------------------------------------------------------------

@dataclass
class Layout:
    """What a writer knows about the bytes it wrote: fields (name, offset, struct format) and
    the boundaries between regions; `header_end`: where the bulk data starts."""
    fields: List[Tuple[str, int, str]] = field(default_factory=list)
    bounds: List[int] = field(default_factory=list)
    header_end: int = 0

    def add(self, name, offset, fmt):
        self.fields.append((name, offset, fmt))

    def shifted(self, by: int) -> "Layout":
        return Layout([(n, o + by, f) for n, o, f in self.fields], [b + by for b in self.bounds],
                      self.header_end + by)


def pack_value(fmt: str, value) -> bytes:
    """`value` in `fmt`, wrapped to the field's width (so -1 is all ones, 2^63 in a u32 is 0)."""
    if fmt[-1] in "fd":
        if isinstance(value, int):  # an integer for a float field: its bit pattern
            return struct.pack("<I" if fmt[-1] == "f" else "<Q", value % (1 << (8 * struct.calcsize(fmt))))
        try:
            return struct.pack(fmt, value)
        except OverflowError:
            return struct.pack(fmt, math.copysign(math.inf, value))
    size = struct.calcsize(fmt)
    unsigned = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[size]
    v = value if isinstance(value, int) else int(value) if math.isfinite(value) else -1
    return struct.pack(unsigned, v % (1 << (8 * size)))


@st.composite
def raw_edit(draw, layout: Layout, size: int):
    kind = draw(st.sampled_from(["set", "set", "set", "truncate", "truncate", "flip", "byte", "extend", "put"]))
    if kind == "set" and layout.fields:
        name, offset, fmt = draw(st.sampled_from(layout.fields))
        pool = SPECIAL_FLOATS + SPECIAL_INTS if fmt[-1] in "fd" else SPECIAL_INTS
        value = draw(st.sampled_from(pool) | st.integers(-(1 << 63), (1 << 64) - 1))
        return ("set", name, offset, fmt, value)
    if kind == "truncate":
        near = [max(0, b + d) for b in layout.bounds for d in (-1, 0, 1)] or [0]
        at = draw(st.sampled_from(near) | st.integers(0, max(0, size - 1)))
        return ("truncate", at)
    if kind == "flip":
        end = max(1, min(size, layout.header_end or size))
        return ("flip", draw(st.integers(0, end - 1)), draw(st.integers(1, 255)))
    if kind == "put":  # NaN, infinities, huge values into the data: the numerical faults
        at = draw(st.integers(layout.header_end, max(layout.header_end, size - 16)))
        return ("put", at - at % 4, draw(st.sampled_from(DATA_PATTERNS)))
    if kind == "byte":
        return ("byte", draw(st.integers(0, max(0, size - 1))), draw(st.integers(0, 255)))
    return ("extend", draw(st.sampled_from([1, 3, 8, 31, 4096])), draw(st.integers(0, 255)))


def raw_edits(layout: Layout, size: int, most: int = 3):
    return st.lists(raw_edit(layout, size), min_size=0, max_size=most)


def apply_raw(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for e in edits:
        if e[0] == "set":
            _, _, offset, fmt, value = e
            v = pack_value(fmt, value)
            if offset + len(v) <= len(b):
                b[offset:offset + len(v)] = v
        elif e[0] == "truncate":
            del b[e[1]:]
        elif e[0] in ("flip", "byte"):
            if e[1] < len(b):
                b[e[1]] = b[e[1]] ^ e[2] if e[0] == "flip" else e[2]
        elif e[0] == "put":
            b[e[1]:e[1] + len(e[2])] = e[2][:max(0, len(b) - e[1])]
        elif e[0] == "extend":
            b += bytes([e[2]]) * e[1]
    return bytes(b)


# --- JSON edits (config.json, params.json, safetensors headers, tokenizer.json) ------------------

JSON_VALUES = SPECIAL_INTS + [0.5, 1e-30, 1e308, -1e308, float("nan"), float("inf"), "", "x", "llama",
                              "gpt2", "silu", "linear", "llama3", "dynamic", "F64", "I8", "U8", "BOOL", "F16",
                              "BF16", "F32", "I32", None, True, False, [], {}, [1, 2], [0], [-1, 2 ** 63],
                              {"type": "x"}, "\u2581", "<0x41>", "<s>", "</s>", "(", {"+:.*": {"bits": 8}},
                              {"-:.*mlp.*": {}}, {"(": {}}]


def json_paths(doc, limit: int = 4000) -> list:
    """Paths (tuples of keys and indices) to every value of `doc`, breadth first, at most `limit`."""
    out, queue = [], [((), doc)]
    while queue and len(out) < limit:
        path, v = queue.pop(0)
        if path:
            out.append(path)
        if isinstance(v, dict):
            queue += [(path + (k,), x) for k, x in v.items()]
        elif isinstance(v, list):
            queue += [(path + (i,), x) for i, x in enumerate(v)]
    return out


def get_path(doc, path):
    for k in path:
        doc = doc[k]
    return doc


@st.composite
def json_edit(draw, doc, paths=None, values=()):
    paths = paths if paths is not None else json_paths(doc)
    kind = draw(st.sampled_from(["set", "set", "set", "delete", "scale", "swap", "add"]))
    if not paths:
        return ("add", (), "extra", draw(st.sampled_from(JSON_VALUES)))
    path = draw(st.sampled_from(paths))
    if kind == "set":
        return ("set", path, draw(st.sampled_from(list(values) + JSON_VALUES)))
    if kind == "scale":
        return ("scale", path, draw(st.sampled_from([2, -1, 0, 1 << 20, 1 << 40, 0.5, 3])))
    if kind == "swap":
        return ("swap", path, draw(st.sampled_from(paths)))
    if kind == "add":
        return ("add", path[:-1], draw(st.sampled_from(["extra", "dtype", "shape", "bits", "0", "dynamic",
                                                        "rope_scaling", "head_dim", "+:(model", "-:.*mlp.*"])),
                draw(st.sampled_from(JSON_VALUES)))
    return ("delete", path)


def json_edits(doc, most=3, values=()):
    paths = json_paths(doc)
    return st.lists(json_edit(doc, paths, values), min_size=1, max_size=most)


def apply_json(doc, edits):
    doc = copy.deepcopy(doc)
    for e in edits:
        try:
            if e[0] == "add":
                parent = get_path(doc, e[1])
                if isinstance(parent, dict):
                    parent[e[2]] = e[3]
                elif isinstance(parent, list):
                    parent.append(e[3])
                continue
            parent, key = get_path(doc, e[1][:-1]), e[1][-1]
            if e[0] == "set":
                parent[key] = copy.deepcopy(e[2])
            elif e[0] == "delete":
                del parent[key]
            elif e[0] == "scale":
                v = parent[key]
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    parent[key] = v * e[2] if isinstance(e[2], int) or isinstance(v, float) else v
            elif e[0] == "swap":
                parent[key] = copy.deepcopy(get_path(doc, e[2]))
        except (KeyError, IndexError, TypeError):
            pass  # an earlier edit removed the path: nothing to do
    return doc


def dump_json(doc) -> bytes:
    return json.dumps(doc).encode()


# --- GGUF ---------------------------------------------------------------------------------------

U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
SCALAR_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<B",
              U64: "<Q", I64: "<q", F64: "<d"}


def _u(fmt, data, pos):
    return struct.unpack_from(fmt, data, pos)[0], pos + struct.calcsize(fmt)


def parse_gguf(data: bytes) -> dict:
    """A valid GGUF file as {"version", "kvs": [[key, vtype, value, itype]], "tensors": [[name,
    dims, type, bytes]], "alignment"} (a plain copy to edit and write again)."""
    version, pos = _u("<I", data, 4)
    n_t, pos = _u("<Q", data, pos)
    n_kv, pos = _u("<Q", data, pos)

    def string(pos):
        n, pos = _u("<Q", data, pos)
        return data[pos:pos + n].decode(), pos + n

    def value(t, pos):
        if t == STRING:
            return string(pos)
        return _u(SCALAR_FMT[t], data, pos)

    kvs = []
    for _ in range(n_kv):
        key, pos = string(pos)
        vt, pos = _u("<I", data, pos)
        if vt == ARRAY:
            it, pos = _u("<I", data, pos)
            n, pos = _u("<Q", data, pos)
            items = []
            for _ in range(n):
                v, pos = value(it, pos)
                items.append(v)
            kvs.append([key, vt, items, it])
        else:
            v, pos = value(vt, pos)
            kvs.append([key, vt, v, None])
    alignment = next((v for k, _, v, _ in kvs if k == "general.alignment"), 32)
    infos = []
    for _ in range(n_t):
        name, pos = string(pos)
        nd, pos = _u("<I", data, pos)
        dims = list(struct.unpack_from(f"<{nd}Q", data, pos))
        pos += 8 * nd
        tt, pos = _u("<I", data, pos)
        off, pos = _u("<Q", data, pos)
        infos.append((name, dims, tt, off))
    start = -(-pos // alignment) * alignment
    ends = sorted(off for _, _, _, off in infos)[1:] + [len(data) - start]
    tensors = []
    for name, dims, tt, off in infos:
        end = min(e for e in ends if e > off) if any(e > off for e in ends) else len(data) - start
        tensors.append([name, dims, tt, data[start + off:start + off + tensor_nbytes(dims, tt, end - off)]])
    return {"version": version, "kvs": kvs, "tensors": tensors, "alignment": alignment}


def tensor_nbytes(dims, ttype, default=None):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
    except (ValueError, KeyError):
        return default
    n = 1
    for d in dims:
        n *= d
    return n // block * size


class _Writer:
    def __init__(self):
        self.out = bytearray()
        self.layout = Layout()

    def put(self, fmt, v, name=None):
        if name is not None:
            self.layout.add(name, len(self.out), fmt)
        self.out += pack_value(fmt, float(v) if fmt[-1] in "fd" else v)

    def string(self, s, name=None):
        raw = s if isinstance(s, bytes) else s.encode("utf-8", "surrogatepass")
        self.put("<Q", len(raw), name)
        self.out += raw

    def bound(self):
        self.layout.bounds.append(len(self.out))


def write_gguf(m: dict) -> Tuple[bytes, Layout]:
    w = _Writer()
    w.out += b"GGUF"
    w.put("<I", m["version"], "version")
    w.put("<Q", len(m["tensors"]), "tensor count")
    w.put("<Q", len(m["kvs"]), "metadata count")
    w.bound()
    for key, vt, v, it in m["kvs"]:
        w.string(key, f"length of key {key}")
        w.put("<I", vt, f"type of {key}")
        if vt == ARRAY:
            w.put("<I", it, f"item type of {key}")
            w.put("<Q", len(v), f"length of {key}")
            for j, item in enumerate(v):
                _item(w, it, item, f"{key}[{j}]" if j < 3 or j == len(v) - 1 else None)
        else:
            _item(w, vt, v, key)
        w.bound()
    alignment = m.get("alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        alignment = 32
    offsets, off = [], 0
    for t in m["tensors"]:
        offsets.append(off if len(t) < 5 else t[4])
        off += -(-len(t[3]) // alignment) * alignment
    for (name, dims, tt, data, *_), off in zip(m["tensors"], offsets):
        w.string(name, f"length of tensor name {name}")
        w.put("<I", len(dims), f"n_dims of {name}")
        for k, d in enumerate(dims):
            w.put("<Q", d, f"dim {k} of {name}")
        w.put("<I", tt, f"type of {name}")
        w.put("<Q", off, f"offset of {name}")
        w.bound()
    w.out += b"\0" * (-len(w.out) % alignment)
    w.layout.header_end = len(w.out)
    w.bound()
    for name, dims, tt, data, *_ in m["tensors"]:
        w.out += data + b"\0" * (-len(data) % alignment)
        w.bound()
    return bytes(w.out), w.layout


def _item(w, t, v, name):
    if t == STRING:
        w.string(v, None if name is None else f"length of {name}")
    elif t in SCALAR_FMT:
        fmt = SCALAR_FMT[t]
        if isinstance(v, str):
            v = 0
        w.put(fmt, v if fmt[-1] in "fd" else int(v), name)
    else:  # a nonsense type: a few bytes
        w.out += b"\x01\x00\x00\x00"


KV_VALUES = [(U32, 0, None), (U32, 1, None), (U32, (1 << 32) - 1, None), (U32, 1 << 31, None),
             (I32, -1, None), (I32, 7, None), (U64, 1 << 63, None), (U64, 0, None), (I64, -(1 << 63), None),
             (F32, float("nan"), None), (F32, float("inf"), None), (F32, -1.0, None), (F32, 0.0, None),
             (F32, 1e-30, None), (F64, 1e300, None), (BOOL, 1, None), (U8, 255, None), (I8, -128, None),
             (STRING, "", None), (STRING, "x", None), (STRING, "llama", None), (STRING, "gpt2", None),
             (STRING, "linear", None), (STRING, "yarn", None), (STRING, b"\xff\xfe", None),
             (ARRAY, [1, 2, 3], I32), (ARRAY, [], U32), (ARRAY, ["a", "b"], STRING), (ARRAY, [float("nan")], F32),
             (ARRAY, [b"\xff"], STRING), (99, 0, None)]
TYPE_CODES = [0, 1, 2, 3, 6, 7, 8, 9, 10, 16, 24, 25, 26, 27, 28, 29, 30, 31, 39, 99, (1 << 32) - 1]
TENSOR_NAMES = ["token_embd.weight", "output.weight", "output_norm.weight", "rope_freqs.weight",
                "blk.0.attn_q.weight", "blk.9.attn_q.weight", "blk.0.attn_q.gptq_perm", "blk.0.attn_q.gptq_qs", "blk.0.ffn_down.gptq_qs",
                "x", ""]


@st.composite
def gguf_edit(draw, m: dict):
    kinds = ["kv_set", "kv_set", "kv_del", "kv_dup", "arr", "arr", "t_del", "t_rename", "t_type", "t_type",
             "t_dims", "t_dims", "t_data", "t_data", "t_offset", "align", "version"]
    kind = draw(st.sampled_from(kinds))
    nk, nt = len(m["kvs"]), len(m["tensors"])
    if kind.startswith("kv") or kind == "arr":
        i = draw(st.integers(0, nk - 1))
        if kind == "kv_set":
            return ("kv_set", i, draw(st.sampled_from(KV_VALUES)))
        if kind == "arr":
            return ("arr", i, draw(st.sampled_from(["cut", "grow", "item"])), draw(st.integers(0, 600)),
                    draw(st.sampled_from(SPECIAL_INTS + SPECIAL_FLOATS + ["", "<0x41>", " ", "a b", "\u2581"])))
        return (kind, i)
    if kind == "align":
        return ("align", draw(st.sampled_from([0, 1, 3, 8, 64, 1 << 31, (1 << 32) - 1])))
    if kind == "version":
        return ("version", draw(st.sampled_from([0, 1, 2, 4, 1 << 24, (1 << 32) - 1])))
    i = draw(st.integers(0, nt - 1))
    if kind == "t_rename":
        return ("t_rename", i, draw(st.sampled_from(TENSOR_NAMES + [t[0] for t in m["tensors"]])))
    if kind == "t_type":
        return ("t_type", i, draw(st.sampled_from(TYPE_CODES)), draw(st.booleans()))
    if kind == "t_dims":
        how = st.sampled_from(["swap", "double", "halve", "one", "zero", "huge", "add", "drop"])
        return ("t_dims", i, draw(how), draw(st.booleans()))
    if kind == "t_data":
        return ("t_data", i, draw(st.floats(0, 1)), draw(st.sampled_from(DATA_PATTERNS)))
    if kind == "t_offset":
        return ("t_offset", i, draw(st.sampled_from([1, 31, 1 << 20, 1 << 40, (1 << 64) - 32, 0])))
    return ("t_del", i)


# bytes written into tensor data: NaN and infinities, huge ints (permutations, group indices),
# out-of-range zero points
DATA_PATTERNS = [struct.pack("<f", float("nan")) * 4, struct.pack("<f", float("inf")) * 4,
                 struct.pack("<e", float("inf")) * 8, b"\xff" * 16, b"\x80" * 16, b"\x10" * 16,
                 struct.pack("<i", -1) * 4, struct.pack("<i", 1 << 30) * 4, struct.pack("<i", 0) * 4,
                 struct.pack("<i", 255) * 4]


def apply_gguf(m: dict, edits) -> dict:
    m = copy.deepcopy(m)
    for e in edits:
        kvs, ts = m["kvs"], m["tensors"]
        kind = e[0]
        if kind.startswith("kv") or kind == "arr":
            if not kvs:
                continue
            i = e[1] % len(kvs)
            if kind == "kv_set":
                vt, v, it = e[2]
                kvs[i][1:] = [vt, copy.deepcopy(v), it]
            elif kind == "kv_del":
                del kvs[i]
            elif kind == "kv_dup":
                kvs.append(copy.deepcopy(kvs[i]))
            elif kvs[i][1] == ARRAY:
                _edit_array(kvs[i], e[2], e[3], e[4])
        elif kind == "align":
            _set_kv(m, "general.alignment", U32, e[1])
        elif kind == "version":
            m["version"] = e[1]
        elif ts:
            _edit_tensor(m, e)
    return m


def _set_kv(m, key, vt, v):
    for kv in m["kvs"]:
        if kv[0] == key:
            kv[1:] = [vt, v, None]
            return
    m["kvs"].append([key, vt, v, None])
    if key == "general.alignment" and v > 0 and not v & (v - 1) and v <= 1 << 16:
        m["alignment"] = v


def _edit_array(kv, how, n, value):
    items, it = kv[2], kv[3]
    if how == "cut":
        del items[min(n, len(items)):]
    elif how == "grow":
        items += items[-1:] * min(n, 600)
    elif items:
        j = n % len(items)
        if it == STRING:
            items[j] = value if isinstance(value, str) else str(value)
        elif it in (F32, F64):
            items[j] = float(value) if not isinstance(value, str) else 0.0
        elif it in SCALAR_FMT:
            items[j] = value if isinstance(value, int) else 0


def _edit_tensor(m, e):
    ts = m["tensors"]
    i = e[1] % len(ts)
    t = ts[i]
    if e[0] == "t_del":
        del ts[i]
    elif e[0] == "t_rename":
        t[0] = e[2]
    elif e[0] == "t_type":
        t[2] = e[2]
        if e[3]:  # data resized to what the new type needs: the container's checks pass
            t[3] = _resized(t[3], tensor_nbytes(t[1], t[2], len(t[3])))
    elif e[0] == "t_dims":
        dims = list(t[1])
        how = e[2]
        if how == "swap":
            dims.reverse()
        elif how == "double":
            dims[-1] *= 2
        elif how == "halve":
            dims[0] = max(1, dims[0] // 2)
        elif how == "one":
            dims[-1] = 1
        elif how == "zero":
            dims[0] = 0
        elif how == "huge":
            dims[-1] = 1 << 40
        elif how == "add":
            dims.append(1)
        elif how == "drop" and len(dims) > 1:
            dims.pop()
        t[1] = dims
        if e[3] and how != "huge":
            t[3] = _resized(t[3], tensor_nbytes(dims, t[2], len(t[3])))
    elif e[0] == "t_data":
        data = bytearray(t[3])
        pat = e[3]
        at = int(e[2] * max(0, len(data) - len(pat)))
        at -= at % 4
        data[at:at + len(pat)] = pat[:max(0, len(data) - at)]
        t[3] = bytes(data)
    elif e[0] == "t_offset":
        while len(t) < 5:
            t.append(None)
        t[4] = e[2]


def _resized(data: bytes, n) -> bytes:
    if n is None or n > 1 << 24:
        return data
    return data[:n] + b"\0" * max(0, n - len(data))


# --- safetensors ----------------------------------------------------------------------------------

def parse_safetensors(data: bytes):
    n = struct.unpack_from("<Q", data)[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_safetensors(header: dict, body: bytes, pad: bool = True) -> Tuple[bytes, Layout]:
    h = dump_json(header)
    if pad:
        h += b" " * (-len(h) % 8)
    lay = Layout(header_end=8 + len(h))
    lay.add("header length", 0, "<Q")
    lay.bounds = [8, 8 + len(h)]
    if isinstance(header, dict):
        for info in header.values():
            offs = info.get("data_offsets") if isinstance(info, dict) else None
            if isinstance(offs, list):
                lay.bounds += [8 + len(h) + o for o in offs if isinstance(o, int) and 0 <= o < 1 << 40]
    return struct.pack("<Q", len(h)) + h + body, lay


@st.composite
def safetensors_edit(draw, header: dict):
    names = [k for k in header if k != "__metadata__"]
    kind = draw(st.sampled_from(["json", "json", "json", "data", "drop", "rename"]))
    name = draw(st.sampled_from(names))
    if kind == "data":
        return ("data", name, draw(st.floats(0, 1)), draw(st.sampled_from(DATA_PATTERNS)))
    if kind == "drop":
        return ("drop", name)
    if kind == "rename":
        return ("rename", name, draw(st.sampled_from(names + ["x", "lm_head.weight", "model.norm.weight"])))
    sub = {name: header[name]}
    paths = json_paths(sub)
    return ("json", draw(json_edit(sub, paths, values=["F16", "BF16", "I32", "F64", "I8", "U8", [0, 1]])))


def apply_safetensors(header: dict, body: bytes, edits):
    header, body = copy.deepcopy(header), bytearray(body)
    for e in edits:
        if e[0] == "json":
            header = apply_json(header, [e[1]])
        elif e[0] == "drop":
            header.pop(e[1], None)
        elif e[0] == "rename" and e[1] in header:
            header[e[2]] = header.pop(e[1])
        elif e[0] == "data" and isinstance(header.get(e[1]), dict):
            offs = header[e[1]].get("data_offsets")
            if isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs):
                lo, hi = offs
                pat = e[3]
                at = lo + int(e[2] * max(0, hi - lo - len(pat)))
                at -= at % 4
                if 0 <= at <= len(body):
                    body[at:at + len(pat)] = pat[:max(0, min(hi, len(body)) - at)]
    return header, bytes(body)


# --- torch.save zip archives (.pth) ---------------------------------------------------------

def zip_layout(data: bytes) -> Layout:
    """The fields of every local header, central directory entry and the end record."""
    lay = Layout()
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except zipfile.BadZipFile:
        return lay
    local = [("csize", 18, "<I"), ("usize", 22, "<I"), ("name length", 26, "<H"), ("extra length", 28, "<H"),
             ("method", 8, "<H"), ("flags", 6, "<H"), ("crc", 14, "<I")]
    for info in infos:
        o = info.header_offset
        lay.bounds += [o, o + 30, o + 30 + len(info.filename)]
        for name, at, fmt in local:
            lay.add(f"{info.filename} local {name}", o + at, fmt)
    eocd = data.rfind(b"PK\x05\x06")
    if eocd >= 0:
        cd_size, cd_off = struct.unpack_from("<II", data, eocd + 12)
        lay.header_end = cd_off
        lay.bounds += [cd_off, eocd, len(data)]
        for name, at, fmt in [("entries", 10, "<H"), ("entries on disk", 8, "<H"), ("cd size", 12, "<I"),
                              ("cd offset", 16, "<I")]:
            lay.add(f"end record {name}", eocd + at, fmt)
        pos = cd_off
        while pos + 46 <= len(data) and data[pos:pos + 4] == b"PK\x01\x02":
            nl, xl, cl = struct.unpack_from("<HHH", data, pos + 28)
            for name, at, fmt in [("csize", 20, "<I"), ("usize", 24, "<I"), ("name length", 28, "<H"),
                                  ("local header offset", 42, "<I"), ("method", 10, "<H"), ("flags", 8, "<H")]:
                lay.add(f"central {pos} {name}", pos + at, fmt)
            pos += 46 + nl + xl + cl
    return lay


def read_members(data: bytes) -> List[Tuple[str, bytes]]:
    zf = zipfile.ZipFile(io.BytesIO(data))
    return [(i.filename, zf.read(i.filename)) for i in zf.infolist()]


def write_members(members, compress=()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, content in members:
            z.writestr(name, content, zipfile.ZIP_DEFLATED if name in compress else zipfile.ZIP_STORED)
    return buf.getvalue()


PICKLE_STRINGS = ["os", "system", "builtins", "eval", "FloatStorage", "DoubleStorage", "LongStorage",
                  "HalfStorage", "BFloat16Storage", "99", "", "cpu", "storage", "x" * 300, "_rebuild_tensor_v2",
                  "_rebuild_parameter", "OrderedDict"]


def pickle_ops(pkl: bytes):
    """(position, opcode name, arg) of every opcode of a valid pickle."""
    return [(pos, op.name, arg) for op, arg, pos in pickletools.genops(pkl)]


@st.composite
def pickle_edit(draw, ops):
    i = draw(st.integers(0, len(ops) - 1))
    kind = draw(st.sampled_from(["value", "value", "value", "flip", "cut", "drop"]))
    if kind == "value":
        return ("value", i, draw(st.sampled_from(SPECIAL_INTS + PICKLE_STRINGS)))
    if kind == "flip":
        return ("flip", i, draw(st.integers(0, 255)))
    return (kind, i)


def apply_pickle(pkl: bytes, ops, edits) -> bytes:
    """Replace the argument of an opcode (an int or a string, re-encoded), or an opcode byte;
    cut the pickle there, or drop one opcode."""
    edits = sorted(edits, key=lambda e: -ops[e[1]][0])  # from the end: positions stay valid
    out = bytearray(pkl)
    for e in edits:
        i = e[1]
        pos, name, arg = ops[i]
        end = ops[i + 1][0] if i + 1 < len(ops) else len(pkl)
        if e[0] == "value":
            v = e[2]
            if isinstance(v, int):
                if -(1 << 31) <= v < 1 << 31:
                    new = b"J" + struct.pack("<i", v)
                else:
                    raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
                    new = b"\x8a" + bytes([len(raw)]) + raw
            else:
                raw = v.encode()
                new = b"X" + struct.pack("<I", len(raw)) + raw
            if name in ("GLOBAL",) and isinstance(v, str):
                new = b"c" + (f"{v}\n{v}\n" if "." not in v else f"{v}\n").encode()
            out[pos:end] = new
        elif e[0] == "flip":
            out[pos] = e[2]
        elif e[0] == "cut":
            del out[pos:]
        elif e[0] == "drop":
            del out[pos:end]
    return bytes(out)


# --- llama2.c tokenizer.bin -----------------------------------------------------------------------

def parse_tokenizer_bin(data: bytes):
    max_len = struct.unpack_from("<I", data)[0]
    pos, entries = 4, []
    while pos < len(data):
        score, n = struct.unpack_from("<fi", data, pos)
        entries.append((score, data[pos + 8:pos + 8 + n]))
        pos += 8 + n
    return max_len, entries


def write_tokenizer_bin(max_len, entries) -> Tuple[bytes, Layout]:
    out = bytearray(struct.pack("<I", max_len))
    lay = Layout(header_end=4)
    lay.add("max_token_length", 0, "<I")
    for k, (score, piece) in enumerate(entries):
        lay.bounds.append(len(out))
        lay.add(f"score {k}", len(out), "<f")
        lay.add(f"length {k}", len(out) + 4, "<i")
        out += pack_value("<f", score) + struct.pack("<i", len(piece)) + piece
    lay.bounds.append(len(out))
    return bytes(out), lay


PIECES = [b"", b" ", b"\xff\xfe", b"<0x41>", b"<0xZZ>", b"\n<s>\n", b"a" * 1000, b"\x00", "\u2581".encode()]


@st.composite
def tokenizer_bin_edit(draw, n):
    kind = draw(st.sampled_from(["piece", "score", "drop", "dup", "max_len"]))
    i = draw(st.integers(0, n - 1))
    if kind == "piece":
        return ("piece", i, draw(st.sampled_from(PIECES)))
    if kind == "score":
        return ("score", i, draw(st.sampled_from(SPECIAL_FLOATS)))
    if kind == "max_len":
        return ("max_len", draw(st.sampled_from(SPECIAL_INTS)) % (1 << 32))
    return (kind, i)


def apply_tokenizer_bin(max_len, entries, edits):
    entries = list(entries)
    for e in edits:
        if e[0] == "max_len":
            max_len = e[1]
            continue
        if not entries:
            continue
        i = e[1] % len(entries)
        if e[0] == "piece":
            entries[i] = (entries[i][0], e[2])
        elif e[0] == "score":
            entries[i] = (e[2], entries[i][1])
        elif e[0] == "drop":
            del entries[i]
        elif e[0] == "dup":
            entries.insert(i, entries[i])
    return max_len, entries
