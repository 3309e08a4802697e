"""Hostile and malformed checkpoint files: each is refused with a `CheckpointError` that names the file (and
the tensor, where there is one), without crashing, hanging, running anything, or allocating what the file
declares instead of what it holds. `tests/test_fuzz_readers.py` tries the same readers on generated files.
"""

import json
import os
import struct
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import safetensors.torch
import torch

from tests import hostile_files as H
from weights_conversion import torch_pickle
from weights_conversion.errors import CheckpointError, UnsafeCheckpointError
from weights_conversion.readers import read_json_object, read_sharded, read_state_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def refused(path, *fragments, error=CheckpointError, lazy=False):
    """Reads ``path``; it must fail with ``error`` whose message holds the path and every fragment."""
    with pytest.raises(error) as raised:
        read_state_dict(path, lazy=lazy)
    message = str(raised.value)
    for fragment in (str(path), *fragments):
        assert fragment in message, message
    return message


def peak_bytes(function, *args):
    """The most memory Python and numpy held at once while ``function(*args)`` ran (it may raise)."""
    tracemalloc.start()
    try:
        function(*args)
    except CheckpointError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


# ---------------------------------------------------------------------------------------------- safetensors

F32 = {"dtype": "F32"}
SAFETENSORS_CASES = {
    "shape given as a string": (
        {"a": {**F32, "shape": "12", "data_offsets": [0, 4]}}, b"\0" * 4, None, ["tensor 'a'", 'shape "12"']),
    "100,000 nested JSON brackets": (
        None, b"", b"[" * 100_000 + b"]" * 100_000, ["not a valid safetensors file"]),
    "overlapping byte ranges": (
        {"a": {**F32, "shape": [2], "data_offsets": [0, 8]}, "b": {**F32, "shape": [2], "data_offsets": [4, 12]}},
        b"\0" * 12, None, ["tensor 'b' (bytes 4..12) overlaps tensor 'a'"]),
    "tensor larger than the file": (
        {"a": {**F32, "shape": [1000], "data_offsets": [0, 4000]}}, b"\0" * 12, None,
        ["truncated", "tensor 'a'"]),
    "negative size": (
        {"a": {**F32, "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None, ["tensor 'a'", "shape [-1]"]),
    "dtype numpy cannot hold": (
        {"a": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4, None,
        ["tensor 'a'", "F8_E4M3"]),
}


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
@pytest.mark.parametrize("case", SAFETENSORS_CASES)
def test_malformed_safetensors_is_refused_naming_the_tensor(tmp_path, case, lazy):
    """A lazy read refuses the same files, with the same messages, before reading any tensor."""
    header, data, raw_header, fragments = SAFETENSORS_CASES[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(H.safetensors_bytes(header, data, raw_header))
    refused(path, *fragments, lazy=lazy)


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_bf16_tensors_are_read_exactly_wherever_they_lie(tmp_path, lazy):
    """bf16 bytes are read by us at the offsets the library validated; other dtypes by the library."""
    torch.manual_seed(0)
    tensors = {"a": torch.randn(3).bfloat16(), "b": torch.randn(5, 2), "c": torch.randn(7).bfloat16(),
               "d": torch.randn(2).half(), "e": torch.zeros(0).bfloat16(), "f": torch.tensor(2.5).bfloat16()}
    safetensors.torch.save_file(tensors, str(tmp_path / "m.safetensors"))
    arrays = read_state_dict(tmp_path / "m.safetensors", lazy=lazy)
    for name, tensor in tensors.items():
        expected = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
        assert arrays[name].dtype == expected.dtype and arrays[name].shape == expected.shape  # before any read
        np.testing.assert_array_equal(np.asarray(arrays[name]), expected, err_msg=name)
        assert np.asarray(arrays[name]).dtype == expected.dtype


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_lazy_tensor_of_a_file_changed_since_validation_is_refused(tmp_path, dtype):
    """A lazy tensor reads at the offsets validated with the header; a file replaced since is not read."""
    path = tmp_path / "m.safetensors"
    tensors = {"a": torch.arange(4.0), "b": torch.ones(2, 2)}
    tensors = {name: t.bfloat16() if dtype == "BF16" else t for name, t in tensors.items()}
    safetensors.torch.save_file(tensors, str(path))
    lazy = read_state_dict(path, lazy=True)
    replaced = tmp_path / "new.safetensors"
    safetensors.torch.save_file({"b": tensors["b"], "a": torch.arange(8.0)}, str(replaced))
    os.replace(replaced, path)
    with pytest.raises(CheckpointError, match="changed since its header was validated") as raised:
        np.asarray(lazy["b"])
    assert str(path) in str(raised.value) and "tensor 'b'" in str(raised.value)


# ------------------------------------------------------------------------------------------- torch pickles


def tensor_file(tmp_path, tensors, storages, container="zip"):
    """A ``.ckpt`` holding ``{"state_dict": tensors}`` with the given storages' bytes."""
    data_pkl = H.torch_pickle({"state_dict": tensors})
    data = H.torch_zip(data_pkl, storages) if container == "zip" else H.torch_legacy(data_pkl, storages)
    path = tmp_path / "model.ckpt"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_storage_shorter_than_the_strides_need_is_refused(tmp_path, container):
    storage = H.Storage("0", 4)
    path = tensor_file(tmp_path, {"w": H.Tensor(storage, 0, (4, 4), (4, 1))}, {"0": b"\0" * 16}, container)
    refused(path, "tensor 'w'", "reach past its 4-element storage")


def test_broadcast_tensor_cannot_claim_more_memory_than_its_file(tmp_path):
    """Stride 0 lets one float stand for 2**40 of them: refused before numpy allocates anything."""
    path = tensor_file(tmp_path, {"w": H.Tensor(H.Storage("0", 1), 0, (2**40,), (0,))}, {"0": b"\0" * 4})
    assert peak_bytes(read_state_dict, path) < 2**20
    refused(path, "tensor 'w'", "beyond twice the file's size")


@pytest.mark.parametrize("layout", [("12", (1,)), ((2, 2), (1,)), ((2.0,), (1,)), ((-1,), (1,)), ((2**70,), (1,))],
                         ids=["string shape", "too few strides", "float size", "negative size", "huge size"])
def test_nonsense_layout_is_refused_naming_the_tensor(tmp_path, layout):
    size, stride = layout
    path = tensor_file(tmp_path, {"w": H.Tensor(H.Storage("0", 4), 0, size, stride)}, {"0": b"\0" * 16})
    refused(path, "tensor 'w'")


def _declare(zip_bytes, member, size):
    """``zip_bytes`` with ``member``'s uncompressed size in its central directory entry replaced by ``size``."""
    name, entry = member.encode(), zip_bytes.index(b"PK\x01\x02")
    while zip_bytes[entry + 28 : entry + 30] != struct.pack("<H", len(name)) or \
            zip_bytes[entry + 46 : entry + 46 + len(name)] != name:
        entry = zip_bytes.index(b"PK\x01\x02", entry + 4)
    return zip_bytes[: entry + 24] + struct.pack("<I", size) + zip_bytes[entry + 28 :]


@pytest.mark.parametrize("member", ["archive/data/0", "archive/data.pkl"])
def test_zip_member_declaring_gigabytes_is_refused_before_reading(tmp_path, member):
    data_pkl = H.torch_pickle({"state_dict": {"w": H.Tensor(H.Storage("0", 4), 0, (4,), (1,))}})
    path = tmp_path / "model.ckpt"
    path.write_bytes(_declare(H.torch_zip(data_pkl, {"0": b"\0" * 16}), member, 3_000_000_000))
    assert peak_bytes(read_state_dict, path) < 2**20
    fragments = ["tensor 'w'"] if member.endswith("/0") else []
    refused(path, *fragments, f"{member} declares 3000000000 bytes")


POISON_PICKLES = {
    # LONG_BINPUT 2**31 - 1: the C unpickler grows its memo to 2**32 entries, 32 GiB, for these 9 bytes.
    "memo index of 2**31": b"\x80\x02Nr\xff\xff\xff\x7f.",
    # BINBYTES8 and BYTEARRAY8 declaring a terabyte they do not hold.
    "bytes declaring a terabyte": b"\x80\x04\x8e" + (2**40).to_bytes(8, "little") + b"abc.",
    "bytearray declaring a terabyte": b"\x80\x05\x96" + (2**40).to_bytes(8, "little") + b"abc.",
    "frame declaring a terabyte": b"\x80\x04\x95" + (2**40).to_bytes(8, "little") + b"N.",
}


@pytest.mark.parametrize("container", ["zip", "legacy"])
@pytest.mark.parametrize("case", POISON_PICKLES)
def test_pickle_cannot_make_the_reader_allocate_what_it_declares(tmp_path, case, container):
    path = tmp_path / "model.ckpt"
    pickled = POISON_PICKLES[case]
    path.write_bytes(H.torch_zip(pickled, {}) if container == "zip" else pickled)
    assert peak_bytes(read_state_dict, path) < 2**20
    refused(path)


def test_deeply_nested_dict_key_is_refused_without_crashing(tmp_path):
    """Hashing a million nested tuples recurses in C past the stack's end: the check comes first.
    Run in a child process, so that a regression shows as a failure rather than killing the test run."""
    path = tmp_path / "model.ckpt"
    path.write_bytes(H.torch_zip(b"\x80\x02}N" + b"\x85" * 1_000_000 + b"Ns.", {}))
    script = f"""
from weights_conversion.errors import CheckpointError
from weights_conversion.readers import read_state_dict
try:
    read_state_dict({str(path)!r})
except CheckpointError as e:
    print(e)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "nested more than one tuple deep" in result.stdout


def test_pickle_cannot_set_attributes_of_our_functions(tmp_path):
    """BUILD on a global would set attributes of the reader's own function, for every later file."""
    build = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__)s\x86b."
    path = tmp_path / "model.ckpt"
    path.write_bytes(H.torch_zip(build, {}))
    refused(path, "refused to set the state of a function", error=UnsafeCheckpointError)
    assert torch_pickle._rebuild_tensor.__defaults__ == (False, None, None)


def test_thousands_of_placeholder_classes_are_refused(tmp_path):
    names = b"".join(b"cpytorch_lightning.x\nC%d\n0" % i for i in range(300))
    path = tmp_path / "model.ckpt"
    path.write_bytes(H.torch_zip(b"\x80\x02" + names + b"N.", {}))
    refused(path, "more than 256 classes")


# --------------------------------------------------------------------------------- whole objects (embeddings)


def _tree_file(tmp_path, obj, storages=None):
    path = tmp_path / "embedding.pt"
    path.write_bytes(H.torch_zip(H.torch_pickle(obj), storages or {}))
    return path


def test_whole_object_read_keeps_nesting_and_checks_each_tensor(tmp_path):
    tensor = H.Tensor(H.Storage("0", 4), 0, (2, 2), (2, 1))
    path = _tree_file(tmp_path, {"p": [tensor, (1, "x")], "n": None}, {"0": np.arange(4, dtype="<f4").tobytes()})
    tree = torch_pickle.read_torch_pickle_tree(path)
    np.testing.assert_array_equal(tree["p"][0], [[0, 1], [2, 3]])
    assert tree["p"][1] == (1, "x") and tree["n"] is None
    path = _tree_file(tmp_path, {"p": {"*": H.Tensor(H.Storage("0", 4), 0, (2, 4), (4, 1))}},
                      {"0": np.arange(4, dtype="<f4").tobytes()})
    with pytest.raises(CheckpointError, match=r"tensor object\['p'\]\['\*'\]"):
        torch_pickle.read_torch_pickle_tree(path)


def test_whole_object_that_holds_itself_is_refused(tmp_path):
    loop = []
    loop.append(loop)
    with pytest.raises(CheckpointError, match="holds itself"):
        torch_pickle.read_torch_pickle_tree(_tree_file(tmp_path, {"a": loop}))


def test_whole_object_nested_too_deep_is_refused(tmp_path):
    deep = []
    for _ in range(200):
        deep = [deep]
    with pytest.raises(CheckpointError, match="nested more than 32"):
        torch_pickle.read_torch_pickle_tree(_tree_file(tmp_path, deep))


def test_whole_object_shared_containers_are_rebuilt_once(tmp_path):
    """Thirty lists each holding the one before twice: 2**30 paths, 30 containers; read at once."""
    shared = [1]
    for _ in range(30):
        shared = [shared, shared]
    tree = torch_pickle.read_torch_pickle_tree(_tree_file(tmp_path, shared))
    assert tree[0] is tree[1]


def test_whole_object_cannot_hand_over_our_functions_or_storages(tmp_path):
    for obj in ({"f": torch._utils._rebuild_tensor_v2}, {"s": H.Storage("0", 1)}, {torch.FloatStorage: 1}):
        with pytest.raises(CheckpointError, match="outside a tensor|not plain data"):
            torch_pickle.read_torch_pickle_tree(_tree_file(tmp_path, obj, {"0": b"\0" * 4}))


# --------------------------------------------------------------------------------------- JSON and shard indexes


def test_shard_outside_the_index_folder_is_refused(tmp_path):
    folder = tmp_path / "unet"
    folder.mkdir()
    outside = tmp_path / "outside.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(outside))
    for shard in ("../outside.safetensors", str(outside)):
        index = folder / "diffusion_pytorch_model.safetensors.index.json"
        index.write_text(json.dumps({"weight_map": {"w": shard}}))
        with pytest.raises(CheckpointError) as error:
            read_sharded(index)
        message = f"{index}: tensor 'w' is in shard {shard!r}, which is not a file in the index's folder"
        assert message in str(error.value)


@pytest.mark.parametrize("text", ["[" * 100_000, "[1, 2]", '{"a": 1', "\xff\xfe", "1" * 5000],
                         ids=["nested", "array", "unfinished", "not utf-8", "long integer"])
def test_broken_json_config_is_a_checkpoint_error(tmp_path, text):
    path = tmp_path / "scheduler_config.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError, match="scheduler_config.json"):
        read_json_object(path)
