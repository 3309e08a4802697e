"""Diffusers / transformers state dicts -> original single-file (CompVis / LDM) checkpoint names.

The inverse of ``weights_conversion.ldm``, written independently of it, so tests can build original
checkpoints from tiny random diffusers models and check both diffusers' own converters and ours against
the models they came from. Arrays are numpy; nothing here needs torch.
"""

import re

import numpy as np

_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _count(keys, pattern):
    """How many distinct indices ``pattern``'s single group takes over ``keys``."""
    return len({m.group(1) for k in keys if (m := re.match(pattern, k))})


def _has(keys, prefix):
    return any(k.startswith(prefix + ".") for k in keys)


def _unet_down_modules(keys):
    """diffusers down-block module -> LDM ``input_blocks`` module."""
    modules, i = {}, 1
    for level in range(_count(keys, r"down_blocks\.(\d+)\.")):
        for j in range(_count(keys, rf"down_blocks\.{level}\.resnets\.(\d+)\.")):
            modules[f"down_blocks.{level}.resnets.{j}"] = f"input_blocks.{i}.0"
            modules[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{i}.1"
            i += 1
        if _has(keys, f"down_blocks.{level}.downsamplers.0.conv"):
            modules[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{i}.0.op"
            i += 1
    return modules


def _unet_up_modules(keys):
    """diffusers up-block module -> LDM ``output_blocks`` module (upsampler after the level's last layer)."""
    modules, i = {}, 0
    for level in range(_count(keys, r"up_blocks\.(\d+)\.")):
        layers = _count(keys, rf"up_blocks\.{level}\.resnets\.(\d+)\.")
        for j in range(layers):
            modules[f"up_blocks.{level}.resnets.{j}"] = f"output_blocks.{i}.0"
            attention = _has(keys, f"up_blocks.{level}.attentions.{j}")
            modules[f"up_blocks.{level}.attentions.{j}"] = f"output_blocks.{i}.1"
            if j == layers - 1:
                modules[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{i}.{2 if attention else 1}.conv"
            i += 1
    return modules


def _unet_ldm_key(key, modules):
    module, _, leaf = key.rpartition(".")
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{leaf}"
    match = re.match(r"(mid_block\.(resnets|attentions)\.(\d+)|[a-z_]+\.\d+\.(resnets|attentions)\.\d+)\.(.+)", key)
    if match is None:
        return modules[module] + "." + leaf  # a down/up sampler's conv
    block, inner = match.group(1), match.group(5)
    if block.startswith("mid_block"):
        target = f"middle_block.{2 * int(match.group(3)) if match.group(2) == 'resnets' else 1}"
    else:
        target = modules[block]
    if ".resnets." in f".{block}.":
        inner_module, _, inner_leaf = inner.rpartition(".")
        inner = f"{_RESNET_PARTS[inner_module]}.{inner_leaf}"
    return f"{target}.{inner}"


def unet_to_ldm(unet_sd):
    """``UNet2DConditionModel`` keys -> LDM ``UNetModel`` keys (without the ``model.diffusion_model.`` prefix)."""
    modules = {**_unet_down_modules(unet_sd), **_unet_up_modules(unet_sd)}
    return {_unet_ldm_key(k, modules): v for k, v in unet_sd.items()}


_VAE_MODULES = [
    (r"conv_norm_out$", "norm_out"),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"\.upsamplers\.0\.", ".upsample."),
    (r"\.resnets\.", ".block."),
    (r"mid_block\.block\.0\.", "mid.block_1."),
    (r"mid_block\.block\.1\.", "mid.block_2."),
    (r"mid_block\.attentions\.0\.group_norm$", "mid.attn_1.norm"),
    (r"mid_block\.attentions\.0\.to_(q|k|v)$", r"mid.attn_1.\1"),
    (r"mid_block\.attentions\.0\.to_out\.0$", "mid.attn_1.proj_out"),
    (r"\.conv_shortcut$", ".nin_shortcut"),
]


def linear_to_conv1x1(weight):
    """A linear ``[out, in]`` weight as the equivalent 1x1 convolution ``[out, in, 1, 1]``."""
    return weight.reshape(weight.shape + (1, 1))


def vae_to_ldm(vae_sd):
    """``AutoencoderKL`` keys -> LDM autoencoder keys (without ``first_stage_model.``); LDM numbers decoder
    levels by resolution, and its attention uses 1x1 convolutions."""
    levels = _count(vae_sd, r"decoder\.up_blocks\.(\d+)\.")
    out = {}
    for key, value in vae_sd.items():
        module, _, leaf = key.rpartition(".")
        module = re.sub(r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.",
                        module)
        for pattern, replacement in _VAE_MODULES:
            module = re.sub(pattern, replacement, module)
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)$", module) and leaf == "weight":
            value = linear_to_conv1x1(value)
        out[f"{module}.{leaf}"] = value
    return out


def clip_to_ldm(text_encoder_sd):
    """transformers ``CLIPTextModel`` keys (with or without ``text_model.``) -> ``cond_stage_model.transformer.*``."""
    return {
        "cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v
        for k, v in text_encoder_sd.items()
    }


_OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def _open_clip_layer(sd, layer):
    """One transformers encoder layer -> one OpenCLIP resblock, q/k/v fused into ``in_proj``."""
    prefix, out = f"encoder.layers.{layer}.", {}
    for leaf in ("weight", "bias"):
        qkv = [sd[f"{prefix}self_attn.{n}_proj.{leaf}"] for n in "qkv"]
        out[f"attn.in_proj_{leaf}"] = np.concatenate(qkv, axis=0)
        for ours, theirs in _OPEN_CLIP_LAYER.items():
            out[f"{theirs}.{leaf}"] = sd[f"{prefix}{ours}.{leaf}"]
    return out


def open_clip_to_ldm(text_encoder_sd, seed=0):
    """transformers ``CLIPTextModel`` -> SD 2.x ``cond_stage_model.model.*`` (OpenCLIP) keys.

    OpenCLIP has one more resblock than the converted encoder (SD 2.x uses the penultimate layer), a
    ``text_projection`` and a ``logit_scale``; those are random here, since a conversion must drop them.
    """
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder_sd.items()}
    layers = _count(sd, r"encoder\.layers\.(\d+)\.")
    out = {theirs: sd[ours] for ours, theirs in _OPEN_CLIP_TOP.items()}
    for layer in range(layers):
        out.update({f"transformer.resblocks.{layer}.{k}": v for k, v in _open_clip_layer(sd, layer).items()})
    rng = np.random.default_rng(seed)
    extra = _open_clip_layer(sd, layers - 1)
    for key, value in extra.items():
        out[f"transformer.resblocks.{layers}.{key}"] = rng.standard_normal(value.shape).astype(value.dtype)
    width = sd["final_layer_norm.weight"].shape[0]
    out["text_projection"] = rng.standard_normal((width, width)).astype(np.float32)
    out["logit_scale"] = np.array(4.6052, np.float32)
    return {"cond_stage_model.model." + k: v for k, v in out.items()}


def diffusers_to_ldm(unet_sd, vae_sd, text_encoder_sd, open_clip=False):
    """Three diffusers-style state dicts -> one original single-file Stable Diffusion state dict."""
    ldm = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet_sd).items()}
    ldm.update({"first_stage_model." + k: v for k, v in vae_to_ldm(vae_sd).items()})
    ldm.update(open_clip_to_ldm(text_encoder_sd) if open_clip else clip_to_ldm(text_encoder_sd))
    return ldm


def latent_diffusion_extras(ldm, max_position=77):
    """The non-network tensors a real ``LatentDiffusion`` checkpoint carries besides the three networks:
    the noise schedule buffers, an EMA copy of the UNet (flattened names) and CLIP's position ids."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1 - betas)
    extras = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": np.append(1.0, alphas_cumprod[:-1]),
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / alphas_cumprod - 1),
        "posterior_variance": betas,
        "posterior_log_variance_clipped": np.log(betas),
        "posterior_mean_coef1": betas,
        "posterior_mean_coef2": betas,
        "logvar": np.zeros(1000, np.float32),
        "model_ema.decay": np.array(0.9999, np.float32),
        "model_ema.num_updates": np.array(1000, np.int32),
    }
    for key, value in ldm.items():
        if key.startswith("model.diffusion_model."):
            extras["model_ema." + key[len("model."):].replace(".", "")] = value
    if any(k.startswith("cond_stage_model.transformer.") for k in ldm):
        position_ids = np.arange(max_position, dtype=np.int64)[None]
        extras["cond_stage_model.transformer.text_model.embeddings.position_ids"] = position_ids
    return extras
