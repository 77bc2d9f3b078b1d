"""HuggingFace Llama directories as an export source: config.json, weights in safetensors
(one file or shards with an index) or pytorch_model*.bin, and tokenizer.model (sentencepiece)
or else tokenizer.json (written as a `gpt2` vocabulary for byte-level BPE such as Llama 3's).

The safetensors parser and config reading live in pecca.formats (the runtime loads GPTQ
directories directly); `.bin` files are PyTorch zip pickles, read without torch by
pecca.formats.pth. q and k rows are unpermuted to Meta's order (pecca.formats.hf.unpermute).
"""
import os
from typing import Dict

import numpy as np

from pecca.errors import ModelFormatError
from pecca.formats.hf import HF_NAMES, need_tensor, read_config, unpermute, weight_files
from pecca.formats.safetensors import read_safetensors
from pecca.formats.tensors import RawTensor, release_pages


class HFSource:
    """A HuggingFace Llama directory as an export source."""

    def __init__(self, d: str, tokenizer_path: str = None):
        self.dir = d
        self.config, cfg = read_config(d)
        kind, files = weight_files(d)
        self.tensors: Dict[str, RawTensor] = {}
        for f in files:
            if kind == "safetensors":
                self.tensors.update(read_safetensors(f))
            else:
                from pecca.formats.pth import read_pth

                self.tensors.update(read_pth(f))
        self.tied = bool(cfg.get("tie_word_embeddings", False)) or "lm_head.weight" not in self.tensors
        self.name = os.path.basename(os.path.normpath(d))
        self.read_vocab(tokenizer_path)

    def read_vocab(self, tokenizer_path: str = None) -> None:
        """self.vocab from the tokenizer given, or the directory's."""
        from export.vocab import vocab_from_sentencepiece, vocab_from_tokenizer_json
        from pecca.chat_template import template_beside

        tok = tokenizer_path or self.tokenizer_file(self.dir)
        if tok.endswith(".json"):
            self.vocab = vocab_from_tokenizer_json(tok, self.config.vocab_size)
        else:
            self.vocab = vocab_from_sentencepiece(tok)
        found = template_beside(tok)
        self.vocab.chat_template = found[0] if found else None

    @staticmethod
    def tokenizer_file(d: str) -> str:
        """A sentencepiece tokenizer.model when there is one, else tokenizer.json (Llama 3's
        directories may hold a tiktoken-format tokenizer.model beside it, which is skipped)."""
        spm, js = os.path.join(d, "tokenizer.model"), os.path.join(d, "tokenizer.json")
        if os.path.isfile(spm):
            with open(spm, "rb") as f:
                if f.read(1) == b"\x0a" or not os.path.isfile(js):  # a sentencepiece ModelProto
                    return spm
        if os.path.isfile(js):
            return js
        raise ModelFormatError(f"{d}: no tokenizer.model or tokenizer.json; pass the tokenizer with "
                               "--tokenizer")

    def hf(self, name: str) -> RawTensor:
        return need_tensor(self.tensors, name, self.dir)

    def tensor(self, name: str) -> RawTensor:
        c = self.config
        if name == "token_embd.weight":
            return self.hf("model.embed_tokens.weight")
        if name == "output_norm.weight":
            return self.hf("model.norm.weight")
        if name == "output.weight":
            return self.hf("lm_head.weight")
        if name == "rope_freqs.weight":
            return RawTensor(np.asarray(c.rope_freq_factors, np.float32), "f32")
        _, i, what, _ = name.split(".")
        t = self.hf(f"model.layers.{i}.{HF_NAMES[what]}.weight")
        if what in ("attn_q", "attn_k"):
            heads = c.n_heads if what == "attn_q" else c.n_kv_heads
            expect = (c.dim if what == "attn_q" else c.kv_dim, c.dim)
            if tuple(t.shape) != expect:
                raise ModelFormatError(f"{self.dir}: tensor model.layers.{i}.{HF_NAMES[what]}.weight has "
                                       f"shape {list(t.shape)}, expected {list(expect)} from the config")
            out = RawTensor(unpermute(t.data, heads), t.dtype)
            release_pages(t.data)  # the copy is made: the source pages can leave the RSS
            return out
        return t
