"""Our weights and configs -> a diffusers folder or one original (CompVis / LDM) checkpoint: the converter run backwards.

Names come from the converter's own rules turned round (`keras_names.to_torch`, `ldm.join_ldm_checkpoint`);
the configs from our frozen network configs (``kerasdiffusion.config``; read here by attribute, so this
package still imports nothing of kerasdiffusion, TensorFlow or Keras). Both writers are atomic: a folder is
written as a temporary sibling and renamed into place, a file beside its name and renamed, so an interrupted
export leaves nothing behind under the output's name.

- diffusers folder: ``model_index.json``, ``unet/`` and ``vae/`` (``config.json`` +
  ``diffusion_pytorch_model.safetensors``), ``text_encoder/`` (``config.json`` + ``model.safetensors``),
  ``scheduler/scheduler_config.json``; the tokenizer files are the caller's (``write_tokenizer(folder)``).
- single file: ``model.diffusion_model.*``, ``first_stage_model.*`` and ``cond_stage_model.transformer.*``
  (SD 1.x's CLIP) or ``cond_stage_model.model.*`` (SD 2.x's OpenCLIP).

Example:

>>> import os, tempfile
>>> from weights_conversion import convert_source
>>> from kerasdiffusion.sources import BUILTIN_MODELS  # the built-in model: a converted folder, plain files
>>> shapes_model = BUILTIN_MODELS["kerasdiffusion/shapes"]
>>> weights = convert_source(shapes_model).weights                  # our names, as a converted folder holds them
>>> state_dicts = torch_state_dicts(weights, conv_projections=True)  # SD 1.x: 1x1 convolution projections
>>> state_dicts["unet"]["conv_in.weight"].shape
(64, 4, 3, 3)
>>> path = save_single_file(os.path.join(tempfile.mkdtemp(), "model.safetensors"), state_dicts, open_clip=False)
>>> os.path.basename(path)
'model.safetensors'
"""

import json
import os

from weights_conversion import keras_names, ldm
from weights_conversion.convert import staged_folder, write_safetensors

EXPORT_FORMATS = ("diffusers", "single-file")
# The diffusers version whose layout these files follow (every version since reads it).
DIFFUSERS_VERSION = "0.21.0"
_WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                 "text_encoder": "model.safetensors"}


def torch_state_dicts(weights, conv_projections=False):
    """``{"unet", "vae", "text_encoder"}`` weights (our paths) as diffusers / transformers state dicts.

    Args:
        weights: ``{network: {path: array}}``, the VAE's encoder and decoder together.
        conv_projections: the UNet's ``proj_in`` / ``proj_out`` are 1x1 convolutions (SD 1.x).
    """
    return {network: keras_names.to_torch(weights[network], network, conv_projections and network == "unet")
            for network in ("unet", "vae", "text_encoder")}


# ------------------------------------------------------------------------------------------------ configs


def unet_config(unet, linear_projection, sample_size):
    """A diffusers ``UNet2DConditionModel`` config from our `UNetConfig`."""
    levels = range(len(unet.block_channels))
    down = ["CrossAttnDownBlock2D" if attention else "DownBlock2D" for attention in unet.attention_levels]
    up = ["CrossAttnUpBlock2D" if attention else "UpBlock2D" for attention in reversed(unet.attention_levels)]
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": sample_size, "in_channels": unet.in_channels, "out_channels": unet.out_channels,
        "block_out_channels": list(unet.block_channels), "layers_per_block": unet.layers_per_level,
        "down_block_types": down, "mid_block_type": "UNetMidBlock2DCrossAttn", "up_block_types": up,
        "cross_attention_dim": unet.context_dim, "transformer_layers_per_block": unet.transformer_depth,
        # diffusers' (misnamed) attention_head_dim holds the number of heads per level.
        "attention_head_dim": [unet.heads(level) for level in levels],
        "use_linear_projection": linear_projection, "upcast_attention": unet.upcast_attention,
        "norm_num_groups": unet.norm_groups, "norm_eps": unet.epsilon, "act_fn": "silu",
        "flip_sin_to_cos": True, "freq_shift": 0, "center_input_sample": False, "downsample_padding": 1,
        "mid_block_scale_factor": 1,
    }


def vae_config(vae, sample_size):
    """A diffusers ``AutoencoderKL`` config from our `VAEConfig`."""
    levels = len(vae.block_channels)
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, "sample_size": sample_size,
        "in_channels": vae.image_channels, "out_channels": vae.image_channels, "latent_channels": vae.latent_channels,
        "block_out_channels": list(vae.block_channels), "layers_per_block": vae.layers_per_level,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "norm_num_groups": vae.norm_groups, "act_fn": "silu", "scaling_factor": vae.scaling_factor,
    }


def text_encoder_config(text_encoder, token_ids):
    """A transformers ``CLIPTextModel`` config from our `TextEncoderConfig`; ``token_ids`` gives the tokenizer's
    ``bos_token_id``, ``eos_token_id`` and ``pad_token_id``."""
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "torch_dtype": "float32",
        "vocab_size": text_encoder.vocab_size, "max_position_embeddings": text_encoder.max_length,
        "hidden_size": text_encoder.width, "intermediate_size": text_encoder.mlp_dim,
        "num_hidden_layers": text_encoder.num_layers, "num_attention_heads": text_encoder.num_heads,
        "hidden_act": text_encoder.activation, "layer_norm_eps": text_encoder.epsilon,
        "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
        **token_ids,
    }


def scheduler_config(fields):
    """diffusers' ``scheduler_config.json``: our `SchedulerConfig`'s fields (``dataclasses.asdict``), for the
    PNDM scheduler Stable Diffusion's own folders name."""
    return {"_class_name": "PNDMScheduler", "_diffusers_version": DIFFUSERS_VERSION, **fields,
            "skip_prk_steps": True, "timestep_spacing": "leading"}


def model_index(inpainting):
    pipeline = "StableDiffusionInpaintPipeline" if inpainting else "StableDiffusionPipeline"
    return {
        "_class_name": pipeline, "_diffusers_version": DIFFUSERS_VERSION,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False,
    }


# ------------------------------------------------------------------------------------------------ writers


def save_diffusers_folder(output_dir, state_dicts, configs, write_tokenizer):
    """Writes a diffusers folder atomically.

    Args:
        output_dir: the folder to make (absent, or empty).
        state_dicts: ``{"unet", "vae", "text_encoder"}`` state dicts (`torch_state_dicts`).
        configs: ``{"unet", "vae", "text_encoder", "scheduler", "model_index"}`` JSON objects (the functions above).
        write_tokenizer: ``write_tokenizer(folder)`` writes the tokenizer's files into ``folder``.

    Raises:
        FileExistsError: ``output_dir`` exists and is not empty.
    """
    with staged_folder(output_dir) as staging:
        _write_json(os.path.join(staging, "model_index.json"), configs["model_index"])
        for network in ("unet", "vae", "text_encoder"):
            os.makedirs(os.path.join(staging, network))
            _write_json(os.path.join(staging, network, "config.json"), configs[network])
            write_safetensors(os.path.join(staging, network, _WEIGHT_FILES[network]), state_dicts[network],
                              metadata={"format": "pt"})
        os.makedirs(os.path.join(staging, "scheduler"))
        _write_json(os.path.join(staging, "scheduler", "scheduler_config.json"), configs["scheduler"])
        os.makedirs(os.path.join(staging, "tokenizer"))
        write_tokenizer(os.path.join(staging, "tokenizer"))
    return os.fspath(output_dir)


def save_single_file(path, state_dicts, open_clip=False):
    """Writes one original-format ``.safetensors`` checkpoint (`ldm.join_ldm_checkpoint`), atomically.

    Raises:
        FileExistsError: ``path`` exists.
        ValueError: ``path`` is not a ``.safetensors`` file name.
    """
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: a single-file export is a .safetensors file")
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; not overwriting it")
    write_safetensors(path, ldm.join_ldm_checkpoint(state_dicts, open_clip), metadata={"format": "pt"})
    return path


def _write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
