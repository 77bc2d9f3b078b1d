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


def test_block_rows_into_and_bad_rows():
    """rows_into (the decode step's lookup: one int token, numpy ints too, or a list of them)
    writes the rows in place; a row outside the table, a wrong output size or kind is an error,
    never a read outside the table."""
    from pecca._kernels import ops

    x = np.random.default_rng(5).standard_normal((6, 96)).astype(np.float32)
    for kind in ("Q8_0", "Q4_0", "Q4_1"):
        blocks = quantize_blocks(x, kind)
        table = BlockRows(blocks, kind)
        ref = dequantize_blocks(blocks, kind)
        one = np.full(96, np.nan, np.float32)
        for tok in (5, np.int64(5), np.int32(5)):
            table.rows_into(tok, one)
            np.testing.assert_array_equal(one, ref[5])
        many = np.full((3, 96), np.nan, np.float32)
        table.rows_into([2, 0, 2], many)
        np.testing.assert_array_equal(many, ref[[2, 0, 2]])
        for bad in (6, -1, [0, 6]):
            with pytest.raises(IndexError, match="outside the table's 6 rows"):
                table.rows_into(bad, np.empty((len(bad) if isinstance(bad, list) else 1) * 96, np.float32))
        with pytest.raises(ValueError, match="need 192 floats, out has 96"):
            ops.dequantize_rows(blocks, [0, 1], kind, np.empty(96, np.float32))
    with pytest.raises(ValueError, match="kind 'Q6_K'"):
        ops.dequantize_rows(blocks, 0, "Q6_K", np.empty(96, np.float32))
    with pytest.raises(ValueError, match="not whole Q8_0 blocks"):
        ops.dequantize_rows(np.zeros((2, 35), np.uint8), 0, "Q8_0", np.empty(32, np.float32))
