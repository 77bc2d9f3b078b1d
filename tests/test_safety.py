"""Safety beyond the readers' format checks: bounded memory (a huge context refused with the
size it needs, or clamped with ctx; a file's header claims never allocated), one generation
at a time from several threads, Ctrl-C leaves the model usable, NaN weights stop generation
with a clear error."""
import os
import shutil
import struct
import threading
import time
import tracemalloc

import numpy as np
import pytest

import pecca
import pecca.model
from pecca.errors import InsufficientMemoryError, ModelFormatError, NonFiniteLogitsError, PeccaError
from pecca.sampling import Sampler
from shared_data import llama2c_model, shared_file

SEQ_LEN_AT = 8 + 4 * 6  # version 1 header: magic, version, then dim ... vocab_size, seq_len


@pytest.fixture(scope="module")
def long_context(tmp_path_factory):
    """stories260K (version 1, whose size does not depend on seq_len) claiming 2^20 positions,
    with its tokenizer beside it."""
    d = tmp_path_factory.mktemp("long")
    data = bytearray(llama2c_model("stories260K_v1.bin").read_bytes())
    struct.pack_into("<i", data, SEQ_LEN_AT, 1 << 20)
    (d / "model.bin").write_bytes(bytes(data))
    shutil.copyfile(llama2c_model("tok512.bin"), d / "tok512.bin")
    return d / "model.bin"


# --- bounded memory ---------------------------------------------------------------------------

def test_huge_context_is_refused_with_the_memory_it_needs(long_context, monkeypatch):
    monkeypatch.setattr(pecca.model, "_total_memory", lambda: 1 << 30)
    with pytest.raises(InsufficientMemoryError) as e:
        pecca.load(str(long_context), threads=1)
    msg = str(e.value)
    # 5 layers x 2^20 positions x 32 (kv_dim) x 2 (keys, values) x 4 bytes = 1.25 GiB
    assert "a context of 1048576 positions" in msg and "= 1.2 GiB" in msg and "1.0 GiB" in msg
    assert "ctx=" in msg and "--ctx" in msg


def test_huge_context_clamped_with_ctx(long_context, monkeypatch):
    monkeypatch.setattr(pecca.model, "_total_memory", lambda: 1 << 30)
    m = pecca.load(str(long_context), threads=1, ctx=256)
    assert m.model.state.key_cache.shape == (5, 256, 32) and m.info()["context"] == 256
    assert m.generate("Once upon a time", max_tokens=8, temperature=0)


def test_cli_refuses_a_huge_context_in_one_line(long_context, monkeypatch, capsys):
    from pecca.cli import main

    monkeypatch.setattr(pecca.model, "_total_memory", lambda: 1 << 30)
    assert main(["generate", str(long_context), "Lily", "-n", "4"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs 1.3 GiB" in err and "--ctx" in err
    assert main(["generate", str(long_context), "Lily", "-n", "4", "--ctx", "64"]) == 0


def test_kv_cache_is_sized_from_the_requested_context():
    full = pecca.load(str(llama2c_model()), threads=1)
    small = pecca.load(str(llama2c_model()), threads=1, ctx=16)
    assert full.model.state.key_cache.shape == (5, 512, 32)
    assert small.model.state.key_cache.shape == small.model.state.value_cache.shape == (5, 16, 32)
    assert small.model.state.att.shape == (8, 16)


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 16, 33)])
def test_aligned_zeros_are_zeros_on_cache_lines(shape):
    a = pecca.model.aligned_zeros(shape)
    assert a.shape == shape and a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable
    assert a.ctypes.data % 64 == 0 and not a.any()


def test_model_buffers_start_on_cache_lines():
    """The kernels' 64-byte loads of the KV cache rows and the matvec inputs stay within one
    line each (numpy's own arrays are 16-byte aligned)."""
    m = pecca.load(str(llama2c_model()), threads=2)
    m.model.prefill([1, 2, 3], 0)
    for state in (m.model.state, m.model.batch_state):
        arrays = {k: v for k, v in vars(state).items() if isinstance(v, np.ndarray) and v.size}
        assert {"x", "xb", "q", "att"} <= arrays.keys()
        assert not [k for k, v in arrays.items() if v.ctypes.data % 64], arrays.keys()


def mapping_flags(path) -> list:
    """VmFlags of this process's mappings of `path` (Linux's /proc/self/smaps)."""
    flags, cur = [], False
    with open("/proc/self/smaps") as f:
        for line in f:
            if line[:1] in "0123456789abcdef" and "-" in line.split()[0]:
                cur = line.rstrip().endswith(str(path))
            elif cur and line.startswith("VmFlags:"):
                flags.append(line.split()[1:])
    return flags


@pytest.mark.parametrize("fmt", ["llama2c", "gguf", "safetensors"])  # safetensors: a GPTQ directory
def test_weights_are_mapped_with_huge_page_advice(fmt, tmp_path):
    """Every reader maps its file through map_readonly: read-only, advised for huge pages (the
    pages that come in at the first token come as 2 MiB folios; see pecca.formats.tensors)."""
    import mmap

    if not os.path.exists("/proc/self/smaps") or not hasattr(mmap, "MADV_HUGEPAGE"):
        pytest.skip("no /proc/self/smaps or MADV_HUGEPAGE on this system")
    path = {"llama2c": llama2c_model(), "safetensors": shared_file("models", "gptq", "stories260K-gptq-4bit-g32",
                                                                  "model.safetensors")}.get(fmt)
    if fmt == "gguf":
        from export import export

        path = tmp_path / "m.gguf"
        export(str(llama2c_model()), str(path), "f32", str(llama2c_model("tok512.bin")))
    m = pecca.load(str(path if fmt != "safetensors" else path.parent))
    flags = mapping_flags(os.path.realpath(path))
    assert flags and all("rd" in f and "wr" not in f and "hg" in f for f in flags), flags
    assert m.model.forward(1, 0).shape == (m.config.vocab_size,)


def test_allocation_failure_becomes_a_pecca_error(monkeypatch):
    """Past the estimate, an allocation the process is refused (a ulimit) is the same error."""
    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(pecca.model, "RunState", no_memory)
    with pytest.raises(InsufficientMemoryError, match="could not be allocated"):
        pecca.load(str(llama2c_model()), threads=1)


def small_and_quick(read, path):
    """Run `read(path)`, which must raise a pecca error, within 1 s and 4 MB of Python/numpy
    allocations: a header's claims are checked against the file before anything is allocated."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(PeccaError) as e:
            read(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 1.0 and peak < 4 << 20, (peak, e.value)
    return str(e.value)


def test_llama2c_header_claiming_huge_dims_on_a_tiny_file(tmp_path):
    from pecca.formats import llama2c

    p = tmp_path / "huge.bin"
    # dim 65536, hidden 262144, 1024 layers, 1024 heads, vocab 4M: petabytes of weights claimed
    p.write_bytes(struct.pack("<7i", 1 << 16, 1 << 18, 1 << 10, 1 << 10, 1 << 10, 1 << 22, 1 << 20) + b"\0" * 100)
    assert "truncated" in small_and_quick(llama2c.read, p)
    head = struct.pack("<Ii7iB", llama2c.MAGIC, 2, 1 << 16, 1 << 18, 1 << 10, 1 << 10, 1 << 10, 1 << 22, 1 << 20, 1)
    p.write_bytes(head + struct.pack("<i", 64) + b"\0" * (256 - len(head) - 4))
    assert "truncated" in small_and_quick(llama2c.read, p)


def gguf_header(n_tensors, n_kv, body=b""):
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + body


def test_gguf_claiming_huge_counts_and_sizes_on_a_tiny_file(tmp_path):
    from pecca.formats.gguf_file import open_gguf

    p = tmp_path / "huge.gguf"
    key = struct.pack("<Q", 5) + b"a.key"
    cases = {
        "tensor infos cannot fit": gguf_header(1 << 63, 0, b"\0" * 64),
        "metadata pairs cannot fit": gguf_header(0, 1 << 62, b"\0" * 64),
        "needs 18446744073709551615 bytes": gguf_header(0, 1, struct.pack("<Q", (1 << 64) - 1) + b"\0" * 64),
        "strings of a.key cannot fit": gguf_header(0, 1, key + struct.pack("<IIQ", 9, 8, 1 << 62) + b"\0" * 64),
        "values of a.key cannot fit": gguf_header(0, 1, key + struct.pack("<IIQ", 9, 4, 1 << 61) + b"\0" * 64),
        "past the end of the file": gguf_header(1, 0, struct.pack("<Q", 1) + b"t" + struct.pack("<I", 2)
                                                + struct.pack("<QQ", 1 << 31, 1 << 31) + struct.pack("<IQ", 0, 0)
                                                + b"\0" * 64),
    }
    for what, data in cases.items():
        p.write_bytes(data)
        assert what in small_and_quick(open_gguf, p)


def test_safetensors_claiming_huge_sizes_on_a_tiny_file(tmp_path):
    import json

    from pecca.formats.safetensors import read_safetensors

    p = tmp_path / "huge.safetensors"
    p.write_bytes(struct.pack("<Q", 1 << 62) + b"{}")
    assert "header length" in small_and_quick(read_safetensors, p)
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 1 << 82]}}).encode()
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    assert "past the end of the file" in small_and_quick(read_safetensors, p)


def test_tokenizer_bin_claiming_a_huge_piece(tmp_path):
    from pecca.tokenizers import load_tokenizer

    p = tmp_path / "tokenizer.bin"
    p.write_bytes(struct.pack("<Ifi", 10, 0.0, (1 << 31) - 1) + b"abc")
    assert "beyond the end of the file" in small_and_quick(load_tokenizer, p)


# --- threads and interrupts ----------------------------------------------------------------------

PROMPTS = ["Once upon a time", "Lily went to the park", "The cat", "Tom had a big red ball"]


@pytest.fixture(scope="module")
def shared_llm():
    return pecca.load(str(llama2c_model()), threads=1)


def test_threads_sharing_a_model_get_what_they_would_alone(shared_llm):
    """Four threads generate on one model at once (text and streams, the forward API too):
    each result equals the sequential one. Without the lock they share one KV cache."""
    m = shared_llm
    jobs = [(p, seed) for seed in range(3) for p in PROMPTS]
    expected = {job: m.generate(job[0], max_tokens=48, temperature=0.8, seed=job[1]) for job in jobs}
    logits = m.forward(1, 0)
    got, errors = {}, []

    def work(k):
        try:
            for i, job in enumerate(jobs[k::4]):
                stream = i % 2 == 1
                out = m.generate(job[0], max_tokens=48, temperature=0.8, seed=job[1], stream=stream)
                got[job] = "".join(out) if stream else out
                np.testing.assert_array_equal(m.forward(1, 0), logits)
        except BaseException as e:  # reported below, in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and got == expected


def test_a_stream_holds_the_model_until_it_is_closed(shared_llm):
    m = shared_llm
    stream = m.generate("Lily", max_tokens=20, temperature=0, stream=True)
    next(stream)
    done = threading.Event()
    t = threading.Thread(target=lambda: (m.generate("Tom", max_tokens=4, temperature=0), done.set()))
    t.start()
    assert not done.wait(0.3)  # the other thread waits its turn
    stream.close()
    assert done.wait(30)
    t.join()


def test_a_new_call_in_the_same_thread_takes_over_an_open_stream(shared_llm):
    m = shared_llm
    alone = m.generate("Lily", max_tokens=20, temperature=0)
    stream = m.generate("Tom", max_tokens=20, temperature=0, stream=True)
    next(stream)
    assert m.generate("Lily", max_tokens=20, temperature=0) == alone  # no deadlock
    with pytest.raises(PeccaError, match="this stream was interrupted"):
        list(stream)


def test_ctrl_c_in_the_sampler_leaves_the_model_usable(monkeypatch):
    fresh = pecca.load(str(llama2c_model()), threads=1)
    expected = fresh.generate("Once upon a time", max_tokens=40, temperature=0.8, seed=7)
    m = pecca.load(str(llama2c_model()), threads=1)
    sample, calls = Sampler.sample, [0]

    def interrupted(self, logits, previous=()):
        calls[0] += 1
        if calls[0] == 6:
            raise KeyboardInterrupt
        return sample(self, logits, previous)

    monkeypatch.setattr(Sampler, "sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        m.generate("Lily went", max_tokens=40, temperature=0.8, seed=3)
    monkeypatch.setattr(Sampler, "sample", sample)
    assert m.generate("Once upon a time", max_tokens=40, temperature=0.8, seed=7) == expected
    # and from another thread: the lock was released, not left to the traceback
    out = []
    t = threading.Thread(target=lambda: out.append(m.generate("Once upon a time", max_tokens=40,
                                                              temperature=0.8, seed=7)))
    t.start()
    t.join(30)
    assert out == [expected]


def test_ctrl_c_inside_a_forward_pass_leaves_the_model_usable():
    """Interrupted between two layers of a prefill: the KV cache is half written; the next
    generation (and a chat reusing the cache) is still exactly a fresh model's."""
    fresh = pecca.load(str(llama2c_model()), threads=1)
    expected = fresh.generate("Once upon a time", max_tokens=30, temperature=0)
    m = pecca.load(str(llama2c_model()), threads=1)
    layer = m.model.weights.layers[3]
    wq = layer.wq

    class Interrupt:
        def __call__(self, *a):
            raise KeyboardInterrupt

        batch = __call__

    layer.wq = Interrupt()
    with pytest.raises(KeyboardInterrupt):
        m.generate("Once upon a time there was", max_tokens=30, temperature=0)
    with pytest.raises(KeyboardInterrupt):  # this time in a single-token step, in a stream
        stream = m.generate("Once", max_tokens=30, temperature=0, stream=True)
        for _ in stream:
            pass
    layer.wq = wq
    assert m.generate("Once upon a time", max_tokens=30, temperature=0) == expected
    assert m.model.cache_tokens[:1] == [1]


# --- numerical faults ----------------------------------------------------------------------------------

def test_nan_weight_stops_generation_with_a_clear_error(tmp_path):
    """A corrupted weight (one NaN in a layer) makes NaN logits: generation stops at once with
    NonFiniteLogitsError instead of sampling garbage; the CLI says so in one line."""
    from pecca.cli import main

    data = bytearray(llama2c_model().read_bytes())
    struct.pack_into("<f", data, 28 + 4 * (512 * 64 + 5 * 64) + 4 * 100, float("nan"))  # layer 0's wq
    p = tmp_path / "model.bin"
    p.write_bytes(bytes(data))
    shutil.copyfile(llama2c_model("tok512.bin"), tmp_path / "tok512.bin")
    m = pecca.load(str(p), threads=1)
    assert not np.isfinite(m.forward(1, 0)).all()
    for temperature in (0, 0.8):
        with pytest.raises(NonFiniteLogitsError, match="non-finite logits"):
            m.generate("Lily", max_tokens=10, temperature=temperature)
    assert main(["generate", str(p), "Lily", "-n", "10"]) == 1


def test_nan_in_a_gguf_export_is_refused(tmp_path):
    """export refuses to write NaN weights (the loader then never sees them from pecca)."""
    from export import export

    data = bytearray(llama2c_model().read_bytes())
    struct.pack_into("<f", data, 28 + 4 * 10, float("nan"))
    p = tmp_path / "model.bin"
    p.write_bytes(bytes(data))
    shutil.copyfile(llama2c_model("tok512.bin"), tmp_path / "tok512.bin")
    with pytest.raises(ModelFormatError, match="NaN or infinite"):
        export(str(p), str(tmp_path / "out.gguf"))


def test_shared_data_present():
    shared_file("models", "llama2c", "stories260K.bin")


# --- chat templates (a model file's Jinja code) -----------------------------------------------------------

@pytest.mark.parametrize("source, what", [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),  # the classic sandbox escape
    ("{{ cycler.__init__.__globals__.os.system('touch MARKER') }}", "unsafe"),
    ("{{ 9 ** 999999999 }}", "too large"),  # a number of gigabytes
    ("{{ 2 ** 64 ** 64 ** 64 ** 64 }}", "too large"),  # the same, in steps
    ("{{ 'x' * 4000000000 }}", "too large"),  # a string of 4 GB
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
])
def test_hostile_chat_templates_are_refused(source, what, tmp_path, monkeypatch):
    from pecca.chat_template import ChatTemplate, ChatTemplateError

    monkeypatch.chdir(tmp_path)
    t = ChatTemplate(source.replace("MARKER", str(tmp_path / "pwned")), origin="model.gguf")
    t0 = time.perf_counter()
    with pytest.raises(ChatTemplateError, match=what):
        t.render([{"role": "user", "content": "hi"}])
    assert time.perf_counter() - t0 < 5 and not (tmp_path / "pwned").exists()


# --- JSON files beside the weights ---------------------------------------------------------------------

def test_deeply_nested_json_is_a_format_error(tmp_path):
    """A 100,000-deep JSON array (Python's parser raises RecursionError) in each JSON a model
    directory holds: a pecca error naming the file, never a RecursionError."""
    from pecca.tokenizers import load_tokenizer

    deep = "[" * 100000
    hf = shared_file("models", "hf", "stories260K-f32")
    for name in ("config.json", "tokenizer.json", "model.safetensors.index.json"):
        d = tmp_path / name
        shutil.copytree(hf, d)
        (d / name).write_text(deep)
        with pytest.raises(PeccaError, match=name):
            if name == "tokenizer.json":
                load_tokenizer(str(d / name))
            else:
                from export import export
                export(str(d), str(tmp_path / "out.gguf"))
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text(deep)
    from export import export
    with pytest.raises(ModelFormatError, match="params.json: not valid JSON"):
        export(str(meta), str(tmp_path / "out.gguf"))


def test_weight_index_cannot_name_files_outside_the_folder(tmp_path):
    import json

    from export import export

    d = tmp_path / "hf"
    shutil.copytree(shared_file("models", "hf", "stories260K-sharded"), d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    for bad in ("../../etc/passwd", "/etc/passwd", "..", 7):
        index["weight_map"][first] = bad
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(ModelFormatError, match="not a file name in the folder|not a weight index"):
            export(str(d), str(tmp_path / "out.gguf"))


def test_a_small_vocabulary_never_encodes_ids_past_its_end():
    """run.c's byte fallback (byte b is token b + 3) would index past a vocabulary of fewer
    than 259 tokens; pecca's gives <unk> there."""
    from pecca.tokenizers import Llama2cTokenizer

    tok = Llama2cTokenizer([b"<unk>", b"\n<s>\n", b"\n</s>\n", b" ", b"a"], [0.0] * 5)
    ids = tok.encode("a\u00e9\U0001F600 z", add_bos=True)
    assert all(0 <= i < 5 for i in ids) and 0 in ids
