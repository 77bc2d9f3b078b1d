"""llama2.c checkpoints, versions 0, 1 and 2, mutated: header fields set to 0, -1, 2^31 ...,
header bytes flipped, truncated at every tensor boundary and at random points."""
import shutil
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness import Quiet, fuzz_settings
from mutate import Layout, apply_raw, raw_edits
from shared_data import shared_file

SEEDS = {"v0": "stories260K.bin", "v1": "stories260K_v1.bin", "v2": "stories260K_q80_gs4.bin"}
FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")


def layout(data: bytes, version: str) -> Layout:
    """The header fields and the tensor boundaries of a llama2.c file."""
    lay = Layout()
    base = 0 if version == "v0" else 8
    if version != "v0":
        lay.add("magic", 0, "<I")
        lay.add("version", 4, "<i")
        lay.add("shared_classifier", 36, "<B")
    if version == "v2":
        lay.add("group_size", 37, "<i")
    for k, name in enumerate(FIELDS):
        lay.add(name, base + 4 * k, "<i")
    d, h, L, nh, nkv, V, S = struct.unpack_from("<7i", data, base)
    V = abs(V)
    kv = nkv * d // nh
    mats = [V * d, L * d * d, L * kv * d, L * kv * d, L * d * d, L * h * d, L * d * h, L * h * d]
    if version == "v0":
        sizes = [4 * V * d, 4 * L * d] + [4 * m for m in mats[1:5]] + [4 * L * d] + [4 * m for m in mats[5:]] \
            + [4 * d, 4 * S * (d // nh) // 2, 4 * S * (d // nh) // 2]
    elif version == "v1":
        sizes = [4 * L * d, 4 * L * d, 4 * d] + [4 * m for m in mats]
    else:
        gs = struct.unpack_from("<i", data, 37)[0]
        sizes = [4 * L * d, 4 * L * d, 4 * d]
        for m in mats:
            sizes += [m, 4 * m // gs]
    pos = lay.header_end = 28 if version == "v0" else 256
    lay.bounds = [pos]
    for s in sizes:
        pos += s
        lay.bounds.append(pos)
    return lay


@pytest.fixture(scope="module")
def originals():
    out = Quiet()
    for v, name in SEEDS.items():
        data = shared_file("models", "llama2c", name).read_bytes()
        out[v] = (data, layout(data, v))
    return out


@pytest.mark.parametrize("version", list(SEEDS))
@fuzz_settings()
@given(data=st.data())
def test_llama2c_mutations_load_or_refuse(version, data, originals, fuzzers):
    seed, lay = originals[version]
    assert lay.bounds[-1] == len(seed)  # the layout is right: it ends where the file does
    edits = data.draw(raw_edits(lay, len(seed), most=4).filter(bool), label="edits")
    fuzz = fuzzers[f"llama2c-{version}"]
    case = fuzz.scratch()
    shutil.copyfile(shared_file("models", "llama2c", "tok512.bin"), case / "tok512.bin")
    (case / "model.bin").write_bytes(apply_raw(seed, edits))
    fuzz.load(case, case / "model.bin")
