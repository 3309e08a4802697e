"""From any local checkpoint form to kerasdiffusion weights, and the converted folder on disk.

Sources: a diffusers folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``), an
original single file (``.safetensors`` / ``.ckpt`` with CompVis/LDM names), or a folder this module wrote
(``kerasdiffusion.json`` beside ``unet.safetensors``, ``vae.safetensors``, ``text_encoder.safetensors``).

A converted folder is written to a temporary sibling and renamed into place only when complete, so an
interrupted conversion never leaves a half-written folder behind.

Example (from the command line, without TensorFlow or PyTorch):

    python -m weights_conversion v1-5-pruned-emaonly.safetensors converted/
"""

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile

import numpy as np

from weights_conversion import keras_names, ldm, progress, readers
from weights_conversion.errors import CheckpointError

NETWORKS = ("text_encoder", "unet", "vae")
MANIFEST = "kerasdiffusion.json"
FORMAT_VERSION = 1
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "special_tokens_map.json", "tokenizer_config.json")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# Image pixels per latent along each side (the VAE halves the image three times): a diffusers UNet's
# sample_size is the latent side, the image side over this.
VAE_SCALE = 8
# numpy dtype -> safetensors dtype code, the readers' table turned round (bfloat16 is only ever read).
SAFETENSORS_DTYPES = {np.dtype(dtype).newbyteorder("="): code
                      for code, dtype in readers.SAFETENSORS_DTYPES.items() if code != "BF16"}


@dataclasses.dataclass
class Converted:
    """Our weights per network, plus what a pipeline needs beside them."""

    weights: dict  # {"text_encoder": {path: array}, "unet": {...}, "vae": {...}}
    scheduler_config: dict | None = None  # a diffusers scheduler_config.json, when the source has one
    tokenizer_dir: str | None = None  # a folder with vocab.json + merges.txt, when the source has one
    source: str = ""
    # The image side (pixels) the model was trained at, when the source says it (a diffusers UNet's sample_size,
    # a converted folder's manifest); None otherwise, and the model family's rule applies when it is loaded.
    image_size: int | None = None
    # The model family (``kerasdiffusion.config.FAMILIES``) when the source names it (a converted folder's
    # manifest); None otherwise, and the family is read from the weights when they are loaded.
    family: str | None = None
    # Group-norm group counts, ``{"unet": n, "vae": n}``, where the source says them (a diffusers folder's
    # configs' ``norm_num_groups``; a converted folder's manifest); None otherwise, and the family's apply. The
    # weights cannot tell them: the built-in model's narrow networks use 16 and 4, Stable Diffusion 32.
    norm_groups: dict | None = None
    # The text encoder's attention heads where the source says them (a diffusers folder's text encoder config, a
    # converted folder's manifest); None otherwise, and the family's rule applies. The weights cannot tell them
    # either: the built-in model's 64-wide text encoder has 4 heads, where CLIP's 64-wide heads would give 1.
    text_encoder_heads: int | None = None


def is_converted_folder(path):
    return os.path.isfile(os.path.join(path, MANIFEST))


def is_diffusers_folder(path):
    return os.path.isdir(os.path.join(path, "unet"))


def _read_json(path):
    """A JSON object file of the source (a config, our manifest), or None where there is none."""
    return readers.read_json_object(path) if os.path.isfile(path) else None


def _tokenizer_dir(path):
    """The source's tokenizer folder: vocab.json + merges.txt, or transformers 5's tokenizer.json alone."""
    folder = os.path.join(path, "tokenizer")
    has = lambda name: os.path.isfile(os.path.join(folder, name))  # noqa: E731
    return folder if (has("vocab.json") and has("merges.txt")) or has("tokenizer.json") else None


def _positive_count(value, where, what):
    """A positive whole number, or None where the source does not say one."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{where}: the {what} {value!r} is not a positive integer")
    return value


def _image_size(value, where):
    return _positive_count(value, where, "image size")


def diffusers_text_encoder_heads(path):
    """The attention heads a diffusers folder's text encoder config gives (``num_attention_heads``)."""
    config_file = os.path.join(path, "text_encoder", "config.json")
    config = _read_json(config_file) or {}
    return _positive_count(config.get("num_attention_heads"), config_file, "number of attention heads")


def diffusers_image_size(path):
    """The image side a diffusers folder's UNet was trained at: its ``sample_size`` (latents) times `VAE_SCALE`.

    A ``[height, width]`` sample size (diffusers allows one) names a non-square model: left to the family's rule.
    """
    config = _read_json(os.path.join(path, "unet", "config.json")) or {}
    sample_size = config.get("sample_size")
    if isinstance(sample_size, list):
        return None
    sample_size = _image_size(sample_size, os.path.join(path, "unet", "config.json"))
    return None if sample_size is None else sample_size * VAE_SCALE


def _norm_groups(value, where):
    """``{"unet": n, "vae": n}`` (either may be absent) of positive whole numbers, or None where there is none."""
    if value is None:
        return None
    if not isinstance(value, dict) or not set(value) <= {"unet", "vae"} or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in value.values()):
        raise CheckpointError(f"{where}: the group-norm group counts {value!r} are not positive integers for "
                              "'unet' and 'vae'")
    return dict(value) or None


def diffusers_norm_groups(path):
    """The group-norm group counts a diffusers folder's UNet and VAE configs give (``norm_num_groups``)."""
    groups, where = {}, []
    for network in ("unet", "vae"):
        config_file = os.path.join(path, network, "config.json")
        config = _read_json(config_file) or {}
        if "norm_num_groups" in config:
            groups[network] = config["norm_num_groups"]
            where.append(config_file)
    return _norm_groups(groups or None, " and ".join(where))


def _convert_networks(state_dicts):
    converters = {
        "text_encoder": keras_names.convert_text_encoder,
        "unet": keras_names.convert_unet,
        "vae": keras_names.convert_vae,
    }
    weights = {}
    for network in NETWORKS:
        weights[network] = converters[network](state_dicts.pop(network))
    return weights


def _load_converted_folder(path, lazy=False):
    manifest = _read_json(os.path.join(path, MANIFEST))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported converted-folder format {manifest.get('format_version')!r}")
    weights = {}
    for network in NETWORKS:
        file = os.path.join(path, f"{network}.safetensors")
        if not os.path.isfile(file):
            raise CheckpointError(f"{path}: converted folder lacks {network}.safetensors")
        weights[network] = readers.read_state_dict(file, lazy=lazy)
    scheduler = _read_json(os.path.join(path, "scheduler_config.json"))
    source = manifest.get("source", path)
    if not isinstance(source, str):
        raise CheckpointError(f"{path}: {MANIFEST} gives a source that is not a string")
    # Folders written before the image size was recorded have none: the family's rule applies.
    image_size = _image_size(manifest.get("image_size"), os.path.join(path, MANIFEST))
    family = manifest.get("family")
    if family is not None and not isinstance(family, str):
        raise CheckpointError(f"{path}: {MANIFEST} gives a family that is not a string")
    norm_groups = _norm_groups(manifest.get("norm_groups"), os.path.join(path, MANIFEST))
    heads = _positive_count(manifest.get("text_encoder_heads"), os.path.join(path, MANIFEST),
                            "number of text encoder attention heads")
    return Converted(weights, scheduler, _tokenizer_dir(path), source, image_size, family, norm_groups, heads)


def convert_source(path, lazy=False):
    """Reads a local source in any supported form and returns our weights (`Converted`).

    With ``lazy``, a converted folder's weights are `readers.LazyTensor`s, read as they are used.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        CheckpointError: if the source is not a recognised form, or its tensors do not map.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No checkpoint at {path!r}: expected a diffusers folder, a converted folder, "
                                "or a .safetensors / .ckpt file.")
    if os.path.isdir(path):
        if is_converted_folder(path):
            return _load_converted_folder(path, lazy)
        if is_diffusers_folder(path):
            weights = _convert_networks(readers.read_diffusers_folder(path))
            scheduler = _read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
            return Converted(weights, scheduler, _tokenizer_dir(path), path, diffusers_image_size(path),
                             norm_groups=diffusers_norm_groups(path),
                             text_encoder_heads=diffusers_text_encoder_heads(path))
        raise CheckpointError(f"{path!r} is a folder but neither a diffusers folder (no unet/) nor a "
                              f"converted one (no {MANIFEST}).")
    if not path.endswith(SINGLE_FILE_SUFFIXES):
        raise CheckpointError(f"{path!r}: unsupported file type; expected one of {', '.join(SINGLE_FILE_SUFFIXES)}")
    weights = _convert_networks(ldm.split_ldm_checkpoint(readers.read_state_dict(path)))
    return Converted(weights, None, None, path)


def save_converted(converted, output_dir):
    """Writes a converted folder atomically: a temporary sibling, renamed into place when complete."""
    with staged_folder(output_dir) as staging:
        total = sum(array.nbytes for network in NETWORKS for array in converted.weights[network].values())
        with progress.bar("writing", total) as advance:
            for network in NETWORKS:
                write_safetensors(os.path.join(staging, f"{network}.safetensors"), converted.weights[network], advance)
        if converted.scheduler_config is not None:
            with open(os.path.join(staging, "scheduler_config.json"), "w", encoding="utf-8") as f:
                json.dump(converted.scheduler_config, f, indent=2)
        if converted.tokenizer_dir:
            os.makedirs(os.path.join(staging, "tokenizer"))
            for name in TOKENIZER_FILES:
                file = os.path.join(converted.tokenizer_dir, name)
                if os.path.isfile(file):
                    shutil.copy(file, os.path.join(staging, "tokenizer", name))
        manifest = {"format_version": FORMAT_VERSION, "source": converted.source}
        if converted.image_size is not None:
            manifest["image_size"] = converted.image_size
        if converted.family is not None:
            manifest["family"] = converted.family
        if converted.norm_groups:
            manifest["norm_groups"] = converted.norm_groups
        if converted.text_encoder_heads is not None:
            manifest["text_encoder_heads"] = converted.text_encoder_heads
        with open(os.path.join(staging, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
    return os.path.abspath(output_dir)


@contextlib.contextmanager
def staged_folder(output_dir):
    """A temporary sibling of ``output_dir`` to write into, renamed to ``output_dir`` when the block completes and
    removed if it fails, so that ``output_dir`` is never seen half-written.

    Raises:
        FileExistsError: ``output_dir`` exists and is not an empty folder.
    """
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise FileExistsError(f"Output folder {output_dir!r} exists and is not empty.")
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".converting-", dir=parent)
    os.chmod(staging, 0o755)  # mkdtemp makes it private; the finished folder is an ordinary one
    try:
        yield staging
        if os.path.exists(output_dir):
            os.rmdir(output_dir)
        os.rename(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_safetensors(path, arrays, advance=lambda n: None, metadata=None):
    """Writes ``{name: array}`` as a safetensors file, one tensor at a time, atomically.

    The format is an 8-byte little-endian header length, a JSON table of names, dtypes, shapes and byte
    offsets (padded with spaces so that the data starts at a multiple of `readers.ALIGNMENT` bytes), then
    each tensor's little-endian bytes in the table's order: first those whose size is a multiple of
    `readers.ALIGNMENT`, which therefore all start at one, so a reader can use them where they are mapped.
    Streaming the tensors keeps a second copy of the whole file out of memory (which
    `safetensors.numpy.save_file` builds), and lets ``advance(nbytes)`` report progress per tensor.
    ``metadata`` (``{str: str}``) becomes the header's ``__metadata__``. The file is written beside ``path``
    and renamed into place when complete, so no half-written file ever has its name.

    Example:

    >>> import os, tempfile, numpy as np
    >>> from safetensors.numpy import load_file
    >>> path = os.path.join(tempfile.mkdtemp(), "weights.safetensors")
    >>> write_safetensors(path, {"dense/kernel": np.ones((2, 3), "float32")})
    >>> load_file(path)["dense/kernel"].shape
    (2, 3)
    """
    # Tensors whose size is a multiple of the alignment first, so that each starts at a multiple of it (the
    # table is padded to one too). In Stable Diffusion that is every tensor but a few small biases.
    names = sorted(arrays, key=lambda name: (arrays[name].nbytes % readers.ALIGNMENT != 0, name))
    header, offset = {}, 0
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    for name in names:
        array = arrays[name]
        dtype = array.dtype.newbyteorder("=")  # big-endian arrays are written as little-endian ones
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{name}: cannot store dtype {array.dtype} in safetensors")
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    table = json.dumps(header, separators=(",", ":")).encode()
    table += b" " * (-(8 + len(table)) % readers.ALIGNMENT)
    path = os.fspath(path)
    staging = tempfile.NamedTemporaryFile(dir=os.path.dirname(os.path.abspath(path)), prefix=".writing-",
                                          suffix=".safetensors", delete=False)
    try:
        with staging as f:
            f.write(len(table).to_bytes(8, "little"))
            f.write(table)
            for name in names:
                array = np.ascontiguousarray(arrays[name], dtype=arrays[name].dtype.newbyteorder("<"))
                f.write(memoryview(array.reshape(-1)).cast("B"))
                advance(array.nbytes)
        os.chmod(staging.name, 0o644)  # NamedTemporaryFile makes it private; the finished file is an ordinary one
        os.replace(staging.name, path)
    except BaseException:
        os.remove(staging.name)
        raise
