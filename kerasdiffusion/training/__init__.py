"""Fine-tuning with Keras `fit`: full, LoRA, textual inversion and DreamBooth (re-exports only).

Example:

>>> import os, tempfile
>>> import keras
>>> import kerasdiffusion as kd
>>> from kerasdiffusion import shapes, training
>>> sd = kd.StableDiffusion.from_pretrained("kerasdiffusion/shapes")
>>> photos = tempfile.mkdtemp()
>>> _ = shapes.write_dataset(photos, seed=0, count=2)  # pictures with same-name .txt captions
>>> trainer = training.Trainer(sd, method="lora", rank=4)
>>> data = training.image_caption_dataset(photos, resolution=64, tokenizer=trainer.tokenizer)
>>> trainer.compile(optimizer=keras.optimizers.AdamW(1e-4))
>>> history = trainer.fit(data, epochs=1, verbose=0)
>>> len(history.history["loss"])
1
>>> path = trainer.save(os.path.join(tempfile.mkdtemp(), "style.safetensors"), format="kohya")
>>> sd.load_lora(path)
'style'
"""

from kerasdiffusion.training.data import image_caption_dataset, read_records, with_prior_preservation  # noqa: F401
from kerasdiffusion.training.lora import DEFAULT_TARGETS, TARGETS, LowRankUpdate  # noqa: F401
from kerasdiffusion.training.objective import TrainingSchedule  # noqa: F401
from kerasdiffusion.training.run import RunSettings, restore_checkpoint, save_checkpoint, train  # noqa: F401
from kerasdiffusion.training.trainer import METHODS, SAVE_FORMATS, Trainer  # noqa: F401
