"""PyTorch Stable Diffusion checkpoints -> kerasdiffusion weights, with numpy alone (no TensorFlow, no Keras).

Example:

    >>> from weights_conversion import convert_source, save_converted   # doctest: +SKIP
    >>> save_converted(convert_source("v1-5-pruned-emaonly.safetensors"), "converted/")
"""

from weights_conversion.convert import Converted, convert_source, save_converted
from weights_conversion.errors import CheckpointError, UnsafeCheckpointError

__all__ = ["Converted", "CheckpointError", "UnsafeCheckpointError", "convert_source", "save_converted"]
