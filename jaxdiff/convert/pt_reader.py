"""A restricted reader for PyTorch ``.pt`` / ``.bin`` files that never runs pickled code.

``torch.save`` writes a pickle whose tensors point at raw storages. The zip format (torch >= 1.6)
holds ``<root>/data.pkl`` (the pickle), ``<root>/data/<key>`` (one raw little-endian storage per key)
and ``<root>/byteorder``; the legacy format is a stream of pickles (magic number, protocol version,
system info, the object, the list of storage keys) followed by each storage as an int64 element count
and its bytes. Inside the pickle a tensor is ``torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, requires_grad, hooks)`` with ``storage`` a persistent id ``("storage", <dtype marker such as
torch.FloatStorage>, key, location, numel)``.

:func:`read_pt` unpickles with a ``pickle.Unpickler`` whose ``find_class`` hands out jaxdiff's own
inert stand-ins for that short list of names (tensor rebuilders, storage dtype markers,
``collections.OrderedDict``, ``torch.Size``) and raises :class:`UnsafePickleError` for any other
global, so no function or class named by the file is ever imported or called: ``os.system``,
``builtins.eval`` and the like are refused before they exist. Tensors come back as numpy arrays
(checked against their storage's bounds), state dicts as plain dicts.
"""
from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"), "DoubleStorage": np.dtype("<f8"), "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16), "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"), "CharStorage": np.dtype("i1"), "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype(np.bool_), "UntypedStorage": np.dtype("u1"),
    "ComplexFloatStorage": np.dtype("<c8"), "ComplexDoubleStorage": np.dtype("<c16"),
}
"""torch's storage dtype markers (``torch.FloatStorage`` ...) -> numpy dtypes (little-endian on disk)."""

TORCH_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")


class UnsafePickleError(ValueError):
    """A ``.pt`` file whose pickle asks for something other than tensors, containers, numbers and strings."""


class PtFormatError(ValueError):
    """A ``.pt`` file that is not a PyTorch checkpoint jaxdiff can read (corrupt, truncated, other format)."""


# ---- inert stand-ins the pickle may name ------------------------------------------------------------------


class _Frozen:
    """No attribute can be set after construction (the pickle's BUILD opcode cannot write into it)."""

    __slots__ = ()

    def __setattr__(self, name: str, value: Any) -> None:
        raise UnsafePickleError(f"the pickle tries to set {name!r} on a {type(self).__name__[1:]}; refused")


class _StorageType(_Frozen):
    """A storage dtype marker (``torch.FloatStorage``): not callable, carries the numpy dtype."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: np.dtype):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", dtype)


class _Storage(_Frozen):
    """One storage: a flat, read-only numpy array of its elements."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        object.__setattr__(self, "array", array)


class _Tensor(_Frozen):
    """A rebuilt tensor (converted to a numpy array once the pickle is read)."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        object.__setattr__(self, "array", array)


class _OrderedDict(dict):
    """``collections.OrderedDict`` (state dicts); extra attributes (``_metadata``) are ignored later."""


def _int_tuple(x: Any, what: str) -> tuple[int, ...]:
    if not isinstance(x, tuple) or not all(type(v) is int for v in x):
        raise UnsafePickleError(f"tensor {what} must be a tuple of ints, got {type(x).__name__}")
    return x


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_ignored: Any) -> _Tensor:
    """``torch._utils._rebuild_tensor_v2``: a strided view of ``storage``, bounds-checked, copied."""
    if not isinstance(storage, _Storage) or type(offset) is not int:
        raise UnsafePickleError("a tensor must be rebuilt from a storage and an int offset")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    flat = storage.array
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise PtFormatError(f"invalid tensor layout: offset {offset}, size {size}, stride {stride}")
    if 0 in size:
        return _Tensor(np.zeros(size, flat.dtype))
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.size:
        raise PtFormatError(f"tensor of size {size} (stride {stride}, offset {offset}) reads past its "
                            f"{flat.size}-element storage; the file is corrupt")
    view = np.lib.stride_tricks.as_strided(flat[offset:], size, tuple(s * flat.itemsize for s in stride),
                                           writeable=False)
    return _Tensor(np.array(view))


def _rebuild_parameter(data: Any, *_ignored: Any) -> _Tensor:
    """``torch._utils._rebuild_parameter(_with_state)``: the parameter's tensor."""
    if not isinstance(data, _Tensor):
        raise UnsafePickleError("a parameter must wrap a tensor")
    return data


def _ordered_dict(*args: Any) -> _OrderedDict:
    if args and not (len(args) == 1 and isinstance(args[0], list)):
        raise UnsafePickleError("collections.OrderedDict takes at most a list of pairs here")
    return _OrderedDict(*args)


def _size(*args: Any) -> tuple:
    if len(args) > 1 or (args and not isinstance(args[0], (tuple, list))):
        raise UnsafePickleError("torch.Size takes one tuple")
    return tuple(*args)


SAFE: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch", "Size"): _size,
    **{("torch", name): _StorageType(name, dtype) for name, dtype in STORAGE_DTYPES.items()},
    **{("torch", name): name for name in TORCH_DTYPES},  # torch.float32 ... as their names
}
"""(module, name) -> what ``find_class`` returns: jaxdiff's own inert objects, never the named ones."""


class _Restricted(pickle.Unpickler):
    """An unpickler that builds only :data:`SAFE` objects and reads storages through ``load_storage``."""

    def __init__(self, file: Any, source: str, load_storage: Callable[[tuple], _Storage],
                 rebuild: Callable[..., _Tensor] = _rebuild_tensor):
        super().__init__(file)
        self._source = source
        self._load_storage = load_storage
        self._rebuild = rebuild

    def find_class(self, module: str, name: str) -> Any:
        found = SAFE.get((module, name))
        if found is _rebuild_tensor:
            return self._rebuild
        if found is None:
            raise UnsafePickleError(
                f"{self._source}: its pickle asks for {module}.{name}, which jaxdiff's restricted .pt reader does "
                "not build (it rebuilds tensors, dicts, lists, numbers and strings only, and never runs code "
                "from a file). If you trust the file, convert it to safetensors in PyTorch "
                "(torch.load(path, weights_only=True) then safetensors.torch.save_file).")
        return found

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage")):
            raise UnsafePickleError(f"{self._source}: unknown persistent id {str(pid)[:60]!r} (only storages)")
        if not isinstance(pid[1], _StorageType) or type(pid[4]) is not int or pid[4] < 0:
            raise UnsafePickleError(f"{self._source}: malformed storage reference {str(pid)[:80]!r}")
        return self._load_storage(pid)


# ---- converting the result ----------------------------------------------------------------------------


def _plain(obj: Any, memo: dict[int, Any]) -> Any:
    """Stand-ins -> numpy arrays and plain dicts; anything unexpected is refused."""
    if id(obj) in memo:
        return memo[id(obj)]
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        return obj
    if isinstance(obj, _Tensor):
        out: Any = obj.array
    elif isinstance(obj, dict):
        out = {}
        memo[id(obj)] = out
        for k, v in dict.items(obj):
            out[_plain(k, memo)] = _plain(v, memo)
    elif isinstance(obj, list):
        out = []
        memo[id(obj)] = out
        out.extend(_plain(v, memo) for v in obj)
    elif isinstance(obj, tuple):
        out = tuple(_plain(v, memo) for v in obj)
    elif isinstance(obj, (set, frozenset)):
        out = type(obj)(_plain(v, memo) for v in obj)
    else:
        raise UnsafePickleError(f"the pickle holds a bare {type(obj).__name__.lstrip('_')}, not a tensor or container")
    memo[id(obj)] = out
    return out


# ---- the two container formats ------------------------------------------------------------------------


def _read_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as zf:
        pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise PtFormatError(f"{path}: a zip file without one <name>/data.pkl record is not a torch.save file")
        root = pkls[0][: -len("data.pkl")]
        order = "little"
        if root + "byteorder" in zf.namelist():
            order = zf.read(root + "byteorder").decode("ascii", "replace").strip()
            if order not in ("little", "big"):
                raise PtFormatError(f"{path}: unknown byte order {order!r}")
        cache: dict[str, _Storage] = {}

        def load(pid: tuple) -> _Storage:
            stype, key, numel = pid[1], str(pid[2]), pid[4]
            if key not in cache:
                name = f"{root}data/{key}"
                try:
                    info = zf.getinfo(name)
                except KeyError:
                    raise PtFormatError(f"{path}: storage {key!r} is missing from the archive") from None
                nbytes = numel * stype.dtype.itemsize
                if info.file_size < nbytes:
                    raise PtFormatError(f"{path}: storage {key!r} holds {info.file_size} bytes, needs {nbytes}")
                with zf.open(info) as f:
                    raw = f.read(nbytes)
                flat = np.frombuffer(raw, stype.dtype)
                cache[key] = _Storage(flat.byteswap() if order == "big" else flat)
            if cache[key].array.dtype != stype.dtype:
                raise PtFormatError(f"{path}: storage {key!r} is read with two dtypes")
            return cache[key]

        with zf.open(pkls[0]) as f:
            return _Restricted(io.BytesIO(f.read()), str(path), load).load()


def _read_legacy(path: Path) -> Any:
    with open(path, "rb") as f:
        def plain_pickle() -> Any:
            return _Restricted(f, str(path), _no_storage).load()

        try:
            magic = plain_pickle()
        except UnsafePickleError:
            raise
        except Exception as e:  # junk bytes fail in many ways inside the unpickler
            raise PtFormatError(f"{path} is neither a torch.save zip nor a legacy torch.save file ({e})") from None
        if magic != LEGACY_MAGIC:
            raise PtFormatError(f"{path} is a pickle but not a torch.save file (no torch magic number)")
        if plain_pickle() != LEGACY_PROTOCOL:
            raise PtFormatError(f"{path}: unsupported legacy torch.save protocol version")
        plain_pickle()  # system info: byte order, sizes of long / int / short
        roots: dict[str, tuple[_StorageType, int]] = {}
        views: list[tuple[_Storage, str, int, int]] = []

        def load(pid: tuple) -> _Storage:
            """An empty storage now; its data follows the object and is filled in below."""
            stype, key, numel = pid[1], str(pid[2]), pid[4]
            roots.setdefault(key, (stype, numel))
            if roots[key][0] is not stype:
                raise PtFormatError(f"{path}: storage {key!r} is read with two dtypes")
            view = pid[5] if len(pid) > 5 else None
            start, count = (0, numel) if view is None else (view[1], view[2])
            if type(start) is not int or type(count) is not int:
                raise UnsafePickleError(f"{path}: malformed storage view {str(view)[:60]!r}")
            holder = _Storage(np.empty(0, stype.dtype))
            views.append((holder, key, start, count))
            return holder

        deferred: list[tuple[_Tensor, tuple]] = []

        def rebuild_later(*args: Any) -> _Tensor:
            t = _Tensor(np.empty(0))
            deferred.append((t, args))
            return t

        obj = _Restricted(f, str(path), load, rebuild=rebuild_later).load()
        keys = plain_pickle()
        if not isinstance(keys, list):
            raise PtFormatError(f"{path}: the storage key list is missing")
        filled: dict[str, np.ndarray] = {}
        for key in map(str, keys):
            if key not in roots:
                raise PtFormatError(f"{path}: storage {key!r} is listed but never used")
            stype, numel = roots[key]
            head = f.read(8)
            if len(head) != 8 or struct.unpack("<q", head)[0] != numel:
                raise PtFormatError(f"{path}: storage {key!r} is truncated or its size does not match")
            raw = f.read(numel * stype.dtype.itemsize)
            if len(raw) != numel * stype.dtype.itemsize:
                raise PtFormatError(f"{path}: storage {key!r} is truncated")
            filled[key] = np.frombuffer(raw, stype.dtype)
        for holder, key, start, count in views:
            if key not in filled or start < 0 or count < 0 or start + count > filled[key].size:
                raise PtFormatError(f"{path}: storage {key!r} has no data, or a view past its end")
            object.__setattr__(holder, "array", filled[key][start: start + count])
        for t, args in deferred:
            object.__setattr__(t, "array", _rebuild_tensor(*args).array)
        return obj


def _no_storage(pid: tuple) -> _Storage:
    raise UnsafePickleError("a storage reference outside the object pickle")


def read_pt(path: str | os.PathLike) -> Any:
    """The object a ``torch.save`` file holds, as nested dicts / lists / tuples of numpy arrays, numbers and
    strings, read without running any code from the file (module docstring).

    Reads the zip format and the legacy (pre-1.6) format. Raises :class:`UnsafePickleError` for a pickle
    that names anything else (the named object is never imported), :class:`PtFormatError` for other files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    obj = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
    return _plain(obj, {})
