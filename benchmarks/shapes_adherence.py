"""How often the built-in model draws what its prompt asks, measured from the pixels; and the README's grid.

    python benchmarks/shapes_adherence.py                         # the table, 200 generations per task
    python benchmarks/shapes_adherence.py --grid docs/shapes_grid.png
    python benchmarks/shapes_adherence.py --count 0 --pairs       # the shape's colour per colour pair

Three tasks, each over prompts of which a third are combinations held out of training
(`kerasdiffusion.shapes.evaluation_scenes`): text to image; inpainting the left half of a picture with the
shape a prompt names; image to image, recolouring a picture's shape. Every picture is read back by
`kerasdiffusion.shapes.describe` and compared with its prompt (`score`). Prints a markdown table.

With ``--pairs``, also how often the shape comes out in its own colour for each (shape colour, background
colour) pair, over short prompts ("a red circle on a blue background"), every shape twice: an average colour
rate can hide one pair that almost always fails.
"""

import argparse
import time

import kerasdiffusion as kd
from kerasdiffusion import shapes
from kerasdiffusion.training.shapes_model import SETTINGS, adherence, text_to_image


def table(results):
    lines = ["| task | " + " | ".join(shapes.ATTRIBUTES) + " |", "|---" * (len(shapes.ATTRIBUTES) + 1) + "|"]
    for task, tally in results.items():
        cells = [f"{100 * hits / asked:.0f}% ({hits}/{asked})" if asked else "-" for hits, asked in
                 (tally[a] for a in shapes.ATTRIBUTES)]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pairs(sd, seed=11, repeats=2):
    """A markdown table: for each shape colour (rows) on each background (columns), how many of its pictures
    show the shape in its colour."""
    scenes = [shapes.Scene(shape, colour, background, short=True) for colour in shapes.COLOURS
              for background in shapes.COLOURS if background != colour for shape in shapes.SHAPES] * repeats
    hits = {}
    for image, scene in zip(text_to_image(sd, scenes, seed), scenes):
        key = scene.colour, scene.background
        hits[key] = hits.get(key, 0) + (shapes.describe(image)["colour"] == scene.colour)
    asked = len(shapes.SHAPES) * repeats
    lines = ["| shape \\ background | " + " | ".join(shapes.COLOURS) + " |", "|---" * (len(shapes.COLOURS) + 1) + "|"]
    for colour in shapes.COLOURS:
        cells = ["-" if background == colour else f"{hits[colour, background]}/{asked}"
                 for background in shapes.COLOURS]
        lines.append(f"| {colour} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid(sd, path, seed=7):
    """A 4x3 grid of pictures under their prompts (held-out combinations marked *), as a PNG."""
    from PIL import Image, ImageDraw

    scenes = shapes.evaluation_scenes(seed, 12)
    images = text_to_image(sd, scenes, seed)
    scale, caption_height, columns = 3, 30, 4
    side = 64 * scale
    sheet = Image.new("RGB", (columns * side, 3 * (side + caption_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, scene) in enumerate(zip(images, scenes)):
        x, y = (i % columns) * side, (i // columns) * (side + caption_height)
        sheet.paste(Image.fromarray(image).resize((side, side), Image.NEAREST), (x, y))
        words = scene.caption() + (" *" if scene.is_held_out() else "")
        middle = len(words) // 2
        cut = words.rfind(" ", 0, middle + 8) if len(words) > 30 else len(words)
        draw.text((x + 4, y + side + 2), words[:cut].strip(), fill="black")
        draw.text((x + 4, y + side + 15), words[cut:].strip(), fill="black")
    sheet.save(path)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="kerasdiffusion/shapes")
    parser.add_argument("--count", type=int, default=200, help="generations per task")
    parser.add_argument("--grid", help="also write the README's grid to this PNG")
    parser.add_argument("--pairs", action="store_true", help="also the shape's colour per colour pair")
    args = parser.parse_args()
    sd = kd.StableDiffusion.from_pretrained(args.model, img_width=64, img_height=64, scheduler="dpmpp_2m",
                                            progress=False)
    start = time.perf_counter()
    if args.count:
        print(table(adherence(sd, args.count)))
        print(f"\n{3 * args.count} generations in {time.perf_counter() - start:.0f} s "
              f"({SETTINGS['num_steps']} DPM++ 2M steps, guidance {SETTINGS['unconditional_guidance_scale']})")
    if args.pairs:
        print(pairs(sd))
    if args.grid:
        print("grid:", grid(sd, args.grid))


if __name__ == "__main__":
    main()
