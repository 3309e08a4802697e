"""Original single-file Stable Diffusion checkpoints (CompVis / LDM names) -> diffusers names and layouts.

An original ``.ckpt`` / ``.safetensors`` holds the whole ``LatentDiffusion`` object: the UNet under
``model.diffusion_model.``, the VAE under ``first_stage_model.`` and the text encoder under
``cond_stage_model.`` (``transformer.`` for SD 1.x's CLIP from transformers, ``model.`` for SD 2.x's
OpenCLIP). ``split_ldm_checkpoint`` renames them to the keys of diffusers' ``UNet2DConditionModel`` and
``AutoencoderKL`` and of transformers' ``CLIPTextModel``, so that the rest of the conversion has one
input format. The UNet's levels, resnets per level and attention placement are read from the keys
present, never assumed, so any channel width, depth or input channel count (9 for inpainting) passes.

Strict: every tensor is either converted exactly once or matches ``IGNORED_KEYS``; anything else is
reported, all at once, in a ``CheckpointError``.

Example:

>>> import os, tempfile
>>> from weights_conversion import convert_source, export
>>> from weights_conversion.readers import read_state_dict
>>> from kerasdiffusion.sources import BUILTIN_MODELS  # the built-in model: a converted folder, plain files
>>> shapes_model = BUILTIN_MODELS["kerasdiffusion/shapes"]
>>> state_dicts = export.torch_state_dicts(convert_source(shapes_model).weights, conv_projections=True)
>>> checkpoint = export.save_single_file(os.path.join(tempfile.mkdtemp(), "shapes.safetensors"), state_dicts)
>>> parts = split_ldm_checkpoint(read_state_dict(checkpoint))  # an original-format file, as SD 1.5's
>>> sorted(parts), parts["unet"]["conv_in.weight"].shape      # (320, 4, 3, 3) for SD 1.5
(['text_encoder', 'unet', 'vae'], (64, 4, 3, 3))
>>> parts = split_ldm_checkpoint(read_state_dict("v1-5-pruned-emaonly.safetensors"))   # doctest: +SKIP
"""

import re

import numpy as np

from weights_conversion.errors import CheckpointError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."

# Tensors of the LatentDiffusion object that no network needs:
IGNORED_KEYS = tuple(
    re.compile(p)
    for p in (
        # the EMA copy of the UNet, flattened names ("model_ema.diffusion_modelinput_blocks00weight")
        r"model_ema\..*",
        # the training noise schedule and loss weights; schedulers rebuild them from the betas' recipe
        (
            r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
            r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod"
            r"|posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2"
            r"|logvar|lvlb_weights|scale_factor)"
        ),
        # the VAE's training losses (LPIPS, discriminator)
        r"first_stage_model\.loss\..*",
        # transformers' constant position-id buffer
        r"cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids",
        # OpenCLIP's contrastive head and causal-mask buffer; SD 2.x conditions on hidden states only
        r"cond_stage_model\.model\.(text_projection|logit_scale|attn_mask)",
    )
)

_MAX_LISTED = 50


def is_ldm_checkpoint(state_dict):
    """Whether a state dict is an original single-file Stable Diffusion checkpoint (has LDM UNet keys)."""
    return any(key.startswith(UNET_PREFIX) for key in state_dict)


def split_ldm_checkpoint(state_dict):
    """An original Stable Diffusion checkpoint as three diffusers-style state dicts.

    Args:
        state_dict: ``{LDM name: array}``, e.g. from ``readers.read_state_dict``.

    Returns:
        ``{"unet": ..., "vae": ..., "text_encoder": ...}`` keyed like diffusers' ``UNet2DConditionModel``,
        ``AutoencoderKL`` and transformers' ``CLIPTextModel`` as saved on the Hub (``text_model.*``).
        For SD 2.x the OpenCLIP tower's last block is dropped, as diffusers does: SD 2.x conditions on the
        penultimate layer, so the converted encoder's final-norm output is what the UNet expects.

    Raises:
        CheckpointError: unknown tensors (all listed), or a network missing altogether.
    """
    parts, unknown = _partition(state_dict)
    if parts[OPEN_CLIP_PREFIX] and parts[CLIP_PREFIX]:
        raise CheckpointError("checkpoint has both a CLIP (SD 1.x) and an OpenCLIP (SD 2.x) text encoder")
    text = (OPEN_CLIP_PREFIX, _convert_open_clip) if parts[OPEN_CLIP_PREFIX] else (CLIP_PREFIX, _convert_clip)
    networks = (("unet", UNET_PREFIX, _convert_unet), ("vae", VAE_PREFIX, _convert_vae), ("text_encoder", *text))
    result, missing = {}, []
    for name, prefix, convert in networks:
        result[name], rejected = convert(parts[prefix])
        unknown += [prefix + key for key in rejected]
        if not result[name]:
            missing.append(f"{prefix}* ({name})")
    if unknown:
        raise CheckpointError(_unknown_message(unknown))
    if missing:
        raise CheckpointError(f"not a Stable Diffusion checkpoint: no tensors for {', '.join(missing)}")
    return result


def _partition(state_dict):
    """Keys grouped by network prefix (prefix removed); ignored keys dropped; the rest unknown."""
    parts = {p: {} for p in (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX, OPEN_CLIP_PREFIX)}
    unknown = []
    for key, value in state_dict.items():
        if any(p.fullmatch(key) for p in IGNORED_KEYS):
            continue
        prefix = next((p for p in parts if key.startswith(p)), None)
        if prefix is None:
            unknown.append(key)
        else:
            parts[prefix][key[len(prefix) :]] = value
    return parts, unknown


def _unknown_message(keys):
    listed = ", ".join(sorted(keys)[:_MAX_LISTED])
    more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return (
        f"{len(keys)} tensors of the checkpoint have no place in a Stable Diffusion 1.x/2.x model "
        f"(another model family, or a damaged file): {listed}{more}"
    )


def _renamed(state_dict, rename, relayout=None):
    """Applies ``rename(key) -> new key or None`` to every key; returns (converted, rejected keys)."""
    converted, rejected = {}, []
    for key, value in state_dict.items():
        new = rename(key)
        if new is None:
            rejected.append(key)
            continue
        if new in converted:
            raise CheckpointError(f"two checkpoint tensors map to the same diffusers tensor {new}")
        converted[new] = relayout(new, value) if relayout else value
    return converted, rejected


# ------------------------------------------------------------------------------------------------ layouts


def conv1x1_to_linear(weight):
    """A 1x1 convolution's ``[out, in, 1, 1]`` weight as a linear layer's ``[out, in]`` (the same numbers).

    LDM's VAE attention computes q, k, v and its output with 1x1 convolutions; diffusers uses linears.
    """
    if weight.ndim == 2:
        return weight
    if weight.ndim != 4 or weight.shape[2:] != (1, 1):
        raise CheckpointError(f"expected a 1x1 convolution weight, got shape {weight.shape}")
    return weight[:, :, 0, 0]


def split_in_proj(weight):
    """PyTorch ``MultiheadAttention``'s fused ``in_proj`` (``[3D, ...]``) as the q, k, v projections."""
    if weight.shape[0] % 3:
        raise CheckpointError(f"in_proj of shape {weight.shape} does not split into q, k, v")
    return np.split(weight, 3, axis=0)


# -------------------------------------------------------------------------------------------------- UNet

UNET_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
RESNET_PARTS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
# LDM's SpatialTransformer already uses diffusers' Transformer2DModel names.
_TRANSFORMER_PART = re.compile(
    r"norm|proj_in|proj_out|transformer_blocks\.\d+\."
    r"(norm[123]|attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2)"
)
_UNET_SUBMODULE = re.compile(r"(input_blocks\.\d+\.\d+|middle_block\.\d+|output_blocks\.\d+\.\d+)\.(.+)")
_COLLECTIONS = {"resnet": "resnets", "attention": "attentions"}


def _submodule_kind(children):
    """What an LDM block's submodule is, from the names of its children."""
    if "in_layers" in children:
        return "resnet"
    if "transformer_blocks" in children or "proj_in" in children:
        return "attention"
    if children == {"op"}:
        return "downsample"
    if children == {"conv"}:
        return "upsample"
    return None


def _unet_submodule_kinds(keys):
    """``{"input_blocks.1.0": "resnet", ...}`` for every submodule of the UNet's block lists."""
    children = {}
    for key in keys:
        match = _UNET_SUBMODULE.fullmatch(key)
        if match and match.group(1) != "input_blocks.0.0":
            children.setdefault(match.group(1), set()).add(match.group(2).split(".")[0])
    return {module: _submodule_kind(names) for module, names in children.items()}


def _block_submodules(kinds, block):
    """The submodules of one LDM block (``"input_blocks.4"``), in order, with their kinds."""
    subs = [m for m in kinds if m.rsplit(".", 1)[0] == block]
    return sorted(((m, kinds[m]) for m in subs), key=lambda mk: int(mk[0].rsplit(".", 1)[1]))


def _block_indices(kinds, name):
    return sorted({int(m.split(".")[1]) for m in kinds if m.startswith(name + ".")})


def _down_block_map(kinds):
    """``input_blocks.i.j`` -> diffusers ``down_blocks.level.{resnets,attentions}.layer``; a downsampler
    closes a level, so the levels and their depths come from the keys alone."""
    mapping, level, layer = {}, 0, 0
    for i in _block_indices(kinds, "input_blocks"):
        subs = _block_submodules(kinds, f"input_blocks.{i}")
        if [kind for _, kind in subs] == ["downsample"]:
            mapping[subs[0][0]] = (f"down_blocks.{level}.downsamplers.0", "downsample")
            level, layer = level + 1, 0
            continue
        for module, kind in subs:
            if kind in _COLLECTIONS:
                mapping[module] = (f"down_blocks.{level}.{_COLLECTIONS[kind]}.{layer}", kind)
        layer += 1
    return mapping


def _mid_block_map(kinds):
    """``middle_block.i`` -> ``mid_block.resnets.r`` / ``mid_block.attentions.a``, counted in order."""
    mapping, counts = {}, {"resnet": 0, "attention": 0}
    for i in _block_indices(kinds, "middle_block"):
        module = f"middle_block.{i}"
        kind = kinds[module]
        if kind in _COLLECTIONS:
            mapping[module] = (f"mid_block.{_COLLECTIONS[kind]}.{counts[kind]}", kind)
            counts[kind] += 1
    return mapping


def _up_block_map(kinds):
    """``output_blocks.i.j`` -> ``up_blocks.level...``, deepest level first; an upsampler closes a level."""
    mapping, level, layer = {}, 0, 0
    for i in _block_indices(kinds, "output_blocks"):
        upsampled = False
        for module, kind in _block_submodules(kinds, f"output_blocks.{i}"):
            if kind == "upsample":
                mapping[module] = (f"up_blocks.{level}.upsamplers.0", kind)
                upsampled = True
            elif kind in _COLLECTIONS:
                mapping[module] = (f"up_blocks.{level}.{_COLLECTIONS[kind]}.{layer}", kind)
        layer += 1
        if upsampled:
            level, layer = level + 1, 0
    return mapping


def unet_block_map(keys):
    """Every LDM UNet submodule (``"output_blocks.5.2"``) -> (diffusers module, kind), from the keys."""
    kinds = _unet_submodule_kinds(keys)
    return {**_down_block_map(kinds), **_mid_block_map(kinds), **_up_block_map(kinds)}


def _level_indices(paths, pattern):
    return sorted({int(m.group(1)) for p in paths if (m := re.match(pattern, p))})


def unet_block_layout(unet_paths):
    """LDM's UNet submodules -> (diffusers module, kind), numbered the way LDM numbers them (`unet_block_map`
    reads the same numbering from an LDM checkpoint's keys), from our UNet's variable paths.

    ``input_blocks.0.0`` is the input convolution; then each down level's layers (a resnet at ``.0``, its
    attention at ``.1``), each level closed by its downsampler; ``middle_block.0..2``; then the up levels,
    deepest first, the upsampler after the level's last layer (``.2`` after an attention, else ``.1``).

    Example:

    >>> unet_block_layout(["down0_res0_conv1/kernel", "down0_attn0_proj_in/kernel"])["input_blocks.1.1"]
    ('down_blocks.0.attentions.0', 'attention')
    """
    has = lambda prefix: any(p.startswith(prefix) for p in unet_paths)  # noqa: E731
    blocks, n = {}, 1
    for level in _level_indices(unet_paths, r"down(\d+)_res"):
        for layer in _level_indices(unet_paths, rf"down{level}_res(\d+)_"):
            blocks[f"input_blocks.{n}.0"] = (f"down_blocks.{level}.resnets.{layer}", "resnet")
            if has(f"down{level}_attn{layer}_"):
                blocks[f"input_blocks.{n}.1"] = (f"down_blocks.{level}.attentions.{layer}", "attention")
            n += 1
        if has(f"down{level}_downsample/"):
            blocks[f"input_blocks.{n}.0"] = (f"down_blocks.{level}.downsamplers.0", "downsample")
            n += 1
    blocks["middle_block.0"] = ("mid_block.resnets.0", "resnet")
    blocks["middle_block.1"] = ("mid_block.attentions.0", "attention")
    blocks["middle_block.2"] = ("mid_block.resnets.1", "resnet")
    n = 0
    for level in _level_indices(unet_paths, r"up(\d+)_res"):
        layers = _level_indices(unet_paths, rf"up{level}_res(\d+)_")
        for layer in layers:
            blocks[f"output_blocks.{n}.0"] = (f"up_blocks.{level}.resnets.{layer}", "resnet")
            attention = has(f"up{level}_attn{layer}_")
            if attention:
                blocks[f"output_blocks.{n}.1"] = (f"up_blocks.{level}.attentions.{layer}", "attention")
            if layer == layers[-1] and has(f"up{level}_upsample/"):
                blocks[f"output_blocks.{n}.{2 if attention else 1}"] = (f"up_blocks.{level}.upsamplers.0", "upsample")
            n += 1
    return blocks


def _submodule_part(kind, part):
    """A parameter's path inside a resnet / attention / resampler, in diffusers' names, or None."""
    module, _, leaf = part.rpartition(".")
    if leaf not in ("weight", "bias"):
        return None
    if kind == "resnet":
        new = RESNET_PARTS.get(module)
    elif kind == "attention":
        new = module if _TRANSFORMER_PART.fullmatch(module) else None
    else:
        new = "conv" if module == {"downsample": "op", "upsample": "conv"}[kind] else None
    return None if new is None else f"{new}.{leaf}"


def _unet_key(key, block_map):
    module, _, leaf = key.rpartition(".")
    if module in UNET_TOP and leaf in ("weight", "bias"):
        return f"{UNET_TOP[module]}.{leaf}"
    match = _UNET_SUBMODULE.fullmatch(key)
    if not match or match.group(1) not in block_map:
        return None
    target, kind = block_map[match.group(1)]
    part = _submodule_part(kind, match.group(2))
    return None if part is None else f"{target}.{part}"


def _convert_unet(state_dict):
    """LDM ``openaimodel.UNetModel`` keys (prefix removed) -> ``UNet2DConditionModel`` keys; same layouts."""
    block_map = unet_block_map(state_dict)
    return _renamed(state_dict, lambda key: _unet_key(key, block_map))


# --------------------------------------------------------------------------------------------------- VAE

_VAE_RENAMES = [
    (r"\.norm_out$", ".conv_norm_out"),
    (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"^decoder\.up_blocks\.(\d+)\.block\.", r"decoder.up_blocks.\1.resnets."),
    (r"^decoder\.up_blocks\.(\d+)\.upsample\.", r"decoder.up_blocks.\1.upsamplers.0."),
    (r"\.mid\.block_1\.", ".mid_block.resnets.0."),
    (r"\.mid\.block_2\.", ".mid_block.resnets.1."),
    (r"\.mid\.attn_1\.norm$", ".mid_block.attentions.0.group_norm"),
    (r"\.mid\.attn_1\.(q|k|v)$", r".mid_block.attentions.0.to_\1"),
    (r"\.mid\.attn_1\.proj_out$", ".mid_block.attentions.0.to_out.0"),
    (r"\.nin_shortcut$", ".conv_shortcut"),
]
_VAE_RESNET = r"resnets\.\d+\.(norm1|conv1|norm2|conv2|conv_shortcut)"
_VAE_MODULE = re.compile(
    r"quant_conv|post_quant_conv|(encoder|decoder)\.(conv_in|conv_out|conv_norm_out"
    rf"|mid_block\.({_VAE_RESNET}|attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)))"
    rf"|encoder\.down_blocks\.\d+\.({_VAE_RESNET}|downsamplers\.0\.conv)"
    rf"|decoder\.up_blocks\.\d+\.({_VAE_RESNET}|upsamplers\.0\.conv)"
)
_VAE_ATTENTION_WEIGHT = re.compile(r".*mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight")


def _decoder_levels_reversed(module, num_levels):
    """LDM numbers the decoder's ``up.i`` by resolution (0 = full size, applied last); diffusers'
    ``up_blocks.i`` in the order they run."""
    return re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}.", module)


def _vae_key(key, num_levels):
    module, _, leaf = key.rpartition(".")
    module = _decoder_levels_reversed(module, num_levels)
    for pattern, replacement in _VAE_RENAMES:
        module = re.sub(pattern, replacement, module)
    if leaf not in ("weight", "bias") or not _VAE_MODULE.fullmatch(module):
        return None
    return f"{module}.{leaf}"


def _vae_relayout(key, value):
    return conv1x1_to_linear(value) if _VAE_ATTENTION_WEIGHT.fullmatch(key) else value


def _convert_vae(state_dict):
    """LDM ``AutoencoderKL`` keys (prefix removed) -> diffusers ``AutoencoderKL`` keys; attention 1x1
    convolutions become linear weights."""
    num_levels = len({m.group(1) for k in state_dict if (m := re.match(r"decoder\.up\.(\d+)\.", k))})
    return _renamed(state_dict, lambda key: _vae_key(key, num_levels), _vae_relayout)


# ---------------------------------------------------------------------------------------- text encoders

_CLIP_KEY = re.compile(
    r"text_model\.(embeddings\.(token|position)_embedding\.weight"
    r"|encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|layer_norm[12]|mlp\.fc[12])\.(weight|bias)"
    r"|final_layer_norm\.(weight|bias))"
)


def _clip_key(key):
    key = key if key.startswith("text_model.") else "text_model." + key
    return key if _CLIP_KEY.fullmatch(key) else None


def _convert_clip(state_dict):
    """SD 1.x: ``cond_stage_model.transformer`` is already a transformers ``CLIPTextModel``; its keys
    only gain the ``text_model.`` prefix where a very old checkpoint lacks it."""
    return _renamed(state_dict, _clip_key)


_OPEN_CLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_OPEN_CLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


def _open_clip_layer_params(layer, part, value):
    """One OpenCLIP resblock parameter as ``{transformers key: array}``; the fused in_proj becomes three."""
    prefix = f"text_model.encoder.layers.{layer}."
    match = re.fullmatch(r"attn\.in_proj_(weight|bias)", part)
    if match:
        q, k, v = split_in_proj(value)
        return {f"{prefix}self_attn.{n}_proj.{match.group(1)}": a for n, a in zip("qkv", (q, k, v))}
    module, _, leaf = part.rpartition(".")
    if module in _OPEN_CLIP_LAYER and leaf in ("weight", "bias"):
        return {f"{prefix}{_OPEN_CLIP_LAYER[module]}.{leaf}": value}
    return {}


def _convert_open_clip(state_dict):
    """SD 2.x: OpenCLIP ViT-H text tower -> transformers ``CLIPTextModel`` keys, without its last
    resblock (SD 2.x reads the penultimate layer; diffusers' converter drops the same block)."""
    layers = [int(m.group(1)) for k in state_dict if (m := _RESBLOCK.fullmatch(k))]
    dropped = max(layers, default=None)
    converted, rejected = {}, []
    for key, value in state_dict.items():
        match = _RESBLOCK.fullmatch(key)
        if match and int(match.group(1)) == dropped:
            continue
        params = _open_clip_layer_params(*match.groups(), value) if match else {}
        if key in _OPEN_CLIP_TOP:
            params = {_OPEN_CLIP_TOP[key]: value}
        if not params:
            rejected.append(key)
        converted.update(params)
    return converted, rejected


# ------------------------------------------------------------------------------------------- the reverse
# diffusers / transformers state dicts -> one original checkpoint. Each network's names are the forward
# renaming's turned round: the UNet's blocks by `unet_block_layout`, the VAE's by running `_vae_key` over
# every name LDM's VAE can have, the text encoders' by inverting their tables; `join_ldm_checkpoint` then
# checks the result by splitting it again.

_LDM_RESNET = ("norm1", "conv1", "norm2", "conv2", "nin_shortcut")
_LDM_VAE_MODULES = (
    "quant_conv", "post_quant_conv",
    *(f"{side}.{part}" for side in ("encoder", "decoder") for part in (
        "conv_in", "norm_out", "conv_out", "mid.attn_1.norm", "mid.attn_1.q", "mid.attn_1.k", "mid.attn_1.v",
        "mid.attn_1.proj_out", *(f"mid.block_{n}.{p}" for n in (1, 2) for p in _LDM_RESNET))),
    *(f"encoder.down.{{i}}.block.{{j}}.{p}" for p in _LDM_RESNET), "encoder.down.{i}.downsample.conv",
    *(f"decoder.up.{{i}}.block.{{j}}.{p}" for p in _LDM_RESNET), "decoder.up.{i}.upsample.conv",
)


def linear_to_conv1x1(weight):
    """A linear layer's ``[out, in]`` weight as a 1x1 convolution's ``[out, in, 1, 1]``: `conv1x1_to_linear`'s reverse."""
    return weight.reshape(*weight.shape, 1, 1) if weight.ndim == 2 else weight


def join_ldm_checkpoint(parts, open_clip=False):
    """Three diffusers-style state dicts as one original Stable Diffusion checkpoint: `split_ldm_checkpoint`'s reverse.

    Args:
        parts: ``{"unet": ..., "vae": ..., "text_encoder": ...}`` keyed like diffusers' ``UNet2DConditionModel``
            and ``AutoencoderKL`` and transformers' ``CLIPTextModel`` (``text_model.*``).
        open_clip: write the text encoder as SD 2.x's OpenCLIP tower (``cond_stage_model.model.*``, fused
            ``in_proj``), with a last block of zeros standing for the one SD 2.x never runs (it conditions on
            the penultimate layer; every reader, ours and diffusers' included, drops the last block).

    Returns:
        ``{LDM name: array}``.

    Raises:
        CheckpointError: a tensor with no LDM name, or a result that does not split back into ``parts``.
    """
    text = _open_clip_from_clip if open_clip else _clip_to_ldm
    checkpoint = {**_prefixed(UNET_PREFIX, _unet_to_ldm(parts["unet"])),
                  **_prefixed(VAE_PREFIX, _vae_to_ldm(parts["vae"])),
                  **_prefixed(OPEN_CLIP_PREFIX if open_clip else CLIP_PREFIX, text(parts["text_encoder"]))}
    back = split_ldm_checkpoint(checkpoint)
    for network, state_dict in parts.items():
        if back[network].keys() != state_dict.keys():
            different = sorted(back[network].keys() ^ state_dict.keys())
            raise CheckpointError(f"{network}: the LDM names do not convert back: {', '.join(different[:_MAX_LISTED])}")
    return checkpoint


def _prefixed(prefix, state_dict):
    return {prefix + key: value for key, value in state_dict.items()}


def _reverse_keys(state_dict, reverse_module, network):
    """Renames every ``module.leaf`` key by ``reverse_module(module)``; strict."""
    renamed, unknown = {}, []
    for key, value in state_dict.items():
        module, _, leaf = key.rpartition(".")
        new = reverse_module(module)
        if new is None:
            unknown.append(key)
        else:
            renamed[f"{new}.{leaf}"] = value
    if unknown:
        raise CheckpointError(f"{network}: no LDM name for {', '.join(sorted(unknown)[:_MAX_LISTED])}")
    return renamed


def _unet_to_ldm(state_dict):
    from weights_conversion import keras_names

    modules = {key.rpartition(".")[0] for key in state_dict}
    paths = [f"{keras_names.rename_module(m, keras_names.UNET_RULES)}/" for m in modules]
    blocks = {module: (block, kind) for block, (module, kind) in unet_block_layout(paths).items()}
    top = {name: ldm_name for ldm_name, name in UNET_TOP.items()}
    resnet = {name: ldm_name for ldm_name, name in RESNET_PARTS.items()}
    parts = {"resnet": resnet.get, "attention": lambda part: part, "downsample": {"conv": "op"}.get,
             "upsample": {"conv": "conv"}.get}

    def reverse(module):
        if module in top:
            return top[module]
        block = next((b for b in blocks if module.startswith(b + ".")), None)
        if block is None:
            return None
        ldm_block, kind = blocks[block]
        part = parts[kind](module[len(block) + 1 :])
        return part and f"{ldm_block}.{part}"

    return _reverse_keys(state_dict, reverse, "unet")


def _vae_to_ldm(state_dict):
    from weights_conversion import keras_names

    num_levels = len({m.group(1) for k in state_dict if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))})
    count = 1 + max((int(n) for key in state_dict for n in re.findall(r"\.(\d+)\.", key)), default=0)
    modules = {}
    for template in _LDM_VAE_MODULES:
        for ldm_module in keras_names.expand_indices(template, count):
            key = _vae_key(f"{ldm_module}.weight", num_levels)
            if key is not None:
                modules[key.rpartition(".")[0]] = ldm_module
    renamed = _reverse_keys(state_dict, modules.get, "vae")
    return {key: linear_to_conv1x1(value) if ".mid.attn_1." in key and key.endswith(".weight") and
            not key.endswith(".norm.weight") else value for key, value in renamed.items()}


def _clip_to_ldm(state_dict):
    """SD 1.x: transformers' names as they are (``text_model.*``)."""
    return dict(state_dict)


def _open_clip_from_clip(state_dict):
    """SD 2.x: transformers ``CLIPTextModel`` keys -> the OpenCLIP tower's, q, k, v fused into ``in_proj``."""
    top = {name: open_clip for open_clip, name in _OPEN_CLIP_TOP.items()}
    layer_parts = {name: open_clip for open_clip, name in _OPEN_CLIP_LAYER.items()}
    converted, projections, unknown = {}, {}, []
    for key, value in state_dict.items():
        match = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if key in top:
            converted[top[key]] = value
        elif match and re.fullmatch(r"self_attn\.(q|k|v)_proj", match.group(2)):
            projections.setdefault((match.group(1), match.group(3)), {})[match.group(2)[10]] = value
        elif match and match.group(2) in layer_parts:
            converted[f"transformer.resblocks.{match.group(1)}.{layer_parts[match.group(2)]}.{match.group(3)}"] = value
        else:
            unknown.append(key)
    for (layer, leaf), qkv in projections.items():
        if qkv.keys() != set("qkv"):
            unknown.append(f"text_model.encoder.layers.{layer}.self_attn.*_proj.{leaf}")
            continue
        converted[f"transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = np.concatenate([qkv[n] for n in "qkv"])
    if unknown:
        raise CheckpointError(f"text_encoder: no OpenCLIP name for {', '.join(sorted(unknown)[:_MAX_LISTED])}")
    return {**converted, **_unused_last_block(converted)}


def _unused_last_block(converted):
    """Zeros shaped as the tower's last block, after the blocks we have."""
    last = max(int(m.group(1)) for k in converted if (m := _RESBLOCK.fullmatch(k)))
    prefix = f"transformer.resblocks.{last}."
    return {f"transformer.resblocks.{last + 1}.{key[len(prefix):]}": np.zeros_like(value)
            for key, value in converted.items() if key.startswith(prefix)}
