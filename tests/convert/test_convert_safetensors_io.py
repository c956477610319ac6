"""The lazy safetensors reader against the `safetensors` package, and its errors on bad files."""
from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from jaxdiff.convert.safetensors_io import (
    PickleCheckpointError,
    SafetensorsError,
    SafetensorsFile,
    ShardedSafetensors,
    open_safetensors,
)


def _sample_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f16": rng.standard_normal((2, 3, 2)).astype(np.float16),
        "f64": rng.standard_normal((5,)),
        "i64": rng.integers(-9, 9, (2, 2)).astype(np.int64),
        "i32": rng.integers(-9, 9, (7,)).astype(np.int32),
        "i8": rng.integers(-9, 9, (3,)).astype(np.int8),
        "u8": rng.integers(0, 255, (4, 1)).astype(np.uint8),
        "bool": rng.random((3, 3)) > 0.5,
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


@pytest.fixture()
def sample_file(tmp_path):
    path = tmp_path / "sample.safetensors"
    save_file(_sample_tensors(), str(path), metadata={"format": "pt", "note": "x"})
    return path


def test_matches_safetensors_package(sample_file):
    ref = load_file(str(sample_file))
    with SafetensorsFile(sample_file) as f, safe_open(str(sample_file), framework="np") as g:
        assert sorted(f.keys()) == sorted(g.keys())
        assert f.metadata == g.metadata() == {"format": "pt", "note": "x"}
        for name in ref:
            assert f.shapes[name] == ref[name].shape
            got = f[name]
            assert got.dtype == ref[name].dtype and got.shape == ref[name].shape
            np.testing.assert_array_equal(got, ref[name])
            np.testing.assert_array_equal(got, g.get_tensor(name))


def test_views_are_read_only_and_survive_release(sample_file):
    f = SafetensorsFile(sample_file)
    x = f["f32"]
    assert not x.flags.writeable
    before = x.copy()
    f.release("f32")  # drops mapped pages; the data is read back from disk on access
    np.testing.assert_array_equal(f["f32"], before)
    f.close()
    np.testing.assert_array_equal(x, before)  # a live view keeps the mapping alive


def test_bfloat16_and_float16_against_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as torch_save

    g = torch.Generator().manual_seed(0)
    tensors = {"bf16": torch.randn(5, 3, generator=g).to(torch.bfloat16),
               "f16": torch.randn(4, generator=g).to(torch.float16)}
    torch_save(tensors, str(tmp_path / "t.safetensors"))
    f = open_safetensors(tmp_path / "t.safetensors")
    assert f.dtypes == {"bf16": "BF16", "f16": "F16"}
    assert f["bf16"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(f["bf16"].astype(np.float32), tensors["bf16"].float().numpy())
    np.testing.assert_array_equal(f["f16"], tensors["f16"].numpy())


def test_sharded_index(tmp_path):
    tensors = _sample_tensors()
    names = sorted(tensors)
    parts = {"m-00001-of-00002.safetensors": names[:4], "m-00002-of-00002.safetensors": names[4:]}
    for shard, keys in parts.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / shard))
    weight_map = {k: s for s, keys in parts.items() for k in keys}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    with open_safetensors(tmp_path / "m.safetensors.index.json") as f:
        assert isinstance(f, ShardedSafetensors) and len(f.shards) == 2
        assert sorted(f) == names
        for k in names:
            assert f.shapes[k] == tensors[k].shape
            np.testing.assert_array_equal(f[k], tensors[k])

    (tmp_path / "m-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="m-00002-of-00002.safetensors"):
        open_safetensors(tmp_path / "m.safetensors.index.json")


def test_index_naming_a_tensor_its_shard_lacks(tmp_path):
    save_file({"a": np.ones(2, np.float32)}, str(tmp_path / "s.safetensors"))
    (tmp_path / "i.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s.safetensors", "b": "s.safetensors"}}))
    with pytest.raises(SafetensorsError, match="b"):
        open_safetensors(tmp_path / "i.safetensors.index.json")


@pytest.mark.parametrize("cut", [1, 100])
def test_truncated_data_names_sizes(sample_file, tmp_path, cut):
    data = sample_file.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[:-cut])
    with pytest.raises(SafetensorsError, match="truncated") as err:
        SafetensorsFile(bad)
    assert f"{len(data)} bytes" in str(err.value) and f"is {len(data) - cut} bytes" in str(err.value)


@pytest.mark.parametrize("keep", [0, 5, 8, 40])
def test_truncated_header(sample_file, tmp_path, keep):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(sample_file.read_bytes()[:keep])
    with pytest.raises(SafetensorsError, match="truncated"):
        open_safetensors(bad)


def _raw_file(path, header: bytes, data: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def test_bad_header_json(tmp_path):
    with pytest.raises(SafetensorsError, match="not valid UTF-8 JSON"):
        SafetensorsFile(_raw_file(tmp_path / "x.safetensors", b'{"a": {"dtype": "F32",'))


def test_unknown_dtype(tmp_path):
    header = json.dumps({"a": {"dtype": "F4_E2M1", "shape": [2], "data_offsets": [0, 1]}}).encode()
    with pytest.raises(SafetensorsError, match="unknown dtype 'F4_E2M1'.*supported: BOOL"):
        SafetensorsFile(_raw_file(tmp_path / "x.safetensors", header, b"\0"))


def test_offsets_inconsistent_with_shape(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    with pytest.raises(SafetensorsError, match="needs 16 bytes"):
        SafetensorsFile(_raw_file(tmp_path / "x.safetensors", header, bytes(16)))


def test_hand_written_file_with_padding_and_metadata(tmp_path):
    """Built from the spec by hand: space-padded header, offsets relative to the data buffer."""
    a = np.array([[1.5, -2.0]], dtype=np.float32)
    b = np.array([7, 8, 9], dtype=np.int32)
    header = json.dumps({"__metadata__": {"k": "v"},
                         "b": {"dtype": "I32", "shape": [3], "data_offsets": [8, 20]},
                         "a": {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]}}).encode()
    header += b" " * (-len(header) % 8)
    path = _raw_file(tmp_path / "h.safetensors", header, a.tobytes() + b.tobytes())
    f = SafetensorsFile(path)
    np.testing.assert_array_equal(f["a"], a)
    np.testing.assert_array_equal(f["b"], b)
    assert f.metadata == {"k": "v"}
    ref = load_file(str(path))  # the reference reader agrees that the file is valid
    np.testing.assert_array_equal(ref["b"], b)


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth", ".pkl"])
def test_pickle_suffixes_refused_without_opening(tmp_path, suffix):
    # The file does not even exist: refusal comes from the name, so nothing is ever opened.
    with pytest.raises(PickleCheckpointError, match="can run arbitrary code.*safetensors only.*save_file"):
        open_safetensors(tmp_path / f"model{suffix}")


def test_pickle_bytes_behind_safetensors_name(tmp_path):
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(b"PK\x03\x04" + bytes(60))  # torch.save's zip container
    with pytest.raises(PickleCheckpointError, match="pickle/zip archive"):
        open_safetensors(fake)
    fake.write_bytes(b"\x80\x02}q\x00." + bytes(10))  # a protocol-2 pickle stream
    with pytest.raises(PickleCheckpointError):
        open_safetensors(fake)


def test_pickle_shards_refused(tmp_path):
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "pytorch_model-1.bin"}}))
    with pytest.raises(PickleCheckpointError, match="pytorch_model-1.bin"):
        open_safetensors(tmp_path / "pytorch_model.bin.index.json")


def test_header_length_that_resembles_a_pickle_opcode(tmp_path):
    """A valid file whose header length starts with bytes 0x80 0x02 is still read as safetensors."""
    body = json.dumps({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}).encode()
    header = body + b" " * (0x0280 - len(body))
    path = _raw_file(tmp_path / "x.safetensors", header, b"\x07")
    assert path.read_bytes()[:2] == b"\x80\x02"
    assert SafetensorsFile(path)["a"].tolist() == [7]
