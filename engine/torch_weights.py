"""Reading a PyTorch state dict saved in the legacy (non-zip) format, without PyTorch.

The legacy format is a sequence of pickles — a magic number, a protocol version, system
information, the object itself (tensors refer to storages by persistent id), the list of
storage keys — followed by each storage's raw bytes (an int64 element count, then the
elements). A restricted unpickler maps only the tensor-rebuild functions, the storage
types and OrderedDict to numpy, and refuses every other global, so a crafted file cannot
run code.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
from dataclasses import dataclass

import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


@dataclass
class _Storage:
    key: str
    dtype: type
    count: int
    data: np.ndarray | None = None


@dataclass
class _TensorReference:
    storage: _Storage
    offset: int
    shape: tuple
    stride: tuple


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    return _TensorReference(storage, int(storage_offset), tuple(size), tuple(stride))


class _StorageType:
    def __init__(self, name: str):
        self.name = name


class _RestrictedUnpickler(pickle.Unpickler):
    """Knows only what a state dict needs; any other global is an error."""

    def __init__(self, handle, storages: dict):
        super().__init__(handle)
        self.storages = storages

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a weights file")

    def persistent_load(self, persistent_id):
        if not isinstance(persistent_id, tuple) or not persistent_id or persistent_id[0] != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {persistent_id!r}")
        _, storage_type, key, _location, count = persistent_id[:5]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unexpected storage type {storage_type!r}")
        if key not in self.storages:
            self.storages[key] = _Storage(key, STORAGE_DTYPES[storage_type.name], int(count))
        return self.storages[key]


def load_legacy_state_dict(path: str | os.PathLike) -> "collections.OrderedDict[str, np.ndarray]":
    """Reads a legacy-format `.pth` state dict into numpy arrays (name → array).

    Raises:
        ValueError: the file is not a legacy PyTorch state dict, or it holds anything else
            than tensors (the message names what was refused).
    """
    storages: dict = {}
    with open(path, "rb") as handle:
        try:
            magic = _RestrictedUnpickler(handle, storages).load()
            if magic != LEGACY_MAGIC_NUMBER:
                raise ValueError(f"{path} is not a legacy PyTorch file (wrong magic number).")
            protocol = _RestrictedUnpickler(handle, storages).load()
            if protocol != LEGACY_PROTOCOL_VERSION:
                raise ValueError(f"{path} uses PyTorch protocol {protocol}; only {LEGACY_PROTOCOL_VERSION} is read.")
            system = _RestrictedUnpickler(handle, storages).load()
            if not isinstance(system, dict) or not system.get("little_endian", False):
                raise ValueError(f"{path} was written on a big-endian machine; not supported.")
            state = _RestrictedUnpickler(handle, storages).load()
            keys = _RestrictedUnpickler(handle, storages).load()
        except pickle.UnpicklingError as error:
            raise ValueError(f"{path}: {error}") from None
        for key in keys:
            storage = storages[key]
            (count,) = struct.unpack("<q", handle.read(8))
            itemsize = np.dtype(storage.dtype).itemsize
            raw = handle.read(count * itemsize)
            if len(raw) != count * itemsize:
                raise ValueError(f"{path} ends inside storage {key}: the file is truncated.")
            storage.data = np.frombuffer(raw, dtype=storage.dtype)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict.")
    arrays = collections.OrderedDict()
    for name, reference in state.items():
        if not isinstance(reference, _TensorReference):
            raise ValueError(f"{path}: entry {name!r} is not a tensor.")
        data = reference.storage.data
        itemsize = data.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[reference.offset:], shape=reference.shape,
            strides=tuple(step * itemsize for step in reference.stride))
        arrays[name] = np.array(view)  # a copy: contiguous, writable, independent of the file buffer
    return arrays
