"""Diffusers / transformers state dicts -> kerasdiffusion weights, as pure functions over numpy arrays.

Our weights are keyed by the Keras variable path (``down0_res0_conv1/kernel``) and laid out the Keras
way (channels-last convolution kernels, ``[in, out]`` dense kernels). Each network's module names are
renamed by an ordered list of regular expressions; the leaf (``weight`` / ``bias``) and the layout follow
from the tensor's rank and from whether the target layer is a dense one.

Example:

>>> import numpy as np
>>> weights = convert_unet({"conv_in.weight": np.zeros((320, 4, 3, 3)), "conv_in.bias": np.zeros(320)})
>>> sorted(weights), weights["input_conv/kernel"].shape
(['input_conv/bias', 'input_conv/kernel'], (3, 3, 4, 320))
"""

import re

import numpy as np

from weights_conversion.errors import CheckpointError

_BLOCK_RULES = [
    (r"^mid_block\.resnets\.(\d+)", r"mid_res\1"),
    (r"^mid_block\.attentions\.(\d+)", r"mid_attn\1"),
    (r"\.resnets\.(\d+)", r"_res\1"),
    (r"\.attentions\.(\d+)", r"_attn\1"),
    (r"\.downsamplers\.0\.conv$", "_downsample"),
    (r"\.upsamplers\.0\.conv$", "_upsample"),
    (r"\.transformer_blocks\.(\d+)", r"_block\1"),
    (r"\.attn1\.to_(q|k|v)$", r"_self_\1"),
    (r"\.attn1\.to_out\.0$", "_self_out"),
    (r"\.attn2\.to_(q|k|v)$", r"_cross_\1"),
    (r"\.attn2\.to_out\.0$", "_cross_out"),
    (r"\.ff\.net\.0\.proj$", "_ff_in"),
    (r"\.ff\.net\.2$", "_ff_out"),
    (r"\.time_emb_proj$", "_time_proj"),
    (r"\.conv_shortcut$", "_skip"),
    (r"\.(norm\d?|conv\d|proj_in|proj_out)$", r"_\1"),
]

UNET_RULES = [
    (r"^time_embedding\.linear_(\d)$", r"time_embed_dense\1"),
    (r"^conv_in$", "input_conv"),
    (r"^conv_norm_out$", "output_norm"),
    (r"^conv_out$", "output_conv"),
    (r"^down_blocks\.(\d+)", r"down\1"),
    (r"^up_blocks\.(\d+)", r"up\1"),
    *_BLOCK_RULES,
]

VAE_RULES = [
    (r"^(encoder|decoder)\.conv_in$", r"\1_input_conv"),
    (r"^(encoder|decoder)\.conv_norm_out$", r"\1_output_norm"),
    (r"^(encoder|decoder)\.conv_out$", r"\1_output_conv"),
    (r"^encoder\.down_blocks\.(\d+)", r"encoder_down\1"),
    (r"^decoder\.up_blocks\.(\d+)", r"decoder_up\1"),
    (r"^(encoder|decoder)\.mid_block", r"\1_mid_block"),
    (r"^(encoder|decoder)_mid_block\.resnets\.(\d+)", r"\1_mid_res\2"),
    (r"^(encoder|decoder)_mid_block\.attentions\.0\.group_norm$", r"\1_mid_attn_norm"),
    (r"^(encoder|decoder)_mid_block\.attentions\.0\.to_(q|k|v)$", r"\1_mid_attn_\2"),
    (r"^(encoder|decoder)_mid_block\.attentions\.0\.to_out\.0$", r"\1_mid_attn_out"),
    (r"^(quant_conv|post_quant_conv)$", r"\1"),
    *_BLOCK_RULES,
]

# transformers < 5 names the tower's modules "text_model.*"; transformers 5 drops that prefix.
TEXT_ENCODER_RULES = [
    (r"^text_model\.", ""),
    (r"^embeddings\.token_embedding$", "token_embedding"),
    (r"^embeddings\.position_embedding$", "position_embedding"),
    (r"^final_layer_norm$", "final_norm"),
    (r"^encoder\.layers\.(\d+)\.layer_norm(\d)$", r"layer\1_norm\2"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj$", r"layer\1_attn_\2"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj$", r"layer\1_attn_out"),
    (r"^encoder\.layers\.(\d+)\.mlp\.(fc\d)$", r"layer\1_mlp_\2"),
]

# Buffers that transformers keeps in the state dict but that are not weights.
TEXT_ENCODER_IGNORED = (r"^(text_model\.)?embeddings\.position_ids$",)

# Target layers that are dense although PyTorch may store them as 1x1 convolutions.
_DENSE_LAYERS = re.compile(r"(_proj_in|_proj_out|_mid_attn_(q|k|v|out))$")
_EMBEDDING_LAYERS = re.compile(r"^(token_embedding|position_embedding)$")


def conv_oihw_to_hwio(w):
    return np.transpose(w, (2, 3, 1, 0))


def linear_oi_to_io(w):
    """A PyTorch linear weight (or a 1x1 convolution's, squeezed) as a Keras dense kernel."""
    if w.ndim == 4:
        w = w[:, :, 0, 0]
    return np.transpose(w)


def kernel_layout(layer, weight):
    """A PyTorch weight (linear ``[out, in]`` or convolution ``[out, in, kh, kw]``) as the kernel of our
    layer ``layer``: HWIO for a convolution, ``[in, out]`` for a dense layer (1x1 convolutions included)."""
    if weight.ndim == 4 and not _DENSE_LAYERS.search(layer):
        return conv_oihw_to_hwio(weight)
    return linear_oi_to_io(weight)


def rename_module(module, rules):
    """The Keras layer name of a PyTorch module path, or None when no rule produces a plain name."""
    for pattern, replacement in rules:
        module = re.sub(pattern, replacement, module)
    return module if re.fullmatch(r"[a-z0-9_]+", module) else None


def _leaf(layer, leaf, array, is_norm):
    """The Keras variable name and array for one PyTorch parameter of a layer."""
    if leaf == "bias":
        return ("beta" if is_norm else "bias"), array
    if leaf != "weight":
        return None, array
    if _EMBEDDING_LAYERS.match(layer):
        return "embeddings", array
    if is_norm:
        return "gamma", array
    return "kernel", kernel_layout(layer, array)


def convert(state_dict, rules, network, ignored=()):
    """Renames and re-lays-out every tensor of one network's state dict; strict about names.

    Raises:
        CheckpointError: naming every source tensor that has no place in our model.
    """
    norms = {k.rsplit(".", 1)[0] for k, v in state_dict.items() if k.endswith(".weight") and v.ndim == 1}
    weights, unknown = {}, []
    for key, array in state_dict.items():
        if any(re.search(p, key) for p in ignored):
            continue
        module, _, leaf = key.rpartition(".")
        layer = rename_module(module, rules)
        variable, array = _leaf(layer or "", leaf, array, module in norms)
        if layer is None or variable is None:
            unknown.append(key)
            continue
        weights[f"{layer}/{variable}"] = array
    if unknown:
        raise CheckpointError(f"{network}: unexpected tensors with no place in the model: {', '.join(sorted(unknown))}")
    return weights


def convert_unet(state_dict):
    """Diffusers ``UNet2DConditionModel`` state dict -> our UNet weights."""
    return convert(state_dict, UNET_RULES, "unet")


def convert_vae(state_dict):
    """Diffusers ``AutoencoderKL`` state dict -> our image encoder and decoder weights, together."""
    return convert(state_dict, VAE_RULES, "vae")


def convert_text_encoder(state_dict):
    """Transformers ``CLIPTextModel`` state dict -> our text encoder weights."""
    return convert(state_dict, TEXT_ENCODER_RULES, "text_encoder", ignored=TEXT_ENCODER_IGNORED)
