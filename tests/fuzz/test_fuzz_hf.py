"""HuggingFace directories, mutated: config.json (and a GPTQ checkpoint's quantization config)
with fields of the wrong type, huge, negative or zero, or missing; model.safetensors with
header entries edited (dtype, shape, data_offsets), tensors dropped or renamed, index data
(g_idx) overwritten, the header length and the bytes mutated.

A plain HF directory is exported to GGUF and loaded (pecca runs no HF directory in place);
a GPTQ directory is loaded as it is (and exported, a quarter of the time)."""
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness import Quiet, fuzz_settings
from mutate import (apply_json, apply_raw, apply_safetensors, dump_json, json_edits, parse_safetensors,
                    raw_edits, safetensors_edit, write_safetensors)
from shared_data import shared_file

# values a config field may be set to, besides the generic ones
CONFIG_VALUES = [64, 128, 512, 8, 4, 16, 192, 1 << 20, "gptq_v2", "marlin", "awq", 3, 8, -1, 0.0,
                 {"rope_type": "linear"}, {"rope_type": "llama3", "factor": 8.0}, {"type": "linear", "factor": 0}]


def read_dir(d):
    files = Quiet()
    for p in sorted(d.iterdir()):
        if p.is_file():
            files[p.name] = p.read_bytes()
    return files


@pytest.fixture(scope="module")
def dirs():
    out = Quiet()
    for name, parts in (("hf", ("models", "hf", "stories260K-f32")),
                        ("gptq", ("models", "gptq", "stories260K-gptq-4bit-g32-actorder"))):
        files = read_dir(shared_file(*parts))
        header, body = parse_safetensors(files["model.safetensors"])
        out[name] = (files, header, body)
    return out


def mutated_dir(data, files, header, body):
    """The directory's files, one or more of them mutated."""
    files = dict(files)
    jsons = [n for n in files if n in ("config.json", "quantize_config.json")]
    targets = data.draw(st.lists(st.sampled_from(jsons + ["model.safetensors"] * 2), min_size=1, max_size=2,
                                 unique=True), label="files")
    for name in targets:
        if name == "model.safetensors":
            edits = data.draw(st.lists(safetensors_edit(header), max_size=3), label="safetensors edits")
            raw, lay = write_safetensors(*apply_safetensors(header, body, edits))
            raw_ed = data.draw(raw_edits(lay, len(raw), most=2).filter(lambda r: r or edits), label="raw edits")
            files[name] = apply_raw(raw, raw_ed)
        else:
            doc = json.loads(files[name])
            files[name] = dump_json(apply_json(doc, data.draw(json_edits(doc, values=CONFIG_VALUES), label=name)))
    return files


def write_dir(case, files):
    d = case / "model"
    d.mkdir()
    for name, content in files.items():
        (d / name).write_bytes(content)
    return d


@fuzz_settings()
@given(data=st.data())
def test_hf_directory_mutations_export_or_refuse(data, dirs, fuzzers):
    fuzz = fuzzers["hf-safetensors"]
    case = fuzz.scratch()
    d = write_dir(case, mutated_dir(data, *dirs["hf"]))
    fuzz.load(case, d, export=True)


@fuzz_settings()
@given(data=st.data())
def test_gptq_directory_mutations_load_or_refuse(data, dirs, fuzzers):
    fuzz = fuzzers["gptq"]
    case = fuzz.scratch()
    d = write_dir(case, mutated_dir(data, *dirs["gptq"]))
    fuzz.load(case, d, export=data.draw(st.sampled_from([False, False, False, True]), label="export"))

