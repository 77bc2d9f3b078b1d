"""pecca export: every source kind -> GGUF -> load -> the outside references.

HF directories: logits vs transformers' (../shared/reference/hf), f32 within 1e-4 and f16
within 2e-2 max relative error (per position: max |diff| / max |ref|). llama2.c files: run.c's
tokens. Meta checkpoints (2 shards, torch.save): the same logits as the llama2.c original.
"""
import json
import os
import shutil
import stat

import numpy as np
import pytest

import pecca
from export import export, open_source
from export.gguf import write_gguf
from pecca.cli import main
from pecca.errors import ModelFormatError, PeccaError, UnsupportedModelError
from shared_data import llama2c_model, shared_file, shared_root

HF_DIRS = ["stories260K", "stories260K-f32", "stories260K-bf16", "stories260K-sharded"]


def hf_cases(d):
    man = json.loads(shared_file("reference", "hf", "manifest.json").read_text())
    base = d.replace("-sharded", "")
    return [c for c in man["cases"] if c["model_dir"].rsplit("/", 1)[-1] == base]


def rel_err(got, ref):
    return float((np.abs(got - ref).max(axis=1) / np.abs(ref).max(axis=1)).max())


def logits(m, ids):
    return np.stack([m.forward(t, p) for p, t in enumerate(ids)])


def writable_copy(src, dst):
    shutil.copytree(src, dst)
    for root, dirs, files in os.walk(dst):
        for n in dirs + files:
            p = os.path.join(root, n)
            os.chmod(p, os.stat(p).st_mode | stat.S_IWUSR)
    return dst


@pytest.mark.parametrize("d", HF_DIRS)
@pytest.mark.parametrize("dtype,tol", [("f32", 1e-4), ("f16", 2e-2)])
def test_hf_export_matches_transformers(tmp_path, d, dtype, tol):
    out = tmp_path / f"{d}.gguf"
    export(str(shared_file("models", "hf", d)), str(out), dtype)
    m = pecca.load(str(out))
    assert m.info()["precision"] == dtype
    for case in hf_cases(d):
        ids = case["input_ids"]
        assert m.tokenizer.encode(case["prompt"]) == ids if case["prompt"] else True
        ref = np.load(shared_root() / "reference" / "hf" / case["logits_all"])
        assert rel_err(logits(m, ids), ref) <= tol


@pytest.mark.parametrize("name", ["stories260K.bin", "stories260K_v1.bin"])
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_llama2c_export_reproduces_run_c(tmp_path, name, dtype):
    out = tmp_path / "m.gguf"
    export(str(llama2c_model(name)), str(out), dtype, str(llama2c_model("tok512.bin")))
    m = pecca.load(str(out))
    man = json.loads(shared_file("reference", "llama2c", "manifest.json").read_text())
    greedy = [e for e in man if e["program"] == "run.c" and e["args"][:2] == ["-t", "0"]]
    assert greedy
    for e in greedy[:6 if dtype == "f32" else 2]:
        ref = json.loads((shared_root() / "reference" / "llama2c" / e["ids"]).read_text())
        assert m.tokenizer.encode(e["prompt"]) == ref["prompt_ids"]
        want = ref["next_ids"][len(ref["prompt_ids"]) - 1:]
        want = [t for t in want if t != 1]
        n = len(want) if dtype == "f32" else 40  # f16 weights: the first tokens
        from pecca.generate import GenerationStats
        from pecca.sampling import Sampler
        got = list(m.stream_ids(ref["prompt_ids"], Sampler(512, 0.0), n, GenerationStats()))
        assert got == want[:n], e["output"]


def test_meta_two_shards_export(tmp_path):
    torch = pytest.importorskip("torch")
    from pecca.formats import llama2c

    lm = llama2c.read(str(llama2c_model()))
    w = lm.weights
    sd = {"tok_embeddings.weight": w.token_embedding, "norm.weight": w.norm, "output.weight": w.output.w}
    names = {"wq": "attention.wq", "wk": "attention.wk", "wv": "attention.wv", "wo": "attention.wo",
             "w1": "feed_forward.w1", "w2": "feed_forward.w2", "w3": "feed_forward.w3"}
    for i, layer in enumerate(w.layers):
        for a, b in names.items():
            sd[f"layers.{i}.{b}.weight"] = getattr(layer, a).w
        sd[f"layers.{i}.attention_norm.weight"] = layer.attn_norm
        sd[f"layers.{i}.ffn_norm.weight"] = layer.ffn_norm
    axis = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}
    d = tmp_path / "meta"
    d.mkdir()
    for r in range(2):
        part = {}
        for k, v in sd.items():
            ax = axis.get(k.split(".")[-2] if k.startswith("layers") else k.split(".")[0])
            a = np.array(v)
            part[k] = torch.from_numpy(np.ascontiguousarray(np.split(a, 2, axis=ax)[r] if ax is not None else a))
        torch.save(part, d / f"consolidated.0{r}.pth")
    (d / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 5, "n_heads": 8, "n_kv_heads": 4,
                                               "vocab_size": -1, "norm_eps": 1e-5, "multiple_of": 4,
                                               "max_seq_len": 512}))
    shutil.copy(llama2c_model("tok512.model"), d / "tokenizer.model")
    out = tmp_path / "meta.gguf"
    assert main(["export", str(d), str(out), "--dtype", "f32"]) == 0
    a, b = pecca.load(str(out)), pecca.load(str(llama2c_model()))
    ids = b.tokenizer.encode("Once upon a time there was a dog")
    assert a.tokenizer.encode("Once upon a time there was a dog") == ids
    assert rel_err(logits(a, ids), logits(b, ids)) < 1e-6


def test_gguf_metadata_is_llama_cpp_s(tmp_path):
    import gguf

    out = tmp_path / "m.gguf"
    export(str(shared_file("models", "hf", "stories260K")), str(out), "f16")
    r = gguf.GGUFReader(str(out))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.t")
         and k != "tokenizer.ggml.scores"}
    assert f["general.architecture"] == "llama"
    assert (f["llama.embedding_length"], f["llama.block_count"], f["llama.feed_forward_length"],
            f["llama.attention.head_count"], f["llama.attention.head_count_kv"], f["llama.context_length"]) == \
        (64, 5, 172, 8, 4, 512)
    assert f["llama.rope.freq_base"] == 10000.0 and f["llama.rope.dimension_count"] == 8
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.bos_token_id"] == 1
    names = {t.name: t.tensor_type.name for t in r.tensors}
    assert "output.weight" not in names  # tied embeddings, as llama.cpp writes them
    assert names["blk.4.ffn_down.weight"] == "F16" and names["blk.0.attn_norm.weight"] == "F32"
    assert len(r.fields["tokenizer.ggml.tokens"].contents()) == 512


def test_info_on_gguf(tmp_path, capsys):
    out = tmp_path / "m.gguf"
    export(str(shared_file("models", "hf", "stories260K-bf16")), str(out), "f16")
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    for word in ("architecture: llama", "rope_theta: 10000.0", "rope_scaling: none", "vocab: llama, 512 tokens",
                 "'F16': 36", "'F32': 11", "file_size", "n_kv_heads: 4"):
        assert word in text, word


# ---- bad input -----------------------------------------------------------------------------

def hf_copy(tmp_path, d="stories260K"):
    return writable_copy(shared_file("models", "hf", d), tmp_path / d)


def edit_config(d, **changes):
    p = d / "config.json"
    cfg = json.loads(p.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    p.write_text(json.dumps(cfg))


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_missing_config_field(tmp_path, capsys):
    d = hf_copy(tmp_path)
    edit_config(d, hidden_size=None)
    assert "hidden_size is missing" in run_cli(capsys, "export", d, tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("changes,pattern", [
    (dict(architectures=["MistralForCausalLM"], model_type="mistral"), "architecture"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}), "rope_scaling type 'yarn'"),
    (dict(sliding_window=4096), "sliding_window"),
    (dict(attention_bias=True), "attention_bias"),
])
def test_unsupported_configs(tmp_path, capsys, changes, pattern):
    d = hf_copy(tmp_path)
    edit_config(d, **changes)
    with pytest.raises(UnsupportedModelError, match=pattern):
        open_source(str(d))
    assert pattern.split()[0] in run_cli(capsys, "export", d, tmp_path / "o.gguf")


def test_shape_that_disagrees_with_config(tmp_path):
    d = hf_copy(tmp_path)
    edit_config(d, intermediate_size=180)
    with pytest.raises(ModelFormatError, match="expected"):
        export(str(d), str(tmp_path / "o.gguf"))
    assert not list(tmp_path.glob("o.gguf*"))


def test_missing_and_truncated_shards(tmp_path, capsys):
    d = hf_copy(tmp_path, "stories260K-sharded")
    shards = sorted(d.glob("model-*.safetensors"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[:len(data) // 2])
    assert "past the end" in run_cli(capsys, "export", d, tmp_path / "o.gguf")
    shards[1].unlink()
    assert "missing" in run_cli(capsys, "export", d, tmp_path / "o.gguf")


def test_unsupported_dtype(tmp_path):
    d = hf_copy(tmp_path, "stories260K-f32")
    p = d / "model.safetensors"
    raw = bytearray(p.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = "model.norm.weight"
    header[name]["dtype"] = "I32"  # same size as F32, so only the dtype is wrong
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (n - len(text))
    assert len(text) == n
    p.write_bytes(bytes(raw[:8]) + text + bytes(raw[8 + n:]))
    with pytest.raises(UnsupportedModelError, match="dtype I32"):
        open_source(str(d))


def test_gguf_tensor_data_past_end_of_file(tmp_path, capsys):
    out = tmp_path / "m.gguf"
    export(str(shared_file("models", "hf", "stories260K")), str(out), "f32")
    data = out.read_bytes()
    out.write_bytes(data[:-4096])
    run_cli(capsys, "generate", out, "hi")  # one clear line, no traceback
    with pytest.raises(ModelFormatError):
        pecca.load(str(out))


def test_interrupted_export_leaves_nothing(tmp_path):
    src = open_source(str(shared_file("models", "hf", "stories260K")))
    calls = {"n": 0}
    real = src.tensor

    def failing(name):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(name)

    src.tensor = failing
    out = tmp_path / "o.gguf"
    with pytest.raises(KeyboardInterrupt):
        write_gguf(str(out), src, "f32")
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_that_does_not_fit(tmp_path):
    with pytest.raises(PeccaError, match="512"):
        export(str(llama2c_model()), str(tmp_path / "o.gguf"), "f32", str(llama2c_model("tokenizer.bin")))
