"""A training run as the command line makes it: data, trainer, optimizer, checkpoints, resuming, the result.

A checkpoint is what a run needs to go on exactly where it stopped, and nothing frozen: the trainable
variables, the step's random-number state and the optimizer's variables, in one ``.safetensors`` written
beside its final name and renamed into place (so a run killed while writing leaves the previous one whole),
with the step reached and the run's settings in its header. Data batches are a function of the seed and the
step (`image_caption_dataset`), so resuming from step ``k`` skips ``k`` batches and the result equals an
uninterrupted run's.

Example:

>>> import os, tempfile
>>> from kerasdiffusion import shapes
>>> photos, out = tempfile.mkdtemp(), tempfile.mkdtemp()
>>> _ = shapes.write_dataset(photos, seed=0, count=2)
>>> settings = RunSettings(method="lora", model="kerasdiffusion/shapes", data=photos, out=out, steps=2, quiet=True)
>>> path = train(settings, log=lambda message: None)
>>> os.path.basename(path)
'pytorch_lora_weights.safetensors'
"""

import dataclasses
import json
import os
import time

import keras
import numpy as np
from keras import ops

from kerasdiffusion.training.data import image_caption_dataset, with_prior_preservation
from kerasdiffusion.training.trainer import SAVE_FORMATS, Trainer
from weights_conversion.convert import write_safetensors

CHECKPOINT = "checkpoint.safetensors"
LR_SCHEDULES = ("constant", "cosine")
# The file each result is written to, in the run's folder (a textual inversion's: the writer names it).
RESULT_NAMES = {("lora", "diffusers"): "pytorch_lora_weights.safetensors", ("lora", "kohya"): "lora.safetensors",
                ("full", "diffusers"): "model", ("full", "single-file"): "model.safetensors",
                ("dreambooth", "diffusers"): "model", ("dreambooth", "single-file"): "model.safetensors"}
# Settings that may differ between a run and its resumption.
_FREE_ON_RESUME = ("steps", "checkpoint_every", "resume", "quiet", "jit_compile", "eager")


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """One training run's settings (the command line's options)."""

    method: str
    model: str
    data: str
    out: str
    resolution: int | None = None  # None: the model's own image size (`Components.image_size`)
    batch_size: int = 1
    steps: int = 1000
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    rank: int = 4
    alpha: float | None = None
    token: str | None = None
    initializer_token: str = "*"
    num_vectors: int = 1
    prompt: str | None = None
    class_data: str | None = None
    class_prompt: str | None = None
    prior_loss_weight: float = 1.0
    train_text_encoder: bool = False
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    format: str | None = None
    precision: str | None = None
    seed: int = 0
    checkpoint_every: int = 500
    jit_compile: bool = True
    eager: bool = False
    resume: bool = False
    quiet: bool = False

    def __post_init__(self):
        for name in ("steps", "batch_size", "checkpoint_every", "rank", "num_vectors"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"Unknown learning-rate schedule {self.lr_schedule!r}; expected {', '.join(LR_SCHEDULES)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.method == "dreambooth" and not self.class_data:
            raise ValueError("dreambooth needs class images (--class-data) for the prior preservation loss")
        if self.format is not None and self.format not in SAVE_FORMATS[self.method]:
            raise ValueError(f"Unknown format {self.format!r} for {self.method}; expected "
                             f"{', '.join(SAVE_FORMATS[self.method])}")

    def recorded(self):
        """The settings a resumed run must share, as JSON."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in _FREE_ON_RESUME}
        return json.dumps(fields, sort_keys=True)


# ---------------------------------------------------------------------------------------- checkpoints


def _state(trainer):
    """``{name: variable}``: what a checkpoint holds, named by group and position."""
    groups = {"trainable": trainer.trainable_variables, "seed": [trainer.seed_generator.state],
              "optimizer": trainer.optimizer.variables}
    return {f"{group}/{i:05d}": v for group, variables in groups.items() for i, v in enumerate(variables)}


def save_checkpoint(trainer, path, step, settings_json=""):
    """Writes the trainer's trainable, random-number and optimizer state at ``step``, atomically."""
    state = _state(trainer)
    arrays = {name: _storable(np.asarray(ops.convert_to_numpy(v))) for name, v in state.items()}
    names = {name: v.name for name, v in state.items()}
    write_safetensors(path, arrays, metadata={"step": str(step), "names": json.dumps(names), "settings": settings_json})


def _storable(array):
    """Unsigned integers (JAX's random-number state) as int64, which safetensors stores; assigned back by dtype."""
    return array.astype(np.int64) if array.dtype.kind == "u" else array


def read_checkpoint_header(path):
    from weights_conversion.readers import read_safetensors_metadata

    return read_safetensors_metadata(path)


def restore_checkpoint(trainer, path):
    """Assigns a checkpoint's state to a compiled trainer (building its optimizer); returns the step reached.

    Raises:
        ValueError: a checkpoint of another trainer (its variables' names or shapes differ).
    """
    from safetensors.numpy import load_file

    if not trainer.optimizer.built:
        trainer.optimizer.build(trainer.trainable_variables)
    header, arrays = read_checkpoint_header(path), load_file(path)
    state = _state(trainer)
    names = json.loads(header["names"])
    # Names, not paths: paths carry the numbers Keras gives a second trainer or optimizer of one process.
    if sorted(names) != sorted(state) or any(names[n] != v.name or arrays[n].shape != tuple(v.shape)
                                             for n, v in state.items()):
        raise ValueError(f"The checkpoint {path} is of another trainer: its variables differ from this run's")
    for name, variable in state.items():
        variable.assign(arrays[name].astype(variable.dtype))
    return int(header["step"])


class CheckpointEvery(keras.callbacks.Callback):
    """Writes a checkpoint every ``every`` steps and at the last one."""

    def __init__(self, path, every, first_step, last_step, settings_json):
        super().__init__()
        self.path, self.every, self.first_step, self.last_step = path, every, first_step, last_step
        self.settings_json = settings_json

    def on_train_batch_end(self, batch, logs=None):
        step = self.first_step + batch + 1
        if step % self.every == 0 or step == self.last_step:
            save_checkpoint(self.model, self.path, step, self.settings_json)


class ProgressBar(keras.callbacks.Callback):
    """A tqdm bar over the run's steps, with the loss and steps per second."""

    def __init__(self, first_step, last_step):
        super().__init__()
        self.first_step, self.last_step = first_step, last_step

    def on_train_begin(self, logs=None):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.last_step, initial=self.first_step, unit="step", desc="training")

    def on_train_batch_end(self, batch, logs=None):
        self.bar.update(1)
        if logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{float(logs['loss']):.4f}")

    def on_train_end(self, logs=None):
        self.bar.close()


# ------------------------------------------------------------------------------------------ the run


def learning_rate(settings):
    if settings.lr_schedule == "constant":
        if not settings.warmup_steps:
            return settings.learning_rate
        return keras.optimizers.schedules.CosineDecay(0.0, 1, alpha=1.0, warmup_target=settings.learning_rate,
                                                      warmup_steps=settings.warmup_steps)
    warmup = settings.warmup_steps
    return keras.optimizers.schedules.CosineDecay(0.0 if warmup else settings.learning_rate,
                                                  max(settings.steps - warmup, 1),
                                                  warmup_target=settings.learning_rate if warmup else None,
                                                  warmup_steps=warmup)


def make_trainer(settings, components):
    return Trainer(components, method=settings.method, rank=settings.rank, alpha=settings.alpha,
                   train_text_encoder=settings.train_text_encoder, token=settings.token,
                   initializer_token=settings.initializer_token, num_vectors=settings.num_vectors,
                   prior_loss_weight=settings.prior_loss_weight, snr_gamma=settings.snr_gamma,
                   noise_offset=settings.noise_offset, seed=settings.seed)


def make_dataset(settings, tokenizer, image_size):
    """The run's training data, in ``settings.resolution`` crops (else ``image_size``, the model's own)."""
    def folder(path, prompt, seed):
        return image_caption_dataset(path, resolution=settings.resolution or image_size,
                                     batch_size=settings.batch_size, tokenizer=tokenizer, caption=prompt, repeat=True,
                                     seed=seed)

    data = folder(settings.data, settings.prompt, settings.seed)
    if settings.method == "dreambooth":
        data = with_prior_preservation(data, folder(settings.class_data, settings.class_prompt, settings.seed + 1))
    return data


def checkpoint_path(settings):
    return os.path.join(settings.out, CHECKPOINT)


def check_resume(settings):
    """The checkpoint to resume from (``None`` for a fresh run), checked against the settings.

    Raises:
        FileNotFoundError: ``resume`` without a checkpoint.
        ValueError: a fresh run over an existing checkpoint, or a resumption with other settings.
    """
    path = checkpoint_path(settings)
    if not settings.resume:
        if os.path.exists(path):
            raise ValueError(f"{settings.out!r} holds a checkpoint: pass --resume to continue it, or another --out")
        return None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Nothing to resume: no {CHECKPOINT} in {settings.out!r}")
    recorded = json.loads(read_checkpoint_header(path).get("settings") or "{}")
    current = json.loads(settings.recorded())
    differing = sorted(k for k in current if recorded.get(k) != current[k])
    if differing:
        raise ValueError(f"--resume with other settings than the checkpoint's: {', '.join(differing)}")
    return path


def train(settings, components=None, log=print):
    """Runs (or resumes) a training run and writes its result into ``settings.out``; returns the result's path.

    Args:
        settings: a `RunSettings`.
        components: the model to train (default: loaded from ``settings.model``).
        log: where one-line messages go.
    """
    from kerasdiffusion.components import load_components

    resume_from = check_resume(settings)
    os.makedirs(settings.out, exist_ok=True)
    if components is None:
        components = load_components(settings.model, precision=settings.precision, progress=not settings.quiet)
    keras.utils.set_random_seed(settings.seed)
    trainer = make_trainer(settings, components)
    trainer.compile(optimizer=keras.optimizers.AdamW(learning_rate(settings), weight_decay=1e-2),
                    jit_compile=settings.jit_compile and not settings.eager, run_eagerly=settings.eager)
    # Built here in every run, fresh or resumed, so that `fit` starts the same way in both: on JAX, an unbuilt
    # optimizer makes `fit` take a batch from the data to build the step, which a resumed run would not.
    trainer.optimizer.build(trainer.trainable_variables)
    first_step = restore_checkpoint(trainer, resume_from) if resume_from else 0
    data = make_dataset(settings, trainer.tokenizer, components.image_size).skip(first_step)
    callbacks = [CheckpointEvery(checkpoint_path(settings), settings.checkpoint_every, first_step, settings.steps,
                                 settings.recorded())]
    if not settings.quiet:
        callbacks.append(ProgressBar(first_step, settings.steps))
    start = time.perf_counter()
    if settings.steps > first_step:
        trainer.fit(data, epochs=1, steps_per_epoch=settings.steps - first_step, callbacks=callbacks, verbose=0,
                    shuffle=False)
    log(f"Trained steps {first_step + 1}-{settings.steps} in {time.perf_counter() - start:.1f} s")
    return save_result(trainer, settings)


def save_result(trainer, settings):
    format = settings.format or SAVE_FORMATS[settings.method][0]
    name = RESULT_NAMES.get((settings.method, format))
    path = os.path.join(settings.out, name) if name else settings.out  # an embedding's writer names its file
    return trainer.save(path, format=format) or path
