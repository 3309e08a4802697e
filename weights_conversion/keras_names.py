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


# --------------------------------------------------------------------------------------------- the reverse
# Our names back to diffusers / transformers ones. The correspondence is stated once, by the rules above: the
# reverse map is made by running them over every module name the PyTorch networks can have (the grammars
# below, `{i}`, `{j}`, `{k}` standing for any index) and keeping the names our weights hold.

_RESNET_PARTS = ("norm1", "conv1", "time_emb_proj", "norm2", "conv2", "conv_shortcut")
_TRANSFORMER_PARTS = ("norm", "proj_in", "proj_out", *(
    f"transformer_blocks.{{k}}.{part}"
    for part in ("norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                 "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")))
UNET_MODULES = (
    "conv_in", "time_embedding.linear_1", "time_embedding.linear_2", "conv_norm_out", "conv_out",
    "down_blocks.{i}.downsamplers.0.conv", "up_blocks.{i}.upsamplers.0.conv",
    *(f"{block}.resnets.{{j}}.{part}" for block in ("down_blocks.{i}", "mid_block", "up_blocks.{i}")
      for part in _RESNET_PARTS),
    *(f"{block}.attentions.{{j}}.{part}" for block in ("down_blocks.{i}", "mid_block", "up_blocks.{i}")
      for part in _TRANSFORMER_PARTS),
)
VAE_MODULES = (
    "quant_conv", "post_quant_conv",
    *(f"{side}.{part}" for side in ("encoder", "decoder") for part in (
        "conv_in", "conv_norm_out", "conv_out",
        *(f"mid_block.resnets.{{j}}.{p}" for p in _RESNET_PARTS),
        *(f"mid_block.attentions.0.{p}" for p in ("group_norm", "to_q", "to_k", "to_v", "to_out.0")))),
    *(f"encoder.down_blocks.{{i}}.resnets.{{j}}.{p}" for p in _RESNET_PARTS),
    *(f"decoder.up_blocks.{{i}}.resnets.{{j}}.{p}" for p in _RESNET_PARTS),
    "encoder.down_blocks.{i}.downsamplers.0.conv", "decoder.up_blocks.{i}.upsamplers.0.conv",
)
# With transformers < 5's "text_model." prefix, which every version reads.
TEXT_ENCODER_MODULES = (
    "text_model.embeddings.token_embedding", "text_model.embeddings.position_embedding", "text_model.final_layer_norm",
    *(f"text_model.encoder.layers.{{i}}.{part}" for part in (
        "layer_norm1", "layer_norm2", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
        "mlp.fc1", "mlp.fc2")),
)
NETWORK_NAMING = {
    "unet": (UNET_RULES, UNET_MODULES),
    "vae": (VAE_RULES, VAE_MODULES),
    "text_encoder": (TEXT_ENCODER_RULES, TEXT_ENCODER_MODULES),
}
# Our dense layers that SD 1.x's PyTorch UNet holds as 1x1 convolutions (``use_linear_projection=False``).
_CONV_PROJECTIONS = re.compile(r"_proj_(in|out)$")
_TORCH_LEAVES = {"kernel": "weight", "embeddings": "weight", "gamma": "weight", "bias": "bias", "beta": "bias"}


def expand_indices(template, count):
    """Every name a template stands for, its ``{i}``, ``{j}``, ``{k}`` each taking 0 .. count-1."""
    fields = sorted(set(re.findall(r"\{([ijk])\}", template)))
    names = []
    for values in np.ndindex(*(count,) * len(fields)):
        names.append(template.format(**dict(zip(fields, map(str, values)))))
    return names


def torch_modules(network, layers):
    """``{our layer: PyTorch module}`` for ``layers`` of one network (``"unet"``, ``"vae"``, ``"text_encoder"``).

    The reverse of `rename_module` under that network's rules, made by renaming every module the network's
    grammar can name (indices up to the largest in ``layers``) and keeping ours.

    Raises:
        CheckpointError: naming every layer that no PyTorch module becomes.

    Example:

    >>> torch_modules("unet", ["down0_attn0_block0_self_q", "mid_res0_skip"])
    {'down0_attn0_block0_self_q': 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q', 'mid_res0_skip': 'mid_block.resnets.0.conv_shortcut'}
    """
    rules, templates = NETWORK_NAMING[network]
    layers = set(layers)
    count = 1 + max((int(n) for layer in layers for n in re.findall(r"\d+", layer)), default=0)
    found = {}
    for template in templates:
        for module in expand_indices(template, count):
            layer = rename_module(module, rules)
            if layer in layers:
                found[layer] = module
    missing = layers - found.keys()
    if missing:
        raise CheckpointError(f"{network}: no PyTorch module is named {', '.join(sorted(missing))} by our rules")
    return {layer: found[layer] for layer in sorted(layers)}


def torch_shape(layer, kernel_shape, conv_projections=False):
    """The PyTorch weight shape behind our kernel: ``[out, in, kh, kw]`` for a convolution, ``[out, in]`` for
    a dense layer, ``[out, in, 1, 1]`` for a projection SD 1.x holds as a 1x1 convolution (``conv_projections``)."""
    if len(kernel_shape) == 4:
        kh, kw, fan_in, fan_out = kernel_shape
        return (fan_out, fan_in, kh, kw)
    fan_in, fan_out = kernel_shape
    if conv_projections and _CONV_PROJECTIONS.search(layer):
        return (fan_out, fan_in, 1, 1)
    return (fan_out, fan_in)


def torch_layout(layer, kernel, conv_projections=False):
    """Our kernel in PyTorch's layout: the reverse of `kernel_layout`."""
    if kernel.ndim == 4:
        return np.transpose(kernel, (3, 2, 0, 1))
    return np.transpose(kernel).reshape(torch_shape(layer, kernel.shape, conv_projections))


def to_torch(weights, network, conv_projections=False):
    """Our weights of one network (``{path: array}``) as the PyTorch state dict they were converted from:
    the reverse of `convert_unet`, `convert_vae` and `convert_text_encoder` (text encoder keys with
    ``text_model.``).

    Args:
        weights: ``{path: array}``, e.g. ``{v.path: v.numpy()}`` of one network (the VAE's encoder and decoder
            together).
        network: ``"unet"``, ``"vae"`` or ``"text_encoder"``.
        conv_projections: the UNet's ``proj_in`` / ``proj_out`` are 1x1 convolutions (SD 1.x), not linears.

    Example:

    >>> to_torch({"input_conv/kernel": np.zeros((3, 3, 4, 320))}, "unet")["conv_in.weight"].shape
    (320, 4, 3, 3)
    """
    modules = torch_modules(network, {path.rsplit("/", 1)[0] for path in weights})
    state_dict = {}
    for path, array in weights.items():
        layer, variable = path.rsplit("/", 1)
        if variable not in _TORCH_LEAVES:
            raise CheckpointError(f"{network}: {path} is not a weight PyTorch has")
        if variable == "kernel":
            array = torch_layout(layer, np.asarray(array), conv_projections)
        state_dict[f"{modules[layer]}.{_TORCH_LEAVES[variable]}"] = np.asarray(array)
    return state_dict
