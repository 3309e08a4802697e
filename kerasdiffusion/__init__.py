"""kerasdiffusion: Stable Diffusion in Keras 3 on TensorFlow, with an XLA-compiled denoising loop.

Example:

    >>> import kerasdiffusion as kd                                      # doctest: +SKIP
    >>> sd = kd.StableDiffusion.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    >>> sd.text_to_image("a watercolor fox", num_steps=25, seed=0).shape
    (1, 512, 512, 3)
"""

import os as _os

_os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from kerasdiffusion.config import TextEncoderConfig, UNetConfig, VAEConfig  # noqa: E402
from kerasdiffusion.pipeline import StableDiffusion  # noqa: E402
from kerasdiffusion.schedulers import SCHEDULER_NAMES, SchedulerConfig, get_scheduler  # noqa: E402
from kerasdiffusion.tokenizer import CLIPTokenizer  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "CLIPTokenizer",
    "SCHEDULER_NAMES",
    "SchedulerConfig",
    "StableDiffusion",
    "TextEncoderConfig",
    "UNetConfig",
    "VAEConfig",
    "get_scheduler",
]
