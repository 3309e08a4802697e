"""Property-based fuzzing of every reader of untrusted bytes (hypothesis).

Each reader in `READERS` gets files made three ways: real files from the library that writes the format,
randomly mutated (bits flipped, interesting integers written over, cut, spliced); files built from the
format's parts with hostile values (safetensors headers with wrong types and offsets, state dicts whose
tensors have random layouts over random storages); and, for pickles, random programs of pickle opcodes
(deep nesting, memo indices, declared lengths, globals safe and unsafe) in either torch container.

Whatever the bytes, a reader must return or raise `CheckpointError`, within `DEADLINE_SECONDS` (hypothesis'
deadline), without writing a file, and holding no more than `MEMORY_PER_BYTE` bytes of Python and numpy
memory per byte of input plus `MEMORY_SLACK`: Python objects are larger than the pickle opcodes that make
them (an empty set is 216 bytes from one), but nothing may be allocated on the file's word (a declared
length, a memo index, a stride of 0 over a huge shape).

CI runs `EXAMPLES` examples per reader, the same ones each time. A longer, random run:

    KERASDIFFUSION_FUZZ_EXAMPLES=20000 pytest -q tests/test_fuzz_readers.py --hypothesis-show-statistics

To fuzz another reader, add one `Reader` line to `READERS`: a name, the file name it reads, the function,
and a strategy of file contents (`mutated(make_seeds)` of a function returning valid files is enough).
"""

import atexit
import contextlib
import dataclasses
import functools
import io
import json
import math
import os
import shutil
import signal
import tempfile
import tracemalloc
from datetime import timedelta
from typing import Callable

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from tests import hostile_files as H
from weights_conversion.__main__ import main as convert_main
from weights_conversion.embeddings import TextualInversion, read_textual_inversion
from weights_conversion.errors import CheckpointError
from weights_conversion.lora import lora_updates, read_lora
from weights_conversion.readers import SAFETENSORS_DTYPES, read_json_object, read_sharded, read_state_dict

# Hypothesis keeps what it learns about the code in a .hypothesis folder; keep it out of the checkout.
_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="kerasdiffusion-hypothesis-")
atexit.register(shutil.rmtree, _HYPOTHESIS_HOME, ignore_errors=True)
set_hypothesis_home_dir(_HYPOTHESIS_HOME)

EXAMPLES = int(os.environ.get("KERASDIFFUSION_FUZZ_EXAMPLES", "500"))
MEMORY_PER_BYTE = 256
MEMORY_SLACK = 2**20
# Most readers answer in milliseconds; the deadline leaves room for a machine busy with other work (a
# second CI job, a training run). HANG_SECONDS is a hard stop beyond it.
DEADLINE_SECONDS = 5
HANG_SECONDS = 10

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=DEADLINE_SECONDS),
    database=None,  # leave no .hypothesis folder behind
    derandomize="KERASDIFFUSION_FUZZ_EXAMPLES" not in os.environ,  # CI tries the same examples every run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)

INTERESTING = (0, 1, 2, 3, 4, 7, 8, 16, 255, 256, 2**15, 2**16, 2**31 - 1, 2**31, 2**32, 2**40, 2**62, 2**63 - 1,
               2**63, 2**64 - 1)
integers = st.one_of(st.sampled_from(INTERESTING), st.integers(0, 40), st.integers(-(2**70), 2**70))


# ------------------------------------------------------------------------------------------------- seeds


def safetensors_seeds():
    torch.manual_seed(0)
    tensors = {"w": torch.randn(3, 2), "h": torch.randn(4).half(), "b": torch.randn(2, 2).bfloat16(),
               "i": torch.arange(3), "t": torch.tensor([True, False]), "s": torch.tensor(1.5), "e": torch.zeros(0, 2)}
    return [safetensors.torch.save(tensors, metadata={"format": "pt"}), safetensors.torch.save({"w": torch.ones(2)})]


def _checkpoint_tensors():
    torch.manual_seed(0)
    base = torch.randn(4, 6)
    return {"w": torch.randn(2, 3), "h": torch.randn(3).half(), "b": torch.randn(2, 2).bfloat16(), "t": base.t(),
            "v": base[1:, ::2], "p": torch.nn.Parameter(torch.randn(2)), "e": torch.zeros(0, 3)}


def torch_seeds(zip_format):
    seeds = []
    for obj in ({"state_dict": _checkpoint_tensors(), "global_step": 3}, _checkpoint_tensors()):
        buffer = io.BytesIO()
        torch.save(obj, buffer, _use_new_zipfile_serialization=zip_format)
        seeds.append(buffer.getvalue())
    return seeds


SHARDS = {"model-00001-of-00002.safetensors": {"a": torch.ones(2)},
          "model-00002-of-00002.safetensors": {"b": torch.zeros(3)}}


def write_shards(folder):
    for name, tensors in SHARDS.items():
        safetensors.torch.save_file(tensors, os.path.join(folder, name))


def shard_index_seeds():
    weight_map = {tensor: shard for shard, tensors in SHARDS.items() for tensor in tensors}
    return [json.dumps({"metadata": {"total_size": 20}, "weight_map": weight_map}, indent=2).encode()]


def json_config_seeds():
    config = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
              "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
    return [json.dumps(config, indent=2).encode(), b'{"format_version": 1, "source": "x"}']


# A model for LoRAs to fit: one attention projection, one resnet convolution, one text-encoder projection
# (our paths and kernel shapes), and the LoRA reader's whole path, file to checked updates.
LORA_MODEL = {"unet": {"down0_attn0_block0_self_q/kernel": (8, 8), "down0_attn0_proj_in/kernel": (8, 8),
                       "down0_res0_conv1/kernel": (3, 3, 4, 8)},
              "text_encoder": {"layer0_attn_q/kernel": (6, 6)}}


def read_and_fit_lora(path):
    state_dict, metadata = read_lora(path)
    return lora_updates(state_dict, LORA_MODEL, metadata, where=path)


def _lora_factors(prefix, down, up, extra=None):
    """``down`` and ``up`` as ``(key suffix, shape)``, random; ``extra``: ``{key suffix: tensor}``."""
    torch.manual_seed(len(prefix))
    return {f"{prefix}{down[0]}": torch.randn(down[1]), f"{prefix}{up[0]}": torch.randn(up[1]),
            **{f"{prefix}{suffix}": tensor for suffix, tensor in (extra or {}).items()}}


def lora_seeds():
    """kohya (diffusers- and LDM-named, LoCon, Tucker) and diffusers / PEFT LoRAs for `LORA_MODEL`."""
    kohya = (".lora_down.weight", ".lora_up.weight")
    kohya_file = {
        **_lora_factors("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", (kohya[0], (2, 8)),
                        (kohya[1], (8, 2)), {".alpha": torch.tensor(1.0)}),
        **_lora_factors("lora_unet_down_blocks_0_resnets_0_conv1", (kohya[0], (2, 4, 3, 3)), (kohya[1], (8, 2, 1, 1)),
                        {".alpha": torch.tensor(2.0)}),
        **_lora_factors("lora_unet_down_blocks_0_attentions_0_proj_in", (kohya[0], (2, 8, 1, 1)),
                        (kohya[1], (8, 2, 1, 1))),
        **_lora_factors("lora_te_text_model_encoder_layers_0_self_attn_q_proj", (kohya[0], (2, 6)), (kohya[1], (6, 2)),
                        {".alpha": torch.tensor(2.0).half()}),
    }
    ldm_tucker_file = {
        **_lora_factors("lora_unet_input_blocks_1_0_in_layers_2", (kohya[0], (2, 4, 1, 1)), (kohya[1], (8, 2, 1, 1)),
                        {".lora_mid.weight": torch.randn(2, 2, 3, 3)}),
        **_lora_factors("lora_unet_input_blocks_1_1_proj_in", (kohya[0], (2, 8)), (kohya[1], (8, 2))),
    }
    peft_file = {
        **_lora_factors("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", (".lora_A.weight", (2, 8)),
                        (".lora_B.weight", (8, 2))),
        **_lora_factors("unet.down_blocks.0.resnets.0.conv1", (".lora_A.weight", (2, 4, 3, 3)),
                        (".lora_B.weight", (8, 2, 1, 1))),
        **_lora_factors("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", (".lora_A.weight", (2, 6)),
                        (".lora_B.weight", (6, 2))),
    }
    peft_metadata = {"format": "pt", "lora_adapter_metadata": json.dumps({
        "unet.r": 2, "unet.lora_alpha": 4, "unet.alpha_pattern": {"attn1.to_q": 3, "down_blocks.*conv1": 1.5},
        "unet.use_rslora": True, "text_encoder.r": 2, "text_encoder.lora_alpha": 2})}
    old_diffusers_file = _lora_factors("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora",
                                       (".down.weight", (2, 8)), (".up.weight", (8, 2)))
    return [safetensors.torch.save(kohya_file), safetensors.torch.save(ldm_tucker_file),
            safetensors.torch.save(peft_file, metadata=peft_metadata), safetensors.torch.save(old_diffusers_file)]


def _torch_save(obj, zip_format=True):
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=zip_format)
    return buffer.getvalue()


def embedding_pt_seeds():
    """AUTOMATIC1111 ``.pt`` embeddings (zip and legacy; ``string_to_param`` a dict or, as torch <= 1.11
    saved it, a ParameterDict) and diffusers' ``learned_embeds.bin``."""
    torch.manual_seed(0)
    a1111 = {"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(2, 8)}, "name": "style",
             "step": 500, "sd_checkpoint": "0123abcd", "sd_checkpoint_name": "v1-5-pruned"}
    old = {"string_to_token": {"*": 265}, "name": "old", "step": 1,
           "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.randn(3, 8).half())})}
    return [_torch_save(a1111), _torch_save(a1111, zip_format=False), _torch_save(old),
            _torch_save({"<cat-toy>": torch.randn(8)}), _torch_save({"<cat-toy>": torch.randn(2, 8).bfloat16()})]


def embedding_safetensors_seeds():
    """AUTOMATIC1111 / kohya ``emb_params`` and diffusers' ``learned_embeds.safetensors``."""
    torch.manual_seed(0)
    return [safetensors.torch.save({"emb_params": torch.randn(4, 8)}),
            safetensors.torch.save({"<cat-toy>": torch.randn(2, 8).half()}),
            safetensors.torch.save({"<cat-toy>": torch.randn(8).bfloat16()}, metadata={"format": "pt"})]


# ------------------------------------------------------------------------------------------ mutated files


@functools.cache
def _seeds(make_seeds):
    return make_seeds()


@st.composite
def mutated(draw, make_seeds):
    """A valid file from ``make_seeds()``, edited one to six times at random places."""
    data = bytearray(draw(st.sampled_from(_seeds(make_seeds))))
    for _ in range(draw(st.integers(1, 6))):
        _mutate(draw, data)
    return bytes(data)


def _mutate(draw, data):
    at = draw(st.integers(0, max(len(data) - 1, 0)))
    kind = draw(st.sampled_from(("flip", "byte", "integer", "cut", "insert", "delete", "repeat")))
    if kind == "flip" and data:
        data[at] ^= 1 << draw(st.integers(0, 7))
    elif kind == "byte" and data:
        data[at] = draw(st.integers(0, 255))
    elif kind == "integer":
        width = draw(st.sampled_from((1, 2, 4, 8)))
        data[at : at + width] = (draw(integers) % 2 ** (8 * width)).to_bytes(width, "little")
    elif kind == "cut":
        del data[at:]
    elif kind == "insert":
        data[at:at] = draw(st.binary(min_size=1, max_size=16))
    elif kind == "delete":
        del data[at : at + draw(st.integers(1, 64))]
    elif kind == "repeat":
        data[at:at] = data[at : at + draw(st.integers(1, 64))] * draw(st.integers(1, 8))


# --------------------------------------------------------------------------------- safetensors from parts

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), integers, st.floats(allow_nan=False), st.text(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=8,
)


@st.composite
def safetensors_files(draw):
    """A safetensors file whose tensors tile the data, then perhaps one field, the length or the data broken."""
    names = draw(st.lists(st.text(min_size=1, max_size=6), max_size=5, unique=True))
    header, offset = {}, 0
    for name in names:
        dtype = draw(st.sampled_from([*SAFETENSORS_DTYPES, "F8_E4M3", "U16"]))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        size = math.prod(shape) * (1 if dtype.startswith(("F8", "I8", "U8", "BOOL")) else int(dtype[-2:]) // 8)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if names and draw(st.booleans()):
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[draw(st.sampled_from(names))][field] = draw(st.one_of(json_values, st.lists(integers, max_size=3)))
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(st.dictionaries(st.text(max_size=4), st.text(max_size=4)), json_values))
    text = json.dumps(header).encode()
    change = draw(st.sampled_from((0, 0, 0, -1, 1, -8, 8)))  # a byte or eight missing or extra
    data = bytes(max(offset + change, 0))
    true_length = st.just(len(text))
    length = draw(st.one_of(true_length, true_length, true_length, integers.map(lambda n: n % 2**64)))
    return length.to_bytes(8, "little") + text + data


# ------------------------------------------------------------------------------- torch pickles from parts

ITEMSIZES = {torch.FloatStorage: 4, torch.HalfStorage: 2, torch.BFloat16Storage: 2, torch.LongStorage: 8,
             torch.BoolStorage: 1}
# Half the state dicts have well-formed layouts (small non-negative integers, one stride per dimension), so
# that tensors get as far as being read, views and copies, in bounds or not; the other half hostile numbers.
plausible_numbers = st.integers(0, 4)
hostile_numbers = st.one_of(st.integers(0, 4), st.sampled_from(INTERESTING), st.sampled_from((-1, "2", 2.0, None)))


@st.composite
def torch_state_dicts(draw):
    """``(data.pkl, storages)``: tensors with random offsets, shapes and strides over random storages."""
    hostile = draw(st.booleans())
    numbers = hostile_numbers if hostile else plausible_numbers
    keys = [str(k) for k in range(draw(st.integers(1, 3)))]
    types = {key: draw(st.sampled_from(sorted(ITEMSIZES, key=str))) for key in keys}
    numels = {key: draw(st.integers(0, 24)) for key in keys}
    tensors, used = {}, set()
    for name in draw(st.lists(st.sampled_from("abcdefgh"), max_size=5, unique=True)):
        key = draw(st.sampled_from(keys))
        ndim = draw(st.integers(0, 3))
        size = tuple(draw(numbers) for _ in range(ndim))
        strides = draw(st.sampled_from((ndim, ndim, ndim + 1))) if hostile else ndim
        stride = tuple(draw(numbers) for _ in range(strides))
        storage = H.Storage(key, draw(st.one_of(st.just(numels[key]), integers)), types[key])
        tensors[name] = H.Tensor(storage, draw(numbers), size, stride)
        used.add(key)
    if draw(st.booleans()):  # torch lists only the storages its tensors use
        keys = sorted(used)
    change = st.sampled_from((0, 0, 0, 1, -1)) if hostile else st.just(0)  # a byte missing or extra
    storages = {key: bytes(max(numels[key] * ITEMSIZES[types[key]] + draw(change), 0)) for key in keys}
    obj = {"state_dict": tensors} if draw(st.booleans()) else tensors
    return H.torch_pickle(obj, protocol=draw(st.sampled_from((2, 4)))), storages


GLOBALS = [b"ctorch._utils\n_rebuild_tensor_v2\n", b"ctorch\nFloatStorage\n", b"ctorch\nBFloat16Storage\n",
           b"ccollections\nOrderedDict\n", b"cbuiltins\nset\n", b"cbuiltins\nfrozenset\n", b"ctorch\nSize\n",
           b"c_codecs\nencode\n", b"ccopyreg\n_reconstructor\n", b"cpytorch_lightning.a\nB\n", b"cos\nsystem\n",
           b"ctorch._tensor\n_rebuild_from_type_v2\n", b"ctorch\nTensor\n", b"ctorch._utils\n_rebuild_parameter\n"]
TEXTS = [b"X\x07\x00\x00\x00storage", b"X\x01\x00\x00\x000", b"X\x03\x00\x00\x00cpu", b"X\x0a\x00\x00\x00state_dict",
         b"\x8c\x06latin1", b"\x8c\x0c__defaults__"]
PLAIN_OPCODES = [bytes([op]) for op in b"()t\x85\x86\x87}]suaebRQN\x88\x89012\x8f\x90\x91\x81\x92\x93\x94oldp."]
# opcode -> width of its little-endian integer argument (lengths, memo indices, numbers)
ARGUMENT_OPCODES = {b"K": 1, b"M": 2, b"J": 4, b"q": 1, b"r": 4, b"h": 1, b"j": 4, b"\x8e": 8, b"\x8d": 8,
                    b"\x96": 8, b"\x95": 8, b"B": 4, b"C": 1, b"\x8a": 1, b"\x8b": 4, b"X": 4, b"\x8c": 1}


@st.composite
def pickle_programs(draw):
    """A random pickle: opcodes with hostile arguments, globals safe and not, runs of one opcode."""
    parts = [b"\x80" + bytes([draw(st.integers(0, 5))])]
    for _ in range(draw(st.integers(0, 40))):
        kind = draw(st.sampled_from(("plain", "plain", "argument", "global", "text", "run")))
        if kind == "plain":
            parts.append(draw(st.sampled_from(PLAIN_OPCODES)))
        elif kind == "argument":
            opcode = draw(st.sampled_from(sorted(ARGUMENT_OPCODES)))
            width = ARGUMENT_OPCODES[opcode]
            parts.append(opcode + (draw(integers) % 2 ** (8 * width)).to_bytes(width, "little")
                         + draw(st.binary(max_size=8)))
        elif kind == "global":
            parts.append(draw(st.sampled_from(GLOBALS)))
        elif kind == "text":
            parts.append(draw(st.sampled_from(TEXTS)))
        else:
            parts.append(draw(st.sampled_from(PLAIN_OPCODES + [b"N\x85", b"\x85"])) * draw(st.integers(2, 5000)))
    return b"".join(parts) + b"."


def torch_zips():
    parts = st.one_of(torch_state_dicts(), st.tuples(pickle_programs(), st.just({"0": bytes(16)})))
    return parts.map(lambda parts: H.torch_zip(*parts))


def torch_legacies():
    parts = st.one_of(torch_state_dicts(), st.tuples(pickle_programs(), st.just({"0": bytes(16)})))
    return parts.map(lambda parts: H.torch_legacy(*parts))


# --------------------------------------------------------------------------------------------- the readers


@dataclasses.dataclass(frozen=True)
class Reader:
    name: str
    file_name: str
    read: Callable  # path -> anything; raises CheckpointError
    inputs: st.SearchStrategy  # of file contents
    companions: Callable = lambda folder: None  # writes the fixed files the reader needs beside its input
    returns: tuple = (dict,)  # what a successful read gives


def read_lazily(path):
    """A converted folder's way (`LazyTensor`s, header validated first), each tensor then read."""
    return {name: np.asarray(tensor) for name, tensor in read_state_dict(path, lazy=True).items()}


READERS = [
    Reader("safetensors", "model.safetensors", read_state_dict,
           st.one_of(mutated(safetensors_seeds), safetensors_files(), st.binary(max_size=64))),
    Reader("safetensors lazily", "model.safetensors", read_lazily,
           st.one_of(mutated(safetensors_seeds), safetensors_files(), st.binary(max_size=64))),
    Reader("torch zip", "model.ckpt", read_state_dict,
           st.one_of(mutated(functools.partial(torch_seeds, True)), torch_zips())),
    Reader("torch legacy", "model.ckpt", read_state_dict,
           st.one_of(mutated(functools.partial(torch_seeds, False)), torch_legacies())),
    Reader("shard index", "model.safetensors.index.json", read_sharded,
           st.one_of(mutated(shard_index_seeds), json_values.map(lambda v: json.dumps({"weight_map": v}).encode())),
           companions=write_shards),
    Reader("JSON config", "scheduler_config.json", read_json_object,
           st.one_of(mutated(json_config_seeds), json_values.map(lambda v: json.dumps(v).encode()),
                     st.integers(1, 5000).map(lambda n: b"[" * n))),
    Reader("LoRA", "lora.safetensors", read_and_fit_lora, st.one_of(mutated(lora_seeds), safetensors_files())),
    Reader("textual inversion pt", "embedding.pt", read_textual_inversion,
           st.one_of(mutated(embedding_pt_seeds), torch_zips(), torch_legacies()), returns=(TextualInversion,)),
    Reader("textual inversion safetensors", "embedding.safetensors", read_textual_inversion,
           st.one_of(mutated(embedding_safetensors_seeds), safetensors_files()), returns=(TextualInversion,)),
]


@contextlib.contextmanager
def hard_time_limit(seconds):
    """Turns a hang into a failure: SIGALRM raises TimeoutError (no reader catches it) after ``seconds``."""
    def expire(signum, frame):
        raise TimeoutError(f"still reading after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def files_in(folder):
    return sorted(os.path.relpath(os.path.join(root, name), folder)
                  for root, dirs, names in os.walk(folder) for name in dirs + names)


def read_safely(reader, data):
    """Reads ``data`` as ``reader``'s file; asserts the outcome, the memory and the folder; returns the result."""
    with tempfile.TemporaryDirectory() as folder:
        reader.companions(folder)
        path = os.path.join(folder, reader.file_name)
        with open(path, "wb") as f:
            f.write(data)
        before = files_in(folder)
        tracemalloc.start()
        try:
            with hard_time_limit(HANG_SECONDS):
                result = reader.read(path)
        except CheckpointError as error:
            result = error
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak <= MEMORY_PER_BYTE * len(data) + MEMORY_SLACK, f"{peak} bytes held for a {len(data)}-byte file"
        assert files_in(folder) == before
    assert isinstance(result, (CheckpointError, *reader.returns)), type(result)
    if isinstance(result, CheckpointError):
        assert path in str(result), str(result)
    return result


@pytest.mark.parametrize("reader", READERS, ids=[reader.name for reader in READERS])
@FUZZ
@given(data=st.data())
def test_reader_survives_any_bytes(reader, data):
    read_safely(reader, data.draw(reader.inputs, label="file"))


@FUZZ
@given(data=st.data())
def test_command_line_refuses_broken_files_in_one_line(data):
    """``python -m weights_conversion``: exit status 2, one ``error:`` line, no output folder or staging left."""
    suffix, contents = data.draw(st.sampled_from([
        (".safetensors", mutated(safetensors_seeds)), (".ckpt", mutated(functools.partial(torch_seeds, True))),
    ]))
    file = data.draw(contents, label="file")
    with tempfile.TemporaryDirectory() as folder:
        source, output = os.path.join(folder, f"model{suffix}"), os.path.join(folder, "converted")
        with open(source, "wb") as f:
            f.write(file)
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), hard_time_limit(HANG_SECONDS):
            status = convert_main([source, output, "--quiet"])
        assert status == 2
        assert stderr.getvalue().startswith("error: ") and stderr.getvalue().count("\n") == 1, stderr.getvalue()
        assert files_in(folder) == [f"model{suffix}"]
