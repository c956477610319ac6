"""The restricted .pt reader: equals torch.load(weights_only=True) on torch.save files, never runs pickled code."""
from __future__ import annotations

import builtins
import collections
import os
import zipfile

import numpy as np
import pytest

from jaxdiff.convert.pt_reader import PtFormatError, UnsafePickleError, read_pt

torch = pytest.importorskip("torch")


def _payload():
    """Tensors of several dtypes, views sharing one storage (offset, transposed, strided), a Parameter, an
    nn.Module state dict (an OrderedDict with _metadata), int keys, nested containers, numbers, strings."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    lin = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.LayerNorm(4))
    return {
        "f32": base,
        "view_offset": base[2:4, 1:],  # storage offset 11, strides (5, 1)
        "view_t": base.t(),
        "view_step": base[::2, ::3],
        "f16": torch.randn(3, 2, generator=g).half(),
        "bf16": torch.randn(4, generator=g).bfloat16(),
        "f64": torch.randn(2, 2, generator=g).double(),
        "i64": torch.arange(-3, 5),
        "i32": torch.tensor([7, -8], dtype=torch.int32),
        "u8": torch.tensor([1, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(torch.randn(2, 3, generator=g)),
        "state": lin.state_dict(),
        768: [{"linear.0.weight": torch.ones(2, 2)}, {"linear.0.weight": torch.zeros(2, 2)}],
        "meta": {"name": "x", "step": 12, "lr": 1e-3, "flag": True, "none": None, "tuple": (1, "a"),
                 "size": base.shape},
    }


def _same(got, want, where="root"):
    """``got`` (read_pt) equals ``want`` (torch.load): arrays bit-exact with dtype and shape, containers alike."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, np.ndarray), where
        ref = want.detach()
        if ref.dtype == torch.bfloat16:
            assert str(got.dtype) == "bfloat16", where
            np.testing.assert_array_equal(got.view(np.uint16), ref.view(torch.int16).numpy().view(np.uint16), where)
        else:
            assert got.dtype == ref.numpy().dtype and got.shape == tuple(ref.shape), where
            np.testing.assert_array_equal(got, ref.numpy(), where)
    elif isinstance(want, dict):
        assert type(got) is dict and list(got) == list(want), where
        for k in want:
            _same(got[k], want[k], f"{where}[{k!r}]")
    elif isinstance(want, (list, tuple)):
        assert type(got) is (list if isinstance(want, list) else tuple) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            _same(a, b, f"{where}[{i}]")
    else:
        assert got == want and type(got) is type(want), where


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_read_pt_equals_torch_load_weights_only(tmp_path, zip_format):
    path = tmp_path / "payload.pt"
    torch.save(_payload(), path, _use_new_zipfile_serialization=zip_format)
    assert zipfile.is_zipfile(path) == zip_format
    want = torch.load(path, weights_only=True)
    got = read_pt(path)
    _same(got, want)
    assert type(want["state"]) is collections.OrderedDict and type(got["state"]) is dict


class _Exploit:
    """An object whose unpickling calls ``fn(arg)`` (what a malicious checkpoint does)."""

    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


def _exploits(marker):
    code = f"open({str(marker)!r}, 'w').close()"
    return {"os.system": (os.system, f"touch '{marker}'"), "builtins.exec": (builtins.exec, code),
            "builtins.eval": (builtins.eval, code)}


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("name", ["os.system", "builtins.exec", "builtins.eval"])
def test_code_in_the_pickle_is_refused_and_never_runs(tmp_path, name, zip_format):
    marker = tmp_path / "pwned"
    fn, arg = _exploits(marker)[name]
    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.ones(2)}, "hook": _Exploit(fn, arg)}, path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UnsafePickleError, match=r"(__builtin__|builtins|posix|os)\." + name.split(".")[1]):
        read_pt(path)
    assert not marker.exists()
    if name == "builtins.exec" and zip_format:  # the payload is real: an unrestricted load runs it
        torch.load(path, weights_only=False)
        assert marker.exists()


def test_a_bare_pickle_and_other_globals_are_refused(tmp_path):
    import pickle

    marker = tmp_path / "pwned"
    path = tmp_path / "raw.pkl"
    path.write_bytes(pickle.dumps(_Exploit(builtins.exec, f"open({str(marker)!r}, 'w').close()")))
    with pytest.raises(UnsafePickleError, match=r"builtins\.exec"):
        read_pt(path)
    assert not marker.exists()
    path = tmp_path / "np.pt"
    torch.save({"a": np.arange(3)}, path)  # numpy's reconstructor is not on the list either
    with pytest.raises(UnsafePickleError, match="numpy"):
        read_pt(path)


def test_corrupt_files_are_clear_errors(tmp_path):
    path = tmp_path / "t.pt"
    torch.save({"w": torch.arange(12.0).reshape(3, 4)}, path)
    with zipfile.ZipFile(path) as zf:
        items = {n: zf.read(n) for n in zf.namelist()}
    short = tmp_path / "short.pt"
    with zipfile.ZipFile(short, "w") as zf:
        for n, data in items.items():
            zf.writestr(n, data[:16] if "/data/" in n else data)  # the storage lost 8 of its 12 floats
    with pytest.raises(PtFormatError, match="holds 16 bytes"):
        read_pt(short)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(PtFormatError):
        read_pt(junk)
    assert isinstance(read_pt(path)["w"], np.ndarray)
