"""GPTQ checkpoints made by the real tools, run by pecca, against the fp32 forward pass over
the tools' own dequantized weights (../shared/reference/gptq*, the "B" / gptq_dequant_fp32
references): logits within 1e-3 of the logit scale (max |reference|) and the same greedy
tokens, from the exported GGUF and from the directory loaded directly, with the 4-bit kernels'
float-activation path and with NumPy's exact dequantization (no kernel: it isolates the
reader). Measured: ~1e-6 of the scale on every checkpoint, greedy tokens all equal.

The exported GGUF's default path quantizes the activations per block of 32 to two int8
levels (q = 256 hi + lo, |q| <= 32512: ~1/65000 of the block's largest value per activation;
pecca/_kernels/q4_kernels.h) with exact integer dots. Measured: 2.5e-5 .. 6.9e-5 of the logit
scale on stories260K and 1.4e-4 .. 3.2e-4 on SmolLM2-135M (30 layers), greedy tokens all equal,
so the int8 path is held to the same 1e-3 and to the reference's greedy tokens exactly.

Then a 2-layer Llama-2-70B-shaped checkpoint from the bench script: export, load time,
resident memory, decoding.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import pecca
from export import export
from gptq_helpers import (HAVE_KERNELS, SMOL_PROMPTS, SMOLLM2, STORY_PROMPTS, assert_routes_agree, bench_script,
                          checkpoints, compare_greedy, greedy, need_kernels, set_float_act, use_numpy_linears)
from shared_data import REPO_ROOT, shared_file, shared_root

TOL = 1e-3  # of the logit scale, every path (int8 activations: module docstring)
PATHS = ["int8", "float", "numpy"]  # int8 activations (default), float activations, NumPy dequant


def cases(variant):
    """(prompt ids, reference logits, reference greedy ids, banned token) per prompt."""
    if variant == SMOLLM2:
        ref = shared_root() / "reference" / "gptq-smollm2"
        for p in SMOL_PROMPTS:
            js = json.loads((ref / f"{p}.json").read_text())
            # greedy there: argmax, no EOS stop, 48 tokens
            yield (p, np.load(ref / f"{p}.ids.npy").tolist(), np.load(ref / f"{p}.logits_gptq_dequant_fp32.npy"),
                   js["gptq_dequant_fp32"]["generated_ids"], None)
        return
    ref = shared_root() / "reference" / "gptq"
    for p in STORY_PROMPTS:
        js = json.loads((ref / f"{variant}__{p}.greedy64_dequant_fp32.json").read_text())
        # transformers' generate(min_new_tokens=64): EOS (2) is never chosen
        yield (p, np.load(ref / f"{variant}__{p}.ids.npy").tolist(),
               np.load(ref / f"{variant}__{p}.logits_dequant_fp32.npy"), js["generated_ids"], 2)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """variant -> its exported GGUF, made once."""
    made = {}

    def get(variant):
        if variant not in made:
            made[variant] = tmp_path_factory.mktemp("gptq") / f"{variant}.gguf"
            export(str(shared_file("models", "gptq", variant)), str(made[variant]))
        return made[variant]
    return get


def load(variant, source, path_kind, exported, monkeypatch):
    if path_kind == "numpy":
        use_numpy_linears(monkeypatch)
    else:
        need_kernels()
    d = shared_file("models", "gptq", variant)
    m = pecca.load(str(exported(variant) if source == "gguf" else d), threads=2)
    if path_kind != "numpy":
        assert set_float_act(m, path_kind == "float") > 0
    return m


def rel_err(got, ref):
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("path_kind", PATHS)
@pytest.mark.parametrize("source", ["gguf", "dir"])
@pytest.mark.parametrize("variant", checkpoints())
def test_logits_and_greedy_match_the_reference(variant, source, path_kind, exported, monkeypatch):
    m = load(variant, source, path_kind, exported, monkeypatch)
    assert m.info()["precision"] == "gptq4"
    int8 = path_kind == "int8" and source == "gguf"  # GPTQLinear (the directory) is float only
    figures = []
    for prompt, ids, ref, want, banned in cases(variant):
        logits = m.model.logits_all(ids)
        err = rel_err(logits, ref)
        scale = float(np.abs(ref).max())
        figures.append(f"{prompt} {err:.2e}")
        assert err <= TOL, f"{prompt}: max |logit diff| / logit scale = {err:.3g}"
        got, steps = greedy(m, ids, len(want), banned)
        if int8:
            n = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
            assert n == len(want) and len(got) >= len(want), f"{prompt}: greedy token {n} differs"
            figures.append(f"greedy {n}/{len(want)} equal")
            continue
        n, note = compare_greedy(got, steps, want, tie_tol=2 * TOL * scale)
        if note:
            figures.append(f"{prompt} greedy: {n}/{len(want)} equal, then {note}")
    print(f"\n{variant} {source} {path_kind}: " + "; ".join(figures))


@pytest.mark.parametrize("variant", [v for v in checkpoints() if v != SMOLLM2])
def test_gguf_and_directory_give_the_same_logits(variant, exported, monkeypatch):
    """Agreement of the two routes with NumPy's dequantization (the repack loses nothing; the
    weights themselves: tests/formats/test_gptq.py)."""
    use_numpy_linears(monkeypatch)
    a = pecca.load(str(exported(variant)))
    b = pecca.load(str(shared_file("models", "gptq", variant)))
    for _, ids, _, _, _ in cases(variant):
        assert_routes_agree(exported(variant), a.model.logits_all(ids), b.model.logits_all(ids))


def test_smollm2_answers_a_chat_question(exported):
    """The real instruct model, 4-bit through the kernels: the reference's own answer."""
    need_kernels()
    m = pecca.load(str(exported(SMOLLM2)), threads=2)
    js = json.loads(shared_file("reference", "gptq-smollm2", "chat_capital.json").read_text())
    got, _ = greedy(m, js["prompt_ids"], 48)
    assert "Paris" in m.tokenizer.decode(got)


# --- a 2-layer Llama-2-70B-shaped checkpoint (bench/make_gptq_checkpoint.py) ---

LOAD_PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
import pecca
m = pecca.load(sys.argv[1], threads=2)
load_s = time.perf_counter() - t0
rss = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
t1 = time.perf_counter()
ids = list(m.stream_ids(m.tokenizer.encode("Once upon a time"), __import__("pecca.sampling").sampling.Sampler(
    m.config.vocab_size, 0.0), 4, __import__("pecca.generate").generate.GenerationStats()))
print(json.dumps({"load_s": load_s, "rss": rss, "info": m.info()["gptq"], "ids": ids,
                  "decode_s": time.perf_counter() - t1, "precision": m.info()["precision"]}))
"""


def probe(path):
    """Load `path` in a fresh process: load time, RSS after load, 4 greedy tokens."""
    r = subprocess.run([sys.executable, "-c", LOAD_PROBE, str(path)], capture_output=True, text=True,
                       cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def print_open_times(path):
    """pecca's GGUF parser against gguf.GGUFReader, which it replaced for speed (reported only)."""
    import gguf

    from pecca.formats.gguf_file import open_gguf

    t0 = time.perf_counter()
    gguf.GGUFReader(str(path))
    t1 = time.perf_counter()
    open_gguf(str(path))
    t2 = time.perf_counter()
    print(f"\n70B shape, 2 layers: GGUF open {(t2 - t1) * 1000:.0f} ms (gguf.GGUFReader {(t1 - t0) * 1000:.0f} ms)")


def test_llama2_70b_shaped_two_layers(tmp_path):
    need_kernels()
    if shutil.disk_usage(tmp_path).free < 6 << 30:
        pytest.skip("needs ~4 GiB of free disk for a 2-layer 70B-shaped checkpoint and its export")
    src, out = tmp_path / "llama2-70b-2layers-gptq", tmp_path / "m.gguf"
    bench_script().make_checkpoint(src, layers=2)  # 70B widths, group 128, act-order, sym
    export(str(src), str(out))
    size = os.path.getsize(out)
    print_open_times(out)
    for path in (out, src):
        r = probe(path)
        print(f"\n70B shape, 2 layers, {path.name}: file {size / 2**30:.2f} GiB, load {r['load_s'] * 1000:.0f} ms, "
              f"RSS after load {r['rss'] / 2**20:.0f} MiB, 4 tokens in {r['decode_s']:.2f} s")
        assert r["precision"] == "gptq4" and r["info"]["group_size"] == 128 and r["info"]["desc_act"]
        assert len(r["ids"]) > 0 and r["rss"] < size / 4  # memory-mapped: the weights are not read in
