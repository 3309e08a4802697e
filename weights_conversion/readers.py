"""Checkpoint files -> ``{name: numpy array}``, without PyTorch and without running code from the file.

Reads ``.safetensors`` and PyTorch's pickled formats (``.ckpt``, ``.pt``, ``.pth``, ``.bin``: the zip
archive of ``torch.save`` and the older non-zip "legacy" stream), and whole diffusers folders.

numpy has no bfloat16, so bf16 tensors come back as float32, exactly (a bf16 number is the top half of
a float32). float16 and float32 keep their dtype. Arrays may be read-only views of the file's bytes.

Example:

>>> import os, tempfile
>>> from weights_conversion import convert_source, export
>>> from kerasdiffusion.sources import BUILTIN_MODELS  # the built-in model: a converted folder, plain files
>>> shapes_model = BUILTIN_MODELS["kerasdiffusion/shapes"]
>>> state_dicts = export.torch_state_dicts(convert_source(shapes_model).weights, conv_projections=True)
>>> checkpoint = export.save_single_file(os.path.join(tempfile.mkdtemp(), "shapes.safetensors"), state_dicts)
>>> sd = read_state_dict(checkpoint)
>>> sd["model.diffusion_model.input_blocks.0.0.weight"].shape       # (320, 4, 3, 3) for SD 1.5
(64, 4, 3, 3)
>>> sd = read_state_dict("v1-5-pruned-emaonly.safetensors")       # doctest: +SKIP
"""

import errno
import json
import math
import mmap
import os

import numpy as np
from safetensors import SafetensorError, safe_open

from weights_conversion import progress
from weights_conversion.arrays import bf16_to_float32
from weights_conversion.errors import CheckpointError
from weights_conversion.torch_pickle import read_torch_pickle, read_torch_pickle_tree  # noqa: F401 (re-exported)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# A tensor stored at a multiple of this many bytes from the start of its file can be used where it is mapped
# (`LazyTensor.mapped`): TensorFlow takes no buffer that is not 64-byte aligned. Our writer puts them there.
ALIGNMENT = 64

SAFETENSORS_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?",
}


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


def read_safetensors(path):
    """Every tensor of a safetensors file, by name (bf16 as float32), read one by one by the safetensors library.

    The library's parser decides what a valid file is: it is the format's reference, and fuzzed
    upstream. It refuses a header that is not the format's JSON (wrong types, negative or string
    sizes, deep nesting), tensors whose byte ranges overlap, leave gaps or do not match their shapes,
    and a file that is not exactly its header plus its data. It then reads each tensor with ``pread``
    into its own array (``backend="pread"``), not through a memory map, so the process holds one copy
    of the weights, not a copy plus the mapped file's pages (which doubled the peak memory of a
    conversion: 7.98 GiB against 4.14 for SD 1.5).

    numpy has no bfloat16, so the library cannot hand bf16 tensors over; their bytes are read here, at
    the offsets the library validated, and widened to float32.
    """
    with _open_safetensors(path) as f:
        layout = _safetensors_layout(f, path)
        arrays = {}
        total = sum(nbytes for *_, nbytes in layout)
        with open(path, "rb") as raw, progress.bar(f"reading {os.path.basename(path)}", total) as advance:
            for name, dtype, shape, begin, nbytes in layout:
                where = f"{path}: tensor {name!r}"
                if dtype == "BF16":
                    array = bf16_to_float32(_read_raw(raw, begin, shape, SAFETENSORS_DTYPES[dtype], where))
                else:
                    array = _get_tensor(f, name, where)
                arrays[name] = array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))
                advance(nbytes)
    return arrays



class LazyTensor:
    """One tensor of a safetensors file, read from the file each time it is made into an array.

    Its name, dtype, shape and byte offset come from the header as the safetensors library validated it
    (`read_safetensors_lazily`), so weights can be checked against a model before any is read, and
    assigned one at a time: the process never holds a second copy of them. Each read is one read of the
    tensor's bytes at the offset the library validated (bf16 then widened to float32), without parsing
    the header again for each of a network's hundreds of tensors. A file that changed since its header
    was validated (another size, inode or modification time) is a `CheckpointError`, not a read at stale
    offsets; a rewrite in place that keeps all three (``cp -p`` over it) is not seen, but no read goes past
    the end of the file. A tensor stored as its array at an aligned offset can also be used where the file
    is mapped (`mapped`), or read into memory a backend owns (`read_into`).

    Example:
    >>> import numpy as np, os, tempfile
    >>> from safetensors.numpy import save_file
    >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
    >>> save_file({"w": np.arange(6, dtype="float32").reshape(2, 3)}, path)
    >>> tensor = read_safetensors_lazily(path)["w"]
    >>> tensor.shape, np.asarray(tensor)[1, 2]
    ((2, 3), np.float32(5.0))
    """

    def __init__(self, path, name, code, shape, offset, identity, mapping=None):
        self.path, self.name, self.code, self.offset, self.identity = path, name, code, offset, identity
        self.mapping = mapping if mapping is not None else _Mapping(path, identity)
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype("float32" if code == "BF16" else SAFETENSORS_DTYPES[code]).newbyteorder("=")
        # Whether the stored bytes are the array's bytes (not bf16 to widen, not another byte order), so that
        # `read_into` can put them straight into memory someone else owns.
        self.stored_as_is = code != "BF16" and np.dtype(SAFETENSORS_DTYPES[code]).isnative

    def __array__(self, dtype=None, copy=None):
        stored = np.dtype(SAFETENSORS_DTYPES[self.code])
        array = np.empty(self.shape, stored)
        self._read(memoryview(array.reshape(-1).view(np.uint8)))
        if self.code == "BF16":
            array = bf16_to_float32(array)
        array = array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))
        return array if dtype is None else array.astype(dtype, copy=False)

    def read_into(self, buffer):
        """Reads the tensor into ``buffer``, a writable buffer of exactly its bytes (``stored_as_is`` only):
        a backend's own freshly made tensor, so that the weights are not copied after reading."""
        if not self.stored_as_is:
            raise ValueError(f"{self!r} is stored as {self.code}, not as its array; read it with numpy.asarray")
        self._read(memoryview(buffer).cast("B"))

    def mapped(self):
        """The tensor where its file is mapped into memory, as an array (`None` unless ``stored_as_is`` and
        at a multiple of `ALIGNMENT` bytes in the file): nothing is read until it is used, and the pages
        read are the operating system's file cache, shared, not a copy. The mapping is private, so a write
        to the array changes a copy of its page, never the file. The file must not be rewritten in place
        while the array is in use (a rewrite that renames a new file over it, as every writer here does,
        is safe)."""
        if not self.stored_as_is or self.offset % ALIGNMENT:
            return None
        stored = np.dtype(SAFETENSORS_DTYPES[self.code])
        return np.frombuffer(self.mapping.get(f"{self.path}: tensor {self.name!r}"), stored,
                             count=math.prod(self.shape), offset=self.offset).reshape(self.shape)

    def _read(self, destination):
        where = f"{self.path}: tensor {self.name!r}"
        expected = math.prod(self.shape) * np.dtype(SAFETENSORS_DTYPES[self.code]).itemsize
        if destination.nbytes != expected:
            raise ValueError(f"{where}: {expected} bytes do not fit a buffer of {destination.nbytes}")
        with open(self.path, "rb", buffering=0) as raw:
            _check_unchanged(raw, self.identity, where)
            raw.seek(self.offset)
            done = 0
            while done < expected:  # a read may return less than asked for; none returns more than is left
                count = raw.readinto(destination[done:])
                if not count:
                    raise CheckpointError(f"{where}: truncated: the tensor at byte {self.offset} ends past the "
                                          "end of the file")
                done += count

    def __repr__(self):
        return f"LazyTensor({os.path.basename(self.path)!r}, {self.name!r}, shape={self.shape}, dtype={self.dtype})"


def read_safetensors_lazily(path):
    """Every tensor of a safetensors file as a `LazyTensor`, none read yet.

    The safetensors library validates the whole header now, as `read_safetensors` has it do (a refused
    file is the same `CheckpointError`, naming the tensor at fault), and refuses dtypes numpy cannot hold.
    """
    with _open_safetensors(path) as f:
        identity = _file_identity(os.stat(path))
        layout = _safetensors_layout(f, path)
    mapping = _Mapping(path, identity)
    return {name: LazyTensor(path, name, dtype, shape, begin, identity, mapping)
            for name, dtype, shape, begin, _ in layout}


class _Mapping:
    """One file's private (copy-on-write) memory map, made on first use and shared by its tensors."""

    def __init__(self, path, identity):
        self.path, self.identity, self.map = path, identity, None

    def get(self, where):
        if self.map is None:
            with open(self.path, "rb") as file:
                _check_unchanged(file, self.identity, where)
                self.map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
        return self.map


def _check_unchanged(file, identity, where):
    if _file_identity(os.fstat(file.fileno())) != identity:
        raise CheckpointError(f"{where}: the file changed since its header was validated; read it again")


def _file_identity(stat):
    """What tells one version of a file from another: device, inode, size and modification time."""
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def read_safetensors_metadata(path):
    """The ``__metadata__`` strings of a safetensors file's header (``{}`` when it has none).

    The library validates the whole header first, so a file it would not read, or whose ``__metadata__``
    is not an object of strings, is a ``CheckpointError``.
    """
    with _open_safetensors(path) as f:
        metadata = f.metadata()
    return dict(metadata or {})


def _open_safetensors(path):
    """``safe_open`` in numpy mode without a memory map; an invalid file is a ``CheckpointError`` that says why."""
    try:
        return safe_open(path, framework="numpy", backend="pread")
    except SafetensorError as e:
        reason = _explain_safetensors(path) or "not a valid safetensors file"
        raise CheckpointError(f"{path}: {reason} (the safetensors library: {e})") from None


def _safetensors_layout(f, path):
    """``(name, dtype, shape, begin, nbytes)`` per tensor, in file order, from the header the library has
    validated: the tensors tile the data exactly in ``offset_keys`` order, so each begins where the one
    before ends, and the data begins after the 8-byte header length and the header."""
    with open(path, "rb") as raw:
        begin = 8 + int.from_bytes(raw.read(8), "little")
    layout = []
    for name in f.offset_keys():
        info = f.get_slice(name)
        dtype, shape = info.get_dtype(), tuple(info.get_shape())
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype}, which numpy cannot hold")
        nbytes = math.prod(shape) * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
        layout.append((name, dtype, shape, begin, nbytes))
        begin += nbytes
    return layout


def _get_tensor(f, name, where):
    try:
        return f.get_tensor(name)
    except SafetensorError as e:  # the file changed since it was validated
        raise CheckpointError(f"{where}: {e}") from None
    except ValueError as e:  # numpy's "array is too big" for an empty tensor with huge dimensions
        raise CheckpointError(f"{where}: numpy cannot hold its shape: {e}") from None


def _read_raw(f, offset, shape, dtype, where):
    """An array of ``shape`` read from byte ``offset`` of an open file."""
    f.seek(offset)
    count = math.prod(shape)
    flat = np.fromfile(f, dtype=dtype, count=count) if count else np.empty(0, dtype)
    if flat.size != count:
        raise CheckpointError(f"{where}: truncated: the tensor at byte {offset} ends past the end of the file")
    try:
        return flat.reshape(shape)
    except ValueError as e:
        raise CheckpointError(f"{where}: numpy cannot hold shape {shape}: {e}") from None


_EXPLAINED_HEADER_LIMIT = 2**20


def _explain_safetensors(path):
    """What makes a safetensors file invalid, naming the tensor at fault; None where it cannot tell.

    Only for the error message: what is valid is the library's decision. Its messages do not always
    name the tensor (one that runs past the end of the file is "incomplete metadata"), so the header is
    read again here, unless it is over 1 MiB: hostile JSON can take many times its size to parse in Python.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"truncated: {size} bytes, too short for a safetensors header"
        length = int.from_bytes(head, "little")
        if 8 + length > size:
            return f"truncated: header says {length} bytes of JSON, file has {size - 8}"
        if length > _EXPLAINED_HEADER_LIMIT:
            return None
        text = f.read(length)
    try:
        header = json.loads(text)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested past Python's recursion limit
        return None
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    metadata = header.get("__metadata__", {})
    if not (metadata is None or isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        return "its __metadata__ is not an object of strings"
    entries = {name: entry for name, entry in header.items() if name != "__metadata__"}
    for name, entry in entries.items():
        problem = _entry_problem(entry)
        if problem:
            return f"tensor {name!r}: {problem}"
    return _coverage_problem(entries, size - 8 - length)


def _is_index(n):
    return type(n) is int and n >= 0


def _entry_problem(entry):
    """What is wrong with one tensor's header entry on its own, or None."""
    if not isinstance(entry, dict):
        return "its entry is not a JSON object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        return "its dtype is not a string"
    if not (isinstance(shape, list) and len(shape) <= 64 and all(_is_index(n) for n in shape)):
        return f"its shape {_clip(shape)} is not a list of non-negative integers"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_index(n) for n in offsets)
            and offsets[0] <= offsets[1]):
        return f"its data_offsets {_clip(offsets)} are not two increasing byte offsets"
    if dtype in SAFETENSORS_DTYPES:
        needed = math.prod(shape) * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
        if offsets[1] - offsets[0] != needed:
            return f"bytes {offsets[0]}..{offsets[1]} hold {offsets[1] - offsets[0]}, its {dtype} shape needs {needed}"
    return None


def _coverage_problem(entries, data_size):
    """Where well-formed entries fail to tile the data exactly: an overlap, a gap, or a short or long file."""
    spans = sorted((entry["data_offsets"][0], entry["data_offsets"][1], name) for name, entry in entries.items())
    position, previous = 0, None
    for begin, end, name in spans:
        if begin < position:
            return f"tensor {name!r} (bytes {begin}..{end}) overlaps tensor {previous!r}, which ends at byte {position}"
        if begin > position:
            return f"tensor {name!r} starts at byte {begin}, leaving bytes {position}..{begin} to no tensor"
        position, previous = end, name
    if position > data_size:
        return (f"truncated: header says {position} bytes of data, file has {data_size} "
                f"(tensor {previous!r} ends past it)")
    if position < data_size:
        return f"{data_size - position} bytes after the last tensor belong to no tensor"
    return None


def _clip(value):
    """A JSON value for a message, at most 60 characters."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------------------------------- JSON


def read_json_object(path, limit=64 * 2**20):
    """A JSON file that must hold an object (a config, a shard index, a manifest), as a dict.

    Raises:
        CheckpointError: the file is larger than ``limit`` bytes, is not UTF-8 JSON, nests deeper than
            Python's parser goes, or holds something other than an object.
    """
    size = os.path.getsize(path)
    if size > limit:
        raise CheckpointError(f"{path}: {size} bytes, too large for a JSON config (at most {limit})")
    with open(path, "rb") as f:
        text = f.read(size)  # not f.read(limit): Python allocates what a read asks for before reading
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, digits past Python's limit
        raise CheckpointError(f"{path}: not valid JSON: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(value).__name__}, not an object")
    return value


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
    """All shards named by a ``*.index.json`` weight map, each read once, merged into one state dict.

    Shards are files beside the index: a shard named by a path (``../other/model.safetensors``, or an
    absolute one) is refused, so an index cannot make us read a file outside its folder.
    """
    weight_map = read_json_object(index_path).get("weight_map")
    if not (isinstance(weight_map, dict) and all(isinstance(shard, str) for shard in weight_map.values())):
        raise CheckpointError(f"{index_path}: corrupt shard index: weight_map is not an object of file names")
    folder, merged = os.path.dirname(index_path), {}
    for shard in sorted(set(weight_map.values())):
        merged.update(read_state_dict(_shard_path(index_path, folder, shard, weight_map)))
    missing = sorted(set(weight_map) - set(merged))
    if missing:
        raise CheckpointError(f"{index_path}: tensors listed in the index but in no shard: {', '.join(missing[:20])}")
    return merged


def _shard_path(index_path, folder, shard, weight_map):
    """The path of a shard the index names, which must be a plain file name in the index's folder."""
    tensor = next(name for name, file in weight_map.items() if file == shard)
    if shard in ("", ".", "..") or os.path.basename(shard) != shard or "\\" in shard:
        raise CheckpointError(f"{index_path}: tensor {tensor!r} is in shard {shard!r}, which is not a file "
                              "in the index's folder")
    path = os.path.join(folder, shard)
    if not os.path.isfile(path):
        raise CheckpointError(f"{index_path}: tensor {tensor!r} is in shard {shard!r}, which is missing")
    return path


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
