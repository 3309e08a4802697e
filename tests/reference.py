"""Reference PyTorch models with seeded, non-trivial random weights, and helpers to compare with ours.

Every parameter is drawn anew, norm scales and biases included, so that a wrong mapping (a swapped
gamma/beta, a transposed kernel, q and k exchanged) changes the outputs and cannot hide.
"""

import kerasdiffusion  # noqa: F401,I001  (first: it loads Triton's library before TensorFlow, see load_order)
import keras
import numpy as np
import torch

# The tests' `jit_compile`: without XLA, TensorFlow still builds a graph (quick to make and to run at tiny
# sizes) while JAX runs op by op, slowly; so the tiny models compile with XLA on JAX only.
JIT = keras.backend.backend() == "jax"

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


def diffusers_scheduler_class(name):
    """The diffusers scheduler class our scheduler `name` reproduces, and the extra keywords it needs.

    The one table of this correspondence in the tests (the README's scheduler list says the same in words).
    """
    import diffusers as D

    return {
        "ddim": (D.DDIMScheduler, {}),
        "pndm": (D.PNDMScheduler, {}),
        "lms": (D.LMSDiscreteScheduler, {}),
        "euler": (D.EulerDiscreteScheduler, {}),
        "euler_ancestral": (D.EulerAncestralDiscreteScheduler, {}),
        "dpmpp_2m": (D.DPMSolverMultistepScheduler, {}),
        "dpmpp_2m_karras": (D.DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    }[name]


def diffusers_scheduler(name, config, **overrides):
    """The diffusers scheduler `name` stands for, built `from_config` of `config` (a dict)."""
    cls, extra = diffusers_scheduler_class(name)
    return cls.from_config(config, **extra, **overrides)


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


# A tiny but complete Stable Diffusion: 4 VAE levels so the latent is 1/8 of the image, as in SD.
PIPELINE_VAE = dict(TINY_VAE, block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1)
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      steps_offset=1, clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True)


def write_clip_tokenizer_files(folder, pad_token="<|endoftext|>"):
    """vocab.json + merges.txt (transformers' format) made from the CLIP vocabulary we ship."""
    import json
    import os

    from kerasdiffusion.tokenizer import load_clip_vocabulary

    vocab, merges = load_clip_vocabulary()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n")
    return folder


# What makes a checkpoint SD 2.x, at tiny sizes: the 1024-wide OpenCLIP text tower (GELU, 16 heads; the width is
# what tells the family), 64-wide attention heads in the UNet with linear projections and float32 attention
# scores, the "!" padding token, and v-prediction (as the 768x768 SD 2.x models).
SD2_UNET = dict(block_out_channels=(64, 128), attention_head_dim=(1, 2), cross_attention_dim=1024,
                use_linear_projection=True, upcast_attention=True)
SD2_TEXT_ENCODER = dict(hidden_size=1024, intermediate_size=128, num_attention_heads=16, hidden_act="gelu")
SD2_SCHEDULER = dict(SD15_SCHEDULER, prediction_type="v_prediction")


def make_reference_pipeline(unet_in_channels=4, seed=0, family="sd1"):
    """A diffusers StableDiffusionPipeline (or the inpainting one, for 9 channels) with random weights,
    shaped as SD 1.x or (``family="sd2"``) as SD 2.x."""
    import tempfile

    from diffusers import PNDMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from transformers import CLIPTokenizer as ReferenceTokenizer

    sd2 = family == "sd2"
    tokenizer = ReferenceTokenizer.from_pretrained(write_clip_tokenizer_files(tempfile.mkdtemp()), model_max_length=77,
                                                   **({"pad_token": "!"} if sd2 else {}))
    parts = dict(
        unet=make_unet(seed, in_channels=unet_in_channels, **(SD2_UNET if sd2 else {})),
        vae=make_vae(seed + 1, **PIPELINE_VAE),
        text_encoder=make_text_encoder(seed + 2, **(SD2_TEXT_ENCODER if sd2 else {})),
        tokenizer=tokenizer,
        scheduler=PNDMScheduler.from_config(SD2_SCHEDULER if sd2 else SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    cls = StableDiffusionInpaintPipeline if unet_in_channels == 9 else StableDiffusionPipeline
    pipeline = cls(**parts)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
