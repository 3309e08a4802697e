"""PyTorch Stable Diffusion checkpoints -> kerasdiffusion weights, with numpy alone (no TensorFlow, no Keras).

Checkpoints come from strangers, so nothing read here is trusted. Which parser reads what, and why:

- ``.safetensors``: the safetensors library's own parser (``safe_open``), the format's reference and fuzzed
  upstream, decides what a valid file is: header types, dtypes, shapes, byte ranges that tile the data
  exactly, the file's length. It then reads each tensor with ``pread`` into its own array
  (``backend="pread"``): no memory map, so a conversion holds one copy of the weights (a converted
  folder's tensors, once its header is validated so, may be used where the file is mapped:
  `readers.LazyTensor.mapped`). numpy has no bfloat16, so bf16 tensors alone are read by `readers`, at the
  offsets the library validated, and widened to float32. `readers` parses a refused header again only to name the tensor at fault in the message.
- ``.ckpt``, ``.pt``, ``.pth``, ``.bin`` (pickles, in torch's zip or legacy container): our restricted
  unpickler (`torch_pickle`), on the standard library's pure-Python unpickler. Nothing else reads them
  safely without PyTorch, and the C unpickler believes the sizes a pickle declares. Ours rebuilds tensors
  only, reads only bytes that are there, refuses zip members declaring more than the file holds, checks
  every shape, stride and offset against its storage, and caps the new arrays at twice the file's size.
  Textual-inversion ``.pt`` files, which are not flat state dicts, are read whole the same way
  (`torch_pickle.read_torch_pickle_tree`): each container rebuilt once, 32 deep at most, nothing but
  plain data, placeholders and checked tensors handed over.
- JSON (shard indexes, scheduler configs, the converted folder's manifest): Python's ``json``, through
  `readers.read_json_object`, which caps the size and turns malformed, non-object or too deeply nested
  JSON into an error. A shard index may name only files in its own folder.

Anything malformed ends in `CheckpointError` (`UnsafeCheckpointError` for a pickle that asks to run code),
naming the file and, where there is one, the tensor. ``tests/test_fuzz_readers.py`` fuzzes every reader;
the README's "Files from strangers" gives the command for a longer run.

Example:

    >>> import os, tempfile
    >>> from weights_conversion import convert_source, save_converted
    >>> from kerasdiffusion.sources import BUILTIN_MODELS
    >>> converted = convert_source(BUILTIN_MODELS["kerasdiffusion/shapes"])  # a converted folder reads as it is
    >>> sorted(converted.weights), converted.image_size
    (['text_encoder', 'unet', 'vae'], 64)
    >>> out = save_converted(converted, os.path.join(tempfile.mkdtemp(), "converted"))
    >>> sorted(os.listdir(out))
    ['kerasdiffusion.json', 'scheduler_config.json', 'text_encoder.safetensors', 'unet.safetensors', 'vae.safetensors']
    >>> save_converted(convert_source("v1-5-pruned-emaonly.safetensors"), "converted/")  # doctest: +SKIP
"""

from weights_conversion.convert import Converted, convert_source, save_converted
from weights_conversion.errors import CheckpointError, UnsafeCheckpointError

__all__ = ["Converted", "CheckpointError", "UnsafeCheckpointError", "convert_source", "save_converted"]
