"""Shared by the GPTQ tests: the checkpoints in ../shared, NumPy stand-ins for the 4-bit Linear
classes (the float64-free reference path: dequantize exactly, then pecca's f32 kernels), and
the bench script that writes random GPTQ checkpoints."""
import importlib.util
import os

import numpy as np
import pytest

import pecca.weights as W
from export.gptq import dequantize, dequantize_q4g
from pecca.formats.gptq import GPTQTensors
from shared_data import REPO_ROOT, shared_root

STORIES = ["stories260K-gptq-4bit-g32", "stories260K-gptq-4bit-g32-actorder",
           "stories260K-gptq_v2-4bit-g32-actorder", "stories260K-gptq-4bit-g32-attnonly",
           "stories260K-autogptq-4bit-g32-actorder"]
SMOLLM2 = "SmolLM2-135M-Instruct-gptq-4bit-g64-actorder"
STORY_PROMPTS = ["once_upon_a_time", "lily_and_ben_were", "the_little_dog"]
SMOL_PROMPTS = ["raw_story", "raw_code", "chat_capital", "chat_colors"]
HAVE_KERNELS = hasattr(W, "Q4GLinear") and hasattr(W, "GPTQLinear")


def checkpoints():
    """The known checkpoints and any other in ../shared/models/gptq (so none goes untested)."""
    d = shared_root() / "models" / "gptq"
    present = sorted(x for x in os.listdir(d) if not x.startswith("_") and (d / x).is_dir()) \
        if d.is_dir() else []
    return STORIES + [SMOLLM2] + [x for x in present if x not in STORIES + [SMOLLM2]]


class NumpyQ4G(W.F32Linear):
    """Q4GLinear's contract through an exact NumPy dequantization (no 4-bit kernel)."""
    kind = "gptq4"

    def __init__(self, qs, scales, zeros, perm=None, quads=False):
        super().__init__(dequantize_q4g(qs, scales, zeros, perm, quads))


class NumpyGPTQ(W.F32Linear):
    """GPTQLinear's contract through an exact NumPy dequantization (no 4-bit kernel)."""
    kind = "gptq4"

    def __init__(self, qweight, qzeros, scales, g_idx, v1, out_perm=None, bias=None):
        m = GPTQTensors("module", "file", qweight, qzeros, scales, g_idx, bias, 0, 0x11111111 if v1 else 0)
        w = dequantize(m)
        super().__init__(np.ascontiguousarray(w if out_perm is None else w[out_perm]))


def assert_routes_agree(gguf_path, la, lb):
    """Logits of a GPTQ GGUF (la) and of its checkpoint directory (lb), both through NumPy's exact
    dequantization: equal, except for the order in which ffn_down sums its inputs where the
    export folded its act-order permutation into ffn_gate / ffn_up's rows (export.gptq)."""
    from export import open_source

    if any(n.endswith(".gptq_fold") for n in open_source(str(gguf_path)).tensors):
        err = np.abs(la - lb).max() / np.abs(lb).max()
        assert err <= 1e-5, f"max |d| / scale = {err:.2e}"
    else:
        assert np.array_equal(la, lb)


def use_numpy_linears(monkeypatch):
    monkeypatch.setattr(W, "Q4GLinear", NumpyQ4G, raising=False)
    monkeypatch.setattr(W, "GPTQLinear", NumpyGPTQ, raising=False)


def need_kernels():
    if not HAVE_KERNELS:
        pytest.skip("pecca.weights has no Q4GLinear / GPTQLinear yet (the 4-bit kernels)")


def set_float_act(llm, flag: bool) -> int:
    """Switch every 4-bit Linear of a loaded model to float activations; returns how many."""
    w = llm.model.weights
    lins = [getattr(layer, n) for layer in w.layers for n in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")]
    n = 0
    for lin in lins + [w.output]:
        if hasattr(lin, "float_act"):
            lin.float_act = flag
            n += 1
    return n


def bench_script():
    """bench/make_gptq_checkpoint.py as a module."""
    path = REPO_ROOT / "bench" / "make_gptq_checkpoint.py"
    spec = importlib.util.spec_from_file_location("make_gptq_checkpoint", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def greedy(llm, prompt_ids, n, banned=None):
    """n greedy tokens (argmax, first index on ties) and each step's logits; `banned` (EOS for
    transformers' min_new_tokens) is never chosen."""
    m = llm.model
    logits = m.prefill(list(prompt_ids)).copy()
    pos, out, steps = len(prompt_ids), [], []
    for _ in range(n):
        pick = logits.copy()
        if banned is not None:
            pick[banned] = -np.inf
        t = int(np.argmax(pick))
        out.append(t)
        steps.append(pick)
        logits = m.forward(t, pos).copy()
        pos += 1
    return out, steps


def compare_greedy(got, steps, want, tie_tol):
    """Number of leading tokens equal to the reference; a later split is allowed only on a near
    tie (the reference's token within tie_tol of pecca's best logit there). Returns (n_equal,
    note or None)."""
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            gap = float(steps[i][a] - steps[i][b])
            assert gap <= tie_tol, f"greedy token {i}: pecca {a}, reference {b}; logit gap {gap:.4g} > {tie_tol:.3g}"
            return i, f"near tie at token {i} (gap {gap:.3g})"
    assert len(got) >= len(want)
    return len(want), None
