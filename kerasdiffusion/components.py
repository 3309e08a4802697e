"""From a source to ready parts: `load_components` resolves, builds and fills the networks, once.

`Components` is what a pipeline runs: the tokenizer, the four networks, the model family and the
training schedule. It is frozen and checked when made, so parts that do not fit together (a UNet that
attends to a context wider than the text encoder's) fail here, before anything is compiled. Build one
from a source with `load_components`, or from networks of your own with the constructor.

Example:

>>> import kerasdiffusion as kd
>>> parts = kd.load_components("kerasdiffusion/shapes")
>>> parts.family.name, parts.scheduler_config.prediction_type, parts.image_size
('shapes', 'epsilon', 64)
>>> sd = kd.StableDiffusion.from_components(parts, img_width=128, img_height=128)
>>> sd.img_width, sd.components is parts
(128, True)
"""

import dataclasses

import keras

from kerasdiffusion import backend
from kerasdiffusion import config as C
from kerasdiffusion.adapters import FusedLoras
from kerasdiffusion.layers import to_be_loaded
from kerasdiffusion import sources
from kerasdiffusion.schedulers import SchedulerConfig
from kerasdiffusion.text_encoder import build_text_encoder
from kerasdiffusion.tokenizer import CLIPTokenizer
from kerasdiffusion.unet import build_unet
from kerasdiffusion.vae import build_decoder, build_image_encoder, split_weights
from kerasdiffusion.weights import check_all
from weights_conversion.errors import CheckpointError


def default_precision():
    """float16 on GPU, bfloat16 on TPU, float32 on CPU."""
    return {"tpu": "mixed_bfloat16", "gpu": "mixed_float16"}.get(backend.device_type(), "float32")


def check_precision(precision):
    if precision is not None and precision not in C.PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; expected one of {', '.join(C.PRECISIONS)} or None")


@dataclasses.dataclass(frozen=True)
class Components:
    """The parts of a Stable Diffusion model, ready to run.

    Attributes:
        tokenizer: a `CLIPTokenizer`.
        text_encoder: token ids ``[B, 77]`` -> context ``[B, 77, D]``.
        diffusion_model: the UNet, ``[latents, timesteps, context] -> prediction``.
        image_encoder: images in [-1, 1] -> latent moments (mean, log-variance).
        decoder: latents (divided by the scaling factor) -> images in about [-1, 1].
        family: the `ModelFamily` (SD 1.x, SD 2.x).
        scheduler_config: the training schedule and prediction type (a `SchedulerConfig`).
        vae_config: the autoencoder's `VAEConfig` (its ``scaling_factor`` scales latents).
        image_size: the image side (pixels) the model was trained at, its pipelines' default size; `None` takes
            the family's for the scheduler config's prediction type (`ModelFamily.default_image_size`).
        precision: the networks' dtype policy name.
        source: where the weights came from, for messages and image metadata.
        loras: the LoRAs fused into the UNet's and text encoder's weights, with the originals they replaced
            (shared by every pipeline over these networks; see `StableDiffusion.load_lora`).
    """

    tokenizer: CLIPTokenizer
    text_encoder: keras.Model
    diffusion_model: keras.Model
    image_encoder: keras.Model
    decoder: keras.Model
    family: C.ModelFamily = C.SD1
    scheduler_config: SchedulerConfig = SchedulerConfig()
    vae_config: C.VAEConfig = C.SD_VAE
    image_size: int | None = None
    precision: str = "float32"
    source: str = ""
    loras: FusedLoras = dataclasses.field(default_factory=FusedLoras, compare=False, repr=False)

    def __post_init__(self):
        if self.image_size is None:
            object.__setattr__(self, "image_size",
                               self.family.default_image_size(self.scheduler_config.prediction_type))
        problems = _disagreements(self)
        if problems:
            raise ValueError("The components do not fit together: " + "; ".join(problems))

    @property
    def latent_channels(self):
        return self.decoder.inputs[0].shape[-1]

    @property
    def unet_channels(self):
        """The UNet's input channels: the latents', plus mask and masked-image latents for inpainting UNets."""
        return self.diffusion_model.inputs[0].shape[-1]

    @property
    def networks(self):
        """The four networks by name."""
        return {name: getattr(self, name) for name in ("text_encoder", "diffusion_model", "image_encoder", "decoder")}


def _disagreements(parts):
    """Every way the parts' shapes contradict each other, as readable sentences."""
    context_width = parts.text_encoder.outputs[0].shape[-1]
    attends_to = parts.diffusion_model.inputs[2].shape[-1]
    latent = parts.latent_channels
    problems = []
    if isinstance(parts.image_size, bool) or not isinstance(parts.image_size, int) or parts.image_size < 8 \
            or parts.image_size % 8:
        problems.append(f"the image size {parts.image_size!r} is not a positive multiple of 8")
    if attends_to != context_width:
        problems.append(f"the UNet attends to a {attends_to}-wide context but the text encoder gives {context_width}")
    if parts.unet_channels not in (latent, 2 * latent + 1):
        problems.append(f"the UNet takes {parts.unet_channels} channels, neither the decoder's {latent} latent "
                        f"channels nor {2 * latent + 1} (inpainting)")
    if parts.diffusion_model.outputs[0].shape[-1] != latent:
        problems.append(f"the UNet predicts {parts.diffusion_model.outputs[0].shape[-1]} channels, the decoder "
                        f"takes {latent}")
    if parts.image_encoder.outputs[0].shape[-1] != 2 * latent:
        problems.append(f"the image encoder gives {parts.image_encoder.outputs[0].shape[-1]} moments, not the "
                        f"{2 * latent} of {latent} latent channels")
    if parts.text_encoder.inputs[0].shape[-1] != parts.tokenizer.max_length:
        problems.append(f"the tokenizer makes {parts.tokenizer.max_length} tokens, the text encoder takes "
                        f"{parts.text_encoder.inputs[0].shape[-1]}")
    if parts.tokenizer.vocab_size > _vocabulary_rows(parts.text_encoder):
        problems.append(f"the tokenizer has {parts.tokenizer.vocab_size} tokens, the text encoder embeds "
                        f"{_vocabulary_rows(parts.text_encoder)}")
    return problems


def _vocabulary_rows(text_encoder):
    return text_encoder.get_layer("token_embedding").input_dim


def _scheduler_config(converted, family, prediction_type):
    config = dict(converted.scheduler_config or {})
    if prediction_type is not None:
        config["prediction_type"] = prediction_type
    elif not converted.scheduler_config:
        config["prediction_type"] = family.prediction_type
    return SchedulerConfig.from_dict(config)


def _family(converted):
    """The family a source names (a converted folder's manifest), else the one its text encoder's width gives;
    with the group-norm group counts and the text encoder's heads the source gives (a diffusers folder's
    configs), where it gives them."""
    if converted.family is None:
        family = C.family_from_weights(converted.weights["text_encoder"])
    elif converted.family not in C.FAMILIES:
        raise CheckpointError(f"{converted.source}: unknown model family {converted.family!r}; this version "
                              f"knows {', '.join(C.FAMILIES)}")
    else:
        family = C.FAMILIES[converted.family]
    changes = {network: dataclasses.replace(getattr(family, network), norm_groups=count)
               for network, count in (converted.norm_groups or {}).items()
               if getattr(family, network).norm_groups != count}
    heads = converted.text_encoder_heads
    text_encoder = C.text_encoder_config_from_weights(converted.weights["text_encoder"], family)
    if heads is not None and heads != text_encoder.num_heads:
        if text_encoder.width % heads:
            raise CheckpointError(f"{converted.source}: {heads} attention heads do not divide the text encoder's "
                                  f"width {text_encoder.width}")
        changes["text_encoder"] = dataclasses.replace(family.text_encoder, width=text_encoder.width, num_heads=heads)
    return dataclasses.replace(family, **changes) if changes else family


def load_components(source=sources.DEFAULT_MODEL, precision=None, revision=None, cache=None, progress=True,
                    prediction_type=None):
    """Reads a source's weights (converting and caching where needed) and builds the networks from them.

    The family (SD 1.x, 2.x, 9-channel inpainting) and every size are read from the weights' shapes.

    Args:
        source: a built-in model's name (``"kerasdiffusion/shapes"``), a Hub id, a diffusers folder, a single
            `.safetensors` / `.ckpt` file, or a converted folder.
        precision: `"float32"`, `"mixed_float16"` or `"mixed_bfloat16"`; `None` picks float16 on GPU,
            bfloat16 on TPU and float32 on CPU. Applies to these networks' layers only.
        revision: for a Hub id, the branch, tag or commit (default: the main branch).
        cache: whether converted weights are read from and written to the conversion cache; `None`
            follows ``$KERASDIFFUSION_NO_CACHE``.
        progress: show progress bars while weights are read and written.
        prediction_type: `"epsilon"` or `"v_prediction"`, overriding what the source says.

    Returns:
        `Components`; its ``image_size`` is what the source says (a diffusers UNet's ``sample_size`` times 8, a
        converted folder's record), else the family's rule (`ModelFamily.default_image_size`).

    Example:

    >>> parts = load_components("kerasdiffusion/shapes", precision="float32")
    >>> parts.image_size, parts.precision, sorted(parts.networks)
    (64, 'float32', ['decoder', 'diffusion_model', 'image_encoder', 'text_encoder'])
    >>> parts = load_components("v1-5-pruned-emaonly.safetensors")   # doctest: +SKIP
    >>> parts.image_size                                             # doctest: +SKIP
    512
    """
    check_precision(precision)
    precision = precision or default_precision()
    converted = sources.resolve(source, half_precision=precision != "float32", use_cache=cache, revision=revision,
                                progress=progress, lazy=True)
    weights = converted.weights
    family = _family(converted)
    vae_config = C.vae_config_from_weights(weights["vae"], family)
    encoder_weights, decoder_weights = split_weights(weights.pop("vae"))
    # Each network is built straight from its weights (read one tensor at a time, never held twice), then
    # checked strictly: a missing, unexpected or mis-shaped tensor anywhere is one error naming them all.
    parts = {
        "text_encoder": (build_text_encoder, C.text_encoder_config_from_weights(weights["text_encoder"], family),
                         weights.pop("text_encoder"), "text_encoder"),
        "diffusion_model": (build_unet, C.unet_config_from_weights(weights["unet"], family), weights.pop("unet"),
                            "unet"),
        "image_encoder": (build_image_encoder, vae_config, encoder_weights, "vae encoder"),
        "decoder": (build_decoder, vae_config, decoder_weights, "vae decoder"),
    }
    networks = {}
    for field, (build, config, network_weights, _) in parts.items():
        with to_be_loaded(network_weights):
            networks[field] = build(config, dtype=precision)
    check_all([(networks[field], network_weights, name) for field, (_, _, network_weights, name) in parts.items()])
    if converted.tokenizer_dir:
        tokenizer = CLIPTokenizer.from_folder(converted.tokenizer_dir)
    else:
        tokenizer = CLIPTokenizer(pad_token=family.pad_token)
    return Components(tokenizer=tokenizer, **networks, family=family,
                      scheduler_config=_scheduler_config(converted, family, prediction_type), vae_config=vae_config,
                      image_size=converted.image_size, precision=precision, source=str(source))
