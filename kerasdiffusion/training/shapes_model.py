"""The built-in ``kerasdiffusion/shapes`` model: its networks' sizes, and the one command that trains it.

    python -m kerasdiffusion.training.shapes_model --out kerasdiffusion/models/shapes --seed 0

Stable Diffusion's architecture, small: a CLIP text encoder (the shipped tokenizer, 2 layers of width 64 with
4 heads), a UNet with cross-attention at every level (8x8 latents), and a KL autoencoder with the 8x factor,
all trained here from random weights in five stages:

1. **Data**: scenes from the seed (`kerasdiffusion.shapes`, the held-out combinations excluded), drawn at
   64x64, captioned.
2. **Autoencoder**: `AutoencoderTrainer` (L1 + KL) on whole pictures, the error over the shape's box weighed
   more than the plain background around it (`box_weights`); then the latent space is rescaled so that
   latents times Stable Diffusion's 0.18215 have unit spread (`match_scaling_factor`), so the model needs no
   new constant.
3. **Latents**: every picture encoded once; the diffusion step samples from the cached posteriors.
4. **Diffusion**: the UNet and the text encoder together, with the training objective of every Stable
   Diffusion (`Trainer`, method ``"full"`` with ``train_text_encoder=True``); one caption in ten is replaced
   by the empty prompt, so the model also learns the unconditional prediction that guidance steers from.
   Min-SNR-γ weighting, AdamW, and the weights' exponential moving average is what is kept.
5. **Result**: a converted folder in float16 (what ``from_pretrained`` reads), written atomically.

`adherence` measures the result: how often its pictures show what their prompts ask, read from the pixels
(`kerasdiffusion.shapes.describe`).

Each stage's batches are a function of the seed and the step, and both training stages write a checkpoint
every `CHECKPOINT_EVERY` steps into ``--work``: after a kill, the same command goes on from there to the
same result (a different recipe over the same ``--work`` is refused).
"""

import argparse
import dataclasses
import json
import os
import time

import keras
import numpy as np

from kerasdiffusion import config as C
from kerasdiffusion import shapes

TEXT_ENCODER = C.SHAPES.text_encoder  # 2 layers of width 64, 4 heads
# Fewer group-norm groups than Stable Diffusion's 32 (the family `config.SHAPES`: 16 in the UNet, 4 in the
# autoencoder): with one channel per group a group norm takes away each channel's mean, and with it the colour
# of a plain picture; several channels per group keep it.
UNET = dataclasses.replace(C.SHAPES.unet, block_channels=(64, 96, 96), attention_levels=(True, True, True),
                           layers_per_level=1, context_dim=TEXT_ENCODER.width)
# The autoencoder's two finest levels are its narrowest: their convolutions at full and half resolution cost
# most of its step, and plain-coloured shapes need few features there. At 16/32 channels a step costs half
# of what 32/64 did, and 500 steps of either read back shapes alike (40% and 36%), so the same time buys
# twice the steps.
VAE = dataclasses.replace(C.SHAPES.vae, block_channels=(16, 32, 64, 64), layers_per_level=1)
SOURCE_NAME = "kerasdiffusion/shapes"
CHECKPOINT_EVERY = 250  # steps


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything the result depends on."""

    seed: int = 0
    pictures: int = 20000
    # The autoencoder learns from whole pictures, as it runs: its group norms and its attention take their
    # statistics over the whole input (crops of a quarter of the picture made small shapes worse; README).
    vae_steps: int = 4000
    vae_batch_size: int = 8
    vae_learning_rate: float = 1e-3
    kl_weight: float = 1e-6
    # The weight of the pixels of the shape's box in the autoencoder's error (others: 1). Read back alone, an
    # autoencoder trained at 4 gives small shapes right 102 times of 162, at 16 125 times (README).
    vae_box_weight: float = 16.0
    diffusion_steps: int = 8000
    batch_size: int = 16
    learning_rate: float = 6e-4
    warmup_steps: int = 200
    caption_dropout: float = 0.1
    ema_momentum: float = 0.998
    snr_gamma: float = 5.0  # min-SNR-γ weighting (Hang et al. 2023): the noisy steps, where layout is decided, count


# ------------------------------------------------------------------------------------------------ 1. data


def pictures(recipe):
    """The training scenes and their pictures, float32 ``[N, 64, 64, 3]`` in [-1, 1]."""
    scenes = shapes.sample_scenes(recipe.seed, recipe.pictures)
    images = np.stack([shapes.render(scene) for scene in scenes]).astype(np.float32) / 127.5 - 1.0
    return scenes, images


def batches(arrays, batch_size, seed, first_step=0):
    """An endless `tf.data.Dataset` whose step ``k`` batch is rows drawn from ``(seed, k)``: a resumed run
    sees the batches an uninterrupted one would have."""
    import tensorflow as tf

    count = len(next(iter(arrays.values())))

    def batch(step):
        rows = np.random.default_rng((seed, int(step))).integers(count, size=batch_size)
        return tuple(array[rows] for array in arrays.values())

    signature = tuple(tf.TensorSpec((batch_size, *array.shape[1:]), tf.as_dtype(array.dtype))
                      for array in arrays.values())

    def generator():
        step = first_step
        while True:
            yield batch(step)
            step += 1

    names = list(arrays)
    data = tf.data.Dataset.from_generator(generator, output_signature=signature)
    return data.map(lambda *columns: dict(zip(names, columns))).prefetch(2)


def box_weights(scenes, weight, margin=2):
    """Each picture's pixel weights in the autoencoder's error, float16 ``[N, 64, 64]``: ``weight`` over the
    shape's bounding box widened by ``margin`` pixels, where a circle, a square and a triangle differ, and 1
    elsewhere. A small shape is a twentieth of its picture: unweighted, its outline and colour are a small
    part of the error beside the background around it."""
    if not weight > 0:
        raise ValueError(f"the box weight must be positive, got {weight!r}")
    weights = np.ones((len(scenes), shapes.RESOLUTION, shapes.RESOLUTION), np.float16)
    for row, scene in enumerate(scenes):
        (x, y), half = scene.centre(), shapes.SIZES[scene.size] / 2 + margin
        left, top = (max(int(np.floor(c - half)), 0) for c in (x, y))
        right, bottom = (int(np.ceil(c + half)) for c in (x, y))
        weights[row, top:bottom, left:right] = weight
    return weights


# ---------------------------------------------------------------------------------------- training stages


def _fit(trainer, data, steps, checkpoint, log, label):
    """Fits ``steps`` steps, resuming from ``checkpoint`` when it exists, saving to it as it goes."""
    from kerasdiffusion.training.run import CheckpointEvery, ProgressBar, restore_checkpoint

    trainer.optimizer.build(trainer.trainable_variables)
    first_step = restore_checkpoint(trainer, checkpoint) if os.path.exists(checkpoint) else 0
    if first_step < steps:
        start = time.perf_counter()
        callbacks = [CheckpointEvery(checkpoint, CHECKPOINT_EVERY, first_step, steps, label),
                     ProgressBar(first_step, steps)]
        trainer.fit(data(first_step), epochs=1, steps_per_epoch=steps - first_step, callbacks=callbacks,
                    verbose=0, shuffle=False)  # `batches` orders them; Keras warns otherwise
        log(f"{label}: steps {first_step + 1}-{steps} in {time.perf_counter() - start:.0f} s")
    else:
        trainer.optimizer.finalize_variable_values(trainer.trainable_weights)


def _optimizer(learning_rate, steps, warmup_steps, ema_momentum=None):
    schedule = keras.optimizers.schedules.CosineDecay(0.0, max(steps - warmup_steps, 1), alpha=0.05,
                                                      warmup_target=learning_rate, warmup_steps=warmup_steps)
    if ema_momentum is None:
        return keras.optimizers.AdamW(schedule, weight_decay=1e-4)
    return keras.optimizers.AdamW(schedule, weight_decay=1e-4, use_ema=True, ema_momentum=ema_momentum)


def train_autoencoder(recipe, scenes, images, work, log=print, jit_compile=True, run_eagerly=False):
    """Stage 2: the image encoder and decoder, rescaled to Stable Diffusion's latent scale."""
    from kerasdiffusion.training.autoencoder import AutoencoderTrainer, match_scaling_factor
    from kerasdiffusion.vae import build_decoder, build_image_encoder

    keras.utils.set_random_seed(recipe.seed)
    encoder, decoder = build_image_encoder(VAE), build_decoder(VAE)
    trainer = AutoencoderTrainer(encoder, decoder, kl_weight=recipe.kl_weight, seed=recipe.seed)
    trainer.compile(optimizer=_optimizer(recipe.vae_learning_rate, recipe.vae_steps, 100), jit_compile=jit_compile,
                    run_eagerly=run_eagerly)
    arrays = {"images": images}
    if recipe.vae_box_weight != 1:
        arrays["weights"] = box_weights(scenes, recipe.vae_box_weight)
    _fit(trainer, lambda first: batches(arrays, recipe.vae_batch_size, recipe.seed + 1, first), recipe.vae_steps,
         os.path.join(work, "autoencoder.safetensors"), log, "autoencoder")
    factor = match_scaling_factor(encoder, decoder, images[:2048], VAE.scaling_factor)
    log(f"autoencoder: latents multiplied by {factor:.4f} to unit spread at scaling factor {VAE.scaling_factor}")
    return encoder, decoder


def train_diffusion(recipe, scenes, images, encoder, decoder, work, log=print, jit_compile=True, run_eagerly=False):
    """Stages 3 and 4: the text encoder and UNet under the diffusion objective, on cached latents."""
    from keras import ops

    from kerasdiffusion.components import Components
    from kerasdiffusion.text_encoder import build_text_encoder
    from kerasdiffusion.tokenizer import CLIPTokenizer
    from kerasdiffusion.training.trainer import Trainer
    from kerasdiffusion.unet import build_unet

    moments = np.concatenate([np.asarray(ops.convert_to_numpy(encoder(images[i:i + 256], training=False)))
                              for i in range(0, len(images), 256)])
    tokenizer = CLIPTokenizer()
    token_ids = np.asarray(tokenizer([scene.caption() for scene in scenes]), np.int32)
    empty = np.asarray(tokenizer([""]), np.int32)
    dropped = np.random.default_rng((recipe.seed, 3)).random(len(scenes)) < recipe.caption_dropout
    # A fixed tenth of the rows is stored twice, once with its caption and once without, so that every
    # picture is also seen with its caption.
    token_ids = np.concatenate([token_ids, np.repeat(empty, dropped.sum(), axis=0)])
    moments = np.concatenate([moments, moments[dropped]])

    keras.utils.set_random_seed(recipe.seed + 2)
    parts = Components(tokenizer=tokenizer, text_encoder=build_text_encoder(TEXT_ENCODER),
                       diffusion_model=build_unet(UNET), image_encoder=encoder, decoder=decoder,
                       family=C.SHAPES, vae_config=VAE, image_size=shapes.RESOLUTION, source=SOURCE_NAME)
    trainer = Trainer(parts, method="full", train_text_encoder=True, snr_gamma=recipe.snr_gamma,
                      seed=recipe.seed + 2)
    trainer.compile(optimizer=_optimizer(recipe.learning_rate, recipe.diffusion_steps, recipe.warmup_steps,
                                         recipe.ema_momentum), jit_compile=jit_compile, run_eagerly=run_eagerly)
    _fit(trainer, lambda first: batches({"token_ids": token_ids, "moments": moments}, recipe.batch_size,
                                        recipe.seed + 4, first),
         recipe.diffusion_steps, os.path.join(work, "diffusion.safetensors"), log, "diffusion")
    return parts


def save_model(parts, out):
    """Stage 5: the networks' weights as a converted folder in float16. Its manifest names the group-norm group
    counts and the text encoder's heads the networks were trained with, which the weights cannot tell."""
    from kerasdiffusion.exporting import network_weights
    from weights_conversion.convert import Converted, save_converted

    weights = {network: {path: array.astype(np.float16) for path, array in arrays.items()}
               for network, arrays in network_weights(parts).items()}
    scheduler = dataclasses.asdict(parts.scheduler_config)
    return save_converted(Converted(weights, scheduler_config=scheduler, source=SOURCE_NAME,
                                    image_size=parts.image_size, family=parts.family.name,
                                    norm_groups={"unet": parts.family.unet.norm_groups,
                                                 "vae": parts.family.vae.norm_groups},
                                    text_encoder_heads=parts.family.text_encoder.num_heads), out)


def train(recipe, out, work, log=print, jit_compile=True, run_eagerly=False):
    """Trains the model from ``recipe`` and writes it to ``out``; returns ``out``. A rerun with the same recipe
    and ``work`` folder goes on from the last checkpoint there, to the same result. ``jit_compile`` and
    ``run_eagerly`` go to the trainers' ``compile``."""
    start = time.perf_counter()
    os.makedirs(work, exist_ok=True)
    recorded = os.path.join(work, "recipe.json")
    if os.path.exists(recorded):
        with open(recorded, encoding="utf-8") as file:
            if json.load(file) != dataclasses.asdict(recipe):
                raise ValueError(f"{work!r} holds checkpoints of another recipe: give the same options, or "
                                 "another --work")
    with open(recorded, "w", encoding="utf-8") as file:
        json.dump(dataclasses.asdict(recipe), file, indent=2)
    scenes, images = pictures(recipe)
    encoder, decoder = train_autoencoder(recipe, scenes, images, work, log, jit_compile, run_eagerly)
    parts = train_diffusion(recipe, scenes, images, encoder, decoder, work, log, jit_compile, run_eagerly)
    save_model(parts, out)
    log(f"trained in {time.perf_counter() - start:.0f} s; written to {out}")
    return out


# ------------------------------------------------------------------------------------- 6. adherence


# How the adherence figures are made.
SETTINGS = dict(num_steps=25, unconditional_guidance_scale=5.0)
CHUNK = 20  # pictures per call


def _each_chunk(call, scenes, seed, *inputs):
    """``call(prompts, *inputs, seed=...)`` over chunks of the scenes, one seed key per picture."""
    images = []
    for start in range(0, len(scenes), CHUNK):
        part = slice(start, start + CHUNK)
        count = len(scenes[part])
        images.append(call([scene.caption() for scene in scenes[part]],
                           *(np.stack(x[part]) if isinstance(x, list) else x for x in inputs),
                           seed=[(seed, start + i) for i in range(count)], verbose=False, **SETTINGS))
    return np.concatenate(images)


def text_to_image(sd, scenes, seed):
    return _each_chunk(sd.text_to_image, scenes, seed)


def inpaint(sd, tasks, seed):
    pictures, masks, scenes = (list(column) for column in zip(*tasks))
    return _each_chunk(sd.inpaint, scenes, seed, pictures, masks[0])  # every task masks the left half


def image_to_image(sd, tasks, seed, strength=0.75):
    pictures, scenes = (list(column) for column in zip(*tasks))
    return _each_chunk(lambda *args, **kwargs: sd.image_to_image(*args, strength=strength, **kwargs), scenes, seed,
                       pictures)


def adherence(sd, count=60, edits=None, seed=100):
    """How often ``sd`` draws what is asked, ``{task: score}`` (`kerasdiffusion.shapes.score`), for three tasks
    over prompts of which a third are held out of training: text to image (``count`` prompts); inpainting the
    left half with the shape a prompt names, and image to image at strength 0.75 recolouring a picture's
    shape (``edits`` prompts each, default ``count``)."""
    edits = count if edits is None else edits
    scenes = shapes.evaluation_scenes(seed, count)
    inpainting = shapes.inpainting_tasks(seed + 1, edits)
    recolouring = shapes.image_to_image_tasks(seed + 2, edits)
    return {
        "text_to_image": shapes.score(text_to_image(sd, scenes, seed), scenes),
        "inpaint (left half)": shapes.score(inpaint(sd, inpainting, seed), [task[-1] for task in inpainting]),
        "image_to_image (recolour, strength 0.75)": shapes.score(image_to_image(sd, recolouring, seed),
                                                                 [task[-1] for task in recolouring]),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description="Trains the built-in kerasdiffusion/shapes model.")
    parser.add_argument("--out", required=True, help="the converted folder to write (absent or empty)")
    parser.add_argument("--work", default=None, help="checkpoints, to resume from after a kill (default: OUT.work)")
    defaults = Recipe()
    for field in dataclasses.fields(Recipe):
        default = getattr(defaults, field.name)
        if isinstance(default, bool):
            parser.add_argument(f"--{field.name.replace('_', '-')}", action=argparse.BooleanOptionalAction,
                                default=default)
        else:
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args(argv)
    recipe = Recipe(**{field.name: getattr(args, field.name) for field in dataclasses.fields(Recipe)})
    work = args.work or args.out.rstrip("/") + ".work"
    train(recipe, args.out, work)


if __name__ == "__main__":
    main()
