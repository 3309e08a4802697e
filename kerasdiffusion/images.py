"""Pixels in and out: uint8 <-> [-1, 1], PIL images, masks, and PNG files that carry their parameters.

Example:

>>> import numpy as np
>>> to_uint8(np.array([[-1.0, 0.0, 1.0]])).tolist()
[[0, 128, 255]]
>>> print(png_parameters("a fox", "blurry", 25, 7.5, 42, "dpmpp_2m_karras", "sd15", 512, 512)["parameters"])
a fox
Negative prompt: blurry
Steps: 25, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: sd15
"""

import io
import json
import os
import re
import uuid

import numpy as np

# Our scheduler names -> the sampler names AUTOMATIC1111's web UI writes in its "parameters" text (and
# parses back). PLMS is the PNDM variant diffusers runs with skip_prk_steps.
A1111_SAMPLERS = {
    "ddim": "DDIM",
    "pndm": "PLMS",
    "lms": "LMS",
    "euler": "Euler",
    "euler_ancestral": "Euler a",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
}


def to_uint8(images):
    """Decoder output in about [-1, 1] -> uint8, rounded the way diffusers does (``round(x * 255)``)."""
    images = np.clip(np.asarray(images, np.float32) / 2 + 0.5, 0.0, 1.0)
    return np.round(images * 255).astype(np.uint8)


def _as_array(image):
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        return np.asarray(image.convert("RGB"))
    return np.asarray(image)


def from_uint8(image, batch_size=None):
    """A uint8 image ``[H, W, 3]``, ``[B, H, W, 3]`` or PIL image -> float32 ``[B, H, W, 3]`` in [-1, 1].

    Raises:
        ValueError: for a shape or dtype that is not an RGB image, or a batch that does not fit.
    """
    array = _as_array(image)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3] or [B, H, W, 3] RGB, got shape {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (0..255), got dtype {array.dtype}")
    if batch_size is not None and array.shape[0] not in (1, batch_size):
        raise ValueError(f"image batch of {array.shape[0]} does not match batch_size={batch_size}")
    if batch_size is not None and array.shape[0] == 1:
        array = np.repeat(array, batch_size, axis=0)
    return array.astype(np.float32) / 127.5 - 1.0


def mask_from_input(mask, height, width):
    """A mask ``[H, W]`` (1 or 255 where to repaint; PIL allowed) -> float32 ``[H, W]`` of 0/1 (binarized at 0.5).

    Raises:
        ValueError: if the mask is not 2-D or its size differs from the image's.
    """
    array = _as_array(mask) if not hasattr(mask, "convert") else np.asarray(mask.convert("L"))
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"mask must be [H, W], got shape {array.shape}")
    if array.shape != (height, width):
        raise ValueError(f"mask size {array.shape[1]}x{array.shape[0]} differs from the image's {width}x{height}")
    array = array.astype(np.float32)
    if array.max(initial=0) > 1:
        array = array / 255.0
    return (array >= 0.5).astype(np.float32)


# ------------------------------------------------------------------------------------------ PNG with metadata


def _a1111_quote(value):
    """A value as AUTOMATIC1111 writes it in "Key: value" lists: JSON-quoted if it holds ',', ':' or a newline."""
    text = str(value)
    if "," in text or ":" in text or "\n" in text:
        return json.dumps(text, ensure_ascii=False)
    return text


def a1111_parameters(prompt, negative_prompt, steps, guidance, seed, scheduler, model_name, width, height,
                     batch_size=1, batch_index=0, *, model_hash=None, clip_skip=1, prompt_syntax="a1111",
                     lora_hashes=None, lora_scales=None, ti_hashes=None):
    """The ``parameters`` text AUTOMATIC1111's web UI writes into its PNGs, and reads back ("PNG Info").

    The prompt, a ``Negative prompt:`` line when there is one, then ``Steps: 50, Sampler: DDIM, CFG scale: 7.5,
    Seed: 1, Size: 512x512, Model hash: 6ce0161689, Model: name`` (plus ``Batch size`` and ``Batch pos`` for
    batches, ``Clip skip`` above 1, ``Lora hashes`` and ``TI hashes`` as ``"name: hash, ..."``, as A1111 writes
    them). Two fields of ours follow where they apply: ``Prompt syntax: plain`` (A1111 always reads its own
    syntax) and ``Lora scales: "name: 0.8, ..."`` for LoRAs given outside the prompt (A1111's are ``<lora:...>``
    tags in it).

    Example:

    >>> print(a1111_parameters("a fox", "", 20, 7, 1, "euler", "sd15", 512, 512, model_hash="6ce0161689",
    ...                        clip_skip=2))
    a fox
    Steps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: 6ce0161689, Model: sd15, Clip skip: 2
    """
    fields = {
        "Steps": steps,
        "Sampler": A1111_SAMPLERS.get(scheduler, scheduler),
        "CFG scale": f"{guidance:g}",
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": model_hash,
        "Model": model_name,
        "Batch size": batch_size if batch_size > 1 else None,
        "Batch pos": batch_index if batch_size > 1 else None,
        "Clip skip": clip_skip if clip_skip > 1 else None,
        "Lora hashes": _a1111_list(lora_hashes),
        "TI hashes": _a1111_list(ti_hashes),
        "Prompt syntax": prompt_syntax if prompt_syntax != "a1111" else None,
        "Lora scales": _a1111_list({name: f"{scale:g}" for name, scale in (lora_scales or {}).items()}),
    }
    settings = ", ".join(f"{key}: {_a1111_quote(value)}" for key, value in fields.items() if value is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{settings}".strip()


def _a1111_list(mapping):
    """``{"a": 1, "b": 2}`` as A1111 lists them inside one field: ``a: 1, b: 2`` (None when empty)."""
    return ", ".join(f"{key}: {value}" for key, value in mapping.items()) if mapping else None


def png_parameters(prompt, negative_prompt, steps, guidance, seed, scheduler, model_name, width, height, batch_size=1,
                   batch_index=0, **settings):
    """The text chunks of a generated image: one per parameter, plus A1111's ``parameters`` (see `a1111_parameters`,
    which takes the keyword ``settings`` too).

    ``model_name`` is the model's short name (a file or folder name, or a Hub id), never a local path: a
    shared image does not reveal its author's directories.
    """
    return {
        "parameters": a1111_parameters(prompt, negative_prompt, steps, guidance, seed, scheduler, model_name, width,
                                       height, batch_size, batch_index, **settings),
        "prompt": prompt,
        "negative_prompt": negative_prompt or "",
        "steps": str(steps),
        "guidance": f"{guidance:g}",
        "seed": str(seed),
        "scheduler": scheduler,
        "model": str(model_name),
        "width": str(width),
        "height": str(height),
        "batch_size": str(batch_size),
        "batch_index": str(batch_index),
        "clip_skip": str(settings.get("clip_skip", 1)),
        "prompt_syntax": settings.get("prompt_syntax", "a1111"),
    }


# ----------------------------------------------------------------------------------- reading parameters back


def read_png_text(path):
    """A PNG's text chunks, ``{key: text}``.

    Raises:
        FileNotFoundError: no such file. OSError: not an image PIL can read.
    """
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return dict(getattr(image, "text", {}) or {})


# A1111's "Key: value" pairs of the settings line (modules/infotext_utils.py, re_param_code).
_A1111_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
# A1111's schedule types that make a sampler of ours out of a base sampler name.
_SCHEDULE_TYPES = {("DPM++ 2M", "Karras"): "dpmpp_2m_karras"}


def parse_a1111_parameters(text):
    """A ``parameters`` text (ours or AUTOMATIC1111's) -> ``(prompt, negative_prompt, {field: value})``.

    As A1111 reads it back: the last line holds the settings if it has at least three ``Key: value`` pairs;
    the lines before are the prompt, up to a line starting ``Negative prompt:``. Quoted values are unquoted.

    Example:

    >>> parse_a1111_parameters('a fox\\nNegative prompt: blur\\nSteps: 20, Sampler: Euler a, Seed: 3')
    ('a fox', 'blur', {'Steps': '20', 'Sampler': 'Euler a', 'Seed': '3'})
    """
    *lines, last = text.strip().split("\n")
    if len(_A1111_FIELD.findall(last)) < 3:
        lines, last = lines + [last], ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    fields = {}
    for key, value in _A1111_FIELD.findall(last):
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = json.loads(value)
        fields[key.strip()] = value
    return "\n".join(prompt), "\n".join(negative), fields


def parse_a1111_list(value):
    """A1111's ``"a: 1, b: 2"`` list field -> ``{"a": "1", "b": "2"}``."""
    pairs = (item.rsplit(":", 1) for item in (value or "").split(",") if item.strip())
    return {name.strip(): entry.strip() for name, entry in pairs}


def scheduler_from_a1111(sampler, schedule_type=None):
    """Our scheduler name for an A1111 ``Sampler`` (and ``Schedule type``, as A1111 1.6 and later split them).

    Raises:
        ValueError: a sampler we do not have, naming the ones we do.
    """
    if (sampler, schedule_type) in _SCHEDULE_TYPES:
        return _SCHEDULE_TYPES[(sampler, schedule_type)]
    names = {a1111: ours for ours, a1111 in A1111_SAMPLERS.items()}
    if sampler in names and schedule_type in (None, "", "Automatic"):
        return names[sampler]
    described = f"{sampler!r}" + (f" with schedule type {schedule_type!r}" if schedule_type else "")
    raise ValueError(f"Unsupported sampler {described}; supported: {', '.join(A1111_SAMPLERS.values())}")


def png_bytes(image, text):
    """A uint8 image ``[H, W, 3]`` encoded as PNG, with ``text`` (a dict) as its text chunks.

    Text that Latin-1 cannot encode goes into an international (UTF-8) text chunk.
    """
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def write_pngs(images, paths, texts):
    """Writes uint8 images ``[H, W, 3]`` as PNGs with text chunks (see `png_bytes`), all or nothing.

    Each image goes to a hidden temporary file beside its target; only when every one is complete are they
    renamed into place, so a failure (full disk, interruption) leaves no partial or truncated PNG behind.
    """
    staged = []
    try:
        for image, path, text in zip(images, paths, texts, strict=True):
            folder, name = os.path.split(os.path.abspath(path))
            temporary = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
            staged.append((temporary, path))
            with open(temporary, "xb") as f:
                f.write(png_bytes(image, text))
        for temporary, path in staged:
            os.replace(temporary, path)
    except BaseException:
        for temporary, _ in staged:
            if os.path.exists(temporary):
                os.remove(temporary)
        raise
    return list(paths)


def write_durably(data, path, shared=False):
    """Writes ``data`` (bytes) to ``path`` so that a crash at any moment leaves the old file or the new one.

    The bytes go to a temporary file beside the target, reach the disk (fsync), and are renamed over it; the
    rename is made durable by syncing the folder too. The temporary file is ``.NAME.tmp``, which the next
    write of the same path overwrites should a crash leave it behind; with ``shared`` (a file several
    processes may write at once, with the same content), a name of its own per write.
    """
    folder, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp" if shared else f".{name}.tmp")
    with open(temporary, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    sync_folder(folder)


def sync_folder(folder):
    """Makes renames and new files in ``folder`` durable (a no-op where folders cannot be opened, as on Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
