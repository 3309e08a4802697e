"""Images and captions from a folder, as a `tf.data.Dataset` of training batches.

Two layouts are read, as people keep them:

- kohya: every image (``.png``, ``.jpg``, ``.jpeg``, ``.webp``, ``.bmp``, in the folder or its subfolders)
  with a caption in a same-name ``.txt`` beside it;
- Hugging Face imagefolder: a ``metadata.jsonl`` whose lines hold ``file_name`` and ``text``.

Each image is resized so its shorter side is ``resolution`` (bilinear), center-cropped (or cropped at random),
flipped left-right with probability 1/2, and scaled to [-1, 1]; each caption is tokenized once. Every random
choice is a function of the seed and the element's position in the stream, so a run resumed at step ``k``
(`skip` of ``k`` batches) sees what an uninterrupted one sees.

Example:

>>> import tempfile
>>> from kerasdiffusion import shapes
>>> photos = tempfile.mkdtemp()
>>> _ = shapes.write_dataset(photos, seed=0, count=2)  # 00000.png + 00000.txt, 00001.png + 00001.txt
>>> data = image_caption_dataset(photos, resolution=32, batch_size=2)
>>> batch = next(iter(data))
>>> tuple(batch["images"].shape), tuple(batch["token_ids"].shape)
((2, 32, 32, 3), (2, 77))
"""

import json
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA = "metadata.jsonl"


def _image_files(folder):
    found = []
    for root, _, names in os.walk(folder):
        found += [os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(found)


def _metadata_records(folder):
    """``[(image path, caption)]`` from ``metadata.jsonl``, each line checked."""
    records = []
    path = os.path.join(folder, METADATA)
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not JSON ({error})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
                raise ValueError(f"{path}, line {number}: no 'file_name'")
            if not isinstance(entry.get("text"), str):
                raise ValueError(f"{path}, line {number}: missing caption: no 'text' for {entry['file_name']!r}")
            records.append((os.path.join(folder, entry["file_name"]), entry["text"]))
    return records


def _kohya_records(folder, images):
    missing = [p for p in images if not os.path.isfile(os.path.splitext(p)[0] + ".txt")]
    if missing:
        listed = ", ".join(os.path.relpath(p, folder) for p in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise ValueError(f"missing caption: no same-name .txt for {listed}{more} (in {folder})")
    records = []
    for path in images:
        with open(os.path.splitext(path)[0] + ".txt", encoding="utf-8") as caption:
            records.append((path, caption.read().strip()))
    return records


def read_records(folder, caption=None):
    """``[(image path, caption)]`` of a folder in either layout; ``caption`` given: every image's caption.

    Raises:
        FileNotFoundError: no such folder, or an image ``metadata.jsonl`` names that is not there.
        ValueError: no images, a missing caption (naming the images), a malformed ``metadata.jsonl`` line, or
            an unreadable image (naming it).
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"No image folder at {folder!r}")
    if caption is not None:
        records = [(path, caption) for path in _image_files(folder)]
    elif os.path.isfile(os.path.join(folder, METADATA)):
        records = _metadata_records(folder)
    else:
        records = _kohya_records(folder, _image_files(folder))
    if not records:
        raise ValueError(f"No images ({', '.join(IMAGE_SUFFIXES)}) in {folder!r}")
    for path, _ in records:
        _check_image(path)
    return records


def _check_image(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"unreadable image {path}: {error}") from None


def load_image(path, resolution, center_crop, flip, rng):
    """One image as float32 ``[resolution, resolution, 3]`` in [-1, 1]: resized, cropped, maybe flipped."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = resolution / min(image.size)
            size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
            image = image.resize(size, Image.BILINEAR)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"unreadable image {path}: {error}") from None
    pixels = np.asarray(image, np.float32)
    height, width = pixels.shape[:2]
    if center_crop:  # torchvision's CenterCrop
        top, left = int(round((height - resolution) / 2.0)), int(round((width - resolution) / 2.0))
    else:
        top, left = int(rng.integers(0, height - resolution + 1)), int(rng.integers(0, width - resolution + 1))
    pixels = pixels[top : top + resolution, left : left + resolution]
    if flip and rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return np.ascontiguousarray(pixels / 127.5 - 1.0, dtype=np.float32)


def image_caption_dataset(folder, resolution=512, batch_size=1, center_crop=True, random_flip=True,
                          tokenizer=None, caption=None, shuffle=True, repeat=False, seed=0):
    """A `tf.data.Dataset` of ``{"images": [B, R, R, 3] in [-1, 1], "token_ids": int32 [B, 77]}`` batches.

    Args:
        folder: images with same-name ``.txt`` captions (kohya), or with a ``metadata.jsonl`` (``file_name``,
            ``text``).
        resolution: the side of the square crops (a multiple of 8).
        batch_size: images per batch; a last, incomplete batch is dropped (the step's shapes stay fixed).
        center_crop: crop the middle (else a random square).
        random_flip: flip left-right with probability 1/2.
        tokenizer: the model's tokenizer (``trainer.tokenizer``: for textual inversion it knows the new
            token); default the CLIP tokenizer shipped with the package (SD 1.x).
        caption: one caption for every image (DreamBooth's instance or class prompt); the folder's
            captions are then not read.
        shuffle: a new order every epoch (a function of ``seed``).
        repeat: repeat forever (for ``fit(steps_per_epoch=...)`` and resuming).
        seed: the seed of the order, the crops and the flips.

    Raises:
        FileNotFoundError, ValueError: as `read_records`; ``resolution`` not a positive multiple of 8, or
            fewer images than ``batch_size``.
    """
    import tensorflow as tf

    from kerasdiffusion.tokenizer import CLIPTokenizer

    if not (isinstance(resolution, int) and resolution > 0 and resolution % 8 == 0):
        raise ValueError(f"resolution must be a positive multiple of 8, got {resolution!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    records = read_records(folder, caption)
    if len(records) < batch_size:
        raise ValueError(f"{folder!r} has {len(records)} images, fewer than a batch of {batch_size}")
    tokenizer = tokenizer or CLIPTokenizer()
    paths = [path for path, _ in records]
    token_ids = tokenizer([text for _, text in records])

    def load(file_index, position):
        rng = np.random.default_rng([seed, int(position)])
        return load_image(paths[int(file_index)], resolution, center_crop, random_flip, rng)

    def element(position, file_index):
        image = tf.numpy_function(load, [file_index, position], tf.float32, stateful=False)
        image.set_shape((resolution, resolution, 3))
        return {"images": image, "token_ids": tf.gather(token_ids, file_index)}

    order = tf.data.Dataset.range(len(records))
    if shuffle:
        order = order.shuffle(len(records), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        order = order.repeat()
    dataset = order.enumerate().map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def with_prior_preservation(instance_data, class_data):
    """DreamBooth batches: each instance batch followed by a class batch, with ``"prior"`` 1 on the class items.

    ``class_data`` is repeated as needed; the `Trainer` weights the class items' loss by its ``prior_loss_weight``.

    Example:

    >>> import tempfile
    >>> from kerasdiffusion import shapes
    >>> instances, classes = tempfile.mkdtemp(), tempfile.mkdtemp()
    >>> _ = shapes.write_dataset(instances, seed=0, count=1)
    >>> _ = shapes.write_dataset(classes, seed=1, count=2)
    >>> data = with_prior_preservation(
    ...     image_caption_dataset(instances, resolution=32, caption="a photo of sks shape"),
    ...     image_caption_dataset(classes, resolution=32, caption="a photo of a shape"))
    >>> batch = next(iter(data))
    >>> batch["prior"].numpy().tolist(), tuple(batch["images"].shape)
    ([0.0, 1.0], (2, 32, 32, 3))
    """
    import tensorflow as tf

    def join(instance, class_):
        size = tf.shape(instance["token_ids"])[0]
        prior = tf.concat([tf.zeros([size], tf.float32), tf.ones([tf.shape(class_["token_ids"])[0]], tf.float32)], 0)
        return {key: tf.concat([instance[key], class_[key]], 0) for key in instance} | {"prior": prior}

    return tf.data.Dataset.zip((instance_data, class_data.repeat())).map(join)
