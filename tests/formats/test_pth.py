"""The .pth reader against torch.save itself: every dtype read back bit-exactly as memmap
views; hostile pickles refused without running them; every kind of broken file a clear error."""
import builtins
import collections
import io
import mmap
import os
import pickle
import struct
import subprocess
import zipfile

import numpy as np
import pytest

from pecca.errors import ModelFormatError, UnsupportedModelError
from pecca.formats.pth import read_pth


@pytest.fixture
def torch():
    """torch.save is the reference writer; the tests of hand-made files run without it."""
    return pytest.importorskip("torch")


def bits(t) -> bytes:
    """A torch tensor's exact bytes (numpy has no bfloat16: read those as int16)."""
    import torch
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.contiguous().numpy().tobytes()


def is_memmap_view(a: np.ndarray) -> bool:
    base = a
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, mmap.mmap)


def state_dict(torch):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 72, generator=g)
    return {
        "a": a,
        "a_row": a[1],  # a view: shares a's storage, at offset 72
        "one": torch.randn(1, generator=g),
        "half": torch.randn(5, 7, generator=g).half(),
        "bf": torch.randn(3, 72, generator=g).bfloat16(),
        "bf_odd": torch.randn(1, 1, 9, generator=g).bfloat16(),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "specials": torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 1e-45]),
    }


def test_round_trip_every_dtype(tmp_path, torch):
    sd = state_dict(torch)
    p = tmp_path / "m.pth"
    torch.save(sd, p)
    got = read_pth(str(p))
    assert list(got) == list(sd)
    want_dtype = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
    for name, t in sd.items():
        assert got[name].dtype == want_dtype[t.dtype], name
        assert got[name].shape == tuple(t.shape), name
        assert got[name].data.tobytes() == bits(t), name
    np.testing.assert_array_equal(got["bf"].to_f32(), sd["bf"].float().numpy())


def test_tensors_are_read_only_memmap_views(tmp_path, torch):
    p = tmp_path / "m.pth"
    torch.save(state_dict(torch), p)
    got = read_pth(str(p))
    for name, t in got.items():
        if t.data.size:
            assert is_memmap_view(t.data), name
            assert not t.data.flags.writeable, name
    # a view of another tensor shares its memory, as in the file
    assert np.shares_memory(got["a"].data, got["a_row"].data)
    # torch.save aligns storages to 64 bytes: the views are aligned
    assert got["a"].data.ctypes.data % 64 == 0


def test_module_state_dict_and_parameters(tmp_path, torch):
    """An nn.Module's state_dict (an OrderedDict carrying _metadata) and bare Parameters."""
    lin = torch.nn.Linear(3, 2)
    torch.save(lin.state_dict(), tmp_path / "lin.pth")
    got = read_pth(str(tmp_path / "lin.pth"))
    assert list(got) == ["weight", "bias"]
    np.testing.assert_array_equal(got["weight"].data, lin.weight.detach().numpy())
    torch.save({"p": torch.nn.Parameter(torch.arange(4.0))}, tmp_path / "par.pth")
    np.testing.assert_array_equal(read_pth(str(tmp_path / "par.pth"))["p"].data, np.arange(4.0, dtype=np.float32))


def test_unaligned_members_still_read(tmp_path, torch):
    """Repacked by Python's zipfile (no 64-byte padding): the offsets come from each local
    header, not from an assumption."""
    p = tmp_path / "m.pth"
    sd = state_dict(torch)
    torch.save(sd, p)
    q = repack(p, tmp_path / "repacked.pth")
    got = read_pth(str(q))
    assert any(t.data.ctypes.data % 4 for t in got.values() if t.data.size)  # really unaligned
    for name, t in sd.items():
        assert got[name].data.tobytes() == bits(t), name


def test_non_contiguous_tensor_is_refused(tmp_path, torch):
    p = tmp_path / "t.pth"
    torch.save({"t": torch.randn(4, 6).t()}, p)
    with pytest.raises(UnsupportedModelError, match=r"non-contiguous stride \(1, 6\)"):
        read_pth(str(p))


def test_other_dtypes_are_refused(tmp_path, torch):
    p = tmp_path / "i.pth"
    torch.save({"i": torch.arange(3)}, p)
    with pytest.raises(UnsupportedModelError, match="int64"):
        read_pth(str(p))


def test_legacy_format_is_refused(tmp_path, torch):
    p = tmp_path / "old.pth"
    torch.save({"a": torch.ones(2)}, p, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsupportedModelError, match="legacy"):
        read_pth(str(p))


# --- hostile pickles -----------------------------------------------------------------------

class Evil:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def hostile_cases(marker):
    return [
        (os.system, (f"touch {marker}",)),
        (builtins.eval, (f"open({str(marker)!r}, 'w').close()",)),
        (subprocess.Popen, (["touch", str(marker)],)),
    ]


@pytest.mark.parametrize("case", [0, 1, 2])
@pytest.mark.parametrize("beside_a_tensor", [False, True])
def test_hostile_pickle_is_refused_and_never_run(tmp_path, case, beside_a_tensor):
    marker = tmp_path / "pwned"
    fn, args = hostile_cases(marker)[case]
    obj = {"w": Evil(fn, args)}
    members = {}
    if beside_a_tensor:  # a valid tensor first: the refusal comes mid-pickle
        obj = {"ok": FakeTensor(FakeStorage("FloatStorage", "0", 2), 0, (2,), (1,)), **obj}
        members["0"] = np.ones(2, np.float32).tobytes()
    p = write_fake_pth(tmp_path / "evil.pth", obj, members)
    with pytest.raises(ModelFormatError, match=f"{fn.__module__}.{fn.__name__}") as e:
        read_pth(str(p))
    assert "evil.pth" in str(e.value)
    assert not marker.exists()


def test_hand_written_global_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    pkl = (b"\x80\x02}X\x01\x00\x00\x00wcos\nsystem\nX" + struct.pack("<I", len(f"touch {marker}"))
           + f"touch {marker}".encode() + b"\x85R" + b"s.")
    p = tmp_path / "evil.pth"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("evil/data.pkl", pkl)
    with pytest.raises(ModelFormatError, match=r"os\.system"):
        read_pth(str(p))
    assert not marker.exists()


def hand_pickles(marker):
    """Hand-written pickles that would touch `marker`, each reaching a callable another way:
    name -> (pickle bytes, the global pecca must name when refusing it)."""
    cmd = f"touch {marker}".encode()
    arg = b"X" + struct.pack("<I", len(cmd)) + cmd
    code = f"open({str(marker)!r}, 'w').close()".encode()
    src = b"X" + struct.pack("<I", len(code)) + code
    rebuild = b"ctorch._utils\n_rebuild_tensor_v2\n"
    return {
        # GLOBAL posix.system (os.system's real home), called by REDUCE
        "posix.system": (b"\x80\x02}X\x01\x00\x00\x00wcposix\nsystem\n" + arg + b"\x85Rs.", "posix.system"),
        # GLOBAL builtins.eval of a Python expression
        "builtins.eval": (b"\x80\x02}X\x01\x00\x00\x00wcbuiltins\neval\n" + src + b"\x85Rs.", "builtins.eval"),
        # a nested reduce: the hostile call sits inside the arguments of an allowed one
        "nested": (b"\x80\x02}X\x01\x00\x00\x00w" + rebuild + b"(cos\nsystem\n" + arg
                   + b"\x85RK\x00K\x01\x85K\x01\x85\x89tRs.", "os.system"),
        # protocol 0's INST opcode: the class named and called in one step
        "INST": (b"(dp0\nVw\n(" + b"V" + cmd + b"\nios\nsystem\ns.", "os.system"),
        # protocol 4's STACK_GLOBAL: the names come from the stack
        "STACK_GLOBAL": (b"\x80\x04}\x8c\x01w\x8c\x08builtins\x8c\x04exec\x93" + src + b"\x85Rs.",
                         "builtins.exec"),
        # getattr reached through an allowed class would be a way out: builtins.getattr is refused
        "getattr": (b"\x80\x02}X\x01\x00\x00\x00wcbuiltins\ngetattr\nccollections\nOrderedDict\n"
                    b"X\x07\x00\x00\x00__new__\x86Rs.", "builtins.getattr"),
    }


@pytest.mark.parametrize("name", ["posix.system", "builtins.eval", "nested", "INST", "STACK_GLOBAL", "getattr"])
def test_hand_written_hostile_pickles_are_refused(tmp_path, name):
    marker = tmp_path / "pwned"
    pkl, refused = hand_pickles(marker)[name]
    p = tmp_path / "evil.pth"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("evil/data.pkl", pkl)
    with pytest.raises(ModelFormatError, match=f"{refused}.*nothing was run"):
        read_pth(str(p))
    assert not marker.exists()


@pytest.mark.parametrize("name", ["posix.system", "builtins.eval", "nested", "INST", "STACK_GLOBAL"])
def test_hand_written_pickles_are_live(tmp_path, name):
    """The pickles above do run their command under a plain unpickler (only the tensor
    rebuild stubbed out), so their refusal above means something."""
    class Plain(pickle.Unpickler):
        def find_class(self, module, cls):
            return (lambda *a: a) if module == "torch._utils" else super().find_class(module, cls)

    marker = tmp_path / "pwned"
    Plain(io.BytesIO(hand_pickles(marker)[name][0])).load()
    assert marker.exists()


@pytest.mark.parametrize("name", ["posix.system", "nested", "STACK_GLOBAL"])
def test_export_of_a_hostile_meta_checkpoint_runs_nothing(tmp_path, name, capsys):
    """The whole path a user takes: `pecca export` on a Meta directory whose shard is hostile
    exits 1 with one line naming the file and the refused global; nothing ran."""
    from pecca.cli import main

    marker = tmp_path / "pwned"
    d = tmp_path / "meta"
    d.mkdir()
    (d / "params.json").write_text('{"dim": 64, "n_layers": 1, "n_heads": 8, "norm_eps": 1e-5, "vocab_size": 512}')
    with zipfile.ZipFile(d / "consolidated.00.pth", "w") as z:
        z.writestr("consolidated/data.pkl", hand_pickles(marker)[name][0])
    code = main(["export", str(d), str(tmp_path / "out.gguf")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "consolidated.00.pth" in err and "refused (nothing was run)" in err
    assert len(err.splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "out.gguf").exists()


def test_compressed_pickle_bomb_is_refused_before_inflating(tmp_path):
    """A data.pkl that inflates from ~100 kB to 100 MB: refused from its declared size,
    without the 100 MB ever being allocated."""
    import tracemalloc

    p = tmp_path / "bomb.pth"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("bomb/data.pkl", b"\x80\x02N" + b"\x00" * (100 << 20))
    assert p.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(ModelFormatError, match="data.pkl claims 104857603 bytes, more than the whole file"):
            read_pth(str(p))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5 << 20


# --- broken files --------------------------------------------------------------------------

def one_tensor_file(path, prefix="m"):
    st = FakeStorage("FloatStorage", "0", 216)
    return write_fake_pth(path, {"a": FakeTensor(st, 0, (3, 72), (72, 1))},
                          {"0": np.ones(216, np.float32).tobytes()}, prefix=prefix)


def test_hand_made_file_reads(tmp_path):
    """The helpers below write what read_pth reads (so the tests of broken files start right)."""
    got = read_pth(str(one_tensor_file(tmp_path / "m.pth")))
    np.testing.assert_array_equal(got["a"].data, np.ones((3, 72), np.float32))


def test_truncated_file(tmp_path):
    p = one_tensor_file(tmp_path / "m.pth")
    data = p.read_bytes()
    for cut in (len(data) // 2, len(data) - 10):
        p.write_bytes(data[:cut])
        with pytest.raises(ModelFormatError, match="m.pth"):
            read_pth(str(p))


def test_member_data_past_end_of_file(tmp_path):
    """The central directory claims more bytes than the file has."""
    p = one_tensor_file(tmp_path / "m.pth")
    patch_central_sizes(p, "m/data/0", 10**6)
    with pytest.raises(ModelFormatError, match=r"m.pth: truncated: m/data/0 needs bytes"):
        read_pth(str(p))


def test_missing_data_member(tmp_path):
    p = one_tensor_file(tmp_path / "m.pth")
    q = repack(p, tmp_path / "gone.pth", drop="m/data/0")
    with pytest.raises(ModelFormatError, match=r"gone.pth: storage member m/data/0 is missing"):
        read_pth(str(q))


def test_compressed_member(tmp_path):
    p = one_tensor_file(tmp_path / "m.pth")
    q = repack(p, tmp_path / "zipped.pth", compress="m/data/0")
    with pytest.raises(UnsupportedModelError, match=r"zipped.pth: member m/data/0 is compressed"):
        read_pth(str(q))


def test_torch_save_file_truncated(tmp_path, torch):
    p = tmp_path / "m.pth"
    torch.save(state_dict(torch), p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match="m.pth"):
        read_pth(str(p))


def test_storage_too_small(tmp_path):
    st = FakeStorage("FloatStorage", "0", 6)
    p = write_fake_pth(tmp_path / "small.pth", {"w": FakeTensor(st, 2, (2, 3), (3, 1))},
                       {"0": np.zeros(6, np.float32).tobytes()})
    with pytest.raises(ModelFormatError, match="needs 8 elements; storage 0 holds 6"):
        read_pth(str(p))


def test_member_size_disagrees_with_record(tmp_path):
    st = FakeStorage("HalfStorage", "0", 6)
    p = write_fake_pth(tmp_path / "odd.pth", {"w": FakeTensor(st, 0, (6,), (1,))},
                       {"0": np.zeros(5, np.float16).tobytes()})
    with pytest.raises(ModelFormatError, match=r"odd.pth: m/data/0 is 10 bytes, but its record says 6 f16"):
        read_pth(str(p))


def test_malformed_pickles(tmp_path):
    st = FakeStorage("FloatStorage", "0", 4)
    members = {"0": np.zeros(4, np.float32).tobytes()}
    for name, obj, msg in [
        ("neg", {"w": FakeTensor(st, 0, (-1, 4), (4, 1))}, "malformed offset/size/stride"),
        ("rank", {"w": FakeTensor(st, 0, (2, 2), (2,))}, "malformed offset/size/stride"),
        ("notdict", [FakeTensor(st, 0, (4,), (1,))], "holds a list, not a state dict"),
        ("nottensor", {"w": FakeTensor(st, 0, (4,), (1,)), "step": 3}, "entry 'step' is not a tensor"),
    ]:
        p = write_fake_pth(tmp_path / f"{name}.pth", obj, members)
        with pytest.raises(ModelFormatError, match=msg):
            read_pth(str(p))
    p = tmp_path / "cut.pth"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("cut/data.pkl", pickle.dumps({"a": 1}, protocol=2)[:-3])
    with pytest.raises(ModelFormatError, match="data.pkl is malformed"):
        read_pth(str(p))


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "junk.pth"
    p.write_bytes(b"hello, not a zip at all" * 10)
    with pytest.raises(ModelFormatError, match="not a torch.save zip"):
        read_pth(str(p))
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(ModelFormatError, match="without <name>/data.pkl"):
        read_pth(str(tmp_path / "other.zip"))
    with pytest.raises(ModelFormatError, match="no such file"):
        read_pth(str(tmp_path / "absent.pth"))


# --- helpers: hand-made checkpoints --------------------------------------------------------

class Global:
    """A reference to module.name, written into a pickle as a GLOBAL opcode without importing
    it (so these files can name torch without torch installed)."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self):  # pickle insists that a reduce function be callable
        raise AssertionError("never called")


class FakeStorage:
    def __init__(self, torch_name, key, numel):
        self.torch_name, self.key, self.numel = torch_name, key, numel


class FakeTensor:
    """Pickles exactly as torch.save pickles a tensor, with whatever fields the test wants."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce__(self):
        return (Global("torch._utils", "_rebuild_tensor_v2"),
                (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict()))


class _Pickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table can be extended
    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[Global] = lambda self, g: self.write(pickle.GLOBAL + f"{g.module}\n{g.name}\n".encode())

    def persistent_id(self, obj):
        if isinstance(obj, FakeStorage):
            return ("storage", Global("torch", obj.torch_name), obj.key, "cpu", obj.numel)
        return None


def write_fake_pth(path, obj, members, prefix="m"):
    """A torch.save-like zip (not 64-byte aligned: Python's zipfile does not pad)."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=2, fix_imports=False).dump(obj)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{prefix}/data.pkl", buf.getvalue())
        z.writestr(f"{prefix}/byteorder", "little")
        for key, data in members.items():
            z.writestr(f"{prefix}/data/{key}", data)
    return path


def repack(src, dst, drop=None, compress=None):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename == drop:
                continue
            method = zipfile.ZIP_DEFLATED if info.filename == compress else zipfile.ZIP_STORED
            zout.writestr(info.filename, zin.read(info.filename), compress_type=method)
    return dst


def patch_central_sizes(path, member, size):
    """Overwrite a member's compressed and uncompressed sizes in the central directory."""
    data = bytearray(path.read_bytes())
    pos = 0
    while True:
        pos = data.find(b"PK\x01\x02", pos)
        assert pos >= 0, member
        name_len = struct.unpack_from("<H", data, pos + 28)[0]
        if data[pos + 46: pos + 46 + name_len] == member.encode():
            struct.pack_into("<II", data, pos + 20, size, size)
            break
        pos += 4
    path.write_bytes(bytes(data))
