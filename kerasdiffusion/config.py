"""Frozen configurations of the three networks, and the model families as preset values.

A family (SD 1.x, SD 2.x) is data: the same builders make every family from these dataclasses. What the
weights' shapes can tell (channels, levels, layers, context width, MLP width, UNet input channels) is read
from them by the ``*_from_weights`` functions; what they cannot tell (attention heads, group-norm groups,
epsilons) follows the family's convention.

Example:

>>> unet = UNetConfig()                       # Stable Diffusion 1.x
>>> unet.block_channels, unet.heads(0)
((320, 640, 1280, 1280), 8)
>>> SD2_UNET.heads(3)                         # SD 2.x: 64-wide heads
20
"""

import dataclasses
import re

# The names users pick a scheduler, a precision and a prompt syntax by (kept here, free of TensorFlow, so that the command
# line can check its arguments before importing it).
SCHEDULER_NAMES = ("ddim", "pndm", "lms", "euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_karras")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
PROMPT_SYNTAXES = ("plain", "a1111")
# The image side Stable Diffusion 1.x (and 2.x base) was trained at.
BASE_IMAGE_SIZE = 512


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """The CLIP text tower. SD 1.x: OpenAI ViT-L/14 text model; SD 2.x: OpenCLIP ViT-H/14 minus its last layer."""

    vocab_size: int = 49408
    max_length: int = 77
    width: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    activation: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP) or "gelu" (OpenCLIP)
    epsilon: float = 1e-5


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The denoising UNet. ``num_heads`` per level (SD 1.x) or ``head_dim`` (SD 2.x) fixes the attention heads."""

    in_channels: int = 4
    out_channels: int = 4
    block_channels: tuple = (320, 640, 1280, 1280)
    attention_levels: tuple = (True, True, True, False)
    layers_per_level: int = 2
    transformer_depth: int = 1
    context_dim: int = 768
    num_heads: int | None = 8
    head_dim: int | None = None
    norm_groups: int = 32
    epsilon: float = 1e-5
    attention_epsilon: float = 1e-6  # the transformer's input group norm
    upcast_attention: bool = False
    # Whether PyTorch's proj_in / proj_out are linear layers (SD 2.x) or 1x1 convolutions (SD 1.x); dense here
    # either way, so it matters only to the weights' PyTorch layout when exported.
    linear_projection: bool = False

    @property
    def time_embedding_dim(self):
        return 4 * self.block_channels[0]

    def heads(self, level):
        """Attention heads at a level; the middle block uses the deepest level's."""
        if self.head_dim is not None:
            return self.block_channels[level] // self.head_dim
        return self.num_heads


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The KL autoencoder that maps images to latents (``scaling_factor`` is applied by the pipeline)."""

    image_channels: int = 3
    latent_channels: int = 4
    block_channels: tuple = (128, 256, 512, 512)
    layers_per_level: int = 2
    norm_groups: int = 32
    epsilon: float = 1e-6
    scaling_factor: float = 0.18215


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """What a checkpoint family fixes beyond its tensor shapes."""

    name: str
    text_encoder: TextEncoderConfig
    unet: UNetConfig
    vae: VAEConfig
    pad_token: str = "<|endoftext|>"
    # What the UNet predicts when the source has no scheduler config to say it: the single-file SD 2.x
    # checkpoints people use are the 768x768 v-prediction ones.
    prediction_type: str = "epsilon"
    # How original single-file checkpoints store the text tower: OpenAI CLIP in transformers' names (SD 1.x), or
    # OpenCLIP's (SD 2.x).
    open_clip: bool = False
    # The image side (pixels) the family's models were trained at with its own prediction type, for sources
    # that do not say it (single files, which carry no UNet sample_size): the SD 2.x v-prediction models are
    # the 768x768 ones.
    image_size: int = BASE_IMAGE_SIZE

    def default_image_size(self, prediction_type):
        """The model's own image side when its source does not say it: the family's for its own prediction
        type; 512 otherwise (SD 2.x base, an epsilon model, is a 512x512 one).

        Example:

        >>> SD2.default_image_size("v_prediction"), SD2.default_image_size("epsilon"), SD1.default_image_size("epsilon")
        (768, 512, 512)
        """
        return self.image_size if prediction_type == self.prediction_type else BASE_IMAGE_SIZE


SD1_TEXT_ENCODER = TextEncoderConfig()
SD2_TEXT_ENCODER = TextEncoderConfig(
    width=1024, num_layers=23, num_heads=16, mlp_dim=4096, activation="gelu"
)
SD1_UNET = UNetConfig()
SD2_UNET = UNetConfig(context_dim=1024, num_heads=None, head_dim=64, upcast_attention=True, linear_projection=True)
SD_VAE = VAEConfig()

SD1 = ModelFamily("sd1", SD1_TEXT_ENCODER, SD1_UNET, SD_VAE)
SD2 = ModelFamily("sd2", SD2_TEXT_ENCODER, SD2_UNET, SD_VAE, pad_token="!", prediction_type="v_prediction",
                  open_clip=True, image_size=768)
# The built-in kerasdiffusion/shapes model (`kerasdiffusion.training.shapes_model`): SD 1.x's conventions for
# narrow networks. Its text tower is 64 wide with 4 heads of 16 (CLIP's heads are 64 wide: with one head, each
# layer adds one weighted mix of the words to a token); its UNet and autoencoder have fewer group-norm groups. The
# weights cannot tell heads or groups, so a converted folder's manifest names its family and the counts it was
# trained with.
SHAPES = ModelFamily("shapes",
                     dataclasses.replace(SD1_TEXT_ENCODER, width=64, num_layers=2, num_heads=4, mlp_dim=256),
                     dataclasses.replace(SD1_UNET, norm_groups=16), dataclasses.replace(SD_VAE, norm_groups=4))
FAMILIES = {family.name: family for family in (SD1, SD2, SHAPES)}


def _levels(weights, pattern):
    """Sorted distinct integers captured by ``pattern`` over the weight names."""
    return sorted({int(m.group(1)) for name in weights for m in [re.match(pattern, name)] if m})


def _text_heads(width, family_config):
    """The family's heads at its own width; CLIP's 64-wide heads at another (a test model's), where they fit."""
    if width == family_config.width or width % 64 != 0:
        return family_config.num_heads
    return width // 64


def text_encoder_config_from_weights(weights, family=SD1):
    """Reads widths and depth from converted text-encoder weights (``{path: array}``)."""
    vocab_size, width = weights["token_embedding/embeddings"].shape
    return dataclasses.replace(
        family.text_encoder,
        vocab_size=vocab_size,
        max_length=weights["position_embedding/embeddings"].shape[0],
        width=width,
        num_layers=len(_levels(weights, r"layer(\d+)_")),
        num_heads=_text_heads(width, family.text_encoder),
        mlp_dim=weights["layer0_mlp_fc1/kernel"].shape[1],
    )


def unet_config_from_weights(weights, family=SD1):
    """Reads channels, levels, attention placement and context width from converted UNet weights."""
    levels = _levels(weights, r"down(\d+)_")
    channels = tuple(weights[f"down{i}_res0_conv1/kernel"].shape[-1] for i in levels)
    return dataclasses.replace(
        family.unet,
        in_channels=weights["input_conv/kernel"].shape[2],
        out_channels=weights["output_conv/kernel"].shape[3],
        block_channels=channels,
        attention_levels=tuple(f"down{i}_attn0_norm/gamma" in weights for i in levels),
        layers_per_level=len(_levels(weights, r"down0_res(\d+)_")),
        transformer_depth=len(_levels(weights, r"mid_attn0_block(\d+)_")),
        context_dim=weights["mid_attn0_block0_cross_k/kernel"].shape[0],
    )


def vae_config_from_weights(weights, family=SD1):
    """Reads channels and levels from converted VAE weights (encoder and decoder together)."""
    levels = _levels(weights, r"encoder_down(\d+)_")
    return dataclasses.replace(
        family.vae,
        image_channels=weights["encoder_input_conv/kernel"].shape[2],
        latent_channels=weights["post_quant_conv/kernel"].shape[2],
        block_channels=tuple(weights[f"encoder_down{i}_res0_conv1/kernel"].shape[-1] for i in levels),
        layers_per_level=len(_levels(weights, r"encoder_down0_res(\d+)_")),
    )


def family_from_weights(text_encoder_weights):
    """SD 2.x checkpoints carry a 1024-wide OpenCLIP text tower; SD 1.x a 768-wide OpenAI one."""
    width = text_encoder_weights["token_embedding/embeddings"].shape[1]
    return SD2 if width == SD2_TEXT_ENCODER.width else SD1
