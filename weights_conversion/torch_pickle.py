"""PyTorch's pickled checkpoints (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) read without PyTorch and without
running code from the file: the zip archive of ``torch.save`` and the older non-zip "legacy" stream.

Example:

>>> sd = read_torch_pickle("v1-5-pruned-emaonly.ckpt")             # doctest: +SKIP
>>> sd["model.diffusion_model.input_blocks.0.0.weight"].shape       # doctest: +SKIP
(320, 4, 3, 3)
"""

import _compat_pickle
import collections
import os
import pickle
import zipfile

import numpy as np

from weights_conversion import progress
from weights_conversion.arrays import bf16_to_float32, strided_view
from weights_conversion.errors import CheckpointError, UnsafeCheckpointError

# torch.<Name>Storage -> the numpy dtype of its elements (bf16 is read as its raw 16 bits).
_TORCH_STORAGE_DTYPES = {
    "DoubleStorage": "f8", "FloatStorage": "f4", "HalfStorage": "f2", "BFloat16Storage": "u2",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?", "ComplexFloatStorage": "c8", "ComplexDoubleStorage": "c16",
}

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


# ------------------------------------------------------------------------------------ the restricted unpickler


class _StorageType:
    """What ``torch.FloatStorage`` and its kin stand for in a pickle: an element dtype."""

    def __init__(self, name):
        self.name = name
        self.dtype = np.dtype(_TORCH_STORAGE_DTYPES[name])


class _StorageRef:
    """A storage named by a pickle's persistent id; its bytes are read later, and only if needed."""

    def __init__(self, key, storage_type, offset=0):
        self.key, self.storage_type, self.offset = key, storage_type, offset


class _TensorRef:
    """A tensor as ``_rebuild_tensor_v2`` describes it: a strided view of a storage."""

    def __init__(self, storage, offset, shape, stride):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Our stand-in for ``torch._utils._rebuild_tensor_v2``: records the view, reads nothing yet."""
    if not isinstance(storage, _StorageRef):
        raise CheckpointError(f"a tensor's storage is a {type(storage).__name__}, not a storage")
    shape, stride = tuple(int(n) for n in size), tuple(int(s) for s in stride)
    if len(shape) != len(stride):
        raise CheckpointError(f"a tensor of shape {shape} has strides {stride}")
    return _TensorRef(storage, storage.offset + int(storage_offset), shape, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    """Our stand-in for ``torch._utils._rebuild_parameter(_with_state)``: a parameter is its tensor."""
    return data


class _TorchClass:
    """Stands for ``torch.Tensor`` / ``torch.nn.Parameter`` as the ``new_type`` of ``_rebuild_from_type_v2``."""

    def __init__(self, name):
        self.name = name


def _rebuild_from_type(func, new_type, args, state):
    """Our stand-in for ``torch._tensor._rebuild_from_type_v2``: only for plain tensors and parameters."""
    if func not in (_rebuild_tensor, _rebuild_parameter) or not isinstance(new_type, _TorchClass):
        raise UnsafeCheckpointError(f"refused tensor subclass rebuild {getattr(new_type, 'name', new_type)!r}")
    return func(*args)


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as protocol-2 pickles use it, to carry bytes as latin-1 text."""
    if encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class _Inert:
    """Stands in for an object of a class we do not import; keeps its pickled arguments, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.__dict__.setdefault("items", []).append((key, value))

    def append(self, value):
        self.__dict__.setdefault("elements", []).append(value)

    def extend(self, values):
        self.__dict__.setdefault("elements", []).extend(values)


_INERT_CLASSES = {}


def _inert_class(qualified_name):
    """One placeholder class per global name: a fresh subclass of ``_Inert``, never the real thing."""
    if qualified_name not in _INERT_CLASSES:
        _INERT_CLASSES[qualified_name] = type(qualified_name, (_Inert,), {"__module__": __name__})
    return _INERT_CLASSES[qualified_name]


def _reconstruct_inert(cls, base, state=None):
    """``copyreg._reconstructor`` (protocol 0/1 objects), allowed only to make a placeholder."""
    if not (isinstance(cls, type) and issubclass(cls, _Inert)):
        raise UnsafeCheckpointError(f"refused copyreg._reconstructor of {cls!r}")
    return cls()


_SAFE_GLOBALS = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type,
    "torch.Tensor": _TorchClass("torch.Tensor"),
    "torch.nn.parameter.Parameter": _TorchClass("torch.nn.parameter.Parameter"),
    "torch.Size": tuple,
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "_codecs.encode": _latin1_encode,
    "copyreg._reconstructor": _reconstruct_inert,
}

# Data-only classes that sit next to the state dict in training checkpoints (Lightning callback states,
# hyper-parameters, numpy scalars). They become placeholders; see _RestrictedUnpickler.
_INERT_MODULE_PREFIXES = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.")
_INERT_GLOBALS = {
    f"numpy.{m}{name}"
    for m in ("", "core.multiarray.", "_core.multiarray.")
    for name in ("scalar", "_reconstruct", "dtype", "ndarray")
} | {"argparse.Namespace"}


class _RestrictedUnpickler(pickle.Unpickler):
    """A pickle reader that can only rebuild tensors; it never imports or calls anything named in the file.

    ``find_class`` answers every global the pickle names from a fixed table of our own functions
    (tensor rebuilders that build numpy views, storage dtypes, plain containers). Any other global is
    refused with ``UnsafeCheckpointError`` before anything runs: ``os.system``, ``builtins.eval`` and
    every class with its own ``__reduce__`` are never looked up, so they cannot execute.

    Training checkpoints also pickle things we do not need beside the weights: the original Stable
    Diffusion ``.ckpt`` files key their ``callbacks`` dict by the class
    ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint``, and others hold omegaconf
    hyper-parameters or numpy scalars. Refusing those would refuse the very files users have, so their
    globals become inert placeholders instead: fresh ``_Inert`` subclasses that store whatever arguments
    the pickle passes and do nothing else. The real class is never imported, so even a hostile name
    under those prefixes runs nothing. If a placeholder lands inside the state dict itself, reading stops
    with ``CheckpointError``. Everything else (``os``, ``subprocess``, ``builtins.eval``/``exec``/
    ``getattr``, ``torch.storage._load_from_bytes`` which would unpickle nested bytes, whole modules)
    stays refused: in a weights file those are a sign of tampering, not data.
    """

    def __init__(self, file, path):
        super().__init__(file)
        self.path = path
        self.storages = {}

    def find_class(self, module, name):
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        qualified = f"{module}.{name}"
        if qualified in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[qualified]
        if module == "torch" and name in _TORCH_STORAGE_DTYPES:
            return _StorageType(name)
        if qualified in _INERT_GLOBALS or qualified.startswith(_INERT_MODULE_PREFIXES):
            return _inert_class(qualified)
        raise UnsafeCheckpointError(
            f"{self.path}: refused global {qualified!r}: a weights file may only rebuild tensors; "
            "nothing from the file was executed"
        )

    def persistent_load(self, pid):
        """A storage reference ``("storage", type, key, location, numel[, view])`` -> ``_StorageRef``."""
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self.path}: unsupported persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"{self.path}: storage {key} has type {storage_type!r}")
        self.storages[key] = storage_type
        view = pid[5] if len(pid) > 5 else None
        if view is None:
            return _StorageRef(key, storage_type)
        _view_key, offset, _size = view
        return _StorageRef(key, storage_type, int(offset))


def _unpickle(file, path):
    """One restricted ``pickle.load``; corrupt or truncated streams become ``CheckpointError``."""
    unpickler = _RestrictedUnpickler(file, path)
    try:
        return unpickler.load(), unpickler.storages
    except CheckpointError as e:
        if str(e).startswith(path):
            raise
        raise type(e)(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated pickle: {type(e).__name__}: {e}") from None


# -------------------------------------------------------------------------------------- torch.save formats


def read_torch_pickle(path):
    """Every tensor of a ``torch.save`` file, zip or legacy, read with the restricted unpickler."""
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    return _read_torch_zip(path) if is_zip else _read_torch_legacy(path)


def _read_torch_zip(path):
    """The zip format: ``<archive>/data.pkl`` plus one ``<archive>/data/<key>`` file per storage."""
    try:
        with zipfile.ZipFile(path) as zf:
            pickles = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise CheckpointError(f"{path}: not a PyTorch zip checkpoint (no single <archive>/data.pkl)")
            prefix = pickles[0][: -len("data.pkl")]
            with zf.open(pickles[0]) as f:
                obj, _ = _unpickle(f, path)
            state_dict = _state_dict_of(obj, path)
            byteorder = _zip_byteorder(zf, prefix)
            cache = {}

            def load(ref):
                if ref.key not in cache:
                    cache[ref.key] = _zip_storage(zf, f"{prefix}data/{ref.key}", ref.storage_type, byteorder, path)
                return cache[ref.key]

            return _materialize_all(state_dict, load, path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated zip archive: {e}") from None


def _zip_byteorder(zf, prefix):
    """``"little"`` or ``"big"``: how the archive's storages were written (files before torch 1.13: little)."""
    name = f"{prefix}byteorder"
    return zf.read(name).decode().strip() if name in zf.namelist() else "little"


def _zip_storage(zf, name, storage_type, byteorder, path):
    """One storage file of the archive as a flat array, read once."""
    try:
        data = zf.read(name)
    except KeyError:
        raise CheckpointError(f"{path}: storage {name} is missing from the archive") from None
    return _flat_storage(data, storage_type.dtype, byteorder, f"{path}: storage {name}")


def _flat_storage(data, dtype, byteorder, where):
    """Raw storage bytes as a flat native-endian array (a view when no byte swap is needed)."""
    if len(data) % dtype.itemsize:
        raise CheckpointError(f"{where}: {len(data)} bytes is not a whole number of {dtype} elements")
    stored = dtype.newbyteorder("<" if byteorder == "little" else ">")
    flat = np.frombuffer(data, dtype=stored)
    return flat if stored.isnative or dtype.itemsize == 1 else flat.astype(dtype)


def _read_torch_legacy(path):
    """The pre-1.6 stream: magic, protocol, sys info, the object, its storage keys, then each storage
    as an 8-byte element count followed by its raw bytes, in key order."""
    with open(path, "rb") as f:
        magic, _ = _unpickle(f, path)
        if magic != _LEGACY_MAGIC:
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither zip nor legacy format)")
        _unpickle(f, path)
        sys_info, _ = _unpickle(f, path)
        obj, storage_types = _unpickle(f, path)
        keys, _ = _unpickle(f, path)
        byteorder = "little" if not isinstance(sys_info, dict) or sys_info.get("little_endian", True) else "big"
        offsets = _legacy_storage_offsets(f, path, [str(k) for k in keys], storage_types, byteorder)
        state_dict = _state_dict_of(obj, path)
        cache = {}

        def load(ref):
            if ref.key not in cache:
                offset, count = offsets[ref.key]
                f.seek(offset)
                data = f.read(count * ref.storage_type.dtype.itemsize)
                cache[ref.key] = _flat_storage(data, ref.storage_type.dtype, byteorder, f"{path}: storage {ref.key}")
            return cache[ref.key]

        return _materialize_all(state_dict, load, path)


def _legacy_storage_offsets(f, path, keys, storage_types, byteorder):
    """Where each legacy storage's bytes start, and its element count, checked against the file size."""
    size = os.fstat(f.fileno()).st_size
    position, offsets = f.tell(), {}
    for key in keys:
        if key not in storage_types:
            raise CheckpointError(f"{path}: storage {key} is listed but no tensor uses it")
        f.seek(position)
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated: storage {key} starts past the end of the file")
        count = int.from_bytes(head, byteorder)
        position += 8
        offsets[key] = (position, count)
        position += count * storage_types[key].dtype.itemsize
        if position > size:
            raise CheckpointError(f"{path}: truncated: storage {key} ends at byte {position}, file has {size}")
    return offsets


def _state_dict_of(obj, path):
    """The ``{name: _TensorRef}`` inside what was unpickled: the object itself or its ``"state_dict"``."""
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    others = [str(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, _TensorRef))]
    if others:
        raise CheckpointError(f"{path}: state dict entries that are not named tensors: {', '.join(others[:20])}")
    return obj


def _materialize_all(state_dict, load_storage, path):
    """Every ``_TensorRef`` of a state dict as an array, with a progress bar over the tensors."""
    arrays = {}
    with progress.bar(f"reading {os.path.basename(path)}", len(state_dict), unit="tensor") as advance:
        for name, ref in state_dict.items():
            arrays[name] = _materialize(ref, load_storage, path, name)
            advance(1)
    return arrays


def _materialize(ref, load_storage, path, name):
    """A ``_TensorRef`` as a numpy array: its storage, offset, shape and strides applied, bf16 widened."""
    flat = load_storage(ref.storage)
    array = strided_view(flat, ref.offset, ref.shape, ref.stride, f"{path}: tensor {name!r}")
    if ref.storage.storage_type.name == "BFloat16Storage":
        return bf16_to_float32(array)
    return array
