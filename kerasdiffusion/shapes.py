"""The synthetic world of the built-in ``kerasdiffusion/shapes`` model: scenes, their captions and pictures,
and a measurement that reads a scene back from a picture's pixels.

A scene is one shape (circle, square, triangle) of one colour, small or large, at one of five places, on a
plain background of another colour. Everything is drawn from a seed, so the training data can be made again
bit for bit. A few (shape, colour, background) combinations are held out of training (`HELD_OUT`), so that
the adherence test can ask for pictures the model has never seen.

`describe` is the measurement the adherence test applies to generated pictures: background colour from the
border, the shape's pixels as those closer to another palette colour, its colour, its size from their
bounding box's side and its place from the box's centre, and its class by a linear classifier of the pixels
sampled over the box, fitted on this module's own renders, sharp and blurred (`_outline_classifier`): a soft
edge, a rounded corner or a blunted apex does not make a triangle a circle.

Example:

>>> scene = Scene(shape="circle", colour="red", background="blue", size="small", position="left")
>>> scene.caption()
'a small red circle on the left, blue background'
>>> describe(render(scene)) == scene.attributes()
True
"""

import dataclasses
import functools
import os

import numpy as np

RESOLUTION = 64

SHAPES = ("circle", "square", "triangle")
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOURS = tuple(PALETTE)
SIZES = {"small": 14, "large": 26}  # the side of the shape's bounding box, in pixels at 64x64
POSITIONS = {  # the centre of the bounding box (x, y) at 64x64, and how captions say it
    "left": ((17, 32), "on the left"),
    "right": ((47, 32), "on the right"),
    "top": ((32, 17), "at the top"),
    "bottom": ((32, 47), "at the bottom"),
    "center": ((32, 32), "in the center"),
}
# Never in the training data. Every pair inside each of them still is (a test checks it), so the model can
# learn the parts and is asked to compose them.
HELD_OUT = (
    ("circle", "green", "red"),
    ("circle", "yellow", "black"),
    ("square", "blue", "white"),
    ("square", "white", "yellow"),
    ("triangle", "red", "green"),
    ("triangle", "black", "blue"),
)
_JITTER = 2  # pixels a shape may move off its place's centre, so positions are regions rather than points
_SUPERSAMPLING = 4  # edges are drawn at 4x and averaged down, as a camera would see them


@dataclasses.dataclass(frozen=True)
class Scene:
    """One picture's content. ``short`` captions name only colour, shape and background."""

    shape: str
    colour: str
    background: str
    size: str = "large"
    position: str = "center"
    short: bool = False
    offset: tuple = (0, 0)  # the jitter, (dx, dy) pixels

    def __post_init__(self):
        for field, value, allowed in [("shape", self.shape, SHAPES), ("colour", self.colour, COLOURS),
                                      ("background", self.background, COLOURS), ("size", self.size, SIZES),
                                      ("position", self.position, POSITIONS)]:
            if value not in allowed:
                raise ValueError(f"{field} must be one of {', '.join(allowed)}; got {value!r}")
        if self.colour == self.background:
            raise ValueError(f"a {self.colour} shape on a {self.background} background cannot be seen")

    def caption(self):
        """``"a small red circle on the left, blue background"``, or ``"a red circle on a blue background"``."""
        if self.short:
            return f"a {self.colour} {self.shape} on a {self.background} background"
        return f"a {self.size} {self.colour} {self.shape} {POSITIONS[self.position][1]}, {self.background} background"

    def attributes(self):
        """What `describe` measures: the scene without its caption form and jitter."""
        return {"shape": self.shape, "colour": self.colour, "background": self.background, "size": self.size,
                "position": self.position}

    def centre(self):
        """The centre of the shape's bounding box, ``(x, y)`` in pixels at 64x64: its place plus its jitter."""
        (x, y), _ = POSITIONS[self.position]
        return x + self.offset[0], y + self.offset[1]

    def is_held_out(self):
        return (self.shape, self.colour, self.background) in HELD_OUT


def sample_scenes(seed, count, held_out=False):
    """``count`` random scenes from ``seed``: training combinations, or (``held_out=True``) `HELD_OUT` ones."""
    rng = np.random.default_rng(seed)
    scenes = []
    while len(scenes) < count:
        shape, colour, background = (str(rng.choice(SHAPES)), str(rng.choice(COLOURS)), str(rng.choice(COLOURS)))
        if colour == background:
            continue
        if held_out:
            shape, colour, background = HELD_OUT[int(rng.integers(len(HELD_OUT)))]
        elif (shape, colour, background) in HELD_OUT:
            continue
        scenes.append(Scene(shape, colour, background, size=str(rng.choice(list(SIZES))),
                            position=str(rng.choice(list(POSITIONS))), short=bool(rng.random() < 0.3),
                            offset=tuple(int(d) for d in rng.integers(-_JITTER, _JITTER + 1, size=2))))
    return scenes


def _coverage(scene):
    """``[64, 64]`` in [0, 1]: how much of each pixel the shape covers."""
    n = RESOLUTION * _SUPERSAMPLING
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / _SUPERSAMPLING
    (cx, cy), half = scene.centre(), SIZES[scene.size] / 2
    u, v = (x - cx) / half, (y - cy) / half  # the bounding box is [-1, 1]^2
    if scene.shape == "circle":
        inside = u**2 + v**2 <= 1
    elif scene.shape == "square":
        inside = (abs(u) <= 1) & (abs(v) <= 1)
    else:  # pointing up: apex at the top centre, base along the bottom
        inside = (v <= 1) & (abs(u) <= (v + 1) / 2)
    return inside.reshape(RESOLUTION, _SUPERSAMPLING, RESOLUTION, _SUPERSAMPLING).mean(axis=(1, 3))


def render(scene):
    """The scene as uint8 ``[64, 64, 3]``."""
    coverage = _coverage(scene)[..., None]
    shape, background = np.array(PALETTE[scene.colour], np.float32), np.array(PALETTE[scene.background], np.float32)
    return np.round(coverage * shape + (1 - coverage) * background).astype(np.uint8)


def _nearest_colour(rgb):
    names = list(PALETTE)
    distances = [np.sum((np.asarray(rgb, np.float32) - PALETTE[name]) ** 2) for name in names]
    return names[int(np.argmin(distances))]


def _palette_distances(pixels):
    """``[..., len(PALETTE)]`` squared distances of each pixel to each palette colour."""
    palette = np.array(list(PALETTE.values()), np.float32)
    return ((pixels[..., None, :].astype(np.float32) - palette) ** 2).sum(-1)


def _smoothed(image):
    """A 3x3 box blur (edges repeated): pixel noise averages out before pixels are named by colour."""
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    height, width = image.shape[:2]
    return sum(padded[dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3)) / 9


def _blurred(image, sigma):
    """A gaussian blur of ``[H, W, 3]`` (edges repeated), separable, in numpy."""
    radius = int(np.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    height, width = image.shape[:2]
    rows = np.pad(image, ((radius, radius), (0, 0), (0, 0)), mode="edge")
    image = sum(tap * rows[i:i + height] for i, tap in enumerate(taps))
    columns = np.pad(image, ((0, 0), (radius, radius), (0, 0)), mode="edge")
    return sum(tap * columns[:, i:i + width] for i, tap in enumerate(taps))


def _shape_pixels(image):
    """``(background, colour, mask)``: the border's colour, the commonest other palette colour among the
    (3x3-smoothed) pixels and where it is; ``colour`` and ``mask`` are None when fewer than 4 pixels differ."""
    image = _smoothed(np.asarray(image, np.float32))
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    background = _nearest_colour(np.median(border, axis=0))
    nearest = np.array(list(PALETTE))[np.argmin(_palette_distances(image), axis=-1)]
    if (nearest != background).sum() < 4:
        return background, None, None
    names, counts = np.unique(nearest[nearest != background], return_counts=True)
    colour = str(names[np.argmax(counts)])
    return background, colour, nearest == colour


def _box(mask):
    """``(left, right, top, bottom)`` in pixels of the mask's 1st to 99th percentiles: a few stray pixels
    must not stretch the box."""
    ys, xs = np.nonzero(mask)
    left, right = np.percentile(xs, [1, 99]) + [0, 1]
    top, bottom = np.percentile(ys, [1, 99]) + [0, 1]
    return left, right, top, bottom


_GRID = 16  # the outline classifier sees the mask as 16x16 cells over its box, widened by _MARGIN each way
_MARGIN = 0.25
_CELL_SAMPLES = 4  # a cell's value: the share of its 4x4 points inside, so that how pixels fall matters little


def _outline_features(mask):
    """How much of each of `_GRID` x `_GRID` cells over the mask's box (widened by `_MARGIN` of the half-side)
    the mask covers, so that position and size are taken out; then a constant 1."""
    left, right, top, bottom = _box(mask)
    count = _GRID * _CELL_SAMPLES
    steps = (np.arange(count) + 0.5) / count * 2 * (1 + _MARGIN) - (1 + _MARGIN)
    xs = (left + right) / 2 + steps * max((right - left) / 2, 0.5)
    ys = (top + bottom) / 2 + steps * max((bottom - top) / 2, 0.5)
    rows, columns = np.floor(ys).astype(int), np.floor(xs).astype(int)
    inside = (rows[:, None] >= 0) & (rows[:, None] < mask.shape[0]) & (columns >= 0) & (columns < mask.shape[1])
    sampled = mask[np.clip(rows, 0, mask.shape[0] - 1)[:, None], np.clip(columns, 0, mask.shape[1] - 1)] & inside
    cells = sampled.reshape(_GRID, _CELL_SAMPLES, _GRID, _CELL_SAMPLES).mean(axis=(1, 3))
    return np.append(cells.ravel().astype(np.float32), 1.0)


@functools.cache
def _outline_classifier(seed=1234, count=400, blurs=(1.0, 2.5), noise=25.0, ridge=1.0):
    """A linear classifier of `_outline_features` into `SHAPES`, fitted by ridge regression to one-hot targets
    on ``count`` rendered scenes from ``seed``, each as drawn, at twice the size, with gaussian pixel noise
    (``noise`` levels of 255) and blurred by each of ``blurs`` (pixels): it learns what each shape looks like
    with soft edges, rounded corners and a blunted apex, at more than one scale, from the synthetic world
    alone. Fitted once per process, on first use (a few seconds). Returns the weights,
    ``[features, len(SHAPES)]``."""
    features, targets = [], []
    rng = np.random.default_rng(seed)
    for scene in sample_scenes(seed, count):
        picture = render(scene).astype(np.float32)
        doubled = np.repeat(np.repeat(picture, 2, axis=0), 2, axis=1)
        noisy = picture + rng.normal(0, noise, picture.shape)
        for variant in [picture, doubled, noisy] + [_blurred(picture, sigma) for sigma in blurs]:
            _, _, mask = _shape_pixels(variant)
            if mask is not None:
                features.append(_outline_features(mask))
                targets.append(np.eye(len(SHAPES))[SHAPES.index(scene.shape)])
    features, targets = np.stack(features), np.stack(targets)
    gram = features.T @ features + ridge * np.eye(features.shape[1])
    return np.linalg.solve(gram, features.T @ targets)


def _outline(mask):
    return SHAPES[int(np.argmax(_outline_features(mask) @ _outline_classifier()))]


def describe(image):
    """Reads a scene's attributes back from a ``[H, W, 3]`` uint8 picture (any size; measured at its own scale).

    Returns:
        ``{"shape", "colour", "background", "size", "position"}``; ``shape``, ``colour``, ``size`` and
        ``position`` are ``None`` when no shape is found.
    """
    height, width = np.shape(image)[:2]
    background, colour, mask = _shape_pixels(image)
    found = {"background": background, "shape": None, "colour": colour, "size": None, "position": None}
    if mask is None:
        return found
    left, right, top, bottom = _box(mask)
    scale = RESOLUTION / width, RESOLUTION / height
    found["shape"] = _outline(mask)
    side = max((right - left) * scale[0], (bottom - top) * scale[1])
    found["size"] = "small" if side < (SIZES["small"] + SIZES["large"]) / 2 else "large"
    centre = np.array([(left + right) / 2 * scale[0], (top + bottom) / 2 * scale[1]])
    found["position"] = min(POSITIONS, key=lambda name: np.sum((centre - POSITIONS[name][0]) ** 2))
    return found


def write_dataset(folder, seed, count):
    """Writes ``count`` training scenes from ``seed`` as ``NNNNN.png`` + ``NNNNN.txt`` caption pairs (kohya's
    layout, which `kerasdiffusion.training.image_caption_dataset` reads). Returns the scenes."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    scenes = sample_scenes(seed, count)
    for number, scene in enumerate(scenes):
        stem = os.path.join(folder, f"{number:05d}")
        Image.fromarray(render(scene)).save(stem + ".png")
        with open(stem + ".txt", "w", encoding="utf-8") as file:
            file.write(scene.caption() + "\n")
    return scenes


# ---------------------------------------------------------------------------------------- adherence

ATTRIBUTES = ("background", "colour", "shape", "size", "position")


def evaluation_scenes(seed, count):
    """``count`` scenes to ask a model for: two thirds training combinations, one third held out, in turn."""
    held_out = sample_scenes(seed + 1, count // 3, held_out=True)
    seen = sample_scenes(seed, count - len(held_out))
    return [scene for pair in zip(seen, held_out) for scene in pair] + seen[len(held_out):]


def score(images, scenes):
    """How many pictures show what their scene asks, per attribute, as ``{attribute: (matches, asked)}``.

    Background, colour and shape are asked of every scene; size and position only where the caption names
    them (the short form leaves them to chance).

    Example:

    >>> scenes = [Scene("circle", "red", "blue"), Scene("square", "white", "black", short=True)]
    >>> score([render(scenes[0]), render(scenes[1])], scenes)["position"]
    (1, 1)
    """
    tally = {attribute: [0, 0] for attribute in ATTRIBUTES}
    for image, scene in zip(images, scenes, strict=True):
        found, wanted = describe(image), scene.attributes()
        for attribute in ATTRIBUTES:
            if scene.short and attribute in ("size", "position"):
                continue
            tally[attribute][0] += found[attribute] == wanted[attribute]
            tally[attribute][1] += 1
    return {attribute: tuple(counts) for attribute, counts in tally.items()}


def _other(rng, choices, *avoid):
    return str(rng.choice([choice for choice in choices if choice not in avoid]))


def inpainting_tasks(seed, count):
    """``count`` (picture, mask, scene) triples: a picture with a shape on the left, the left half masked, and
    the scene to paint there instead (another shape and colour, named on the left, same background)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((RESOLUTION, RESOLUTION), np.float32)
    mask[:, : RESOLUTION // 2] = 1
    tasks = []
    for wanted in evaluation_scenes(seed, count):
        wanted = dataclasses.replace(wanted, position="left", short=False, offset=(0, 0))
        old = Scene(_other(rng, SHAPES, wanted.shape), _other(rng, COLOURS, wanted.colour, wanted.background),
                    wanted.background, size=str(rng.choice(list(SIZES))), position="left")
        tasks.append((render(old), mask, wanted))
    return tasks


def image_to_image_tasks(seed, count):
    """``count`` (picture, scene) pairs: the scene's picture with the shape in another colour, and the scene."""
    rng = np.random.default_rng(seed)
    tasks = []
    for wanted in evaluation_scenes(seed, count):
        old = dataclasses.replace(wanted, colour=_other(rng, COLOURS, wanted.colour, wanted.background))
        tasks.append((render(old), wanted))
    return tasks
