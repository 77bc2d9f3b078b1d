"""Export throughput and peak memory of `pecca export` on random-weight HuggingFace Llama
checkpoints (sharded bf16 safetensors) of 1B and 7B shapes.

Writes the checkpoint into --out-dir (default bench/out/, gitignored; the 7B needs ~27 GB of
disk for source and result), then runs `pecca export SRC OUT.gguf --dtype f16` in a child
process and reports MB/s (source bytes / wall time) and the child's peak RSS.

Usage: python bench/export_throughput.py [--shapes 1B,7B] [--dtype f16] [--keep]
"""
import argparse
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHAPES = {  # Llama-3.2-1B-like and Llama-2-7B widths, with the 32000-token Llama 2 vocabulary
    "1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
}
SHARD_BYTES = 2 << 30


def shared_dir() -> Path:
    return Path(os.environ.get("PECCA_SHARED") or REPO.parent / "shared")


def hf_tensor_shapes(cfg):
    d, h, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * d // cfg["num_attention_heads"]
    yield "model.embed_tokens.weight", (V, d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (d,)
        yield p + "self_attn.q_proj.weight", (d, d)
        yield p + "self_attn.k_proj.weight", (kv, d)
        yield p + "self_attn.v_proj.weight", (kv, d)
        yield p + "self_attn.o_proj.weight", (d, d)
        yield p + "post_attention_layernorm.weight", (d,)
        yield p + "mlp.gate_proj.weight", (h, d)
        yield p + "mlp.up_proj.weight", (h, d)
        yield p + "mlp.down_proj.weight", (d, h)
    yield "model.norm.weight", (d,)
    yield "lm_head.weight", (V, d)


def random_bf16_block(n=1 << 24, seed=0):
    """16M bf16 values ~ N(0, 0.02), reused for every tensor: content does not matter here."""
    bits = (np.random.default_rng(seed).standard_normal(n).astype(np.float32) * 0.02).view(np.uint32)
    return (bits >> 16).astype(np.uint16)


def write_shard(path, tensors, block):
    """A safetensors file written by hand: numpy has no bfloat16 for the safetensors package."""
    header, offset = {}, 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, shape in tensors:
            left = int(np.prod(shape))
            while left:
                k = min(left, block.size)
                block[:k].tofile(f)
                left -= k


def make_checkpoint(d: Path, shape: str) -> int:
    cfg = dict(SHAPES[shape], architectures=["LlamaForCausalLM"], model_type="llama",
               max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
               tie_word_embeddings=False, torch_dtype="bfloat16", hidden_act="silu")
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    shutil.copy(shared_dir() / "models" / "llama2c" / "tokenizer.model", d / "tokenizer.model")
    block = random_bf16_block()
    shards, cur, size, total = [], [], 0, 0
    for name, shp in hf_tensor_shapes(cfg):
        n = int(np.prod(shp)) * 2
        if cur and size + n > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shp))
        size += n
        total += n
    shards.append(cur)
    weight_map = {}
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(d / fname, tensors, block)
        weight_map.update({name: fname for name, _ in tensors})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return total


def run_export(src: Path, out: Path, dtype: str):
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pecca", "export", str(src), str(out), "--dtype", dtype],
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"export failed: {r.stderr.strip()}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child so far
    return wall, peak_kib * 1024


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="1B,7B")
    ap.add_argument("--dtype", default="f16")
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench" / "out")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and GGUF files")
    args = ap.parse_args(argv)
    if not (shared_dir() / "models" / "llama2c" / "tokenizer.model").is_file():
        print("export_throughput: skipped: ../shared/models/llama2c/tokenizer.model not found")
        return 0
    rows = []
    for shape in [s for s in args.shapes.split(",") if s]:
        src = args.out_dir / f"hf-random-{shape}"
        out = args.out_dir / f"hf-random-{shape}-{args.dtype}.gguf"
        t0 = time.perf_counter()
        nbytes = make_checkpoint(src, shape)
        made = time.perf_counter() - t0
        os.sync()
        wall, peak = run_export(src, out, args.dtype)
        rows.append((shape, nbytes, made, wall, peak, out.stat().st_size))
        if not args.keep:
            shutil.rmtree(src)
            out.unlink()
    print(f"{'shape':<6} {'source':>10} {'written':>10} {'export s':>9} {'MB/s':>7} {'peak RSS':>10}")
    for shape, nbytes, made, wall, peak, outsize in rows:
        print(f"{shape:<6} {nbytes / 2**30:>8.2f}Gi {outsize / 2**30:>8.2f}Gi {wall:>9.1f} "
              f"{nbytes / 1e6 / wall:>7.0f} {peak / 2**20:>8.0f}Mi")
    print("source: sharded bf16 safetensors (2 GiB shards), random weights; MB/s = source bytes / wall "
          "time; peak RSS of the largest export child so far")
    return 0


if __name__ == "__main__":
    sys.exit(main())
