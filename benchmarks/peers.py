"""The three implementations `compare.py` times, each as a `Peer`: same work, same shapes, random weights.

Every peer is built at the full Stable Diffusion 1.5 sizes with seeded random weights (timing does not
depend on their values) and nothing downloaded, and offers the same timed calls:

- `text_encoder()`: tokenize one prompt and encode it (`[1, 77]` ids -> `[1, 77, 768]`), as each pipeline
  does once for the prompt and once for the negative prompt.
- `step()`: one denoising step of classifier-free guidance: the UNet on the batch of 2 (unconditional and
  conditional), the guidance, and the DDIM update.
- `vae_decode()`: latents `[1, h, w, 4]` -> image `[1, 8h, 8w, 3]`.
- `end_to_end()`: prompt -> uint8 image with `steps` DDIM steps, through the pipeline's own public call.

KerasCV's `generate_image` does not batch the guidance: it calls its UNet twice with a batch of 1 per step.
`step()` times the same work as the others (its UNet on the batch of 2, plus its own guidance and update
arithmetic); `step_own_loop()` times one iteration of its loop as it runs inside `generate_image`.

Each module is imported inside its peer, so a worker process loads only its own framework.
"""

import importlib.util
import json
import math
import os
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a photograph of an astronaut riding a horse"
GUIDANCE = 7.5
# The Stable Diffusion 1.5 sizes, in the PyTorch libraries' own configuration names.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768, attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu")
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      steps_offset=1, clip_sample=False, set_alpha_to_one=False)


def _load_tokenizer_module():
    """Our pure-Python tokenizer module, loaded by path so that the PyTorch worker never imports TensorFlow."""
    spec = importlib.util.spec_from_file_location("kd_tokenizer", os.path.join(ROOT, "kerasdiffusion", "tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _vocabulary_file():
    return os.path.join(ROOT, "kerasdiffusion", "data", "bpe_simple_vocab_16e6.txt.gz")


class Ours:
    """kerasdiffusion: a pipeline `from_components` with SD 1.5-sized random networks (`random_model`).

    `step()` calls the denoising core's compiled one-step program (`Denoiser.program`), the one the
    pipeline runs per step. `attention="whole"` sets `ScaledDotProductAttention.block_scores = 0` in this
    (worker) process: the whole-matrix attention, to measure the blocked one against it.
    """

    name = "kerasdiffusion"

    def __init__(self, size, steps, precision, xla, device, attention="blocked"):
        import kerasdiffusion as kd
        from kerasdiffusion import config as C
        from kerasdiffusion.denoise import Conditioning, Denoiser, as_tensors
        from kerasdiffusion.layers import ScaledDotProductAttention
        from keras import ops
        from random_model import random_components

        if attention == "whole":
            ScaledDotProductAttention.block_scores = 0
        self.ops, self.steps, self.device = ops, steps, device
        parts = random_components(precision)
        self.sd = kd.StableDiffusion.from_components(parts, img_width=size, img_height=size, jit_compile=xla,
                                                     scheduler="ddim", loop="steps")
        rng = np.random.default_rng(0)
        latent = size // 8
        scheduler = self.sd.scheduler
        plan = scheduler.plan(steps)
        conditioning = as_tensors(Conditioning(rng.standard_normal((1, 77, 768)).astype("float32"),
                                               rng.standard_normal((1, 77, 768)).astype("float32"), GUIDANCE))
        program = Denoiser(parts.diffusion_model, xla).program("steps", scheduler, plan, conditioning)
        latents = ops.convert_to_tensor(rng.standard_normal((1, latent, latent, 4)).astype("float32"))
        state = scheduler.initial_state(latents)
        index = ops.convert_to_tensor(0, "int32")
        self.step_call = lambda: program(latents, state, index, conditioning, None)
        self.decoder_latents = rng.standard_normal((1, latent, latent, 4)).astype("float32") * C.SD_VAE.scaling_factor

    def text_encoder(self):
        return self.ops.convert_to_numpy(self.sd.encode_text(PROMPT))

    def step(self):
        latents, _ = self.step_call()
        return self.ops.convert_to_numpy(latents)

    def vae_decode(self):
        return self.sd._decode(self.decoder_latents)

    def end_to_end(self):
        return self.sd.text_to_image(PROMPT, num_steps=self.steps, seed=0, verbose=False)

    def notes(self):
        """How many times the pipeline's denoising program was traced (1 for the end-to-end runs)."""
        return {"step_traces": self.sd.trace_count}

    def gpu_peak_mb(self):
        if self.device != "gpu":
            return None
        import tensorflow as tf

        return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20


class KerasCV:
    """KerasCV 0.9's Stable Diffusion, built with `download_weights=False` and compiled as its properties do.

    Its tokenizer reads the CLIP vocabulary file that ships with kerasdiffusion (the same file KerasCV
    would download). On GPU the models are built under the global `mixed_float16` policy, KerasCV's own
    recipe for half precision.
    """

    name = "KerasCV"

    def __init__(self, size, steps, precision, xla, device):
        import keras
        import keras_cv
        from keras_cv.models import stable_diffusion as kcv
        from keras_cv.src.models.stable_diffusion.clip_tokenizer import SimpleTokenizer

        if precision != "float32":
            keras.mixed_precision.set_global_policy(precision)
        keras.utils.set_random_seed(0)
        self.steps = steps
        self.sd = keras_cv.models.StableDiffusion(img_height=size, img_width=size, jit_compile=xla)
        self.sd._tokenizer = SimpleTokenizer(bpe_path=_vocabulary_file())
        self.sd._text_encoder = kcv.TextEncoder(77, download_weights=False)
        self.sd._diffusion_model = kcv.DiffusionModel(size, size, 77, download_weights=False)
        self.sd._decoder = kcv.Decoder(size, size, download_weights=False)
        for model in (self.sd._text_encoder, self.sd._diffusion_model, self.sd._decoder):
            model.compile(jit_compile=xla)
        rng = np.random.default_rng(0)
        latent = size // 8
        self.latents = rng.standard_normal((1, latent, latent, 4)).astype("float32")
        self.context = rng.standard_normal((1, 77, 768)).astype("float32")
        self.unconditional = rng.standard_normal((1, 77, 768)).astype("float32")
        self.timestep = 981

    def text_encoder(self):
        return np.asarray(self.sd.encode_text(PROMPT))

    def _update(self, latent_prev, unconditional, conditional, a_t=0.05, a_prev=0.07):
        """generate_image's guidance and DDIM update, written as it writes them."""
        latent = unconditional + GUIDANCE * (conditional - unconditional)
        pred_x0 = (latent_prev - math.sqrt(1 - a_t) * latent) / math.sqrt(a_t)
        return latent * math.sqrt(1.0 - a_prev) + math.sqrt(a_prev) * pred_x0

    def step(self):
        t_emb = self.sd._get_timestep_embedding(self.timestep, 2)
        output = self.sd.diffusion_model.predict_on_batch({
            "latent": np.repeat(self.latents, 2, axis=0),
            "timestep_embedding": t_emb,
            "context": np.concatenate([self.unconditional, self.context]),
        })
        return self._update(self.latents, output[:1], output[1:])

    def step_own_loop(self):
        t_emb = self.sd._get_timestep_embedding(self.timestep, 1)
        unet = self.sd.diffusion_model
        unconditional = unet.predict_on_batch(
            {"latent": self.latents, "timestep_embedding": t_emb, "context": self.unconditional})
        conditional = unet.predict_on_batch({"latent": self.latents, "timestep_embedding": t_emb, "context": self.context})
        return self._update(self.latents, unconditional, conditional)

    def vae_decode(self):
        return self.sd.decoder.predict_on_batch(self.latents)

    def end_to_end(self):
        return self.sd.text_to_image(PROMPT, num_steps=self.steps, seed=0)

    def gpu_peak_mb(self):
        import tensorflow as tf

        if not tf.config.list_physical_devices("GPU"):
            return None
        return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20


class Diffusers:
    """diffusers' StableDiffusionPipeline and its modules: PyTorch float32 on CPU, float16 with SDPA on GPU.

    The modules are built from the SD 1.5 configurations with PyTorch's default initialisation; the
    tokenizer is transformers' CLIPTokenizer over our shipped CLIP vocabulary.
    """

    name = "diffusers"

    def __init__(self, size, steps, precision, xla, device):
        import torch
        from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from diffusers.models.attention_processor import AttnProcessor2_0
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        torch.manual_seed(0)
        self.torch, self.steps, self.size = torch, steps, size
        self.device = "cuda" if device == "gpu" else "cpu"
        dtype = torch.float16 if precision == "float16" else torch.float32
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(**SD15_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)),
            tokenizer=CLIPTokenizer.from_pretrained(_write_tokenizer_files(tempfile.mkdtemp()), model_max_length=77),
            unet=UNet2DConditionModel(**SD15_UNET), scheduler=DDIMScheduler.from_config(SD15_SCHEDULER),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.unet.set_attn_processor(AttnProcessor2_0())  # torch's scaled_dot_product_attention
        self.pipe = pipe.to(self.device, dtype)
        self.pipe.set_progress_bar_config(disable=True)
        latent = size // 8
        generator = torch.Generator().manual_seed(0)
        self.latents = torch.randn((1, 4, latent, latent), generator=generator).to(self.device, dtype)
        self.context = torch.randn((2, 77, 768), generator=generator).to(self.device, dtype)
        self.pipe.scheduler.set_timesteps(steps)
        self.timestep = self.pipe.scheduler.timesteps[0]

    def _sync(self, result):
        if self.device == "cuda":
            self.torch.cuda.synchronize()
        return result

    def text_encoder(self):
        with self.torch.inference_mode():
            ids = self.pipe.tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True,
                                      return_tensors="pt").input_ids.to(self.device)
            return self._sync(self.pipe.text_encoder(ids)[0])

    def step(self):
        scheduler = self.pipe.scheduler
        with self.torch.inference_mode():
            model_input = scheduler.scale_model_input(self.torch.cat([self.latents] * 2), self.timestep)
            noise = self.pipe.unet(model_input, self.timestep, encoder_hidden_states=self.context).sample
            unconditional, conditional = noise.chunk(2)
            noise = unconditional + GUIDANCE * (conditional - unconditional)
            return self._sync(scheduler.step(noise, self.timestep, self.latents).prev_sample)

    def vae_decode(self):
        with self.torch.inference_mode():
            vae = self.pipe.vae
            return self._sync(vae.decode(self.latents / vae.config.scaling_factor).sample)

    def end_to_end(self):
        generator = self.torch.Generator(self.device).manual_seed(0)
        with self.torch.inference_mode():
            return self._sync(self.pipe(PROMPT, height=self.size, width=self.size, num_inference_steps=self.steps,
                                        guidance_scale=GUIDANCE, generator=generator, output_type="np").images)

    def gpu_peak_mb(self):
        if self.device != "cuda":
            return None
        return self.torch.cuda.max_memory_allocated() / 2**20


def _write_tokenizer_files(folder):
    """vocab.json and merges.txt in transformers' format, from the CLIP vocabulary kerasdiffusion ships."""
    vocab, merges = _load_tokenizer_module().load_clip_vocabulary()
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n")
    return folder


PEERS = {"ours": Ours, "kerascv": KerasCV, "diffusers": Diffusers}
