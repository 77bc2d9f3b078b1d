"""GGUF files (pecca's exports of stories260K: f32, q8_0, q4_0, one with a byte-level `gpt2`
vocabulary, and the q4g layout of its GPTQ checkpoint; a q4g file with column slices), mutated: keys given other types and
values or removed, arrays cut and grown, tensors retyped, reshaped, renamed, dropped, moved,
their data overwritten with NaN and out-of-range indices; then the container's counts,
lengths, dims and offsets set to 0, -1, 2^31, 2^63 ..., truncated at every region boundary."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness import Quiet, fuzz_settings
from mutate import apply_gguf, apply_raw, gguf_edit, parse_gguf, raw_edits, write_gguf


@pytest.fixture(scope="module")
def parsed(seeds):
    out = Quiet()
    for name in ("gguf-f32", "gguf-q8_0", "gguf-q4_0", "gguf-gpt2", "gguf-q4g", "gguf-q4g-sliced"):
        data = seeds[name].read_bytes()
        m = parse_gguf(data)
        assert write_gguf(m)[0] == data  # the test's writer reproduces pecca's export exactly
        out[name] = m
    return out


def fuzz_gguf(data, m, fuzz):
    edits = data.draw(st.lists(gguf_edit(m), min_size=0, max_size=3), label="edits")
    raw, lay = write_gguf(apply_gguf(m, edits))
    raw_ed = data.draw(raw_edits(lay, len(raw), most=2).filter(lambda r: r or edits), label="raw edits")
    case = fuzz.scratch()
    (case / "model.gguf").write_bytes(apply_raw(raw, raw_ed))
    fuzz.load(case, case / "model.gguf")


@fuzz_settings()
@given(data=st.data())
def test_gguf_mutations_load_or_refuse(data, parsed, fuzzers):
    seeds = ["gguf-f32", "gguf-q8_0", "gguf-q4_0", "gguf-gpt2", "gguf-gpt2"]
    seed = data.draw(st.sampled_from(seeds), label="seed")
    fuzz_gguf(data, parsed[seed], fuzzers["gguf"])


@fuzz_settings()
@given(data=st.data())
def test_gguf_q4g_mutations_load_or_refuse(data, parsed, fuzzers):
    seed = data.draw(st.sampled_from(["gguf-q4g", "gguf-q4g-sliced"]), label="seed")
    fuzz_gguf(data, parsed[seed], fuzzers["gguf-q4g"])
