"""Tokenizer files given to pecca.load(stories260K.bin, tokenizer=...), mutated: llama2.c's
tokenizer.bin (max_token_length, scores and lengths set to 0, -1, 2^31 ..., pieces replaced,
dropped, duplicated, truncated at every entry); HuggingFace's tokenizer.json (stories260K's
sentencepiece-style one, and a byte-level one of 512 tokens trained for the test: vocabulary
ids, merges, added tokens, pre-tokenizer, decoder and normalizer edited, keys removed, the file
cut), with tokenizer_config.json beside it edited too; sentencepiece's tokenizer.model."""
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness import Quiet, fuzz_settings
from mutate import (apply_json, apply_raw, apply_tokenizer_bin, dump_json, json_edits, parse_tokenizer_bin,
                    raw_edits, tokenizer_bin_edit, write_tokenizer_bin)
from shared_data import shared_file

TOKENIZER_VALUES = ["BPE", "WordPiece", "ByteLevel", "Metaspace", "Sequence", "Split", "Replace", "Strip",
                    "ByteFallback", "Fuse", "TemplateProcessing", 511, 512, 100000, "<unk>", "\u2581t", "a b",
                    ["a", "b"], {"Regex": "("}, {"String": ""}, {"id": "<s>", "type_id": 0}]


@pytest.fixture(scope="module")
def model():
    return shared_file("models", "llama2c", "stories260K.bin")


@pytest.fixture(scope="module")
def seeds(bytelevel_tokenizer):
    data = shared_file("models", "llama2c", "tok512.bin").read_bytes()
    max_len, entries = parse_tokenizer_bin(data)
    assert write_tokenizer_bin(max_len, entries)[0] == data
    d = shared_file("models", "hf", "stories260K")
    return Quiet(bin=(max_len, entries), config=json.loads((d / "tokenizer_config.json").read_text()),
                 json={"sentencepiece-style": json.loads((d / "tokenizer.json").read_text()),
                       "byte-level": json.loads(bytelevel_tokenizer.read_text())})


@fuzz_settings()
@given(data=st.data())
def test_tokenizer_bin_mutations_load_or_refuse(data, seeds, model, fuzzers):
    max_len, entries = seeds["bin"]
    edits = data.draw(st.lists(tokenizer_bin_edit(len(entries)), max_size=3), label="edits")
    raw, lay = write_tokenizer_bin(*apply_tokenizer_bin(max_len, entries, edits))
    raw_ed = data.draw(raw_edits(lay, len(raw), most=3).filter(lambda r: r or edits), label="raw edits")
    fuzz = fuzzers["tokenizer.bin"]
    case = fuzz.scratch()
    (case / "tokenizer.bin").write_bytes(apply_raw(raw, raw_ed))
    fuzz.load(case, model, tokenizer=case / "tokenizer.bin")


@fuzz_settings()
@given(data=st.data())
def test_tokenizer_json_mutations_load_or_refuse(data, seeds, model, fuzzers):
    fuzz = fuzzers["tokenizer.json"]
    case = fuzz.scratch()
    seed = seeds["json"][data.draw(st.sampled_from(sorted(seeds["json"])), label="seed")]
    edits = data.draw(json_edits(seed, most=4, values=TOKENIZER_VALUES), label="tokenizer.json edits")
    spec = apply_json(seed, edits)
    raw = dump_json(spec)
    if data.draw(st.booleans(), label="cut or flip bytes"):
        raw = apply_raw(raw, data.draw(raw_edits(_json_layout(raw), len(raw), most=2)))
    (case / "tokenizer.json").write_bytes(raw)
    config = seeds["config"]
    if data.draw(st.booleans(), label="edit tokenizer_config.json"):
        config = apply_json(config, data.draw(json_edits(config, values=TOKENIZER_VALUES)))
    (case / "tokenizer_config.json").write_bytes(dump_json(config))
    fuzz.load(case, model, tokenizer=case / "tokenizer.json")


def _json_layout(raw: bytes):
    from mutate import Layout

    return Layout(bounds=[i for i, c in enumerate(raw) if c in b"{}[]"][:200], header_end=min(len(raw), 400))


@fuzz_settings()
@given(data=st.data())
def test_sentencepiece_model_mutations_load_or_refuse(data, model, fuzzers):
    """tokenizer.model (a sentencepiece protobuf, parsed by the sentencepiece package's C++):
    bytes flipped, set, truncated. Not pecca's parser, but pecca's loader must survive it."""
    raw = shared_file("models", "llama2c", "tok512.model").read_bytes()
    lay = _json_layout(b"")
    lay.header_end, lay.bounds = 64, list(range(0, len(raw), 97))
    edits = data.draw(raw_edits(lay, len(raw), most=4).filter(bool), label="edits")
    fuzz = fuzzers["tokenizer.model"]
    case = fuzz.scratch()
    (case / "tokenizer.model").write_bytes(apply_raw(raw, edits))
    fuzz.load(case, model, tokenizer=case / "tokenizer.model")
