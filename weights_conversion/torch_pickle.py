"""PyTorch's pickled checkpoints (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) read without PyTorch and without
running code from the file: the zip archive of ``torch.save`` and the older non-zip "legacy" stream.

A pickle is a program, and these files come from strangers, so it runs on a restricted unpickler (see
`_RestrictedUnpickler`) that can only rebuild tensors, and nothing it reads is trusted before it is
checked: a length is read only as far as the bytes that are there, a zip member that declares more
bytes than its whole archive is refused before it is decompressed, every shape, stride and offset is
bounds-checked against its storage, and the new arrays a file makes (strided copies, bf16 widened to
float32) may not exceed twice the file's size. Anything malformed ends in `CheckpointError` naming the
file, and the tensor where there is one.

Example:

>>> import os, tempfile
>>> import torch  # only to write the example's file
>>> path = os.path.join(tempfile.mkdtemp(), "tiny.ckpt")
>>> torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}}, path)
>>> weight = read_torch_pickle(path)["model.diffusion_model.input_blocks.0.0.weight"]  # without PyTorch
>>> type(weight).__name__, weight.shape, weight.dtype.name
('ndarray', (8, 4, 3, 3), 'float32')
>>> sd = read_torch_pickle("v1-5-pruned-emaonly.ckpt")             # doctest: +SKIP
"""

import _compat_pickle
import collections
import io
import math
import os
import pickle
import reprlib
import struct
import zipfile
import zlib

import numpy as np

from weights_conversion import progress
from weights_conversion.arrays import bf16_to_float32, check_layout, is_contiguous, strided_view
from weights_conversion.errors import CheckpointError, UnsafeCheckpointError

# torch.<Name>Storage -> the numpy dtype of its elements (bf16 is read as its raw 16 bits).
_TORCH_STORAGE_DTYPES = {
    "DoubleStorage": "f8", "FloatStorage": "f4", "HalfStorage": "f2", "BFloat16Storage": "u2",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?", "ComplexFloatStorage": "c8", "ComplexDoubleStorage": "c16",
}

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# A real checkpoint names a handful of classes we do not import (Lightning callbacks, omegaconf); a file
# naming thousands would only be making the reader build classes.
_MAX_PLACEHOLDER_CLASSES = 256

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 80


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
    """A tensor as ``_rebuild_tensor_v2`` describes it: a strided view of a storage, its numbers as the
    pickle gave them (checked once the tensor's name is known, so that errors can name it)."""

    def __init__(self, storage, offset, shape, stride):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride


class _TorchClass:
    """Stands for ``torch.Tensor`` / ``torch.nn.Parameter`` as the ``new_type`` of ``_rebuild_from_type_v2``."""

    def __init__(self, name):
        self.name = name


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Our stand-in for ``torch._utils._rebuild_tensor_v2``: records the view, reads nothing yet."""
    if not isinstance(storage, _StorageRef):
        raise CheckpointError(f"a tensor's storage is a {type(storage).__name__}, not a storage")
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    """Our stand-in for ``torch._utils._rebuild_parameter(_with_state)``: a parameter is its tensor."""
    return data


def _rebuild_from_type(func, new_type, args, state):
    """Our stand-in for ``torch._tensor._rebuild_from_type_v2``: only for plain tensors and parameters."""
    if func not in (_rebuild_tensor, _rebuild_parameter) or not isinstance(new_type, _TorchClass):
        name = getattr(new_type, "name", new_type)
        raise UnsafeCheckpointError(f"refused tensor subclass rebuild {_short.repr(name)}")
    return func(*args)


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as protocol-2 pickles use it, to carry bytes as latin-1 text."""
    if encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(f"refused _codecs.encode with encoding {_short.repr(encoding)}")
    return text.encode("latin1")


def _check_key(key):
    """A dict key or set member that hashes without deep recursion: anything but a tuple or frozenset, or
    one of those holding no tuple or frozenset.

    Python hashes nested tuples recursively in C with no depth limit: a key of a million nested tuples,
    a 1 MB pickle, overflows the C stack and kills the interpreter. Checkpoints key by strings and ints.
    """
    if isinstance(key, (tuple, frozenset)) and any(isinstance(item, (tuple, frozenset)) for item in key):
        raise CheckpointError("a dict key or set member nested more than one tuple deep")
    return key


def _checked_set(items=()):
    """``builtins.set``, with its members checked before they are hashed."""
    return set(_check_key(item) for item in items)


def _checked_frozenset(items=()):
    """``builtins.frozenset``, with its members checked before they are hashed."""
    return frozenset(_check_key(item) for item in items)


def _checked_ordered_dict(items=()):
    """``collections.OrderedDict`` called with its items (pickles usually add them later, with SETITEMS)."""
    return collections.OrderedDict((_check_key(key), value) for key, value in items)


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


def _reconstruct_inert(cls, base, state=None):
    """``copyreg._reconstructor`` (protocol 0/1 objects), allowed only to make a placeholder."""
    if not (isinstance(cls, type) and issubclass(cls, _Inert)):
        raise UnsafeCheckpointError(f"refused copyreg._reconstructor of {_short.repr(cls)}")
    return cls()


_SAFE_GLOBALS = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type,
    "torch.Tensor": _TorchClass("torch.Tensor"),
    "torch.nn.parameter.Parameter": _TorchClass("torch.nn.parameter.Parameter"),
    "torch.Size": tuple,
    "collections.OrderedDict": _checked_ordered_dict,
    "builtins.set": _checked_set,
    "builtins.frozenset": _checked_frozenset,
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


class _RestrictedUnpickler(pickle._Unpickler):
    """A pickle reader that can only rebuild tensors; it never imports or calls anything named in the file.

    ``find_class`` answers every global the pickle names from a fixed table of our own functions
    (tensor rebuilders that build numpy views, storage dtypes, plain containers). Any other global is
    refused with ``UnsafeCheckpointError`` before anything runs: ``os.system``, ``builtins.eval`` and
    every class with its own ``__reduce__`` are never looked up, so they cannot execute. ``BUILD``
    (setting an object's attributes) is allowed only on dicts and placeholders, so a pickle cannot
    alter our own functions and records either.

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

    It is the standard library's pure-Python unpickler (``pickle._Unpickler``), not the C one, because the
    C one believes what a pickle says before checking it: a memo index of 2**31 in a 9-byte pickle makes
    it allocate and clear 32 GiB, a declared length makes it allocate that many bytes before reading
    them, and it hashes dict keys in C with no depth limit (a 1 MB pickle of nested tuples crashes the
    interpreter). In Python the memo is a dict, every read is of bytes that are there (`_BoundedFile`,
    or a bytes buffer), and the opcodes that hash or allocate are replaced below by checked ones. It
    reads a 2,500-tensor state dict's pickle in about 80 ms, against 20 ms in C.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, path):
        super().__init__(file)
        self.path = path
        self.storages = {}
        self.placeholders = {}

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
            return self._placeholder_class(qualified)
        raise UnsafeCheckpointError(
            f"{self.path}: refused global {_short.repr(qualified)}: a weights file may only rebuild tensors; "
            "nothing from the file was executed"
        )

    def _placeholder_class(self, qualified_name):
        """One placeholder class per global name and file: a fresh subclass of ``_Inert``, never the real thing."""
        if qualified_name not in self.placeholders:
            if len(self.placeholders) >= _MAX_PLACEHOLDER_CLASSES:
                raise CheckpointError(f"names more than {_MAX_PLACEHOLDER_CLASSES} classes beside its tensors")
            self.placeholders[qualified_name] = type(qualified_name, (_Inert,), {"__module__": __name__})
        return self.placeholders[qualified_name]

    def persistent_load(self, pid):
        """A storage reference ``("storage", type, key, location, numel[, view])`` -> ``_StorageRef``."""
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(f"unsupported persistent id {_short.repr(pid)}")
        storage_type, key = pid[1], pid[2]
        if type(key) is not str:
            raise CheckpointError(f"a storage key is a {type(key).__name__}, not a string")
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"storage {_short.repr(key)} has type {type(storage_type).__name__}")
        self.storages[key] = storage_type
        view = pid[5] if len(pid) > 5 else None
        if view is None:
            return _StorageRef(key, storage_type)
        _view_key, offset, _size = view
        if type(offset) is not int or offset < 0:
            raise CheckpointError(f"storage {_short.repr(key)}: a view's offset is not a non-negative integer")
        return _StorageRef(key, storage_type, offset)

    # The opcodes that hash what the pickle built, or allocate what it declares, check it first.

    def _load_setitem(self):
        _check_key(self.stack[-2])
        pickle._Unpickler.load_setitem(self)

    def _load_marked(self, load, step):
        """``load`` after checking the keys (``step`` 2) or members (``step`` 1) pushed since the last MARK."""
        for key in self.stack[::step]:
            _check_key(key)
        load(self)

    def _load_bytearray8(self):
        (size,) = struct.unpack("<Q", self.read(8))
        data = self.read(size)  # the plain opcode allocates ``size`` bytes before reading any
        if len(data) < size:
            raise pickle.UnpicklingError("pickle data was truncated")
        self.append(bytearray(data))

    def _load_build(self):
        if not isinstance(self.stack[-2], (_Inert, dict)):
            raise UnsafeCheckpointError(f"refused to set the state of a {type(self.stack[-2]).__name__}")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.SETITEM[0]] = _load_setitem
    dispatch[pickle.SETITEMS[0]] = lambda self: self._load_marked(pickle._Unpickler.load_setitems, 2)
    dispatch[pickle.DICT[0]] = lambda self: self._load_marked(pickle._Unpickler.load_dict, 2)
    dispatch[pickle.ADDITEMS[0]] = lambda self: self._load_marked(pickle._Unpickler.load_additems, 1)
    dispatch[pickle.FROZENSET[0]] = lambda self: self._load_marked(pickle._Unpickler.load_frozenset, 1)
    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8
    dispatch[pickle.BUILD[0]] = _load_build


class _BoundedFile:
    """An open file's ``read`` and ``readline`` that never ask for more bytes than are left in it.

    Python's buffered reader allocates what a read asks for before it reads; a pickle that declares a
    length of terabytes would otherwise make it try.
    """

    def __init__(self, f):
        self.f = f
        self.size = os.fstat(f.fileno()).st_size

    def _left(self, n):
        left = max(self.size - self.f.tell(), 0)
        return left if n is None or n < 0 else min(n, left)

    def read(self, n=-1):
        return self.f.read(self._left(n))

    def readline(self, limit=-1):
        return self.f.readline(self._left(limit))


_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, LookupError,
                  ArithmeticError, struct.error, RecursionError, MemoryError)


def _unpickle(file, path):
    """One restricted ``pickle.load``; corrupt or truncated streams become ``CheckpointError``."""
    unpickler = _RestrictedUnpickler(file, path)
    try:
        return unpickler.load(), unpickler.storages
    except CheckpointError as e:
        if str(e).startswith(path):
            raise
        raise type(e)(f"{path}: {e}") from None
    except _PICKLE_ERRORS as e:
        raise CheckpointError(f"{path}: corrupt or truncated pickle: {type(e).__name__}: {str(e)[:200]}") from None


# -------------------------------------------------------------------------------------- torch.save formats


def read_torch_pickle(path):
    """Every tensor of a ``torch.save`` file, zip or legacy, read with the restricted unpickler."""
    return _read_torch(path, lambda obj, load: _materialize_all(_state_dict_of(obj, path), load, path))


def read_torch_pickle_tree(path):
    """The whole object a ``torch.save`` file holds, read with the restricted unpickler, each tensor as a
    numpy array: nested dicts, lists and plain values as they were pickled, for files that are not a flat
    state dict (AUTOMATIC1111's textual-inversion ``.pt``). Placeholders of data-only classes keep their
    pickled state in ``.state``.

    The same checks as `read_torch_pickle` apply to every tensor (layout, the twice-the-file allowance
    for new arrays); the object may nest at most 32 containers deep, and may not hold anything but plain
    data, containers, placeholders and tensors (no storage outside a tensor, no class or function).

    Example:

    >>> import os, tempfile
    >>> import torch  # only to write the example's file
    >>> path = os.path.join(tempfile.mkdtemp(), "embedding.pt")
    >>> torch.save({"string_to_param": {"*": torch.zeros(2, 768)}, "name": "my-style", "step": 1000}, path)
    >>> tree = read_torch_pickle_tree(path)
    >>> tree["string_to_param"]["*"].shape, tree["name"], tree["step"]
    ((2, 768), 'my-style', 1000)
    """
    return _read_torch(path, lambda obj, load: _TreeMaterializer(load, path).walk(obj, "object", 0))


def _read_torch(path, finish):
    """Unpickles a ``torch.save`` file, zip or legacy, and returns ``finish(object, load_storage)``."""
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    return _read_torch_zip(path, finish) if is_zip else _read_torch_legacy(path, finish)


# What zipfile raises for a damaged archive: bad structures, truncated or corrupt compressed data, an
# unknown compression method (NotImplementedError), an encrypted member (RuntimeError), a member said to
# start before the file does (OSError from seek).
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, NotImplementedError, RuntimeError,
               ValueError, struct.error, OSError)


def _read_torch_zip(path, finish):
    """The zip format: ``<archive>/data.pkl`` plus one ``<archive>/data/<key>`` file per storage."""
    try:
        with zipfile.ZipFile(path) as zf:
            read_member = _member_reader(zf, path)
            pickles = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise CheckpointError(f"{path}: not a PyTorch zip checkpoint (no single <archive>/data.pkl)")
            prefix = pickles[0][: -len("data.pkl")]
            obj, _ = _unpickle(io.BytesIO(read_member(pickles[0], path)), path)
            byteorder = _zip_byteorder(zf, read_member, prefix, path)
            cache = {}

            def load(ref, where):
                if ref.key not in cache:
                    data = read_member(f"{prefix}data/{ref.key}", where)
                    cache[ref.key] = _flat_storage(data, ref.storage_type.dtype, byteorder, where)
                return cache[ref.key]

            return finish(obj, load)
    except CheckpointError:
        raise
    except _ZIP_ERRORS as e:
        raise CheckpointError(f"{path}: corrupt or truncated zip archive: {type(e).__name__}: {e}") from None


def _member_reader(zf, path):
    """``read(name, where)``: a member's bytes, refused before decompression if it declares more than is
    left of the archive's size (the members read from one archive together never exceed it: a torch
    archive stores them uncompressed, so a member declaring gigabytes in a small file is a zip bomb)."""
    left = os.path.getsize(path)

    def read(name, where):
        nonlocal left
        try:
            info = zf.getinfo(name)
        except KeyError:
            raise CheckpointError(f"{where}: {name} is missing from the archive") from None
        if info.file_size > left:
            raise CheckpointError(f"{where}: {name} declares {info.file_size} bytes, more than the file can hold "
                                  f"({os.path.getsize(path)} bytes in all)")
        left -= info.file_size
        with zf.open(info) as member:
            data = member.read(info.file_size)  # one bounded read: zipfile never inflates past this length
        if len(data) != info.file_size:
            raise CheckpointError(f"{where}: {name} is truncated")
        return data

    return read


def _zip_byteorder(zf, read_member, prefix, path):
    """``"little"`` or ``"big"``: how the archive's storages were written (files before torch 1.13: little)."""
    name = f"{prefix}byteorder"
    if name not in zf.namelist():
        return "little"
    byteorder = read_member(name, path).decode("ascii", "replace").strip()
    if byteorder not in ("little", "big"):
        raise CheckpointError(f"{path}: {name} says {_short.repr(byteorder)}, not little or big")
    return byteorder


def _flat_storage(data, dtype, byteorder, where):
    """Raw storage bytes as a flat native-endian array (a view when no byte swap is needed)."""
    if len(data) % dtype.itemsize:
        raise CheckpointError(f"{where}: its storage's {len(data)} bytes are not a whole number of {dtype} elements")
    stored = dtype.newbyteorder("<" if byteorder == "little" else ">")
    flat = np.frombuffer(data, dtype=stored)
    return flat if stored.isnative or dtype.itemsize == 1 else flat.astype(dtype)


def _read_torch_legacy(path, finish):
    """The pre-1.6 stream: magic, protocol, sys info, the object, its storage keys, then each storage
    as an 8-byte element count followed by its raw bytes, in key order."""
    with open(path, "rb") as raw:
        f = _BoundedFile(raw)
        magic, _ = _unpickle(f, path)
        if type(magic) is not int or magic != _LEGACY_MAGIC:
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither zip nor legacy format)")
        _unpickle(f, path)
        sys_info, _ = _unpickle(f, path)
        obj, storage_types = _unpickle(f, path)
        keys, _ = _unpickle(f, path)
        byteorder = "little" if not isinstance(sys_info, dict) or sys_info.get("little_endian", True) else "big"
        offsets = _legacy_storage_offsets(raw, path, _legacy_keys(keys, path), storage_types, byteorder)
        cache = {}

        def load(ref, where):
            if ref.key not in offsets:
                raise CheckpointError(f"{where}: its storage {_short.repr(ref.key)} is not in the file")
            if ref.key not in cache:
                offset, count = offsets[ref.key]
                raw.seek(offset)
                data = raw.read(count * ref.storage_type.dtype.itemsize)
                cache[ref.key] = _flat_storage(data, ref.storage_type.dtype, byteorder, where)
            return cache[ref.key]

        return finish(obj, load)


def _legacy_keys(keys, path):
    """The storage keys listed after a legacy file's object (torch writes them as strings)."""
    if not isinstance(keys, (list, tuple)) or not all(type(k) is str for k in keys):
        raise CheckpointError(f"{path}: corrupt legacy checkpoint: the storage keys are not a list of strings")
    return list(keys)


def _legacy_storage_offsets(f, path, keys, storage_types, byteorder):
    """Where each legacy storage's bytes start, and its element count, checked against the file size."""
    size = os.fstat(f.fileno()).st_size
    position, offsets = f.tell(), {}
    for key in keys:
        if key not in storage_types:
            raise CheckpointError(f"{path}: storage {_short.repr(key)} is listed but no tensor uses it")
        f.seek(position)
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated: storage {_short.repr(key)} starts past the end of the file")
        count = int.from_bytes(head, byteorder)
        position += 8
        offsets[key] = (position, count)
        position += count * storage_types[key].dtype.itemsize
        if position > size:
            raise CheckpointError(f"{path}: truncated: storage {_short.repr(key)} ends at byte {position}, "
                                  f"file has {size}")
    return offsets


def _state_dict_of(obj, path):
    """The ``{name: _TensorRef}`` inside what was unpickled: the object itself or its ``"state_dict"``."""
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    others = [_short.repr(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, _TensorRef))]
    if others:
        raise CheckpointError(f"{path}: state dict entries that are not named tensors: {', '.join(others[:20])}")
    return obj


def _materialize_all(state_dict, load_storage, path):
    """Every ``_TensorRef`` of a state dict as an array, with a progress bar over the tensors.

    Storages are read once each and never exceed the file. Contiguous tensors are views of them; the
    new arrays (strided copies, bf16 widened to float32) may take at most twice the file's size, which
    is what a real checkpoint needs at most (all of it bf16), so no tensor can claim more memory than
    its file could justify, however it reuses one storage.
    """
    arrays, allowance = {}, _Allowance(path)
    with progress.bar(f"reading {os.path.basename(path)}", len(state_dict), unit="tensor") as advance:
        for name, ref in state_dict.items():
            arrays[name] = _materialize(ref, load_storage, f"{path}: tensor {_short.repr(name)}", allowance)
            advance(1)
    return arrays


class _Allowance:
    """The new bytes a file's tensors may still make: twice the file's size, for all of them together."""

    def __init__(self, path):
        self.left = 2 * os.path.getsize(path)

    def take(self, cost, shape, where):
        if cost > self.left:
            raise CheckpointError(f"{where}: shape {shape} would make {cost} new bytes, beyond twice the "
                                  "file's size in all")
        self.left -= cost


def _materialize(ref, load_storage, where, allowance):
    """One ``_TensorRef`` as a numpy array, its layout checked against its storage and its cost against
    ``allowance``: its storage, offset, shape and strides applied, bf16 widened to float32."""
    shape, stride = check_layout(ref.shape, ref.stride, ref.offset, where)
    storage_type = ref.storage.storage_type
    allowance.take(_new_bytes(storage_type, shape, stride), shape, where)
    flat = load_storage(ref.storage, where)
    array = strided_view(flat, ref.storage.offset + ref.offset, shape, stride, where)
    return bf16_to_float32(array) if storage_type.name == "BFloat16Storage" else array


# The types a whole-object read hands over as they are.
_PLAIN_TYPES = (type(None), bool, int, float, complex, str, bytes, bytearray)
_MAX_TREE_DEPTH = 32


class _TreeMaterializer:
    """A whole unpickled object with its tensors as arrays (`read_torch_pickle_tree`).

    Each container is rebuilt once, however often the pickle refers to it (its memo can make a DAG
    whose paths are exponentially many), and a container that holds itself is refused, as is nesting
    deeper than ``_MAX_TREE_DEPTH``: the walk never recurses further than that.
    """

    def __init__(self, load_storage, path):
        self.load_storage, self.path = load_storage, path
        self.allowance = _Allowance(path)
        self.done, self.active = {}, set()

    def walk(self, obj, name, depth):
        if isinstance(obj, _PLAIN_TYPES):
            return obj
        key = id(obj)
        if key in self.done:
            return self.done[key]
        where = f"{self.path}: {name}"
        if key in self.active:
            raise CheckpointError(f"{where}: a container that holds itself")
        if depth > _MAX_TREE_DEPTH:
            raise CheckpointError(f"{where}: nested more than {_MAX_TREE_DEPTH} containers deep")
        self.active.add(key)
        result = self._rebuild(obj, name, depth + 1, where)
        self.active.discard(key)
        self.done[key] = result
        return result

    def _rebuild(self, obj, name, depth, where):
        if isinstance(obj, _TensorRef):
            return _materialize(obj, self.load_storage, f"{self.path}: tensor {name}", self.allowance)
        if isinstance(obj, dict):  # dict or OrderedDict: the only mappings the unpickler makes
            return type(obj)((self._key(k, where), self.walk(v, f"{name}[{_short.repr(k)}]", depth))
                             for k, v in obj.items())
        if isinstance(obj, (set, frozenset)):
            return type(obj)(self._key(k, where) for k in obj)
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.walk(v, f"{name}[{i}]", depth) for i, v in enumerate(obj))
        if isinstance(obj, _Inert):
            for attribute, value in list(vars(obj).items()):
                setattr(obj, attribute, self.walk(value, f"{name}.{attribute}", depth))
            return obj
        raise CheckpointError(f"{where}: holds a {type(obj).__name__} outside a tensor, where data was expected")

    @staticmethod
    def _key(key, where):
        """A dict key or set member, which must be plain data (or a tuple of it: `_check_key` keeps it flat)."""
        if isinstance(key, _PLAIN_TYPES) or (isinstance(key, (tuple, frozenset))
                                             and all(isinstance(k, _PLAIN_TYPES) for k in key)):
            return key
        raise CheckpointError(f"{where}: a dict key or set member is a {type(key).__name__}, not plain data")


def _new_bytes(storage_type, shape, stride):
    """The bytes a tensor's array takes beyond its storage: none for a contiguous view."""
    count = math.prod(shape)
    if storage_type.name == "BFloat16Storage":
        return count * 4
    return 0 if is_contiguous(shape, stride) else count * storage_type.dtype.itemsize
