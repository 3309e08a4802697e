"""Fine-tuning with Keras `fit`: full, LoRA, textual inversion and DreamBooth (re-exports only).

Example:

>>> from kerasdiffusion import training                                          # doctest: +SKIP
>>> trainer = training.Trainer(sd, method="lora", rank=4)
>>> data = training.image_caption_dataset("photos/", resolution=512, tokenizer=trainer.tokenizer)
>>> trainer.compile(optimizer=keras.optimizers.AdamW(1e-4))
>>> trainer.fit(data, epochs=1)
>>> trainer.save("style.safetensors", format="kohya")
"""

from kerasdiffusion.training.data import image_caption_dataset, read_records, with_prior_preservation  # noqa: F401
from kerasdiffusion.training.lora import DEFAULT_TARGETS, TARGETS, LowRankUpdate  # noqa: F401
from kerasdiffusion.training.objective import TrainingSchedule  # noqa: F401
from kerasdiffusion.training.run import RunSettings, restore_checkpoint, save_checkpoint, train  # noqa: F401
from kerasdiffusion.training.trainer import METHODS, SAVE_FORMATS, Trainer  # noqa: F401
