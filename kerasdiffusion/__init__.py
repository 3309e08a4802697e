"""kerasdiffusion: Stable Diffusion in Keras 3 on TensorFlow or JAX, with an XLA-compiled denoising loop.

The public names are re-exported lazily (PEP 562), so that `python -m kerasdiffusion --help` and the
command line's argument checks answer before TensorFlow is imported.

Example:

    >>> import kerasdiffusion as kd
    >>> sd = kd.StableDiffusion.from_pretrained("kerasdiffusion/shapes")  # built in, 64x64
    >>> sd.text_to_image("a red circle on a blue background", num_steps=2, seed=0).shape
    (1, 64, 64, 3)
    >>> sd = kd.StableDiffusion.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")  # doctest: +SKIP
    >>> sd.text_to_image("a watercolor fox", num_steps=25, seed=0).shape                         # doctest: +SKIP
    (1, 512, 512, 3)
"""

import importlib
import os as _os

from kerasdiffusion import load_order as _load_order

_os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Before anything imports TensorFlow: Triton's library must be loaded first or not at all (see load_order).
_load_order.prepare()

__version__ = "0.1.0"
_EXPORTS = {
    "StableDiffusion": "kerasdiffusion.pipeline",
    "Components": "kerasdiffusion.components",
    "load_components": "kerasdiffusion.components",
    "export": "kerasdiffusion.exporting",  # not export.py: a submodule of that name would replace the function
    "CLIPTokenizer": "kerasdiffusion.tokenizer",
    "SchedulerConfig": "kerasdiffusion.schedulers",
    "get_scheduler": "kerasdiffusion.schedulers",
    "SCHEDULER_NAMES": "kerasdiffusion.config",
    "PRECISIONS": "kerasdiffusion.config",
    "TextEncoderConfig": "kerasdiffusion.config",
    "UNetConfig": "kerasdiffusion.config",
    "VAEConfig": "kerasdiffusion.config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kerasdiffusion' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__():
    return sorted(list(globals()) + __all__)
