"""Small random Llama models made with `transformers` (torch CPU, test extras only), exported
and compared with transformers' own float32 logits, positions 0..31: grouped-query attention,
rope_theta 500000, rope_scaling llama3 and linear, tied and untied embeddings, bf16/fp16/fp32
safetensors, sharded files, odd sizes (hidden 72, 3 heads), pytorch_model.bin.

Tolerance: per position max |pecca - transformers| / max |transformers| <= 1e-4 (f32 export).
"""
import shutil

import numpy as np
import pytest

import pecca
from export import export
from shared_data import llama2c_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
            rms_norm_eps=1e-5, tie_word_embeddings=False)
CASES = {
    "gqa-untied-f32": dict(),
    "tied-bf16": dict(tie_word_embeddings=True, _dtype="bfloat16"),
    "fp16-sharded": dict(_dtype="float16", _shard="100KB"),
    "theta500k": dict(rope_theta=500000.0),
    "llama3-scaling": dict(rope_theta=500000.0, max_position_embeddings=1024,
                           rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                             high_freq_factor=4.0, original_max_position_embeddings=64)),
    "linear-scaling": dict(rope_scaling=dict(rope_type="linear", factor=4.0)),
    "odd-72-3heads": dict(hidden_size=72, intermediate_size=100, num_attention_heads=3, num_key_value_heads=1),
    "mha-bin": dict(num_key_value_heads=8, _bin=True),
}


def make_model(d, case):
    spec = dict(BASE)
    opts = {k: v for k, v in CASES[case].items() if k.startswith("_")}
    spec.update({k: v for k, v in CASES[case].items() if not k.startswith("_")})
    torch.manual_seed(sum(map(ord, case)))
    cfg = transformers.LlamaConfig(**spec)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 and larger weights, so that errors would show
        for name, p in model.named_parameters():
            p.mul_(5.0) if p.ndim == 2 else p.copy_(1 + 0.3 * torch.randn_like(p))
    dtype = getattr(torch, opts.get("_dtype", "float32"))
    model.to(dtype).save_pretrained(d, max_shard_size=opts.get("_shard", "5GB"))
    if opts.get("_bin"):  # the older pytorch_model.bin layout (transformers 5 writes safetensors)
        torch.save(model.state_dict(), d / "pytorch_model.bin")
        for f in d.glob("model*.safetensors*"):
            f.unlink()
    shutil.copy(llama2c_model("tok512.model"), d / "tokenizer.model")
    # the reference: transformers computing in float32 on the saved weights
    ref = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    return ref


@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_transformers(tmp_path, case):
    d = tmp_path / case
    ref_model = make_model(d, case)
    if CASES[case].get("_bin"):
        assert (d / "pytorch_model.bin").exists() and not list(d.glob("*.safetensors"))
    out = tmp_path / "m.gguf"
    export(str(d), str(out), "f32")
    m = pecca.load(str(out))
    ids = [1] + np.random.default_rng(0).integers(3, 512, 31).tolist()
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].double().numpy()
    got = np.stack([m.forward(t, p) for p, t in enumerate(ids)])
    err = (np.abs(got - ref).max(axis=1) / np.abs(ref).max(axis=1)).max()
    assert err <= 1e-4, f"max relative error {err:.3g}"
    # batched prefill agrees too
    last = m.model.prefill(ids, 0)
    assert np.abs(last - ref[-1]).max() / np.abs(ref[-1]).max() <= 1e-4
