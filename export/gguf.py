"""Write pecca's model file: GGUF with llama.cpp's metadata keys and tensor names, so that
llama.cpp runs pecca's F32/F16 files. Written tensor by tensor from an export source, in
chunks of rows, so memory stays near one chunk; the file appears under its name only once
complete (a temporary name, renamed at the end).

A source provides `config` (ModelConfig), `vocab` (export.vocab.Vocab), `name` (str) and
`tensor(gguf_name) -> RawTensor` in llama.cpp's layout (q/k rows in Meta's order).
"""
import os
from typing import List, Tuple

import numpy as np

from pecca.config import ModelConfig
from pecca.errors import InvalidArgumentError, ModelFormatError
from pecca.formats.tensors import RawTensor, release_pages
from pecca.progress import progress

OUT_DTYPES = {"f32": np.float32, "f16": np.float16}
CHUNK_BYTES = 64 << 20  # rows converted at a time


def tensor_plan(c: ModelConfig, tied: bool) -> List[Tuple[str, tuple]]:
    """GGUF tensor names and numpy shapes, in writing order (llama.cpp's converter's)."""
    d, h, kv = c.dim, c.hidden_dim, c.kv_dim
    plan = [("token_embd.weight", (c.vocab_size, d))]
    if c.rope_freq_factors is not None:
        plan.append(("rope_freqs.weight", (c.head_size // 2,)))
    for i in range(c.n_layers):
        p = f"blk.{i}."
        plan += [(p + "attn_norm.weight", (d,)), (p + "attn_q.weight", (d, d)),
                 (p + "attn_k.weight", (kv, d)), (p + "attn_v.weight", (kv, d)),
                 (p + "attn_output.weight", (d, d)), (p + "ffn_norm.weight", (d,)),
                 (p + "ffn_gate.weight", (h, d)), (p + "ffn_up.weight", (h, d)),
                 (p + "ffn_down.weight", (d, h))]
    plan.append(("output_norm.weight", (d,)))
    if not tied:
        plan.append(("output.weight", (c.vocab_size, d)))
    return plan


def out_dtype(name: str, shape: tuple, dtype: str):
    """Norms and rope factors stay F32 (as llama.cpp keeps them); matrices take `dtype`."""
    return np.float32 if len(shape) == 1 else OUT_DTYPES[dtype]


def add_metadata(w, c: ModelConfig, vocab, name: str, dtype: str) -> None:
    import gguf

    w.add_name(name)
    w.add_context_length(c.seq_len)
    w.add_embedding_length(c.dim)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(c.head_size)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model(vocab.model)
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    w.add_unk_token_id(vocab.unk_id)
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(vocab.add_space_prefix)


def write_gguf(out_path: str, source, dtype: str = "f32") -> None:
    """Write `source` to `out_path` as GGUF with matrices in `dtype` ("f32" or "f16")."""
    import gguf

    if dtype not in OUT_DTYPES:
        raise InvalidArgumentError(f"--dtype {dtype!r}: expected one of {', '.join(OUT_DTYPES)}")
    c, vocab = source.config, source.vocab
    if len(vocab) != c.vocab_size:
        raise ModelFormatError(f"{vocab.source}: the tokenizer has {len(vocab)} tokens but the model's "
                               f"vocabulary is {c.vocab_size}")
    plan = tensor_plan(c, source.tied)
    tmp = f"{out_path}.tmp{os.getpid()}"
    w = gguf.GGUFWriter(tmp, "llama")
    try:
        add_metadata(w, c, vocab, source.name, dtype)
        total = 0
        for name, shape in plan:
            t = np.dtype(out_dtype(name, shape, dtype))
            nbytes = int(np.prod(shape)) * t.itemsize
            w.add_tensor_info(name, shape, t, nbytes)
            total += nbytes
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        fout = w.fout[0]
        w.write_padding(fout, fout.tell())
        with progress(f"exporting {os.path.basename(out_path)}", total) as advance:
            for name, shape in plan:
                nbytes = write_tensor(fout, name, shape, source.tensor(name),
                                      out_dtype(name, shape, dtype), advance)
                w.write_padding(fout, nbytes)
        w.close()
        os.replace(tmp, out_path)
    finally:
        w.close()
        if os.path.exists(tmp):
            os.remove(tmp)


def write_tensor(fout, name, shape, raw: RawTensor, dtype, advance) -> int:
    """Convert `raw` to `dtype` a chunk of rows at a time and append it; returns bytes written."""
    if tuple(raw.shape) != tuple(shape):
        raise ModelFormatError(f"tensor {name} has shape {list(raw.shape)}, expected {list(shape)} "
                               "from the config")
    data = raw.data.reshape(shape[0], -1) if raw.data.ndim > 1 else raw.data.reshape(1, -1)
    rows = max(1, CHUNK_BYTES // max(1, data.shape[1] * 4))
    written = 0
    for r in range(0, data.shape[0], rows):
        part = RawTensor(np.ascontiguousarray(data[r:r + rows]), raw.dtype).to_f32()
        if not np.all(np.isfinite(part)):
            raise ModelFormatError(f"tensor {name} holds NaN or infinite values")
        out = part.astype(dtype, copy=False)
        if dtype == np.float16 and not np.all(np.isfinite(out)):
            raise ModelFormatError(f"tensor {name} has values beyond the f16 range; export with --dtype f32")
        out.tofile(fout)
        written += out.nbytes
        advance(out.nbytes)
        release_pages(data[r:r + rows])
    return written
