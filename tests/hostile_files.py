"""Checkpoint files made by hand, as an attacker would: any safetensors header, any pickle, any tensor layout.

`torch_pickle` writes a state dict the way ``torch.save`` pickles one (each tensor a ``_rebuild_tensor_v2``
call on a storage named by a persistent id), but with whatever offset, shape and strides it is given;
`torch_zip` and `torch_legacy` wrap such a pickle in either container.
"""

import collections
import io
import json
import pickle
import struct
import zipfile

import torch

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def safetensors_bytes(header, data=b"", raw_header=None):
    """A safetensors file: the 8-byte header length, the header (``header`` as JSON, or ``raw_header``), data."""
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


class Storage:
    """A storage as a pickle names it: ``("storage", torch.FloatStorage, key, "cpu", numel)``."""

    def __init__(self, key, numel, storage_type=torch.FloatStorage):
        self.key, self.numel, self.storage_type = key, numel, storage_type


class Tensor:
    """Pickles as ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``, numbers unchecked."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride)

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (*self.args, False, collections.OrderedDict())


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


def torch_pickle(obj, protocol=2):
    """``obj`` pickled as ``torch.save`` pickles a checkpoint, `Storage` objects as persistent ids."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=protocol).dump(obj)
    return buffer.getvalue()


def torch_zip(data_pkl, storages, prefix="archive"):
    """The zip container of ``torch.save``: ``<prefix>/data.pkl`` and ``<prefix>/data/<key>`` per storage."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(f"{prefix}/data.pkl", data_pkl)
        for key, data in storages.items():
            zf.writestr(f"{prefix}/data/{key}", data)
        zf.writestr(f"{prefix}/version", "3\n")
    return buffer.getvalue()


def torch_legacy(obj_pickle, storages, counts=None):
    """The legacy container: magic, protocol, sys info and ``obj_pickle``, the storage keys, then each
    storage as its 8-byte element count (``counts[key]``, else its bytes over 4) and its bytes."""
    head = b"".join(pickle.dumps(x, protocol=2) for x in (LEGACY_MAGIC, 1001, {"little_endian": True}))
    tail = pickle.dumps(sorted(storages), protocol=2)
    for key in sorted(storages):
        data = storages[key]
        count = counts[key] if counts else len(data) // 4
        tail += struct.pack("<Q", count % 2**64) + data
    return head + obj_pickle + tail
