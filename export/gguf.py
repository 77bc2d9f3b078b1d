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
from pecca.quant import BLOCK_BYTES, BLOCK_VALUES, quantize_blocks

OUT_DTYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")
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


def out_type(name: str, shape: tuple, dtype: str) -> str:
    """GGUF type of a tensor: norms and rope factors stay F32 (as llama.cpp keeps them);
    matrices take `dtype`, but block types need rows of whole 32-value blocks (F16 otherwise).
    With a 4-bit dtype the token embedding and the classifier are Q8_0, as llama.cpp's
    quantizer keeps those two (the most sensitive) at a higher precision."""
    if len(shape) == 1 or dtype == "f32":
        return "F32"
    if dtype in ("q4_0", "q4_1") and name in ("token_embd.weight", "output.weight"):
        dtype = "q8_0"
    if dtype.upper() in BLOCK_BYTES and shape[1] % BLOCK_VALUES == 0:
        return dtype.upper()
    return "F16"


def stored_shape(shape: tuple, kind: str) -> tuple:
    """numpy shape of the data as written: block-quantized rows are bytes."""
    if kind in BLOCK_BYTES:
        return shape[:-1] + (shape[-1] // BLOCK_VALUES * BLOCK_BYTES[kind],)
    return shape


# I32 and I8: GPTQ's repacked tensors (export.gptq)
NUMPY_OF = {"F32": np.float32, "F16": np.float16, "Q8_0": np.uint8, "Q4_0": np.uint8, "Q4_1": np.uint8,
            "I32": np.int32, "I8": np.int8}


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
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
                     "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[dtype])
    w.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:  # gpt2: the pre-tokenizer's name, as llama.cpp's converter writes it
        w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    if vocab.scores:  # a gpt2 vocabulary has none
        w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    if vocab.unk_id is not None:
        w.add_unk_token_id(vocab.unk_id)
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)


def write_gguf(out_path: str, source, dtype: str = "f32") -> None:
    """Write `source` to `out_path` as GGUF with matrices in `dtype` (one of OUT_DTYPES)."""
    import gguf

    if dtype not in OUT_DTYPES:
        raise InvalidArgumentError(f"--dtype {dtype!r}: expected one of {', '.join(OUT_DTYPES)}")
    c, vocab = source.config, source.vocab
    if len(vocab) != c.vocab_size:
        raise ModelFormatError(f"{vocab.source}: the tokenizer has {len(vocab)} tokens but the model's "
                               f"vocabulary is {c.vocab_size}")
    plan = gguf_plan(source, dtype)
    tmp = f"{out_path}.tmp{os.getpid()}"
    w = gguf.GGUFWriter(tmp, "llama")
    try:
        add_metadata(w, c, vocab, source.name, dtype)
        if hasattr(source, "add_metadata"):  # e.g. GPTQ's settings
            source.add_metadata(w)
        total = 0
        for name, shape, kind in plan:
            data_shape = stored_shape(shape, kind)
            nbytes = int(np.prod(data_shape)) * np.dtype(NUMPY_OF[kind]).itemsize
            w.add_tensor_info(name, data_shape, np.dtype(NUMPY_OF[kind]), nbytes,
                              raw_dtype=gguf.GGMLQuantizationType[kind])
            total += nbytes
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        fout = w.fout[0]
        w.write_padding(fout, fout.tell())
        with progress(f"exporting {os.path.basename(out_path)}", total) as advance:
            for name, shape, kind in plan:
                try:
                    nbytes = write_tensor(fout, name, shape, source.tensor(name), kind, advance)
                except ModelFormatError as e:  # name the checkpoint, not only the tensor
                    where = getattr(source, "dir", None) or getattr(source, "path", None)
                    raise ModelFormatError(f"{where}: {e}" if where and not str(e).startswith(str(where))
                                           else str(e)) from None
                w.write_padding(fout, nbytes)
        w.close()
        os.replace(tmp, out_path)
    finally:
        w.close()
        if os.path.exists(tmp):
            os.remove(tmp)


def gguf_plan(source, dtype: str):
    """(name, shape, GGUF type) of every tensor, in writing order. A source with tensors of its
    own layout (GPTQ's repacked 4-bit ones) gives its own plan."""
    if hasattr(source, "gguf_plan"):
        return source.gguf_plan(dtype)
    return [(n, s, out_type(n, s, dtype)) for n, s in tensor_plan(source.config, source.tied)]


def write_array(fout, name, shape, a: np.ndarray, kind: str, advance) -> int:
    """Append `a`, already in GGUF type `kind` (a source's own layout), as it is."""
    if tuple(a.shape) != tuple(shape) or a.dtype != NUMPY_OF[kind]:
        raise ModelFormatError(f"tensor {name} is {a.dtype} {list(a.shape)}, expected {kind} {list(shape)}")
    np.ascontiguousarray(a).tofile(fout)
    advance(a.nbytes)
    return a.nbytes


def write_tensor(fout, name, shape, raw: RawTensor, kind: str, advance) -> int:
    """Convert `raw` to GGUF type `kind` a chunk of rows at a time and append it; returns the
    bytes written. A plain numpy array is written as it is (write_array)."""
    if isinstance(raw, np.ndarray):
        return write_array(fout, name, shape, raw, kind, advance)
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
        if kind in BLOCK_BYTES:
            out = quantize_blocks(part, kind)
        else:
            out = part.astype(NUMPY_OF[kind], copy=False)
        if kind == "F16" and not np.all(np.isfinite(out)):
            raise ModelFormatError(f"tensor {name} has values beyond the f16 range; export with --dtype f32")
        out.tofile(fout)
        written += out.nbytes
        advance(out.nbytes)
        release_pages(data[r:r + rows])
    return written


class GGUFSource:
    """A GGUF file (F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors, `llama` or `gpt2` vocabulary) as an
    export source: to re-export it in another type. Block-quantized tensors are dequantized a
    tensor at a time."""

    def __init__(self, path: str):
        from export.vocab import Vocab
        from pecca.formats import gguf as reader

        r = reader.open_reader(path)
        meta = reader.Metadata(path, r)
        self.tensors = {t.name: t for t in r.tensors}
        self.config = reader.read_config(path, meta, self.tensors)
        self.tied = "output.weight" not in self.tensors and "output.gptq_qs" not in self.tensors
        self.q4g_quads = reader.q4g_quads(path, meta)
        self.name = meta.string("general.name", None) or os.path.splitext(os.path.basename(path))[0]
        model = meta.string("tokenizer.ggml.model", None)
        if model not in ("llama", "gpt2"):
            raise ModelFormatError(f"{path}: tokenizer.ggml.model {model!r}; re-export reads the "
                                   "'llama' and 'gpt2' vocabularies")
        tokens = meta.strings("tokenizer.ggml.tokens")
        unk = meta.integer("tokenizer.ggml.unknown_token_id", None)
        self.vocab = Vocab(tokens, list(meta.numbers("tokenizer.ggml.scores", None) or
                                        ([0.0] * len(tokens) if model == "llama" else [])),
                           list(meta.integers("tokenizer.ggml.token_type", None) or [1] * len(tokens)),
                           bos_id=meta.integer("tokenizer.ggml.bos_token_id", 1),
                           eos_id=meta.integer("tokenizer.ggml.eos_token_id", 2),
                           unk_id=None if unk is None and model == "gpt2" else int(unk or 0),
                           add_bos=meta.flag("tokenizer.ggml.add_bos_token", True),
                           add_space_prefix=meta.flag("tokenizer.ggml.add_space_prefix", model == "llama"),
                           model=model, source=path,
                           merges=list(meta.strings("tokenizer.ggml.merges", None) or []),
                           pre=meta.string("tokenizer.ggml.pre", None),
                           chat_template=meta.string("tokenizer.chat_template", None))
        self.path = path

    def tensor(self, name: str) -> RawTensor:
        """The tensor as the model computes it; in a GPTQ export's layers with a folded ffn_down
        permutation (export.gptq), ffn_gate / ffn_up's rows and ffn_down's columns go back to the
        checkpoint's order."""
        t = self._tensor(name)
        parts = name.split(".")
        if parts[0] != "blk" or len(parts) < 3 or parts[2] not in ("ffn_gate", "ffn_up", "ffn_down"):
            return t
        fold = self.tensors.get(f"blk.{parts[1]}.ffn_down.gptq_fold")
        if fold is None:
            return t
        fold = np.asarray(fold.data, np.int64)
        hidden = t.data.shape[1 if parts[2] == "ffn_down" else 0]
        if fold.shape != (hidden,) or not np.array_equal(np.sort(fold), np.arange(hidden)):
            raise ModelFormatError(f"{self.path}: blk.{parts[1]}.ffn_down.gptq_fold is not a permutation of "
                                   f"0..{hidden - 1}")
        out = np.empty_like(t.data)
        if parts[2] == "ffn_down":
            out[:, fold] = t.data
        else:
            out[fold] = t.data
        return RawTensor(out, t.dtype)

    def _tensor(self, name: str) -> RawTensor:
        from pecca.quant import dequantize_blocks

        t = self.tensors.get(name)
        if t is None and name.endswith(".weight") and name[:-7] + ".gptq_qs" in self.tensors:
            return self._gptq(name[:-7])
        if t is None:
            raise ModelFormatError(f"{self.path}: tensor {name} is missing")
        kind = t.tensor_type.name
        shape = tuple(int(d) for d in reversed(t.shape))
        if kind == "F32":
            return RawTensor(t.data.reshape(shape), "f32")
        if kind == "F16":
            return RawTensor(t.data.reshape(shape), "f16")
        if kind == "BF16":
            return RawTensor(t.data.view(np.uint16).reshape(shape), "bf16")
        if kind in BLOCK_BYTES:
            return RawTensor(dequantize_blocks(t.data, kind).reshape(shape).astype(np.float32), "f32")
        raise ModelFormatError(f"{self.path}: tensor {name} has type {kind}, which cannot be re-exported")

    def _gptq(self, base: str) -> RawTensor:
        """A GPTQ module of pecca's GGUF (export.gptq), dequantized to float32."""
        from export.gptq import dequantize_q4g

        part = {p: self.tensors[f"{base}.gptq_{p}"].data for p in ("qs", "scales", "zeros", "perm")
                if f"{base}.gptq_{p}" in self.tensors}
        from pecca.weights import q4g_quads_fit

        qs = part["qs"].view(np.uint8)
        s = qs.shape[0] if qs.ndim == 3 else 1
        quads = self.q4g_quads and q4g_quads_fit(qs.shape[-2], 2 * qs.shape[-1] * s, s)
        return RawTensor(dequantize_q4g(qs, part["scales"], part["zeros"], part.get("perm"), quads), "f32")
