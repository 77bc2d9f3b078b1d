"""pecca.quant.dequantize_rows (the embedding lookup's dequantizer) against the gguf package's."""
import numpy as np
import pytest

from pecca.quant import BlockRows, dequantize_blocks, dequantize_rows, quantize_blocks


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_dequantize_rows_equals_gguf(kind):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((7, 96)) * rng.uniform(0.01, 10, (7, 1))).astype(np.float32)
    quantized = quantize_blocks(x, kind)
    raw = rng.integers(0, 256, quantized.shape, dtype=np.uint8)  # any f16 bits: subnormal, inf, nan
    for blocks in (quantized, raw, quantized[3], quantized[[1, 1, 4]]):
        ours, ref = dequantize_rows(blocks, kind), dequantize_blocks(blocks, kind)
        assert ours.shape == ref.shape and ours.dtype == np.float32
        np.testing.assert_array_equal(ours, ref)
    assert dequantize_rows(quantized[:0], kind).shape == (0, 96)  # (gguf's raises here)


def test_block_rows_reads_rows_of_a_memmap(tmp_path):
    x = np.random.default_rng(4).standard_normal((5, 64)).astype(np.float32)
    blocks = quantize_blocks(x, "Q4_1")
    path = tmp_path / "emb.bin"
    blocks.tofile(path)
    table = BlockRows(np.memmap(path, np.uint8, "r", shape=blocks.shape), "Q4_1")
    assert table.shape == (5, 64)
    np.testing.assert_array_equal(table.rows([4, 0]), dequantize_blocks(blocks[[4, 0]], "Q4_1"))
