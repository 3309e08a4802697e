"""Reference PyTorch models with seeded, non-trivial random weights, and helpers to compare with ours.

Every parameter is drawn anew, norm scales and biases included, so that a wrong mapping (a swapped
gamma/beta, a transposed kernel, q and k exchanged) changes the outputs and cannot hide.
"""

import numpy as np
import torch

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=32,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
)
TINY_TEXT_ENCODER = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=1,
    vocab_size=49408,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)


def randomize(module, seed):
    """Replaces every parameter with seeded random values of a sensible scale."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            noise = torch.randn(p.shape, generator=generator)
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            elif "embedding" in name:
                p.copy_(0.5 * noise)
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(noise / np.sqrt(fan_in))
    return module.eval()


def make_unet(seed=0, **overrides):
    from diffusers import UNet2DConditionModel

    return randomize(UNet2DConditionModel(**{**TINY_UNET, **overrides}), seed)


def make_vae(seed=1, **overrides):
    from diffusers import AutoencoderKL

    return randomize(AutoencoderKL(**{**TINY_VAE, **overrides}), seed)


def make_text_encoder(seed=2, **overrides):
    from transformers import CLIPTextConfig, CLIPTextModel

    return randomize(CLIPTextModel(CLIPTextConfig(**{**TINY_TEXT_ENCODER, **overrides})), seed)


def state_dict_numpy(module):
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def nhwc(t):
    return np.transpose(t.detach().cpu().numpy(), (0, 2, 3, 1))


def relative_error(ours, reference):
    """Max absolute difference over the reference's max magnitude."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))
