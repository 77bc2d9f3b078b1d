"""HF GPTQ checkpoints: the reader and the q4g repacking against the real tools' dequantized
weights (exact), the layout the kernels expect, and clear errors for every bad input.
No 4-bit kernel is needed here (NumPy stand-ins where a model must load)."""
import json
import shutil

import numpy as np
import pytest

import pecca
from export import export, open_source
from export.gptq import (Q4G_BLOCK, column_slices, dequantize, dequantize_q4g, from_quads, repack, slice_columns,
                         to_quads, unpack_codes, unpack_zeros)
from gptq_helpers import (HAVE_KERNELS, STORIES, assert_routes_agree, bench_script, checkpoints, set_float_act,
                          use_numpy_linears)
from pecca.errors import ModelFormatError, UnsupportedModelError
from pecca.formats import open_model
from pecca.formats.gptq import GPTQCheckpoint, GPTQTensors, linear_shapes, q_k_heads
from pecca.formats.hf import HF_NAMES, unpermute
from pecca.formats.safetensors import read_safetensors
from shared_data import shared_file


@pytest.fixture(autouse=True)
def linears(monkeypatch):
    """Models load with NumPy stand-ins until the 4-bit Linear classes exist."""
    if not HAVE_KERNELS:
        use_numpy_linears(monkeypatch)


def quantized_modules(ck):
    c = ck.config
    for i in range(c.n_layers):
        for what, shape in linear_shapes(c).items():
            prefix = f"model.layers.{i}.{HF_NAMES[what]}"
            if ck.is_quantized(prefix):
                yield prefix, what, ck.module(prefix, shape)


@pytest.mark.parametrize("variant", [v for v in checkpoints() if v.startswith("stories")])
def test_dequantized_weights_equal_the_tools(variant):
    """GPTQModel's own dequantize_weight() (the reference file) equals ours bit for bit, from the
    checkpoint's layout and from the repacked q4g layout (q/k rows in Meta's order there)."""
    ck = GPTQCheckpoint(str(shared_file("models", "gptq", variant)))
    ref = read_safetensors(str(shared_file("reference", "gptq", f"{variant}.dequant_weights_fp32.safetensors")))
    seen = 0
    for prefix, what, m in quantized_modules(ck):
        w = dequantize(m)
        assert np.array_equal(w, ref[prefix + ".weight"].to_f32()), prefix
        heads = q_k_heads(ck.config, what)
        q = repack(m, heads)
        assert np.array_equal(dequantize_q4g(q.qs, q.scales, q.zeros, q.perm),
                              unpermute(w, heads) if heads else w), prefix
        seen += 1
    assert seen == len([k for k in ref if k.endswith("_proj.weight")]) and seen >= 20


def test_smollm2_repack_is_exact():
    """No dequantized-weight file for SmolLM2: its repack must agree with the direct formula."""
    ck = GPTQCheckpoint(str(shared_file("models", "gptq", "SmolLM2-135M-Instruct-gptq-4bit-g64-actorder")))
    assert ck.quant.group_size == 64 and ck.quant.desc_act and ck.tied
    for prefix, what, m in list(quantized_modules(ck))[:14]:  # two layers: every Linear shape
        heads = q_k_heads(ck.config, what)
        q = repack(m, heads)
        w = dequantize(m)
        assert q.perm is not None  # act-order
        assert np.array_equal(dequantize_q4g(q.qs, q.scales, q.zeros, q.perm),
                              unpermute(w, heads) if heads else w), prefix


def test_v1_zero_points_borrow_across_nibbles():
    """GPTQModel's own v1 packing of true zeros of 0: a whole-word +0x11111111 decodes them."""
    t = read_safetensors(str(shared_file("reference", "gptq", "gptq_v1_asym_borrow_case.safetensors")), ints=True)
    want = t["case.true_zeros"].data
    assert np.array_equal(unpack_zeros(t["case.qzeros"].data, 0x11111111), want)
    assert np.array_equal(unpack_zeros(t["case.qzeros_v2"].data, 0), want)
    per_nibble = (unpack_zeros(t["case.qzeros"].data, 0) + 1) & 15
    assert (per_nibble != want).sum() > 0  # the trap the whole-word add avoids
    m = GPTQTensors("case", "f", t["case.qweight"].data, t["case.qzeros"].data, t["case.scales"].data,
                    t["case.g_idx"].data, None, 32, 0x11111111)
    ref = t["case.dequant_fp32"].data  # made by GPTQModel in fp16: equal to f16 rounding
    assert np.all(np.abs(dequantize(m) - ref) <= np.abs(ref) * 2.0 ** -10)


def test_q4g_layout_is_the_spec_s():
    """qs bytes: row n, block b holds input perm[32b+j] (low nibble) and perm[32b+16+j] (high);
    scales/zeros transposed; perm sorts g_idx."""
    rng = np.random.default_rng(1)
    k, n, gs = 128, 16, 32
    codes = rng.integers(0, 16, (k, n), dtype=np.uint32)
    qweight = np.zeros((k // 8, n), np.uint32)
    for r in range(8):
        qweight |= codes[r::8] << np.uint32(4 * r)
    zeros = rng.integers(0, 16, (k // gs, n), dtype=np.uint32)
    qzeros = np.zeros((k // gs, n // 8), np.uint32)
    for r in range(8):
        qzeros |= zeros[:, r::8] << np.uint32(4 * r)
    g_idx = rng.permutation(np.arange(k, dtype=np.int32) // gs).astype(np.int32)
    scales = rng.uniform(0.01, 0.1, (k // gs, n)).astype(np.float16)
    m = GPTQTensors("m", "f", qweight.view(np.int32), qzeros.view(np.int32), scales, g_idx, None, gs, 0)
    assert np.array_equal(unpack_codes(m.qweight), codes)
    q = repack(m)
    assert np.array_equal(q.perm, np.argsort(g_idx, kind="stable"))
    assert np.array_equal(g_idx[q.perm], np.arange(k) // gs)
    for b in range(k // Q4G_BLOCK):
        for j in range(16):
            byte = q.qs[:, 16 * b + j]
            assert np.array_equal(byte & 15, codes[q.perm[32 * b + j]])
            assert np.array_equal(byte >> 4, codes[q.perm[32 * b + 16 + j]])
    assert np.array_equal(q.scales, scales.T) and q.zeros.dtype == np.int8
    assert np.array_equal(q.zeros, zeros.T.astype(np.int8))
    assert repack(GPTQTensors("m", "f", m.qweight, m.qzeros, scales, np.arange(k, dtype=np.int32) // gs,
                              None, gs, 0)).perm is None  # contiguous groups: no perm tensor


@pytest.mark.parametrize("k,groups,want", [
    (4096, 32, 1), (5120, 40, 1), (8192, 64, 2), (8192, 1, 2), (11008, 86, 2), (11008, 1, 2),
    (13824, 108, 3), (14336, 112, 4), (28672, 224, 7), (28672, 896, 7), (8192, 2, 2), (8192, 4, 2),
    (8224, 257, 1), (12288, 3, 3), (10240, 5, 5)])
def test_column_slices_choice(k, groups, want):
    """Long rows (K >= 8192: 7B's ffn_down, Llama-2-13B's, Llama 3's, every 70B matrix) go in the
    fewest slices of at most 6144 inputs made of whole groups and blocks (one group per row is
    repeated in each); none where no such split exists (8224 = 257 blocks, prime)."""
    s = column_slices(k, groups)
    assert s == want
    if s > 1:
        ks = k // s
        assert k % s == 0 and 2048 <= ks <= 6144 and ks % 32 == 0 and (groups == 1 or ks % (k // groups) == 0)


@pytest.mark.parametrize("groups", [1, 86])
def test_slice_columns_keeps_the_matrix(groups):
    """The sliced tensors dequantize to the same matrix, exactly, act-order or not."""
    rng = np.random.default_rng(groups)
    n, k = 40, 11008
    codes = rng.integers(0, 16, (n, k), dtype=np.uint8)
    qs = np.ascontiguousarray((codes.reshape(n, k // 32, 2, 16)[:, :, 0]
                               | (codes.reshape(n, k // 32, 2, 16)[:, :, 1] << 4)).reshape(n, k // 2))
    scales = (rng.standard_normal((n, groups)) * 0.01).astype(np.float16)
    zeros = rng.integers(0, 16, (n, groups), dtype=np.int8)
    for perm in (None, rng.permutation(k).astype(np.int32)):
        from export.gptq import Q4G
        q = Q4G(qs, scales, zeros, perm)
        sl = slice_columns(q, column_slices(k, groups))
        assert sl.qs.shape == (2, n, k // 4) and sl.scales.shape == sl.zeros.shape == (2, n, max(1, groups // 2))
        assert sl.qs.flags.c_contiguous and sl.perm is perm
        assert np.array_equal(dequantize_q4g(sl.qs, sl.scales, sl.zeros, perm), dequantize_q4g(qs, scales, zeros, perm))
        assert set(sl.parts()) == set(q.parts()) and sl.parts()["qs"].shape == (2, n, k // 16)


# --- bad input: a small random checkpoint from the bench script, broken one way at a time ---

K, N = 256, 256  # dim; hidden 512


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("gptq") / "small"
    bench_script().make_checkpoint(d, layers=2, dim=256, hidden=512, heads=4, kv_heads=2, vocab=600,
                                   group_size=64, act_order=True, sym=False)
    return d


def broken_copy(src, dst, config=None, quantize_config=None, tensors=None):
    """A copy of checkpoint `src` with config fields changed and tensors replaced or (None)
    removed."""
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["quantization_config"].update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        mod = bench_script()
        old = read_safetensors(str(dst / "model.safetensors"), ints=True)
        new = {k: v.data for k, v in old.items()}
        for k, v in tensors.items():
            if v is None:
                del new[k]
            else:
                new[k] = v(new[k]) if callable(v) else v
        kinds = {np.dtype(np.int32): "I32", np.dtype(np.float16): "F16", np.dtype(np.float32): "F32"}
        rows = [(k, kinds[a.dtype], a.shape, lambda r, n, a=a: np.ascontiguousarray(a[r:r + n]))
                for k, a in new.items()]
        (dst / "model.safetensors").unlink()
        mod.write_safetensors(dst / "model.safetensors", rows)
    return dst


def refused(d, err, *words):
    """Both the direct load and the export refuse `d` with `err` naming `words`; the export
    leaves no file behind."""
    out = d.parent / "out.gguf"
    for opener in (lambda: open_model(str(d)), lambda: export(str(d), str(out))):
        with pytest.raises(err) as e:
            opener()
        for w in words:
            assert w in str(e.value), (w, str(e.value))
    assert not any(p.name.startswith("out.gguf") for p in d.parent.iterdir())


P = "model.layers.1.mlp.up_proj"


@pytest.mark.parametrize("field,value,words", [
    ("bits", 3, ["bits = 3"]), ("bits", 8, ["bits = 8"]),
    ("format", "marlin", ["format = 'marlin'"]), ("checkpoint_format", "bitblas", []),
    ("is_marlin_format", True, ["is_marlin_format"]), ("quant_method", "awq", ["quant_method 'awq'"]),
    ("pack_dtype", "int16", ["pack_dtype"]), ("group_size", 96, ["group_size 96"]),
])
def test_unsupported_settings_are_refused(small_ckpt, tmp_path, field, value, words):
    cfg = {field: value}
    if field == "checkpoint_format":
        cfg["format"] = None
    refused(broken_copy(small_ckpt, tmp_path / "c", config=cfg), UnsupportedModelError, *words)


@pytest.mark.parametrize("field,value,words", [
    ("dynamic", {"+:(model": {}}, ["dynamic pattern '+:(model'", "not a regular expression"]),
    ("dynamic", [1], ["dynamic = [1] is not a JSON object"]),
    ("group_size", "32", ["group_size = '32'"]), ("desc_act", "yes", ["desc_act = 'yes'"]),
])
def test_malformed_settings_are_refused(small_ckpt, tmp_path, field, value, words):
    refused(broken_copy(small_ckpt, tmp_path / "c", config={field: value}), ModelFormatError, *words)


@pytest.mark.parametrize("name,change,words", [
    (P + ".qweight", lambda a: a[:, :-8], ["qweight", "expected i32 [32, 512]"]),
    (P + ".qzeros", lambda a: a[:-1], ["qzeros", "expected i32 [4, 64]"]),
    (P + ".scales", lambda a: a[:, :-1], ["scales", "expected f16 [4, 512]"]),
    (P + ".scales", lambda a: a.astype(np.float32), ["scales", "f32"]),
    (P + ".g_idx", lambda a: a[:-8], ["g_idx", "expected i32 [256]"]),
    (P + ".g_idx", lambda a: np.where(np.arange(a.size) == 5, 4, a).astype(np.int32), ["g_idx[5] = 4", "0..3"]),
    (P + ".g_idx", lambda a: np.where(np.arange(a.size) == 7, -1, a).astype(np.int32), ["g_idx[7] = -1"]),
    (P + ".qzeros", None, ["qzeros is missing"]),
    (P + ".qweight", None, ["neither", P]),
    ("model.norm.weight", None, ["model.norm.weight is missing"]),
])
def test_bad_tensors_are_refused(small_ckpt, tmp_path, name, change, words):
    refused(broken_copy(small_ckpt, tmp_path / "c", tensors={name: change}), ModelFormatError, *words)


def test_truncated_safetensors_is_refused(small_ckpt, tmp_path):
    d = broken_copy(small_ckpt, tmp_path / "c")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    refused(d, ModelFormatError, "truncated")


def test_missing_g_idx_means_contiguous_groups(small_ckpt, tmp_path):
    """Files from before act-order have no g_idx: group i // group_size."""
    src = GPTQCheckpoint(str(small_ckpt))
    m = src.module(P, (512, 256))
    order = np.argsort(m.g_idx, kind="stable")
    codes = unpack_codes(m.qweight)[order]  # rows rearranged so contiguous groups mean the same
    words = np.zeros((32, 512), np.uint32)
    for r in range(8):
        words |= codes[r::8].astype(np.uint32) << np.uint32(4 * r)
    d = broken_copy(small_ckpt, tmp_path / "c", tensors={P + ".g_idx": None, P + ".qweight": words.view(np.int32)})
    m2 = GPTQCheckpoint(str(d)).module(P, (512, 256))
    assert np.array_equal(m2.g_idx, np.arange(256) // 64)
    assert np.array_equal(dequantize(m2), dequantize(m)[:, order])


def test_zero_bias_is_accepted_and_nonzero_bias_added(small_ckpt, tmp_path):
    """AutoGPTQ's all-zero biases load; a real bias is added by the direct load, refused by export
    (pecca's GGUF has no GPTQ bias)."""
    zero = broken_copy(small_ckpt, tmp_path / "z", tensors={P + ".bias": np.zeros(512, np.float16)})
    assert GPTQCheckpoint(str(zero)).module(P, (512, 256)).bias is None
    bias = np.linspace(-1, 1, 512).astype(np.float16)
    d = broken_copy(small_ckpt, tmp_path / "b", tensors={P + ".bias": bias})
    assert np.array_equal(GPTQCheckpoint(str(d)).module(P, (512, 256)).bias, bias.astype(np.float32))
    with pytest.raises(UnsupportedModelError, match="bias is not zero"):
        open_source(str(d))


def test_unequal_groups_load_directly_but_do_not_export(small_ckpt, tmp_path):
    d = broken_copy(small_ckpt, tmp_path / "c",
                    tensors={P + ".g_idx": lambda a: np.where(np.arange(a.size) == 0, (a[0] + 1) % 4, a).astype(np.int32)})
    open_model(str(d))
    with pytest.raises(UnsupportedModelError, match="equal groups"):
        open_source(str(d))


def test_plain_hf_directory_says_export_first():
    d = shared_file("models", "hf", "stories260K")
    with pytest.raises(ModelFormatError, match="pecca export"):
        pecca.load(str(d))


def test_dynamic_fp16_modules_and_autogptq_quirks():
    """-attnonly: GPTQModel's dynamic left the MLP in fp16 (decided by the tensors present);
    autogptq: no format key, is_marlin_format false, gptq_model-4bit-32g.safetensors, zero biases,
    an lm_head copy beside tied embeddings."""
    ck = GPTQCheckpoint(str(shared_file("models", "gptq", "stories260K-gptq-4bit-g32-attnonly")))
    assert ck.module_kinds() == {"GPTQ-4bit": 20, "F16": 15}
    assert ck.quant.override("model.layers.0.mlp.up_proj") == {}
    ck = GPTQCheckpoint(str(shared_file("models", "gptq", "stories260K-autogptq-4bit-g32-actorder")))
    assert ck.quant.format == "gptq" and ck.files[0].endswith("gptq_model-4bit-32g.safetensors")
    assert ck.tied and "lm_head.weight" in ck.tensors
    assert ck.module("model.layers.0.self_attn.q_proj", (64, 64)).bias is None


@pytest.mark.parametrize("variant", STORIES[:1])
def test_gguf_metadata_and_info(variant, tmp_path):
    """The export's tensor names and pecca.gptq.* metadata; `pecca info` shows the settings."""
    import gguf

    src = shared_file("models", "gptq", "stories260K-gptq-4bit-g32-actorder")
    out = tmp_path / "m.gguf"
    export(str(src), str(out))
    r = gguf.GGUFReader(str(out))
    names = {t.name: t for t in r.tensors}
    assert names["blk.0.attn_q.gptq_qs"].tensor_type.name == "I32"
    assert list(names["blk.0.ffn_down.gptq_qs"].data.shape) == [64, 192 // 8]
    assert names["blk.0.ffn_down.gptq_scales"].tensor_type.name == "F16"
    assert list(names["blk.0.ffn_down.gptq_zeros"].data.shape) == [64, 6]
    assert names["blk.0.attn_q.gptq_perm"].tensor_type.name == "I32"  # act-order
    # ffn_down's permutation is folded into ffn_gate / ffn_up's rows (export.gptq)
    assert "blk.0.ffn_down.gptq_perm" not in names and "blk.0.ffn_gate.gptq_perm" in names
    assert names["blk.0.ffn_down.gptq_fold"].tensor_type.name == "I32"
    assert list(names["blk.0.ffn_down.gptq_fold"].data.shape) == [192]
    assert "blk.0.attn_q.weight" not in names and "output.weight" not in names
    assert names["token_embd.weight"].tensor_type.name == "F16"  # the default for GPTQ's others
    meta = {k: r.fields[k].contents() for k in r.fields if k.startswith("pecca.gptq")}
    assert meta == {"pecca.gptq.bits": 4, "pecca.gptq.group_size": 32, "pecca.gptq.desc_act": True,
                    "pecca.gptq.sym": False, "pecca.gptq.source_format": "gptq",
                    "pecca.gptq.layout": "quads"}
    # every matrix here has rows of 64 or 192 inputs, not whole steps of 128: all in rows
    layer = pecca.load(str(out)).loaded.weights.layers[0]
    assert not any(getattr(layer, n).quads for n in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    for path in (out, src):
        info = pecca.load(str(path)).info()
        assert info["precision"] == "gptq4"
        assert {k: info["gptq"][k] for k in ("bits", "group_size", "desc_act", "sym")} == \
            {"bits": 4, "group_size": 32, "desc_act": True, "sym": False}


def test_tokenizer_is_found_inside_the_directory():
    m = pecca.load(str(shared_file("models", "gptq", "stories260K-gptq-4bit-g32")))
    assert m.tokenizer.path.endswith("tokenizer.json")
    assert m.tokenizer.encode("Once upon a time") == [1, 403, 407, 261, 378]


def test_ffn_down_permutation_folded_into_gate_and_up_rows(tmp_path):
    """In the GGUF, ffn_down has no input permutation: its columns are the checkpoint's in the
    act-order (fold), and ffn_gate / ffn_up's rows come in that order, so SwiGLU's output is
    already ffn_down's permuted input. Exactly the checkpoint's weights, reordered."""
    import gguf

    src = shared_file("models", "gptq", "stories260K-gptq-4bit-g32-actorder")
    out = tmp_path / "m.gguf"
    export(str(src), str(out))
    t = {x.name: x.data for x in gguf.GGUFReader(str(out)).tensors}
    ck = GPTQCheckpoint(str(src))
    c = ck.config
    for i in range(c.n_layers):
        fold = np.asarray(t[f"blk.{i}.ffn_down.gptq_fold"])
        g_idx = ck.module(f"model.layers.{i}.mlp.down_proj", (c.dim, c.hidden_dim)).g_idx
        assert np.array_equal(fold, np.argsort(g_idx, kind="stable"))  # the group order
        part = lambda name: [t[f"blk.{i}.{name}.gptq_{p}"] for p in ("qs", "scales", "zeros")]

        def gguf_w(name, perm=None):
            qs, sc, z = part(name)
            return dequantize_q4g(np.asarray(qs).view(np.uint8), np.asarray(sc), np.asarray(z), perm)

        down = dequantize(ck.module(f"model.layers.{i}.mlp.down_proj", (c.dim, c.hidden_dim)))
        assert np.array_equal(gguf_w("ffn_down"), down[:, fold])
        for name, hf in (("ffn_gate", "gate_proj"), ("ffn_up", "up_proj")):
            m = ck.module(f"model.layers.{i}.mlp.{hf}", (c.hidden_dim, c.dim))
            perm = np.asarray(t[f"blk.{i}.{name}.gptq_perm"]) if f"blk.{i}.{name}.gptq_perm" in t else None
            assert np.array_equal(gguf_w(name, perm), dequantize(m)[fold])


def test_fold_reorders_float_gate_and_up_rows_too():
    """A layer whose ffn_down is act-order-quantized while ffn_gate / ffn_up stayed in floating
    point: the float rows are written in the fold's order as well (here on the attention-only
    checkpoint's float MLP, with a fold put in by hand)."""
    src = open_source(str(shared_file("models", "gptq", "stories260K-gptq-4bit-g32-attnonly")))
    want = {n: src.tensor(f"blk.0.{n}.weight").data.copy() for n in ("ffn_gate", "ffn_up", "ffn_down")}
    fold = np.random.default_rng(0).permutation(src.config.hidden_dim).astype(np.int32)
    src.folds = {0: fold}
    for n in ("ffn_gate", "ffn_up"):
        assert np.array_equal(src.tensor(f"blk.0.{n}.weight").data, want[n][fold])
    assert np.array_equal(src.tensor("blk.0.ffn_down.weight").data, want["ffn_down"])  # float: not folded
    other = open_source(str(shared_file("models", "gptq", "stories260K-gptq-4bit-g32-attnonly")))
    assert np.array_equal(src.tensor("blk.1.ffn_gate.weight").data, other.tensor("blk.1.ffn_gate.weight").data)


def test_gguf_re_export_refuses_a_bad_fold(tmp_path, monkeypatch):
    """A gptq_fold that is not a permutation: re-export says so (the runtime never reads it)."""
    import gguf

    use_numpy_linears(monkeypatch)
    src = shared_file("models", "gptq", "stories260K-gptq-4bit-g32-actorder")
    out = tmp_path / "m.gguf"
    export(str(src), str(out))
    fold = next(t for t in gguf.GGUFReader(str(out)).tensors if t.name == "blk.1.ffn_down.gptq_fold")
    data = bytearray(out.read_bytes())
    at = int(fold.data_offset)
    data[at:at + 4] = data[at + 4:at + 8]  # fold[0] = fold[1]: a repeat
    out.write_bytes(bytes(data))
    ids = [1, 403, 407]
    assert np.all(np.isfinite(pecca.load(str(out)).model.logits_all(ids)))  # not used at run time
    with pytest.raises(ModelFormatError, match="blk.1.ffn_down.gptq_fold is not a permutation"):
        export(str(out), str(tmp_path / "f.gguf"), "f32")


def test_gguf_re_export_dequantizes(tmp_path, monkeypatch):
    """A GPTQ GGUF exported again as f32 holds the exact dequantized weights."""
    use_numpy_linears(monkeypatch)
    src = shared_file("models", "gptq", "stories260K-gptq-4bit-g32-actorder")
    export(str(src), str(tmp_path / "q.gguf"))
    export(str(tmp_path / "q.gguf"), str(tmp_path / "f.gguf"), "f32")
    a, b = pecca.load(str(tmp_path / "f.gguf")), pecca.load(str(src))
    assert a.info()["precision"] == "f32"
    ids = [1, 403, 407, 261, 378]
    assert np.array_equal(a.model.logits_all(ids), b.model.logits_all(ids))


@pytest.mark.parametrize("group_size,fmt,hidden", [(-1, "gptq", 512), (32, "gptq_v2", 512),
                                                   (128, "gptq", 8192), (-1, "gptq_v2", 8192)])
def test_random_checkpoints_gguf_equals_directory(tmp_path, group_size, fmt, hidden):
    """Sharded files, a quantized lm_head, group size -1 and v2 zeros, an ffn_down of 8192 inputs
    (written in 2 column slices): the GGUF route and the directory route compute the same model
    (through NumPy's dequantization: exactly, but for the order in which ffn_down sums its inputs
    where the export folded its act-order permutation into ffn_gate / ffn_up's rows)."""
    from gptq_helpers import NumpyGPTQ, NumpyQ4G
    import pecca.weights as W

    d = tmp_path / "ck"
    bench_script().make_checkpoint(d, layers=2, dim=256, hidden=hidden, heads=4, kv_heads=2, vocab=600,
                                   group_size=group_size, sym=False, fmt=fmt, shard_gb=0.0004, lm_head=True)
    assert (d / "model.safetensors.index.json").is_file()
    export(str(d), str(tmp_path / "m.gguf"))
    down = open_source(str(tmp_path / "m.gguf")).tensors["blk.1.ffn_down.gptq_qs"]
    assert list(down.data.shape) == ([2, 256, hidden // 16] if hidden >= 8192 else [256, hidden // 8])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(W, "Q4GLinear", NumpyQ4G, raising=False)
        mp.setattr(W, "GPTQLinear", NumpyGPTQ, raising=False)
        a, b = pecca.load(str(tmp_path / "m.gguf")), pecca.load(str(d))
        assert not a.model.weights.shared_classifier and a.model.weights.output.kind == "gptq4"
        ids = a.tokenizer.encode("Hello world")
        assert ids == b.tokenizer.encode("Hello world")
        la, lb = a.model.logits_all(ids), b.model.logits_all(ids)
    assert_routes_agree(tmp_path / "m.gguf", la, lb)
    assert np.all(np.isfinite(la)) and la.std() > 0.1
    if HAVE_KERNELS:  # and the kernels on both routes
        a, b = pecca.load(str(tmp_path / "m.gguf")), pecca.load(str(d))
        ref = np.abs(la).max()
        for m in (a, b):
            set_float_act(m, True)
            assert np.abs(m.model.logits_all(ids) - la).max() <= 1e-3 * ref


def test_to_quads_and_back():
    """to_quads puts a quad's 4 rows' 64 bytes of each step side by side (2-D and sliced 3-D);
    from_quads undoes it; dequantize_q4g reads either layout."""
    rng = np.random.default_rng(3)
    qs = rng.integers(0, 256, (2, 8, 128), dtype=np.uint8)  # 2 slices, 8 rows, 256 inputs
    qq = to_quads(qs)
    assert qq.shape == qs.shape and qq.flags.c_contiguous
    # slice 1, rows 4..7 (quad 1), step 1: row 6's bytes 64..127 are the quad's third 64 bytes
    assert np.array_equal(qq[1, 4:8].reshape(-1)[256 + 2 * 64:256 + 3 * 64], qs[1, 6, 64:128])
    assert np.array_equal(from_quads(qq), qs) and np.array_equal(from_quads(to_quads(qs[0])), qs[0])
    scales = rng.standard_normal((2, 8, 2)).astype(np.float16)
    zeros = rng.integers(0, 16, (2, 8, 2)).astype(np.int8)
    assert np.array_equal(dequantize_q4g(qq, scales, zeros, None, quads=True),
                          dequantize_q4g(qs, scales, zeros, None))


def test_quad_layout_export_and_read(tmp_path):
    """A checkpoint whose every matrix fits the quad layout: the export writes them in it
    (pecca.gptq.layout = "quads"), pecca reads them so, and the logits equal those of the same
    matrices in the row layout bit for bit; a layout it does not know is refused."""
    import gguf

    if not HAVE_KERNELS:
        pytest.skip("no 4-bit kernels")
    from pecca.weights import Q4GLinear

    src, out = tmp_path / "ck", tmp_path / "m.gguf"
    bench_script().make_checkpoint(src, layers=1, dim=128, hidden=384, heads=4, kv_heads=2, vocab=300,
                                   group_size=128, act_order=True, sym=False)
    export(str(src), str(out))
    assert gguf.GGUFReader(str(out)).fields["pecca.gptq.layout"].contents() == "quads"
    m = pecca.load(str(out))
    names = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    layer = m.loaded.weights.layers[0]
    assert all(getattr(layer, n).quads for n in names)
    quads = m.model.forward(7, 0).copy()
    for n in names:  # the same matrices in rows
        q = getattr(layer, n)
        setattr(layer, n, Q4GLinear(from_quads(q.qs), q.scales, q.zeros, q.perm))
    # (position 0 again: its cache entry is overwritten, so the pass is the same one)
    assert np.array_equal(m.model.forward(7, 0), quads)

    data = bytearray(out.read_bytes())
    at = data.find(b"quads")
    data[at:at + 5] = b"qu4ds"
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="pecca.gptq.layout is 'qu4ds'"):
        pecca.load(str(bad))
