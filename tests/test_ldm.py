"""Reading checkpoint files and splitting original (LDM) checkpoints, checked against PyTorch and diffusers.

The LDM checkpoints are built from tiny random diffusers models by ``ldm_fixtures.diffusers_to_ldm``;
diffusers' own single-file converters must turn them back into the exact models, and so must ours.
"""

import io
import os
import pickle
import subprocess
import sys
import textwrap
import types
import zipfile

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as dsf
from transformers import CLIPTextConfig, CLIPTextModel

from tests.ldm_fixtures import diffusers_to_ldm, latent_diffusion_extras
from weights_conversion.errors import CheckpointError, UnsafeCheckpointError
from weights_conversion.ldm import conv1x1_to_linear, is_ldm_checkpoint, split_ldm_checkpoint
from weights_conversion.readers import bf16_to_float32, read_diffusers_folder, read_state_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

UNET_CONFIGS = {
    "two_levels": {
        "block_out_channels": (32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "attention_head_dim": 8,
    },
    # SD 2.x style: linear projections in the transformers, per-level heads, one resnet per level.
    "three_levels_linear": {
        "block_out_channels": (32, 32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "layers_per_block": 1,
        "attention_head_dim": (2, 4, 4),
        "use_linear_projection": True,
    },
    "inpainting": {
        "in_channels": 9,
        "block_out_channels": (32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "attention_head_dim": 8,
    },
}


def random_state_dict(model, seed):
    """The model's state dict with every tensor random, so that any two swapped tensors would show."""
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(tuple(v.shape)).astype(np.float32) for k, v in model.state_dict().items()}


def make_unet(name):
    kwargs = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
              "cross_attention_dim": 32, "norm_num_groups": 8}
    return UNet2DConditionModel(**{**kwargs, **UNET_CONFIGS[name]})


def make_vae():
    return AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)


def make_text_encoder(layers=2, hidden_act="quick_gelu"):
    config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=layers, num_attention_heads=4,
                            vocab_size=1000, max_position_embeddings=77, hidden_act=hidden_act,
                            bos_token_id=0, eos_token_id=2)
    return CLIPTextModel(config)


def without_text_model_prefix(state_dict):
    """Text encoder keys as transformers 5 names them (``CLIPTextModel`` lost its ``text_model.`` level)."""
    return {k.removeprefix("text_model."): v for k, v in state_dict.items()}


def to_torch(state_dict):
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}


def to_numpy(state_dict):
    return {k: v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in state_dict.items()}


def assert_same(actual, expected):
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        np.testing.assert_array_equal(actual[key], value, err_msg=key)


@pytest.fixture(scope="module")
def vae():
    model = make_vae()
    return model, random_state_dict(model, 1)


@pytest.fixture(scope="module")
def text_encoder():
    model = make_text_encoder()
    return model, random_state_dict(model, 2)


@pytest.fixture(scope="module", params=sorted(UNET_CONFIGS))
def sd1(request, vae, text_encoder):
    """A tiny SD 1.x-style model as diffusers state dicts and as the LDM checkpoint holding them."""
    unet = make_unet(request.param)
    parts = {"unet": random_state_dict(unet, 0), "vae": vae[1], "text_encoder": text_encoder[1]}
    models = {"unet": unet, "vae": vae[0], "text_encoder": text_encoder[0]}
    return models, parts, diffusers_to_ldm(parts["unet"], parts["vae"], parts["text_encoder"])


# ------------------------------------------------------------------------------- the fixture, against diffusers


def test_diffusers_converters_invert_the_fixture(sd1):
    models, parts, ldm = sd1
    checkpoint = to_torch(ldm)
    unet = dsf.convert_ldm_unet_checkpoint(checkpoint, dict(models["unet"].config))
    vae = dsf.convert_ldm_vae_checkpoint(checkpoint, dict(models["vae"].config))
    clip = dsf.convert_ldm_clip_checkpoint(checkpoint)
    assert_same(to_numpy(unet), parts["unet"])
    assert_same(to_numpy(vae), parts["vae"])
    assert_same(without_text_model_prefix(to_numpy(clip)), parts["text_encoder"])


def test_diffusers_open_clip_converter_inverts_the_fixture(vae):
    # diffusers drops resblock 23 by name (SD 2.x's ViT-H has 24), so this tiny tower has 23 + 1 blocks.
    model = make_text_encoder(layers=23, hidden_act="gelu")
    text_sd = random_state_dict(model, 3)
    ldm = diffusers_to_ldm(random_state_dict(make_unet("two_levels"), 0), vae[1], text_sd, open_clip=True)
    converted = dsf.convert_open_clip_checkpoint(model, to_torch(ldm))
    assert_same(without_text_model_prefix(to_numpy(converted)), text_sd)
    ours = split_ldm_checkpoint(ldm)["text_encoder"]
    assert all(k.startswith("text_model.") for k in ours)
    assert_same(without_text_model_prefix(ours), text_sd)


# ------------------------------------------------------------------------------------------- ours, exact


def test_split_ldm_checkpoint_gives_back_the_diffusers_models(sd1):
    models, parts, ldm = sd1
    assert is_ldm_checkpoint(ldm)
    split = split_ldm_checkpoint(ldm)
    assert sorted(split) == ["text_encoder", "unet", "vae"]
    assert_same(split["unet"], parts["unet"])
    assert_same(split["vae"], parts["vae"])
    assert_same(without_text_model_prefix(split["text_encoder"]), parts["text_encoder"])
    models["unet"].load_state_dict(to_torch(split["unet"]), strict=True)


def test_inpainting_unet_keeps_nine_input_channels(sd1):
    models, _, ldm = sd1
    in_channels = models["unet"].config.in_channels
    assert split_ldm_checkpoint(ldm)["unet"]["conv_in.weight"].shape[1] == in_channels


def test_training_buffers_and_ema_are_ignored(sd1):
    _, parts, ldm = sd1
    extras = latent_diffusion_extras(ldm)
    assert sum(k.startswith("model_ema.") for k in extras) > 100
    split = split_ldm_checkpoint({**ldm, **extras})
    assert_same(split["unet"], parts["unet"])
    assert_same(without_text_model_prefix(split["text_encoder"]), parts["text_encoder"])


def test_unknown_keys_are_all_listed(sd1):
    _, _, ldm = sd1
    bad = {
        "model.diffusion_model.label_emb.0.0.weight": np.zeros(2),
        "first_stage_model.encoder.down.0.attn.0.q.weight": np.zeros(2),
        "cond_stage_model.transformer.text_model.pooler.weight": np.zeros(2),
        "depth_model.weight": np.zeros(2),
    }
    with pytest.raises(CheckpointError) as error:
        split_ldm_checkpoint({**ldm, **bad})
    for key in bad:
        assert key in str(error.value)


def test_missing_network_is_named(sd1):
    _, _, ldm = sd1
    no_vae = {k: v for k, v in ldm.items() if not k.startswith("first_stage_model.")}
    with pytest.raises(CheckpointError, match="first_stage_model"):
        split_ldm_checkpoint(no_vae)


def test_conv1x1_to_linear():
    weight = np.arange(6.0).reshape(3, 2, 1, 1)
    np.testing.assert_array_equal(conv1x1_to_linear(weight), weight[:, :, 0, 0])
    with pytest.raises(CheckpointError):
        conv1x1_to_linear(np.zeros((3, 2, 3, 3)))


# ---------------------------------------------------------------------------------------------- readers


def test_safetensors_round_trip_keeps_fp32_fp16_and_widens_bf16(tmp_path):
    torch.manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 4),
        "f16": torch.randn(5).half(),
        "bf16": torch.randn(2, 3).bfloat16(),
        "i64": torch.arange(4),
    }
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    sd = read_state_dict(path)
    assert {k: v.dtype for k, v in sd.items()} == {
        "f32": np.float32, "f16": np.float16, "bf16": np.float32, "i64": np.int64,
    }
    for key in ("f32", "f16", "i64"):
        np.testing.assert_array_equal(sd[key], tensors[key].numpy())
    np.testing.assert_array_equal(sd["bf16"], tensors["bf16"].float().numpy())


def test_bf16_to_float32_is_exact():
    values = torch.tensor([1.0, -2.5, 3.140625, 1e-30, float("inf")], dtype=torch.bfloat16)
    bits = values.view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bf16_to_float32(bits), values.float().numpy())


def test_truncated_safetensors_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "t.safetensors"
    safetensors.numpy.save_file({"w": np.zeros((100,), np.float32)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    message = r"t\.safetensors: truncated: header says 400 bytes of data, file has 360"
    with pytest.raises(CheckpointError, match=message):
        read_state_dict(path)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        read_state_dict(path)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        read_state_dict(tmp_path / "nope.ckpt")


def _checkpoint_tensors():
    torch.manual_seed(0)
    base = torch.randn(4, 6)
    return {
        "contiguous": torch.randn(2, 3),
        "half": torch.randn(3).half(),
        "bf16": torch.randn(2, 2).bfloat16(),
        "transposed": base.t(),
        "strided": base[1:, ::2],
        "offset_view": base[2],
        "parameter": torch.nn.Parameter(torch.randn(3, 3)),
        "scalar": torch.tensor(7, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
    }


def _expected(tensors):
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).detach().numpy() for k, v in tensors.items()}


def _read_without_torch(path):
    """Reads ``path`` in a fresh interpreter where torch cannot be imported; returns the arrays it read."""
    out = str(path) + ".npz"
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None
        import numpy as np
        from weights_conversion.readers import read_state_dict
        np.savez({out!r}, **read_state_dict({str(path)!r}))
        assert not any(m.split(".")[0] in ("torch", "tensorflow", "keras") for m in sys.modules if sys.modules[m])
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO)
    with np.load(out) as arrays:
        return dict(arrays)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_save_checkpoint_read_without_torch(tmp_path, zip_format):
    tensors = _checkpoint_tensors()
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": tensors, "global_step": 5, "epoch": 1}, path, _use_new_zipfile_serialization=zip_format)
    assert_same(_read_without_torch(path), _expected(tensors))


def test_bin_state_dict_without_wrapper(tmp_path):
    tensors = _checkpoint_tensors()
    path = tmp_path / "diffusion_pytorch_model.bin"
    torch.save(tensors, path)
    assert_same(read_state_dict(path), _expected(tensors))


def _fake_lightning_module(monkeypatch, marker):
    """``pytorch_lightning.callbacks.model_checkpoint`` as far as pickling needs it, with a class and a
    function that would leave ``marker`` behind if the reader ever used them."""
    names = ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint")
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    module = sys.modules[names[-1]]

    class ModelCheckpoint:
        def __setstate__(self, state):
            marker.write_text("real class used")

    def touch(path):
        marker.write_text("real function called")

    for obj, name in ((ModelCheckpoint, "ModelCheckpoint"), (touch, "touch")):
        obj.__module__, obj.__qualname__ = module.__name__, name
        setattr(module, name, obj)
    return names, ModelCheckpoint, touch


def test_lightning_objects_beside_the_state_dict_are_inert(tmp_path, monkeypatch):
    """Original SD .ckpt files key their callbacks by Lightning's ModelCheckpoint class: such objects
    become placeholders, and nothing they name is imported or called."""
    marker = tmp_path / "touched"
    names, model_checkpoint, touch = _fake_lightning_module(monkeypatch, marker)
    tensors = {"w": torch.randn(2, 2)}
    callback = model_checkpoint()
    callback.best_model_path = "x.ckpt"
    checkpoint = {"state_dict": tensors, "global_step": 5, "trainer": callback, "hook": _Exploit(touch, "x"),
                  "callbacks": {model_checkpoint: {"best_model_score": torch.tensor(0.5)}}}
    path = tmp_path / "lightning.ckpt"
    torch.save(checkpoint, path)
    torch.save({"state_dict": {"w": torch.randn(2), "hook": _Exploit(touch, "x")}}, tmp_path / "inside.ckpt")
    for name in names:
        monkeypatch.delitem(sys.modules, name)
    assert_same(read_state_dict(path), _expected(tensors))
    with pytest.raises(CheckpointError, match="hook"):
        read_state_dict(tmp_path / "inside.ckpt")
    assert not marker.exists()


class _Exploit:
    def __init__(self, call, argument):
        self.call, self.argument = call, argument

    def __reduce__(self):
        return self.call, (self.argument,)


def _malicious_ckpt(path, payload):
    """A torch zip archive whose data.pkl runs ``payload`` when unpickled by plain pickle."""
    buffer = io.BytesIO()
    pickle.dump({"state_dict": {}, "global_step": payload}, buffer, protocol=2)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", buffer.getvalue())
        zf.writestr("archive/version", "3\n")


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "subprocess"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, kind):
    marker = tmp_path / "pwned"
    payload = {
        "os.system": _Exploit(os.system, f"touch {marker}"),
        "builtins.exec": _Exploit(exec, f"open({str(marker)!r}, 'w').close()"),
        "subprocess": _Exploit(subprocess.check_call, ["touch", str(marker)]),
    }[kind]
    path = tmp_path / "evil.ckpt"
    _malicious_ckpt(path, payload)
    with pytest.raises(UnsafeCheckpointError, match="refused global") as error:
        read_state_dict(path)
    assert isinstance(error.value, ValueError)
    assert kind.split(".")[-1] in str(error.value) or "posix" in str(error.value)
    assert not marker.exists()


def test_truncated_ckpt_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "t.ckpt"
    torch.save({"state_dict": {"w": torch.randn(64, 64)}}, path)
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(CheckpointError, match="t.ckpt"):
        read_state_dict(path)


def test_read_diffusers_folder(tmp_path, sd1):
    _, parts, _ = sd1
    (tmp_path / "unet").mkdir()
    safetensors.numpy.save_file(parts["unet"], str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "vae").mkdir()
    half_vae = {k: v.astype(np.float16) for k, v in parts["vae"].items()}
    safetensors.numpy.save_file(half_vae, str(tmp_path / "vae" / "diffusion_pytorch_model.fp16.safetensors"))
    _write_sharded(tmp_path / "text_encoder", parts["text_encoder"])
    (tmp_path / "tokenizer").mkdir()
    weights = read_diffusers_folder(tmp_path)
    assert sorted(weights) == ["text_encoder", "unet", "vae"]
    assert_same(weights["unet"], parts["unet"])
    assert_same(weights["vae"], half_vae)
    assert_same(weights["text_encoder"], parts["text_encoder"])


def _write_sharded(folder, state_dict):
    import json

    folder.mkdir()
    keys = sorted(state_dict)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, shard_keys in shards.items():
        safetensors.numpy.save_file({k: state_dict[k] for k in shard_keys}, str(folder / name))
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_diffusers_folder_missing_component_is_named(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="unet"):
        read_diffusers_folder(tmp_path)
