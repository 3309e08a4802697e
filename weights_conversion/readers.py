"""Checkpoint files -> ``{name: numpy array}``, without PyTorch and without running code from the file.

Reads ``.safetensors`` and PyTorch's pickled formats (``.ckpt``, ``.pt``, ``.pth``, ``.bin``: the zip
archive of ``torch.save`` and the older non-zip "legacy" stream), and whole diffusers folders.

numpy has no bfloat16, so bf16 tensors come back as float32, exactly (a bf16 number is the top half of
a float32). float16 and float32 keep their dtype. Arrays may be read-only views of the file's bytes.

Example:

>>> sd = read_state_dict("v1-5-pruned-emaonly.safetensors")       # doctest: +SKIP
>>> sd["model.diffusion_model.input_blocks.0.0.weight"].shape       # doctest: +SKIP
(320, 4, 3, 3)
"""

import _compat_pickle
import collections
import errno
import json
import math
import os
import pickle
import zipfile

import numpy as np

from weights_conversion import progress
from weights_conversion.errors import CheckpointError, UnsafeCheckpointError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

SAFETENSORS_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?",
}

# torch.<Name>Storage -> the numpy dtype of its elements (bf16 is read as its raw 16 bits).
_TORCH_STORAGE_DTYPES = {
    "DoubleStorage": "f8", "FloatStorage": "f4", "HalfStorage": "f2", "BFloat16Storage": "u2",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?", "ComplexFloatStorage": "c8", "ComplexDoubleStorage": "c16",
}

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def bf16_to_float32(bits):
    """The raw 16 bits of bfloat16 numbers (uint16) as float32; exact, since bf16 is float32's top half."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def read_state_dict(path, lazy=False):
    """Every tensor of one checkpoint file, by name.

    With ``lazy``, a safetensors file's tensors are `LazyTensor`s, read when made into arrays (other
    file types are read whole all the same).

    A pickled ``{"state_dict": {...}, ...}`` (a PyTorch Lightning checkpoint, as the original Stable
    Diffusion ``.ckpt`` files are) gives its inner ``state_dict``.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: a truncated or corrupt file, or an unknown file type.
        UnsafeCheckpointError: a pickle that asks for anything but tensors; nothing of it was run.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(errno.ENOENT, "checkpoint file not found", path)
    if path.endswith(".safetensors"):
        return read_safetensors_lazily(path) if lazy else read_safetensors(path)
    if path.endswith(PICKLE_SUFFIXES):
        return read_torch_pickle(path)
    raise CheckpointError(f"{path}: unknown checkpoint type; expected .safetensors or one of {PICKLE_SUFFIXES}")


# ---------------------------------------------------------------------------------------------- safetensors


def _safetensors_header_json(path):
    """The parsed JSON header of a safetensors file (``__metadata__`` included) and where the data starts.

    The format is an 8-byte little-endian header length, that many bytes of JSON, then the raw data.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated: {size} bytes, too short for a safetensors header")
        length = int.from_bytes(head, "little")
        if 8 + length > size:
            raise CheckpointError(f"{path}: truncated: header says {length} bytes of JSON, file has {size - 8}")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: not a JSON object")
    return header, 8 + length


def read_safetensors_header(path):
    """The tensor table of a safetensors file and where its data starts, checked against the file's size."""
    header, data_start = _safetensors_header_json(path)
    header.pop("__metadata__", None)
    for name, entry in header.items():
        _check_safetensors_entry(path, name, entry)
    data_size, size = max((entry["data_offsets"][1] for entry in header.values()), default=0), os.path.getsize(path)
    if data_start + data_size > size:
        raise CheckpointError(
            f"{path}: truncated: header says {data_size} bytes of data, file has {size - data_start}"
        )
    return header, data_start


def read_safetensors_metadata(path):
    """The ``__metadata__`` strings of a safetensors file's header (``{}`` when it has none)."""
    metadata = _safetensors_header_json(path)[0].get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: __metadata__ is not an object")
    return metadata


def _check_safetensors_entry(path, name, entry):
    """One header entry is well formed: known dtype, and offsets spanning exactly its shape's bytes."""
    try:
        dtype = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]])
        begin, end = (int(x) for x in entry["data_offsets"])
        nbytes = math.prod(int(n) for n in entry["shape"]) * dtype.itemsize
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: corrupt or unsupported safetensors entry {name!r}: {entry}") from None
    if not 0 <= begin <= end or end - begin != nbytes:
        raise CheckpointError(f"{path}: corrupt safetensors entry {name!r}: offsets {begin}..{end} for {nbytes} bytes")


def read_safetensors(path):
    """Every tensor of a safetensors file, read one by one (bf16 as float32).

    Each tensor is read straight into its own array (no memory map), so the process holds one copy of
    the weights, not a copy plus the mapped file's pages.
    """
    header, data_start = read_safetensors_header(path)
    arrays = {}
    total = sum(entry["data_offsets"][1] - entry["data_offsets"][0] for entry in header.values())
    with open(path, "rb") as raw, progress.bar(f"reading {os.path.basename(path)}", total) as advance:
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            array = _read_raw(raw, data_start + begin, entry["shape"], SAFETENSORS_DTYPES[entry["dtype"]])
            array = bf16_to_float32(array) if entry["dtype"] == "BF16" else array
            arrays[name] = array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))
            advance(end - begin)
    return arrays


class LazyTensor:
    """One tensor of a safetensors file, read from the file each time it is made into an array.

    Its shape and dtype come from the header, so weights can be checked against a model before any is
    read, and assigned one at a time: the process never holds a second copy of them.

    Example:
    >>> import numpy as np, os, tempfile
    >>> from safetensors.numpy import save_file
    >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
    >>> save_file({"w": np.arange(6, dtype="float32").reshape(2, 3)}, path)
    >>> tensor = read_safetensors_lazily(path)["w"]
    >>> tensor.shape, np.asarray(tensor)[1, 2]
    ((2, 3), np.float32(5.0))
    """

    def __init__(self, path, offset, shape, code):
        self.path, self.offset, self.code = path, offset, code
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype("float32" if code == "BF16" else SAFETENSORS_DTYPES[code]).newbyteorder("=")

    def __array__(self, dtype=None, copy=None):
        with open(self.path, "rb") as raw:
            array = _read_raw(raw, self.offset, self.shape, SAFETENSORS_DTYPES[self.code])
        array = bf16_to_float32(array) if self.code == "BF16" else array
        array = array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))
        return array if dtype is None else array.astype(dtype, copy=False)

    def __repr__(self):
        return f"LazyTensor({os.path.basename(self.path)!r}, shape={self.shape}, dtype={self.dtype})"


def read_safetensors_lazily(path):
    """Every tensor of a safetensors file as a `LazyTensor`; the header is checked now, against the file's size."""
    header, data_start = read_safetensors_header(path)
    return {name: LazyTensor(path, data_start + entry["data_offsets"][0], entry["shape"], entry["dtype"])
            for name, entry in header.items()}


def _read_raw(f, offset, shape, dtype):
    """An array of ``shape`` read from byte ``offset`` of an open file."""
    f.seek(offset)
    count = math.prod(shape)
    flat = np.fromfile(f, dtype=dtype, count=count) if count else np.empty(0, dtype)
    if flat.size != count:
        raise CheckpointError(f"{f.name}: truncated: a tensor at byte {offset} ends past the end of the file")
    return flat.reshape(shape)


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
} | {
    "argparse.Namespace",
    # AUTOMATIC1111 embeddings saved with torch <= 1.11 pickle their ``string_to_param`` as a whole
    # ParameterDict module; as a placeholder its pickled state (``_parameters``) stays readable.
    "torch.nn.modules.container.ParameterDict",
}


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
    return _read_torch(path, lambda obj, load: _materialize_all(_state_dict_of(obj, path), load, path))


def read_torch_pickle_tree(path):
    """The whole object a ``torch.save`` file holds, read with the restricted unpickler, each tensor as a
    numpy array: nested dicts, lists and plain values as they were pickled, for files that are not a flat
    state dict (AUTOMATIC1111's textual-inversion ``.pt``). Placeholders of data-only classes keep their
    pickled state in ``.state``.

    Example:

    >>> read_torch_pickle_tree("embedding.pt")["string_to_param"]["*"].shape   # doctest: +SKIP
    (2, 768)
    """
    return _read_torch(path, lambda obj, load: _materialize_tree(obj, load, path))


def _read_torch(path, finish):
    """Unpickles a ``torch.save`` file and returns ``finish(object, load_storage)``."""
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    return _read_torch_zip(path, finish) if is_zip else _read_torch_legacy(path, finish)


def _read_torch_zip(path, finish):
    """The zip format: ``<archive>/data.pkl`` plus one ``<archive>/data/<key>`` file per storage."""
    try:
        with zipfile.ZipFile(path) as zf:
            pickles = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise CheckpointError(f"{path}: not a PyTorch zip checkpoint (no single <archive>/data.pkl)")
            prefix = pickles[0][: -len("data.pkl")]
            with zf.open(pickles[0]) as f:
                obj, _ = _unpickle(f, path)
            byteorder = _zip_byteorder(zf, prefix)
            cache = {}

            def load(ref):
                if ref.key not in cache:
                    cache[ref.key] = _zip_storage(zf, f"{prefix}data/{ref.key}", ref.storage_type, byteorder, path)
                return cache[ref.key]

            return finish(obj, load)
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


def _read_torch_legacy(path, finish):
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
        cache = {}

        def load(ref):
            if ref.key not in cache:
                offset, count = offsets[ref.key]
                f.seek(offset)
                data = f.read(count * ref.storage_type.dtype.itemsize)
                cache[ref.key] = _flat_storage(data, ref.storage_type.dtype, byteorder, f"{path}: storage {ref.key}")
            return cache[ref.key]

        return finish(obj, load)


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


def _materialize_tree(obj, load_storage, path, name="object"):
    """``obj`` with every ``_TensorRef`` inside dicts, lists, tuples and placeholders' state read as an array."""
    if isinstance(obj, _TensorRef):
        return _materialize(obj, load_storage, path, name)
    if isinstance(obj, dict):
        return type(obj)((k, _materialize_tree(v, load_storage, path, f"{name}[{k!r}]")) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize_tree(v, load_storage, path, f"{name}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, _Inert) and hasattr(obj, "state"):
        obj.state = _materialize_tree(obj.state, load_storage, path, f"{name}.state")
    return obj


def _materialize(ref, load_storage, path, name):
    """A ``_TensorRef`` as a numpy array: its storage, offset, shape and strides applied, bf16 widened."""
    flat = load_storage(ref.storage)
    array = strided_view(flat, ref.offset, ref.shape, ref.stride, f"{path}: tensor {name!r}")
    if ref.storage.storage_type.name == "BFloat16Storage":
        return bf16_to_float32(array)
    return array


def contiguous_strides(shape):
    """The element strides of a C-contiguous array of ``shape``."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def strided_view(flat, offset, shape, stride, where):
    """``flat[offset:]`` seen with element ``stride``s as ``shape``: a view when contiguous, else a copy.

    Bounds are checked first, since ``as_strided`` would otherwise read memory past the storage.
    """
    if math.prod(shape) == 0:
        return np.zeros(shape, flat.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
    if offset < 0 or any(s < 0 for s in stride) or last >= flat.size:
        raise CheckpointError(
            f"{where}: shape {shape}, strides {stride} at offset {offset} reach past its {flat.size}-element storage"
        )
    if all(s == c for n, s, c in zip(shape, stride, contiguous_strides(shape), strict=True) if n > 1):
        return flat[offset : offset + math.prod(shape)].reshape(shape)
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=shape, strides=[s * flat.itemsize for s in stride], writeable=False
    )
    return view.copy()


# ----------------------------------------------------------------------------------------- diffusers folders

DIFFUSERS_COMPONENTS = ("unet", "vae", "text_encoder")
_WEIGHT_BASENAMES = ("diffusion_pytorch_model", "model", "pytorch_model")


def weight_file_candidates():
    """File names a component folder may keep its weights in, best first: full-precision safetensors,
    then full-precision ``.bin``, then the fp16 variants; each as one file or as a sharded index."""
    names = []
    for variant in ("", ".fp16"):
        for ext in ("safetensors", "bin"):
            for base in _WEIGHT_BASENAMES:
                single = f"{base}{variant}.{ext}"
                names += [single, f"{single}.index.json"]
                if variant:
                    names.append(f"{base}.{ext}.index{variant}.json")
    return names


def read_component_folder(folder):
    """The state dict of one diffusers component folder (``unet/``, ``vae/``, ``text_encoder/``)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(errno.ENOENT, "diffusers component folder not found", folder)
    for name in weight_file_candidates():
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return read_sharded(path) if name.endswith(".json") else read_state_dict(path)
    raise FileNotFoundError(
        errno.ENOENT, "no weights file in folder (looked for diffusion_pytorch_model/model[.fp16].safetensors or .bin)",
        folder,
    )


def read_sharded(index_path):
    """All shards named by a ``*.index.json`` weight map, each read once, merged into one state dict."""
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: corrupt shard index: {e}") from None
    folder, merged = os.path.dirname(index_path), {}
    for shard in sorted(set(weight_map.values())):
        merged.update(read_state_dict(os.path.join(folder, shard)))
    missing = sorted(set(weight_map) - set(merged))
    if missing:
        raise CheckpointError(f"{index_path}: tensors listed in the index but in no shard: {', '.join(missing[:20])}")
    return merged


def read_diffusers_folder(path):
    """The weights of a diffusers Stable Diffusion folder: ``{"unet": sd, "vae": sd, "text_encoder": sd}``.

    Tokenizer and scheduler files are not read here.

    Raises:
        FileNotFoundError: the folder, a component subfolder, or its weights file is missing.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(errno.ENOENT, "diffusers folder not found", path)
    return {name: read_component_folder(os.path.join(path, name)) for name in DIFFUSERS_COMPONENTS}
