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

import errno
import json
import math
import os

import numpy as np

from weights_conversion import progress
from weights_conversion.arrays import bf16_to_float32
from weights_conversion.errors import CheckpointError
from weights_conversion.torch_pickle import read_torch_pickle

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

SAFETENSORS_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?",
}


def read_state_dict(path):
    """Every tensor of one checkpoint file, by name.

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
        return read_safetensors(path)
    if path.endswith(PICKLE_SUFFIXES):
        return read_torch_pickle(path)
    raise CheckpointError(f"{path}: unknown checkpoint type; expected .safetensors or one of {PICKLE_SUFFIXES}")


# ---------------------------------------------------------------------------------------------- safetensors


def read_safetensors_header(path):
    """The tensor table of a safetensors file and where its data starts, checked against the file's size.

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
    header.pop("__metadata__", None)
    for name, entry in header.items():
        _check_safetensors_entry(path, name, entry)
    data_start = 8 + length
    data_size = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if data_start + data_size > size:
        raise CheckpointError(
            f"{path}: truncated: header says {data_size} bytes of data, file has {size - data_start}"
        )
    return header, data_start


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


def _read_raw(f, offset, shape, dtype):
    """An array of ``shape`` read from byte ``offset`` of an open file."""
    f.seek(offset)
    count = math.prod(shape)
    flat = np.fromfile(f, dtype=dtype, count=count) if count else np.empty(0, dtype)
    if flat.size != count:
        raise CheckpointError(f"{f.name}: truncated: a tensor at byte {offset} ends past the end of the file")
    return flat.reshape(shape)



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
