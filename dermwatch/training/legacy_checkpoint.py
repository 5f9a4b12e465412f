"""Read a PyTorch state dict in PyTorch's legacy file format, without PyTorch.

The ImageNet weights of EfficientNet-Lite0 ship as such a file. The format is four pickles
(magic number, protocol version, system info, the state dict whose tensors point at storages
by key), then the list of storage keys, then each storage in that order as a little-endian
int64 element count and its raw little-endian bytes. A restricted unpickler rebuilds each
tensor as a NumPy array; it accepts only the handful of globals a state dict needs, so the
file cannot run code.
"""

from __future__ import annotations

import collections
import pickle
from pathlib import Path
from typing import BinaryIO

import numpy as np

from dermwatch.errors import DataError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

#: PyTorch's storage classes, by the dtype of their elements.
STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class _TensorRef:
    """A tensor before its storage's bytes are read: which storage, and its view of it."""

    def __init__(self, storage: tuple[str, np.dtype], offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
        self.key, self.dtype = storage
        self.offset, self.size, self.stride = offset, tuple(size), tuple(stride)

    def view(self, storage: np.ndarray) -> np.ndarray:
        """The tensor's elements, copied out of its storage in C order."""
        itemsize = storage.dtype.itemsize
        strided = np.lib.stride_tricks.as_strided(
            storage[self.offset:], shape=self.size, strides=[s * itemsize for s in self.stride], writeable=False
        )
        return np.ascontiguousarray(strided)


def _rebuild_tensor(storage, offset, size, stride, *_ignored) -> _TensorRef:
    return _TensorRef(storage, offset, size, stride)


class _StorageType:
    def __init__(self, name: str) -> None:
        self.dtype = STORAGE_DTYPES[name]


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a state dict and nothing else: tensors become _TensorRef."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in {"_rebuild_tensor", "_rebuild_tensor_v2"}:
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"a state dict holds no {module}.{name}; refusing to load it")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, _numel = pid[:5]
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return key, storage_type.dtype


def _read_storages(stream: BinaryIO, keys: list[str], dtypes: dict[str, np.dtype]) -> dict[str, np.ndarray]:
    storages = {}
    for key in keys:
        (count,) = np.frombuffer(stream.read(8), dtype="<i8")
        dtype = dtypes[key]
        raw = stream.read(int(count) * dtype.itemsize)
        if len(raw) != int(count) * dtype.itemsize:
            raise DataError(f"truncated checkpoint: storage {key} needs {count} elements")
        storages[key] = np.frombuffer(raw, dtype=dtype)
    return storages


def load_state_dict(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of the legacy-format state dict at ``path``, by name, as NumPy arrays."""
    with open(path, "rb") as stream:
        try:
            magic = pickle.load(stream)
            protocol = pickle.load(stream)
            system = pickle.load(stream)
        except (pickle.UnpicklingError, EOFError) as error:
            raise DataError(f"{path} is not a PyTorch legacy checkpoint: {error}") from error
        if magic != LEGACY_MAGIC or protocol != LEGACY_PROTOCOL:
            raise DataError(f"{path} is not a PyTorch legacy checkpoint (magic {magic!r}, protocol {protocol!r})")
        if not system.get("little_endian", False):
            raise DataError(f"{path} was written on a big-endian machine; only little-endian files are read")
        state = _StateDictUnpickler(stream).load()
        keys = pickle.load(stream)
        refs = {name: ref for name, ref in state.items() if isinstance(ref, _TensorRef)}
        storages = _read_storages(stream, keys, {ref.key: ref.dtype for ref in refs.values()})
    return {name: ref.view(storages[ref.key]) for name, ref in refs.items()}
