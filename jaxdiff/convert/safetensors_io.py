"""A lazy, memory-mapped safetensors reader, written from the format specification.

Layout of a ``.safetensors`` file: 8 bytes little-endian unsigned header length ``N``; ``N`` bytes
of UTF-8 JSON mapping each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the byte buffer that follows the header) plus an optional ``__metadata__``
string map; then the byte buffer, little-endian, C order. Sharded checkpoints add a
``*.safetensors.index.json`` with ``{"weight_map": {name: shard file}}``.

Tensors are returned one at a time as read-only numpy views of the mapped file, so filling a
model never holds a second full copy of the checkpoint. Pickle formats are refused, never opened.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
import json
import math
import mmap
import os
from pathlib import Path

import ml_dtypes
import numpy as np

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("<u1"),
    "I8": np.dtype("<i1"),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "C64": np.dtype("<c8"),
}


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read: truncated, corrupt header, unknown dtype."""


class PickleCheckpointError(ValueError):
    """A pickle-based checkpoint (.ckpt, .bin, .pt, .pth, .pkl): refused, never opened."""


def pickle_refusal_message(path: str | os.PathLike) -> str:
    """Why pickle checkpoints are refused, and how to convert one to safetensors."""
    return (
        f"{os.fspath(path)} is a pickle-based PyTorch checkpoint. Pickle files can run arbitrary code "
        "when opened, so jaxdiff loads safetensors only and will not open it. Convert it once in a "
        "trusted PyTorch environment: for a state dict or an original Stable Diffusion .ckpt, "
        "`sd = torch.load(path, weights_only=True); sd = sd.get('state_dict', sd); "
        "from safetensors.torch import save_file; save_file({k: v.contiguous() for k, v in sd.items() "
        "if isinstance(v, torch.Tensor)}, 'model.safetensors')` (jaxdiff loads SD 1.x/2.x single files: "
        "`jaxdiff sample --model model.safetensors`); for a diffusers or transformers model or pipeline, "
        "`X.from_pretrained(folder).save_pretrained(out, safe_serialization=True)`. Then point jaxdiff at "
        "the .safetensors files."
    )


def is_pickle_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def refuse_pickle(path: str | os.PathLike) -> None:
    """Raise :class:`PickleCheckpointError` if ``path`` names a pickle checkpoint."""
    if is_pickle_path(path):
        raise PickleCheckpointError(pickle_refusal_message(path))


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: dtype code, shape and byte range within the data buffer."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _looks_like_pickle(head: bytes) -> bool:
    """PyTorch's zip container (``PK``) or a raw pickle stream (protocol opcode ``0x80``)."""
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and head[1] <= 5)


def _parse_entry(path: Path, name: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise SafetensorsError(f"{path}: header entry {name!r} needs dtype, shape and data_offsets; got {entry!r}")
    dtype = entry["dtype"]
    if dtype not in DTYPES:
        raise SafetensorsError(
            f"{path}: tensor {name!r} has unknown dtype {dtype!r}; supported: {', '.join(DTYPES)}"
        )
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise SafetensorsError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise SafetensorsError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if begin < 0 or end - begin != expected:
        raise SafetensorsError(
            f"{path}: tensor {name!r} ({dtype} {tuple(shape)}) needs {expected} bytes but its "
            f"data_offsets {offsets} span {end - begin}; the header is corrupt"
        )
    return TensorInfo(dtype, tuple(shape), begin, end)


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse a safetensors header: (tensor infos, ``__metadata__``, byte offset of the data buffer).

    Checks that every tensor's bytes lie inside the file, so a truncated download fails here
    with the expected and actual sizes instead of later with a bus error.
    """
    path = Path(path)
    refuse_pickle(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
        if len(head) < 9:
            raise SafetensorsError(
                f"{path} is truncated or corrupt: a safetensors file starts with an 8-byte header "
                f"length and a JSON header, but the file has only {size} bytes"
            )
        n = int.from_bytes(head[:8], "little")
        if head[8:9] != b"{" and _looks_like_pickle(head):
            raise PickleCheckpointError(pickle_refusal_message(path) + " (its bytes are a pickle/zip archive.)")
        f.seek(8)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise SafetensorsError(
                f"{path} is truncated or corrupt: its header claims {n} bytes, so the file should be at "
                f"least {8 + n} bytes, but it is {size} bytes. Download or save it again."
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path} is corrupt: its header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path} is corrupt: its header is JSON but not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise SafetensorsError(f"{path}: __metadata__ must be a string map, got {type(metadata).__name__}")
    infos = {name: _parse_entry(path, name, entry) for name, entry in header.items()}
    data_start = 8 + n
    data_end = max((i.end for i in infos.values()), default=0)
    if data_start + data_end > size:
        raise SafetensorsError(
            f"{path} is truncated or corrupt: its tensors need {data_start + data_end} bytes but the file "
            f"is {size} bytes ({data_start + data_end - size} missing). Download or save it again."
        )
    return infos, {str(k): str(v) for k, v in metadata.items()}, data_start


class SafetensorsFile(Mapping[str, np.ndarray]):
    """Lazy read-only mapping ``name -> numpy array`` over one memory-mapped safetensors file.

    ``f[name]`` is a zero-copy read-only view of the file; ``f.shapes`` and ``f.dtypes`` come from
    the header without touching tensor data. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.infos, self.metadata, self._data_start = read_header(self.path)
        self.shapes: dict[str, tuple[int, ...]] = {k: v.shape for k, v in self.infos.items()}
        self.dtypes: dict[str, str] = {k: v.dtype for k, v in self.infos.items()}
        self._mmap: mmap.mmap | None = None

    def _map(self) -> mmap.mmap:
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mmap

    def __getitem__(self, name: str) -> np.ndarray:
        info = self.infos.get(name)
        if info is None:
            raise KeyError(f"{name!r} is not a tensor in {self.path}")
        dtype = DTYPES[info.dtype]
        if info.nbytes == 0:
            return np.zeros(info.shape, dtype)
        array = np.frombuffer(self._map(), dtype=dtype, count=math.prod(info.shape),
                              offset=self._data_start + info.begin).reshape(info.shape)
        return array  # explicit little-endian dtypes: numpy reads them right on any host

    def release(self, name: str) -> None:
        """Drop the mapped pages of ``name`` from this process (the data stays on disk)."""
        info = self.infos.get(name)
        if self._mmap is None or info is None or info.nbytes == 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start = (self._data_start + info.begin) // page * page
        self._mmap.madvise(mmap.MADV_DONTNEED, start, self._data_start + info.end - start)

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def __contains__(self, name: object) -> bool:
        return name in self.infos

    def close(self) -> None:
        """Unmap the file; arrays still referenced keep the mapping alive until they are freed."""
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # views are still alive; the mapping goes with the last of them
                pass
            self._mmap = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self)} tensors)"


class ShardedSafetensors(Mapping[str, np.ndarray]):
    """Lazy mapping over a sharded checkpoint described by a ``*.safetensors.index.json``."""

    def __init__(self, index_path: str | os.PathLike):
        self.path = Path(index_path)
        try:
            index = json.loads(self.path.read_text())
            weight_map = dict(index["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise SafetensorsError(f"{self.path} is not a valid safetensors index (needs a weight_map): {e}") from None
        self.metadata: dict = dict(index.get("metadata") or {})
        shard_names = sorted(set(weight_map.values()))
        for shard in shard_names:
            refuse_pickle(shard)
        absent = [s for s in shard_names if not (self.path.parent / s).is_file()]
        if absent:
            raise FileNotFoundError(f"{self.path} lists shards that are not in {self.path.parent}: {', '.join(absent)}")
        self.shards = {s: SafetensorsFile(self.path.parent / s) for s in shard_names}
        wrong = [f"{k} (not in {s})" for k, s in weight_map.items() if k not in self.shards[s].infos]
        if wrong:
            raise SafetensorsError(f"{self.path} names tensors its shards lack: {', '.join(sorted(wrong)[:20])}")
        self.weight_map = weight_map
        self.shapes = {k: self.shards[s].shapes[k] for k, s in weight_map.items()}
        self.dtypes = {k: self.shards[s].dtypes[k] for k, s in weight_map.items()}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.weight_map:
            raise KeyError(f"{name!r} is not a tensor in {self.path}")
        return self.shards[self.weight_map[name]][name]

    def release(self, name: str) -> None:
        if name in self.weight_map:
            self.shards[self.weight_map[name]].release(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.weight_map)

    def __len__(self) -> int:
        return len(self.weight_map)

    def __contains__(self, name: object) -> bool:
        return name in self.weight_map

    def close(self) -> None:
        for shard in self.shards.values():
            shard.close()

    def __enter__(self) -> "ShardedSafetensors":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ShardedSafetensors({str(self.path)!r}, {len(self)} tensors in {len(self.shards)} shards)"


def open_safetensors(path: str | os.PathLike) -> SafetensorsFile | ShardedSafetensors:
    """Open a ``.safetensors`` file or a sharded ``*.index.json`` lazily; pickle files are refused."""
    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.name.endswith(".json"):
        return ShardedSafetensors(path)
    return SafetensorsFile(path)
