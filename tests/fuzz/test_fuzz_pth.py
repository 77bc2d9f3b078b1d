"""Meta checkpoint directories (two consolidated.NN.pth shards written by torch.save), mutated:
the pickle's integers (sizes, strides, offsets, storage lengths), strings (storage types, keys,
globals) and opcodes replaced, cut or dropped; storage members shortened, grown, dropped or
compressed; the zip's headers, sizes and offsets set to 0, -1, 2^31 ...; params.json edited.
Each directory is exported to GGUF (pecca reads Meta checkpoints through export) and loaded."""
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness import Quiet, fuzz_settings
from mutate import (apply_json, apply_pickle, apply_raw, dump_json, json_edits, pickle_edit, pickle_ops,
                    raw_edits, read_members, write_members, zip_layout)

PARAMS_VALUES = [64, 8, 4, 512, 32, 0.0, 1e-5, 5e5, True, -1, 1.3]


@pytest.fixture(scope="module")
def meta(meta_seed):
    files = Quiet()
    for p in sorted(meta_seed.iterdir()):
        files[p.name] = p.read_bytes()
    shards = Quiet()
    for name in ("consolidated.00.pth", "consolidated.01.pth"):
        members = read_members(files[name])
        pkl = next(c for n, c in members if n.endswith("/data.pkl"))
        shards[name] = (members, pickle_ops(pkl), zip_layout(files[name]))
    return files, shards


@st.composite
def member_edit(draw, members):
    i = draw(st.integers(0, len(members) - 1))
    return (draw(st.sampled_from(["cut", "grow", "drop", "compress", "rename", "byteorder"])), i,
            draw(st.integers(0, 64)))


def apply_members(members, edits):
    members, compress = list(members), set()
    for kind, i, n in edits:
        i %= len(members)
        name, content = members[i]
        if kind == "cut":
            members[i] = (name, content[:max(0, len(content) - 1 - n)])
        elif kind == "grow":
            members[i] = (name, content + b"\x7f" * (n + 1))
        elif kind == "drop":
            del members[i]
        elif kind == "compress":
            compress.add(name)
        elif kind == "rename":
            members[i] = (name.replace("/data/", "/data/9") if "/data/" in name else "other/" + name, content)
        elif kind == "byteorder":
            members = [(m, b"big" if m.endswith("/byteorder") else c) for m, c in members]
    return write_members(members, compress)


def mutated_shard(data, files, shards):
    name = data.draw(st.sampled_from(sorted(shards)), label="shard")
    members, ops, lay = shards[name]
    how = data.draw(st.sampled_from(["pickle", "pickle", "members", "raw"]), label="how")
    if how == "raw":
        return name, apply_raw(files[name], data.draw(raw_edits(lay, len(files[name]), 3).filter(bool)))
    if how == "members":
        return name, apply_members(members, data.draw(st.lists(member_edit(members), min_size=1, max_size=2)))
    pkl_at = next(i for i, (n, _) in enumerate(members) if n.endswith("/data.pkl"))
    edits = data.draw(st.lists(pickle_edit(ops), min_size=1, max_size=3, unique_by=lambda e: e[1]), label="pickle")
    members = list(members)
    members[pkl_at] = (members[pkl_at][0], apply_pickle(members[pkl_at][1], ops, edits))
    return name, write_members(members)


@fuzz_settings()
@given(data=st.data())
def test_meta_checkpoint_mutations_export_or_refuse(data, meta, fuzzers):
    files, shards = meta
    files = dict(files)
    what = data.draw(st.sampled_from(["shard", "shard", "shard", "params", "missing shard"]), label="what")
    if what == "shard":
        name, content = mutated_shard(data, files, shards)
        files[name] = content
    elif what == "params":
        doc = json.loads(files["params.json"])
        files["params.json"] = dump_json(apply_json(doc, data.draw(json_edits(doc, values=PARAMS_VALUES))))
    else:
        del files[data.draw(st.sampled_from(["consolidated.00.pth", "consolidated.01.pth"]))]
    fuzz = fuzzers["meta-pth"]
    case = fuzz.scratch()
    d = case / "meta"
    d.mkdir()
    for name, content in files.items():
        (d / name).write_bytes(content)
    fuzz.load(case, d, export=True)
