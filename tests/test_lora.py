"""LoRA files of every form, fused by us, give the weights diffusers' own loader fuses (tiny models).

Each LoRA is random and made here: diffusers / PEFT ones with peft and diffusers' ``save_lora_weights``, kohya
ones key by key. Every fixture is first read by diffusers (``load_lora_weights`` + ``fuse_lora``), so the
key names are proven by diffusers' converter, not by ours; LDM-named kohya files are the same tensors renamed
by ``tests.ldm_fixtures`` (proven against diffusers' single-file converters in ``test_ldm.py``). What diffusers
cannot read (per-module alphas, LyCORIS' Tucker core) is checked against the formula, computed with torch.
"""

import copy
import re

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from tests import ldm_fixtures
from tests import reference as R
from weights_conversion import CheckpointError, keras_names, ldm
from weights_conversion.lora import LoraUpdate, fuse, ldm_unet_blocks, lora_state_dict, lora_updates, read_lora, write_lora

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "time_emb_proj")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def base():
    """The tiny SD 1.x pipeline and its converted weights and shapes; tests fuse into copies."""
    pipeline = R.make_reference_pipeline(seed=30)
    return dict(pipeline=pipeline, **_converted(pipeline))


def _converted(pipeline):
    weights = {"unet": keras_names.convert_unet(R.state_dict_numpy(pipeline.unet)),
               "text_encoder": keras_names.convert_text_encoder(R.state_dict_numpy(pipeline.text_encoder))}
    shapes = {network: {path: array.shape for path, array in w.items()} for network, w in weights.items()}
    return dict(weights=weights, shapes=shapes)


def fused_by_diffusers(pipeline, path, scale):
    """diffusers' fusing of the file into a copy of ``pipeline``, converted to our weights."""
    pipeline = copy.deepcopy(pipeline)
    pipeline.load_lora_weights(str(path))
    pipeline.fuse_lora(lora_scale=scale)
    pipeline.unload_lora_weights()
    return _converted(pipeline)["weights"]


def fused_by_us(path, weights, shapes, scale):
    state_dict, metadata = read_lora(path)
    updates = lora_updates(state_dict, shapes, metadata)
    return {network: fuse(weights[network], updates[network], scale) for network in weights}, updates


def assert_fused_alike(ours, expected, base_weights, updates):
    """Every weight equal; the changed ones exactly those the LoRA adapts, and their changes equal too."""
    for network, reference in expected.items():
        base_network = base_weights[network]
        changed = {p for p, w in reference.items() if not np.array_equal(w, base_network[p])}
        assert changed == set(updates[network]), network
        for path, weight in reference.items():
            error = R.relative_error(ours[network][path], weight)
            assert error < TOLERANCE, f"{network} {path}: relative error {error:.1e}"
        for path in changed:
            error = R.relative_error(ours[network][path] - base_network[path], reference[path] - base_network[path])
            assert error < 1e-4, f"{network} {path}: the update's relative error {error:.1e}"


def targets(module, suffixes):
    """``{name: module}`` of the Linear / Conv2d modules whose name ends with one of ``suffixes``."""
    return {name: m for name, m in module.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(suffixes)}


def randomize_lora(module, seed):
    """peft starts lora_B at zero; give every LoRA factor seeded random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) / np.sqrt(np.prod(p.shape[1:])))


# ------------------------------------------------------------------------------------- diffusers / PEFT


def save_peft_lora(pipeline, folder, unet_config, text_encoder_config=None, with_metadata=True):
    """Adds random peft adapters to a copy of ``pipeline`` and saves them with diffusers' writer."""
    from diffusers import StableDiffusionPipeline
    from peft import inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipeline = copy.deepcopy(pipeline)
    pipeline.unet.add_adapter(unet_config)
    randomize_lora(pipeline.unet, 1)
    layers = dict(unet_lora_layers=get_peft_model_state_dict(pipeline.unet))
    metadata = dict(unet_lora_adapter_metadata=unet_config.to_dict())
    if text_encoder_config is not None:
        inject_adapter_in_model(text_encoder_config, pipeline.text_encoder)
        randomize_lora(pipeline.text_encoder, 2)
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(pipeline.text_encoder)
        metadata["text_encoder_lora_adapter_metadata"] = text_encoder_config.to_dict()
    StableDiffusionPipeline.save_lora_weights(folder, **layers, **(metadata if with_metadata else {}))
    return folder / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("form", ["metadata", "rslora", "no-metadata"])
def test_peft_lora_matches_diffusers(base, tmp_path, form):
    from peft import LoraConfig

    unet_config = LoraConfig(r=4, lora_alpha=8, target_modules=list(UNET_TARGETS), use_rslora=form == "rslora",
                             rank_pattern={"to_k": 2}, alpha_pattern={"attn2.to_v": 3, "conv2": 5})
    text_encoder_config = LoraConfig(r=2, lora_alpha=3, target_modules=list(TEXT_ENCODER_TARGETS))
    path = save_peft_lora(base["pipeline"], tmp_path, unet_config, text_encoder_config, form != "no-metadata")
    expected = fused_by_diffusers(base["pipeline"], path, scale=0.7)
    ours, updates = fused_by_us(path, base["weights"], base["shapes"], scale=0.7)
    assert len(updates["unet"]) == len(targets(base["pipeline"].unet, UNET_TARGETS))
    assert "down0_attn0_proj_in/kernel" in updates["unet"] and "down0_res0_conv1/kernel" in updates["unet"]
    assert len(updates["text_encoder"]) == 12
    assert_fused_alike(ours, expected, base["weights"], updates)


# ----------------------------------------------------------------------------------------- kohya / A1111


def kohya_lora(unet, text_encoder, alpha, seed=0, unet_names=None):
    """A random kohya LoRA over ``targets``: LoCon 3x3 on the resnets' convolutions, 1x1 on SD 1.x's proj_in
    / proj_out and the resnets' shortcuts, linear elsewhere; ranks 2 to 4; ``alpha(i)`` per module.

    Returns:
        ``(state_dict, factors)``; ``factors[(network, module)] = (down, up, alpha)`` for reference formulas.
    """
    rng = np.random.default_rng(seed)
    unet_names = unet_names or {}
    modules = [("unet", name, m) for name, m in targets(unet, UNET_TARGETS).items()]
    modules += [("text_encoder", name, m) for name, m in targets(text_encoder, TEXT_ENCODER_TARGETS).items()]
    state_dict, factors = {}, {}
    for i, (network, name, module) in enumerate(modules):
        rank, weight = 2 + i % 3, module.weight
        fan_in = int(np.prod(weight.shape[1:]))
        down = rng.standard_normal((rank, *weight.shape[1:])).astype("float32") * 0.5 / np.sqrt(fan_in)
        up = rng.standard_normal((weight.shape[0], rank, *(1, 1)[: weight.ndim - 2])).astype("float32") / np.sqrt(rank)
        if network == "unet":
            key = "lora_unet_" + unet_names.get(name, name).replace(".", "_")
        else:
            key = "lora_te_" + ("text_model." + name.removeprefix("text_model.")).replace(".", "_")
        state_dict.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                           f"{key}.alpha": np.array(alpha(i), np.float32)})
        factors[(network, name)] = (down, up, alpha(i))
    return state_dict, factors


def ldm_unet_names(unet):
    """diffusers UNet module -> its LDM name, from ``tests.ldm_fixtures``' independent map."""
    renamed = ldm_fixtures.unet_to_ldm({k: k for k in unet.state_dict()})
    return {diffusers.rsplit(".", 1)[0]: name.rsplit(".", 1)[0] for name, diffusers in renamed.items()}


def test_kohya_lora_matches_diffusers(base, tmp_path):
    """kohya names of both kinds, LoCon convolutions and alphas, against diffusers' kohya loader."""
    pipeline = base["pipeline"]
    state_dict, _ = kohya_lora(pipeline.unet, pipeline.text_encoder, alpha=lambda i: 3.0)
    save_file(state_dict, str(tmp_path / "kohya.safetensors"))
    expected = fused_by_diffusers(pipeline, tmp_path / "kohya.safetensors", scale=0.8)
    ours, updates = fused_by_us(tmp_path / "kohya.safetensors", base["weights"], base["shapes"], scale=0.8)
    assert updates["unet"]["down0_res0_conv1/kernel"].down.shape[2:] == (3, 3)
    assert_fused_alike(ours, expected, base["weights"], updates)

    ldm_named, _ = kohya_lora(pipeline.unet, pipeline.text_encoder, alpha=lambda i: 3.0,
                              unet_names=ldm_unet_names(pipeline.unet))
    assert "lora_unet_input_blocks_1_1_proj_in.lora_down.weight" in ldm_named
    assert "lora_unet_output_blocks_5_0_skip_connection.lora_up.weight" in ldm_named
    save_file(ldm_named, str(tmp_path / "kohya-ldm.safetensors"))
    ours, updates = fused_by_us(tmp_path / "kohya-ldm.safetensors", base["weights"], base["shapes"], scale=0.8)
    assert_fused_alike(ours, expected, base["weights"], updates)


def test_older_diffusers_names_match_diffusers(base, tmp_path):
    """diffusers' pre-PEFT names (``processor.to_q_lora.down``, ``lora.down``, ``lora_linear_layer.down``,
    ``self_attn.to_q_lora.down``), made by diffusers' own kohya converter, alphas left out (scale 1)."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

    pipeline = base["pipeline"]
    kohya, _ = kohya_lora(pipeline.unet, pipeline.text_encoder, alpha=lambda i: 1.0, seed=4)
    older, _ = _convert_non_diffusers_lora_to_diffusers({k: torch.from_numpy(v) for k, v in kohya.items()})
    assert any(k.endswith(".processor.to_out_lora.up.weight") for k in older)
    assert any(k.endswith(".self_attn.to_q_lora.down.weight") for k in older)
    save_file({k: v.numpy() for k, v in older.items()}, str(tmp_path / "older.safetensors"))
    expected = fused_by_diffusers(pipeline, tmp_path / "older.safetensors", scale=1.0)
    ours, updates = fused_by_us(tmp_path / "older.safetensors", base["weights"], base["shapes"], scale=1.0)
    assert_fused_alike(ours, expected, base["weights"], updates)


def test_kohya_per_module_alphas_follow_the_formula(base, tmp_path):
    """``W + multiplier * alpha / rank * up @ down`` per module (diffusers' loader mishandles per-module alphas)."""
    pipeline = base["pipeline"]
    state_dict, factors = kohya_lora(pipeline.unet, pipeline.text_encoder, alpha=lambda i: 0.5 + i % 5, seed=1)
    save_file(state_dict, str(tmp_path / "alphas.safetensors"))
    expected = {network: dict(R.state_dict_numpy(getattr(pipeline, network))) for network in ("unet", "text_encoder")}
    for (network, name), (down, up, alpha) in factors.items():
        weight = torch.from_numpy(expected[network][name + ".weight"])
        delta = torch.from_numpy(up).flatten(1) @ torch.from_numpy(down).flatten(1)
        fused = weight + 1.5 * alpha / down.shape[0] * delta.reshape(weight.shape)
        expected[network][name + ".weight"] = fused.numpy()
    expected = {"unet": keras_names.convert_unet(expected["unet"]),
                "text_encoder": keras_names.convert_text_encoder(expected["text_encoder"])}
    ours, updates = fused_by_us(tmp_path / "alphas.safetensors", base["weights"], base["shapes"], scale=1.5)
    assert_fused_alike(ours, expected, base["weights"], updates)


def test_tucker_core_composes_the_three_convolutions(base):
    """LyCORIS' ``lora_mid``: our one kernel acts as the 1x1 down, kh x kw core and 1x1 up convolutions
    (on down0_res0_conv1, a 32 -> 32 3x3 convolution)."""
    rng = np.random.default_rng(2)
    down, mid, up = (rng.standard_normal(s).astype("float32") for s in ((4, 32, 1, 1), (4, 4, 3, 3), (32, 4, 1, 1)))
    key = "lora_unet_down_blocks_0_resnets_0_conv1"
    state_dict = {f"{key}.lora_down.weight": down, f"{key}.lora_mid.weight": mid, f"{key}.lora_up.weight": up,
                  f"{key}.alpha": np.array(2.0, np.float32)}
    update = lora_updates(state_dict, base["shapes"])["unet"]["down0_res0_conv1/kernel"]
    assert update.delta().shape == (3, 3, 32, 32)
    x = torch.from_numpy(rng.standard_normal((1, 32, 6, 5)).astype("float32"))
    conv = torch.nn.functional.conv2d
    chained = conv(conv(conv(x, torch.from_numpy(down)), torch.from_numpy(mid), padding=1), torch.from_numpy(up))
    ours = conv(x, torch.from_numpy(np.transpose(update.delta(), (3, 2, 0, 1)).copy()), padding=1)
    assert R.relative_error(ours.numpy(), 2.0 / 4 * chained.numpy()) < 1e-5


# ---------------------------------------------------------------------------------------------- SD 2.x


def test_sd2_loras_match_diffusers(tmp_path):
    """SD 2.x's linear proj_in / proj_out, in both forms."""
    from peft import LoraConfig

    pipeline = R.make_reference_pipeline(seed=31)
    pipeline.unet = R.make_unet(31, **R.SD2_UNET)
    model = _converted(pipeline)
    peft_path = save_peft_lora(pipeline, tmp_path, LoraConfig(r=4, lora_alpha=4, target_modules=list(UNET_TARGETS)))
    state_dict, _ = kohya_lora(pipeline.unet, pipeline.text_encoder, alpha=lambda i: 2.0, seed=3)
    save_file(state_dict, str(tmp_path / "kohya.safetensors"))
    for path in (peft_path, tmp_path / "kohya.safetensors"):
        expected = fused_by_diffusers(pipeline, path, scale=1.0)
        ours, updates = fused_by_us(path, model["weights"], model["shapes"], scale=1.0)
        assert updates["unet"]["down0_attn0_proj_in/kernel"].down.ndim == 2
        assert_fused_alike(ours, expected, model["weights"], updates)


# ------------------------------------------------------------------------------------------- bad input


def test_sd2_lora_on_sd1_and_unknown_keys_are_named_at_once(base):
    pipeline = R.make_reference_pipeline(seed=32)
    pipeline.unet = R.make_unet(32, **R.SD2_UNET)
    state_dict, _ = kohya_lora(pipeline.unet, pipeline.text_encoder, alpha=lambda i: 2.0)
    state_dict["lora_unet_down_blocks_0_attentions_0_wrong_layer.lora_down.weight"] = np.zeros((2, 4), np.float32)
    state_dict["lora_unet_down_blocks_0_attentions_0_wrong_layer.lora_up.weight"] = np.zeros((4, 2), np.float32)
    state_dict["lora_unet_mid_block_resnets_0_conv1.hada_w1_a"] = np.zeros((4, 2), np.float32)
    state_dict["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = np.zeros((2, 4), np.float32)
    del state_dict["lora_te_text_model_encoder_layers_1_mlp_fc2.lora_up.weight"]
    with pytest.raises(CheckpointError) as error:
        lora_updates(state_dict, base["shapes"])
    message = str(error.value)
    assert message.count("\n") == 0 and "mis-shaped: " in message
    assert "unet: down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k -> down0_attn0_block0_cross_k/kernel " \
           "(LoRA (64, 1024), model (32, 64), PyTorch layout)" in message
    assert "no place in the model: unet: down_blocks_0_attentions_0_wrong_layer (down, up)" in message
    assert "unsupported network type LoHa (hada_*): lora_unet_mid_block_resnets_0_conv1.hada_w1_a" in message
    assert "SD-XL" in message and "lora_te2_text_model_encoder_layers_0_mlp_fc1" in message
    assert "text_encoder: text_model_encoder_layers_1_mlp_fc2 lacks its up factor" in message


def test_ldm_numbering_agrees_with_the_checkpoint_converter(base):
    """Our LDM layout from the model's levels is the one ``ldm.unet_block_map`` reads from LDM checkpoints."""
    ldm_keys = ldm_fixtures.unet_to_ldm(R.state_dict_numpy(base["pipeline"].unet))
    expected = {module.replace(".", "_"): (diffusers.replace(".", "_"), kind)
                for module, (diffusers, kind) in ldm.unet_block_map(ldm_keys).items()}
    assert ldm_unet_blocks(base["shapes"]["unet"]) == expected


TINY_MODEL = {"unet": {"down0_attn0_block0_self_q/kernel": (8, 8)}, "text_encoder": {}}
TO_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.mark.parametrize("metadata, message", [
    ("{", "corrupt lora_adapter_metadata: JSONDecodeError"),
    ("[" * 100_000 + "]" * 100_000, "corrupt lora_adapter_metadata: RecursionError"),
    ("[1, 2]", "a JSON list, not an object"),
    ('{"unet.lora_alpha": "8"}', 'unet.lora_alpha is "8", not a finite number'),
    ('{"unet.lora_alpha": 8, "unet.use_rslora": "yes"}', "use_rslora"),
    ('{"unet.lora_alpha": 8, "unet.alpha_pattern": [1]}', "alpha_pattern is [1], not an object"),
    ('{"unet.lora_alpha": 8, "unet.alpha_pattern": {"(a+)+$": 2}}', "is not a module name"),
    ('{"unet.lora_alpha": 8, "unet.alpha_pattern": {"to_q": null}}', "not a finite number"),
])
def test_hostile_peft_metadata_is_a_checkpoint_error(tmp_path, metadata, message):
    """The metadata is the file's, like its tensors: nothing in it may crash, hang or backtrack forever."""
    path = tmp_path / "lora.safetensors"
    factors = {f"{TO_Q}.lora_A.weight": np.ones((2, 8), np.float32), f"{TO_Q}.lora_B.weight": np.ones((8, 2), np.float32)}
    save_file(factors, str(path), metadata={"lora_adapter_metadata": metadata})
    state_dict, read_metadata = read_lora(path)
    with pytest.raises(CheckpointError, match=re.escape(message)) as error:
        lora_updates(state_dict, TINY_MODEL, read_metadata, where=str(path))
    assert str(error.value).startswith(str(path))


@pytest.mark.parametrize("factors, message", [
    ({"down": (0, 8), "up": (8, 0)}, "rank 0"),
    ({"down": (2, 8), "up": (8, 2), "alpha": (0,)}, "alpha of shape (0,) is not one finite number"),
    ({"down": (2, 8), "up": (8, 2), "alpha": (2,)}, "alpha of shape (2,)"),
    ({"down": (2, 8, 1, 1), "up": (8,), "mid": (2, 2, 1, 1)}, "does not join up (8,)"),
    ({"down": (2, 8, 1, 1), "up": (8, 2, 1), "mid": (2, 2, 1, 1)}, "does not join"),
])
def test_malformed_factors_are_a_checkpoint_error(factors, message):
    suffixes = {"down": ".lora_down.weight", "up": ".lora_up.weight", "mid": ".lora_mid.weight", "alpha": ".alpha"}
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    state_dict = {prefix + suffixes[name]: np.ones(shape, np.float32) for name, shape in factors.items()}
    with pytest.raises(CheckpointError, match=re.escape(message)):
        lora_updates(state_dict, TINY_MODEL)


# ------------------------------------------------------------------------------------------------ writing

# Our layers a trainer adapts: attention projections, SD 1.x's 1x1 proj_in / proj_out, feed-forward, resnet
# convolutions (3x3), their shortcuts and time projections; the text encoder's attention and MLP.
WRITTEN_TARGETS = {"unet": re.compile(r"_(self|cross)_(q|k|v|out)|_proj_(in|out)|_ff_(in|out)|_res\d+_(conv[12]|skip|time_proj)"),
                   "text_encoder": re.compile(r"_attn_(q|k|v|out)|_mlp_fc[12]")}


def random_updates(shapes, seed, alpha, conv_projections=True):
    """Random `LoraUpdate`s (ranks 2 to 4, ``alpha(i)``) on every targeted kernel of ``shapes``, as a trainer
    makes them: factors in PyTorch's layout for `keras_names.torch_shape`."""
    rng = np.random.default_rng(seed)
    updates, i = {}, 0
    for network, pattern in WRITTEN_TARGETS.items():
        updates[network] = []
        for path, shape in sorted(shapes[network].items()):
            layer, variable = path.rsplit("/", 1)
            if variable != "kernel" or not pattern.search(layer):
                continue
            torch_shape = keras_names.torch_shape(layer, shape, conv_projections)
            rank, fan_in = 2 + i % 3, int(np.prod(torch_shape[1:]))
            down = (rng.standard_normal((rank, *torch_shape[1:])) * 0.5 / np.sqrt(fan_in)).astype("float32")
            up = (rng.standard_normal((torch_shape[0], rank)) / np.sqrt(rank)).astype("float32")
            updates[network].append(LoraUpdate(path, torch_shape, up, down, alpha(i) / rank))
            i += 1
    return updates


@pytest.mark.parametrize("format", ["diffusers", "kohya"])
def test_written_loras_read_back_identically(base, tmp_path, format):
    updates = random_updates(base["shapes"], seed=3, alpha=lambda i: 1.0 + i % 4)
    path = write_lora(tmp_path / "written.safetensors", updates, format=format)
    state_dict, metadata = read_lora(path)
    back = lora_updates(state_dict, base["shapes"], metadata)
    for network, written in updates.items():
        assert sorted(back[network]) == sorted(u.path for u in written)
        for update in written:
            read = back[network][update.path]
            assert read.torch_shape == update.torch_shape and read.mid is None
            np.testing.assert_array_equal(read.up, update.up)
            np.testing.assert_array_equal(read.down, update.down)
            assert read.scale == pytest.approx(update.scale, rel=1e-6)
    assert "down0_attn0_proj_in/kernel" in back["unet"] and "down0_res0_conv1/kernel" in back["unet"]
    assert back["unet"]["down0_attn0_proj_in/kernel"].down.shape[2:] == (1, 1)  # SD 1.x: a 1x1 convolution
    assert len(back["text_encoder"]) == 12


def test_written_tucker_lora_is_kohya_only(base, tmp_path):
    rng = np.random.default_rng(5)
    mid = rng.standard_normal((2, 2, 3, 3)).astype("float32")
    update = LoraUpdate("down0_res0_conv1/kernel", (32, 32, 3, 3), rng.standard_normal((32, 2)).astype("float32"),
                        rng.standard_normal((2, 32)).astype("float32"), 0.75, mid)
    path = write_lora(tmp_path / "tucker.safetensors", {"unet": [update]}, format="kohya")
    read = lora_updates(read_lora(path)[0], base["shapes"])["unet"][update.path]
    np.testing.assert_allclose(read.delta(), update.delta(), rtol=1e-6)
    with pytest.raises(ValueError, match="Tucker-core .* write it as kohya"):
        lora_state_dict({"unet": [update]}, "diffusers")
    with pytest.raises(ValueError, match="Unknown LoRA format 'peft'"):
        lora_state_dict({"unet": [update]}, "peft")
    bad = LoraUpdate("down0_res0_conv1/kernel", (32, 32, 3, 3), update.up, update.down, 1.0)
    with pytest.raises(ValueError, match="do not make the PyTorch weight"):
        lora_state_dict({"unet": [bad]}, "kohya")


@pytest.mark.parametrize("format", ["diffusers", "kohya"])
def test_written_loras_load_in_diffusers(base, tmp_path, format):
    """diffusers' own loader fuses the written file into the weights ours fuse (per-module alphas through the
    PEFT metadata's alpha_pattern; kohya files with one alpha, which diffusers' kohya loader needs)."""
    alpha = (lambda i: 1.0 + i % 4) if format == "diffusers" else (lambda i: 3.0)
    updates = random_updates(base["shapes"], seed=4, alpha=alpha)
    path = write_lora(tmp_path / f"{format}.safetensors", updates, format=format)
    expected = fused_by_diffusers(base["pipeline"], path, scale=0.6)
    ours, read = fused_by_us(path, base["weights"], base["shapes"], scale=0.6)
    assert_fused_alike(ours, expected, base["weights"], read)
