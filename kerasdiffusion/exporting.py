"""Components -> a diffusers folder, or one original (CompVis / LDM) ``.safetensors``, that diffusers,
AUTOMATIC1111 and ComfyUI load.

The weights are the networks' as they are now (LoRAs fused into them included); the names and layouts are
the converter's turned round (`weights_conversion.export`), the configs made from the network configs that
`kerasdiffusion.config` reads from the weights, so an export loads back (here or in diffusers) as the same
model. Nothing is left under the output's name unless the export completes.

Example:

>>> import os, tempfile
>>> import kerasdiffusion as kd
>>> parts = kd.load_components("kerasdiffusion/shapes")
>>> folder = tempfile.mkdtemp()
>>> diffusers = kd.export(parts, os.path.join(folder, "shapes-diffusers"))             # a diffusers folder
>>> sorted(os.listdir(diffusers))
['model_index.json', 'scheduler', 'text_encoder', 'tokenizer', 'unet', 'vae']
>>> single = kd.export(parts, os.path.join(folder, "shapes.safetensors"), format="single-file")  # one checkpoint
>>> os.path.basename(single)
'shapes.safetensors'
"""

import dataclasses

import numpy as np
from keras import ops

from kerasdiffusion import config as C
from weights_conversion import export as W
from weights_conversion.convert import VAE_SCALE

FORMATS = W.EXPORT_FORMATS


def export(components, out, format="diffusers"):
    """Writes a model's weights in a form other Stable Diffusion software loads.

    Args:
        components: the `Components` to export (e.g. ``sd.components``, or `load_components`' result).
        out: for ``"diffusers"`` a folder to create (absent, or empty): ``model_index.json``, ``unet/``,
            ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/`` as ``StableDiffusionPipeline.from_pretrained``
            reads them; for ``"single-file"`` a ``.safetensors`` file (absent) with the original checkpoints'
            names (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``).
        format: ``"diffusers"`` or ``"single-file"``.

    Returns:
        The path written.

    Raises:
        ValueError: an unknown format, or a single-file name that is not ``.safetensors``.
        FileExistsError: ``out`` exists (a folder: and is not empty).

    Example:

    >>> import os, tempfile
    >>> import kerasdiffusion as kd
    >>> sd = kd.StableDiffusion.from_pretrained("kerasdiffusion/shapes")
    >>> path = kd.export(sd.components, os.path.join(tempfile.mkdtemp(), "my-model"), format="diffusers")
    >>> sorted(os.listdir(path))
    ['model_index.json', 'scheduler', 'text_encoder', 'tokenizer', 'unet', 'vae']
    >>> again = kd.load_components(path, cache=False)  # loads back as the same model, group and head counts included
    >>> family = again.family
    >>> again.image_size, family.unet.norm_groups, family.vae.norm_groups, family.text_encoder.num_heads
    (64, 16, 4, 4)
    """
    if format not in FORMATS:
        raise ValueError(f"Unknown export format {format!r}; expected one of {', '.join(FORMATS)}")
    weights = network_weights(components)
    unet = C.unet_config_from_weights(weights["unet"], components.family)
    state_dicts = W.torch_state_dicts(weights, conv_projections=not unet.linear_projection)
    if format == "single-file":
        return W.save_single_file(out, state_dicts, open_clip=components.family.open_clip)
    return W.save_diffusers_folder(out, state_dicts, diffusers_configs(components, weights, unet),
                                   components.tokenizer.save)


def network_weights(components):
    """``{"unet", "vae", "text_encoder"}``: each network's weights by path, as numpy arrays (the VAE's encoder
    and decoder together, as converted weights hold them)."""
    def values(model):
        return {v.path: np.asarray(ops.convert_to_numpy(v.value)) for v in model.weights}

    return {"unet": values(components.diffusion_model),
            "vae": {**values(components.image_encoder), **values(components.decoder)},
            "text_encoder": values(components.text_encoder)}


def diffusers_configs(components, weights, unet):
    """The folder's JSON files, from the network configs the weights give (`kerasdiffusion.config`); the
    sample sizes from the model's own image size (`Components.image_size`)."""
    family, tokenizer, image_size = components.family, components.tokenizer, components.image_size
    token_ids = {"bos_token_id": tokenizer.start_token_id, "eos_token_id": tokenizer.end_token_id,
                 "pad_token_id": tokenizer.pad_token_id}
    return {
        "unet": W.unet_config(unet, unet.linear_projection, image_size // VAE_SCALE),
        "vae": W.vae_config(dataclasses.replace(C.vae_config_from_weights(weights["vae"], family),
                                                scaling_factor=components.vae_config.scaling_factor), image_size),
        "text_encoder": W.text_encoder_config(C.text_encoder_config_from_weights(weights["text_encoder"], family),
                                              token_ids),
        "scheduler": W.scheduler_config(dataclasses.asdict(components.scheduler_config)),
        "model_index": W.model_index(inpainting=unet.in_channels != unet.out_channels),
    }
