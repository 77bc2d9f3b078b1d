"""Token-for-token agreement with llama2.c, from ../shared/reference/llama2c/manifest.json: every
run.c (f32) and runq.c (int8 version-2 file) entry, greedy and seeded-sampled, through the API
and through the CLI."""
import json

import pytest

import pecca
from pecca import _kernels
from pecca.cli import main
from pecca.sampling import Sampler
from pecca.generate import GenerationStats
from shared_data import shared_file, shared_root


def manifest():
    try:
        path = shared_file("reference", "llama2c", "manifest.json")
    except pytest.skip.Exception:
        return []
    return json.loads(path.read_text())  # run.c (f32) and runq.c (int8, version 2) entries


ENTRIES = manifest()


def settings(entry):
    """run.c's arguments as pecca's: -n counts positions (prompt included), -p <= 0 or >= 1
    means plain multinomial sampling (top_p = 1 here)."""
    args = dict(zip(entry["args"][::2], entry["args"][1::2]))
    temperature = float(args.get("-t", 1.0))
    top_p = float(args.get("-p", 0.9))
    if top_p <= 0 or top_p >= 1:
        top_p = 1.0
    return temperature, top_p, int(args.get("-s", 0)), int(args.get("-n", 256))


@pytest.fixture(autouse=True)
def exact_path_for_runq(request):
    """runq.c's int8 activations turn last-bit float differences into different tokens, so its
    references are reproduced on the portable path, whose float arithmetic is runq.c's own
    (sequential sums, no FMA). The SIMD paths agree with it to float rounding (kernel tests)."""
    entry = request.node.callspec.params.get("entry") if hasattr(request.node, "callspec") else None
    if entry and entry["program"] == "runq.c":
        _kernels.set_simd_path("portable")
        yield
        _kernels.set_simd_path(None)
    else:
        yield


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(entry):
        key = (entry["model"], entry["tokenizer"])
        if key not in cache:
            root = shared_root()
            cache[key] = pecca.load(str(root / entry["model"]), tokenizer=str(root / entry["tokenizer"]),
                                    threads=2)
        return cache[key]
    return get


def expected(entry):
    ref = json.loads((shared_root() / "reference" / "llama2c" / entry["ids"]).read_text())
    return ref["prompt_ids"], ref["next_ids"]


def max_tokens_for(m, entry, n_prompt):
    steps = settings(entry)[3]
    if steps == 0 or steps > m.config.seq_len:
        steps = m.config.seq_len
    return steps - n_prompt + 1


@pytest.mark.skipif(not ENTRIES, reason="shared/reference/llama2c/manifest.json not found")
@pytest.mark.parametrize("entry", ENTRIES, ids=[e["output"] for e in ENTRIES])
def test_tokens_match_run_c(models, entry):
    m = models(entry)
    prompt_ids, next_ids = expected(entry)
    assert m.tokenizer.encode(entry["prompt"]) == prompt_ids
    temperature, top_p, seed, _ = settings(entry)
    sampler = Sampler(m.config.vocab_size, temperature, top_p, 0, seed)
    stats = GenerationStats()
    n_max = max_tokens_for(m, entry, len(prompt_ids))
    got = list(m.stream_ids(prompt_ids, sampler, n_max, stats))
    want = next_ids[len(prompt_ids) - 1:]
    if entry["stopped_on_bos"]:
        assert want[-1] == 1
        want = want[:-1]
        assert stats.stop_reason == "eos"
    assert got == want
    assert entry["n_generated_positions"] == len(prompt_ids) - 1 + len(got) + entry["stopped_on_bos"]


@pytest.mark.skipif(not ENTRIES, reason="shared/reference/llama2c/manifest.json not found")
@pytest.mark.parametrize("entry", ENTRIES, ids=[e["output"] for e in ENTRIES])
def test_cli_prints_run_c_text(entry, capsys, monkeypatch):
    root = shared_root()
    temperature, top_p, seed, steps = settings(entry)
    m = pecca.load(str(root / entry["model"]), tokenizer=str(root / entry["tokenizer"]))
    n_prompt = len(m.tokenizer.encode(entry["prompt"]))
    argv = ["generate", str(root / entry["model"]), entry["prompt"], "-z", str(root / entry["tokenizer"]),
            "-n", str(max_tokens_for(m, entry, n_prompt)), "-t", str(temperature),
            "--top-p", str(top_p), "--seed", str(seed)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out == (root / "reference" / "llama2c" / entry["output"]).read_text()


def test_api_generate_and_stream_agree():
    path = shared_file("models", "llama2c", "stories260K.bin")
    m = pecca.load(str(path))
    text = m.generate("Once upon a time", max_tokens=60, temperature=0)
    assert "".join(m.generate("Once upon a time", max_tokens=60, temperature=0, stream=True)) == text
    ref = (shared_root() / "reference" / "llama2c" / "stories260K__once_upon_a_time__greedy_n256.txt").read_text()
    assert ref.startswith("Once upon a time" + text)
    a = m.generate("Lily", max_tokens=50, temperature=1.0, top_p=0.9, seed=5)
    b = m.generate("Lily", max_tokens=50, temperature=1.0, top_p=0.9, seed=5)
    assert a == b
