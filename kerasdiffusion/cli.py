"""The ``kerasdiffusion`` command (also ``python -m kerasdiffusion``): argparse over the pipeline, no model logic.

    kerasdiffusion generate "a watercolor fox" --steps 25 --seed 1 --out fox.png
    kerasdiffusion convert v1-5-pruned-emaonly.safetensors sd15-keras/

Every input is checked before any weights are read; bad input prints one line starting with ``error:`` on
stderr and exits with a non-zero status, and no output file is left behind.

Example:

>>> from kerasdiffusion.cli import output_paths
>>> output_paths("out.png", 3)
['out-0.png', 'out-1.png', 'out-2.png']
"""

import argparse
import contextlib
import logging
import math
import os
import random
import sys
import tempfile
import time

from kerasdiffusion import images as I
from kerasdiffusion import sources
from kerasdiffusion.config import PRECISIONS, SCHEDULER_NAMES
from weights_conversion import progress as conversion_progress
from weights_conversion.convert import SINGLE_FILE_SUFFIXES, save_converted

DEBUG_ENV = "KERASDIFFUSION_DEBUG"

EXAMPLES = f"""\
examples:
  # one 512x512 image from Stable Diffusion v1.5 (downloaded from the Hugging Face Hub on first use)
  kerasdiffusion generate "a photograph of an astronaut riding a horse"

  # choose the sampler, steps and seed; write fox.png
  kerasdiffusion generate "a watercolor fox" --negative-prompt "blurry, low quality" \\
      --scheduler dpmpp_2m_karras --steps 25 --seed 42 --out fox.png

  # four images (cabin-0.png ... cabin-3.png) from a local checkpoint file
  kerasdiffusion generate "a cabin in the snow" --model ./v1-5-pruned-emaonly.safetensors \\
      --batch-size 4 --out cabin.png

  # convert a checkpoint once, then load the converted folder (no PyTorch needed)
  kerasdiffusion convert ./v1-5-pruned-emaonly.safetensors ./sd15-keras
  kerasdiffusion generate "a lighthouse at dusk" --model ./sd15-keras

Models: a Hub id (org/name, diffusers layout), a diffusers folder, a .safetensors / .ckpt file, or a
folder written by `kerasdiffusion convert`. Converted weights are cached in {sources.cache_dir()}
(set ${sources.CACHE_ENV} to move it, ${sources.NO_CACHE_ENV}=1 to turn it off), so only the first
use of a model converts it. Each PNG stores its prompt and settings, also in the "parameters" text
AUTOMATIC1111's web UI reads.
"""

GENERATE_EXAMPLES = """\
examples:
  kerasdiffusion generate "a photograph of an astronaut riding a horse" --seed 1
  kerasdiffusion generate "a watercolor fox" --model ./sd15-keras --scheduler euler_ancestral \\
      --steps 30 --guidance 6 --width 768 --height 512 --batch-size 2 --out fox.png
"""

SCHEDULER_HELP = ", ".join(f"{name} ({I.A1111_SAMPLERS[name]})" for name in SCHEDULER_NAMES)


class UsageError(ValueError):
    """An argument that is well formed but unusable (checked before any weights are read)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line: ``error: ...``."""

    def error(self, message):
        self.exit(2, f"error: {_one_line(message)} (see `{self.prog} --help`)\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=32)


def build_parser():
    """The ``kerasdiffusion`` parser: the ``generate`` and ``convert`` commands."""
    parser = _Parser(
        prog="kerasdiffusion",
        description="Stable Diffusion in Keras 3 / TensorFlow: generate images from a text prompt, or convert\n"
        "a PyTorch checkpoint into weights that load without PyTorch.",
        epilog=EXAMPLES,
        formatter_class=_Formatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_generate(commands)
    _add_convert(commands)
    return parser


def _add_generate(commands):
    generate = commands.add_parser(
        "generate", help="generate images from a text prompt and save them as PNG files",
        description="Generate images from a text prompt and save them as PNG files that carry their parameters.",
        epilog=GENERATE_EXAMPLES, formatter_class=_Formatter,
    )
    generate.add_argument("prompt", help='what to draw, in quotes: "a watercolor fox in the snow"')
    generate.add_argument("--model", "-m", metavar="SOURCE", default=sources.DEFAULT_MODEL,
                          help="a Hub id (org/name), a diffusers folder, a .safetensors / .ckpt file or a folder "
                          "written by `kerasdiffusion convert` (default: %(default)s)")
    generate.add_argument("--out", "-o", metavar="PATH", default="out.png",
                          help="the PNG to write; with --batch-size N > 1, out.png becomes out-0.png ... "
                          "out-{N-1}.png (default: %(default)s)")
    generate.add_argument("--negative-prompt", "-n", metavar="TEXT", default="",
                          help='what to steer away from: "blurry, low quality" (default: none)')
    generate.add_argument("--steps", type=int, default=50, metavar="N",
                          help="denoising steps: more is slower and usually finer (default: %(default)s)")
    generate.add_argument("--guidance", "--cfg-scale", type=float, default=7.5, metavar="G",
                          help="how closely to follow the prompt (classifier-free guidance scale); 1 turns guidance "
                          "off (default: %(default)s)")
    generate.add_argument("--seed", type=int, default=None, metavar="S",
                          help="the same seed and settings give the same images (default: a random seed, printed "
                          "and stored in the PNG)")
    generate.add_argument("--width", type=int, default=512, metavar="W",
                          help="image width in pixels, a multiple of 8 (default: %(default)s)")
    generate.add_argument("--height", type=int, default=512, metavar="H",
                          help="image height in pixels, a multiple of 8 (default: %(default)s)")
    generate.add_argument("--batch-size", "-b", type=int, default=1, metavar="B",
                          help="how many images to make at once (default: %(default)s)")
    generate.add_argument("--scheduler", "--sampler", default="ddim", choices=SCHEDULER_NAMES, metavar="NAME",
                          help=f"the sampler; in brackets, the name AUTOMATIC1111 gives it: {SCHEDULER_HELP} "
                          "(default: %(default)s)")
    generate.add_argument("--precision", default="auto", choices=("auto", *PRECISIONS), metavar="P",
                          help="auto (float16 on GPU, bfloat16 on TPU, float32 on CPU), "
                          f"{', '.join(PRECISIONS)} (default: %(default)s)")
    generate.add_argument("--no-xla", action="store_true",
                          help="do not compile with XLA: no compile time, slower steps (good for quick tries)")
    generate.add_argument("--no-cache", action="store_true",
                          help=f"neither read nor write the conversion cache (same as {sources.NO_CACHE_ENV}=1)")
    _add_revision(generate)
    _add_quiet(generate)
    generate.set_defaults(run=run_generate)


def _add_convert(commands):
    convert = commands.add_parser(
        "convert", help="convert a checkpoint into a folder that loads without PyTorch",
        description="Convert a checkpoint (a Hub id, a diffusers folder, or an original .safetensors / .ckpt\n"
        "file) into a kerasdiffusion folder for `--model` and `StableDiffusion.from_pretrained`, which loads\n"
        "without PyTorch. The same as `python -m weights_conversion SOURCE OUTPUT_DIR`, plus Hub ids.",
        epilog="example:\n  kerasdiffusion convert ./v1-5-pruned-emaonly.safetensors ./sd15-keras\n",
        formatter_class=_Formatter,
    )
    convert.add_argument("source", help="a Hub id (org/name), a diffusers folder, or a .safetensors / .ckpt file")
    convert.add_argument("output_dir", help="the folder to write (must not exist, or be empty)")
    _add_revision(convert)
    _add_quiet(convert)
    convert.set_defaults(run=run_convert)


def _add_revision(parser):
    parser.add_argument("--revision", metavar="REV", default=None,
                        help="for a Hub id: the branch, tag or commit to use (default: main)")


def _add_quiet(parser):
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars or messages")


def main(argv=None):
    """Runs the command line; returns the exit status (argparse exits by itself on malformed arguments)."""
    args = build_parser().parse_args(argv)
    try:
        with _messages_on_stdout(args.quiet), _hub_progress_bars(not args.quiet):
            return args.run(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError) as error:  # bad input: missing or corrupt files, unusable values, Hub errors
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 1
    except Exception as error:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"error: unexpected {type(error).__name__}: {_one_line(error)} "
              f"(set {DEBUG_ENV}=1 to see the traceback)", file=sys.stderr)
        return 1


def run_generate(args):
    check_generate_args(args)
    paths = output_paths(args.out, args.batch_size)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    say = _printer(args.quiet)
    start = time.perf_counter()
    from kerasdiffusion.pipeline import StableDiffusion  # TensorFlow loads only once the arguments are valid

    sd = StableDiffusion.from_pretrained(args.model, img_width=args.width, img_height=args.height,
                                         jit_compile=not args.no_xla, scheduler=args.scheduler,
                                         precision=None if args.precision == "auto" else args.precision,
                                         revision=args.revision, cache=False if args.no_cache else None,
                                         progress=not args.quiet)
    say(f"Loaded {args.model} in {time.perf_counter() - start:.1f} s; seed {seed}")
    images = sd.text_to_image(args.prompt, negative_prompt=args.negative_prompt or None, batch_size=args.batch_size,
                              num_steps=args.steps, unconditional_guidance_scale=args.guidance, seed=seed,
                              verbose=not args.quiet)
    texts = [
        I.png_parameters(args.prompt, args.negative_prompt, args.steps, args.guidance, seed, args.scheduler,
                         args.model, args.width, args.height, args.batch_size, index, model_name(args.model))
        for index in range(args.batch_size)
    ]
    for path in I.write_pngs(images, paths, texts):
        say(f"Wrote {path}")
    return 0


def run_convert(args):
    if os.path.exists(args.output_dir) and (not os.path.isdir(args.output_dir) or os.listdir(args.output_dir)):
        raise UsageError(f"output folder {args.output_dir!r} exists and is not empty")
    parent = os.path.dirname(os.path.abspath(args.output_dir))
    if os.path.exists(parent):
        _check_writable(parent)
    sources.source_kind(args.source)
    sources.check_revision(args.source, args.revision)
    start = time.perf_counter()
    converted = sources.resolve(args.source, use_cache=False, revision=args.revision, progress=not args.quiet)
    with conversion_progress.shown(not args.quiet):
        save_converted(converted, args.output_dir)
    _printer(args.quiet)(f"Converted {args.source} -> {args.output_dir} in {time.perf_counter() - start:.1f} s")
    return 0


def check_generate_args(args):
    """Everything that can be checked before reading weights; raises `UsageError`, `FileNotFoundError` or
    `CheckpointError` with a one-line message."""
    for option, value in (("--steps", args.steps), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UsageError(f"{option} must be at least 1, got {value}")
    for option, value in (("--width", args.width), ("--height", args.height)):
        if value < 8 or value % 8:
            raise UsageError(f"{option} must be a positive multiple of 8, got {value}")
    if not math.isfinite(args.guidance):
        raise UsageError(f"--guidance must be a finite number, got {args.guidance}")
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed must be 0 or more, got {args.seed} (leave it out for a random seed)")
    if not args.out.lower().endswith(".png"):
        raise UsageError(f"--out must name a .png file, got {args.out!r}")
    for path in output_paths(args.out, args.batch_size):
        if os.path.isdir(path):
            raise UsageError(f"cannot write {path!r}: it is a folder")
    _check_writable(os.path.dirname(os.path.abspath(args.out)))
    sources.source_kind(args.model)
    sources.check_revision(args.model, args.revision)


def _check_writable(folder):
    if not os.path.isdir(folder):
        raise UsageError(f"cannot write to {folder!r}: not an existing folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UsageError(f"cannot write to {folder!r}: {error.strerror or error}") from None


def output_paths(out, batch_size):
    """``out.png`` for one image; ``out-0.png`` ... ``out-{n-1}.png`` for a batch of n."""
    if batch_size == 1:
        return [out]
    stem, extension = os.path.splitext(out)
    return [f"{stem}-{index}{extension}" for index in range(batch_size)]


def model_name(source):
    """The short model name A1111's ``Model:`` field shows: a Hub id as is, a path's last part without suffix."""
    if sources.is_hub_id(source):
        return source
    name = os.path.basename(os.path.normpath(source))
    stem, extension = os.path.splitext(name)
    return stem if extension in SINGLE_FILE_SUFFIXES else name


# ---------------------------------------------------------------------------------------------------- output


def _one_line(error):
    return " ".join(str(error).split()) or type(error).__name__


def _printer(quiet):
    return (lambda message: None) if quiet else (lambda message: print(message, flush=True))


@contextlib.contextmanager
def _messages_on_stdout(quiet):
    """Shows the loading messages of `kerasdiffusion.sources` (converting, caching) on stdout while a command
    runs: stderr is kept for progress bars and the one-line error."""
    logger = logging.getLogger("kerasdiffusion")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(logging.CRITICAL + 1 if quiet else logging.INFO)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextlib.contextmanager
def _hub_progress_bars(show):
    """huggingface_hub's download bars, hidden with ``--quiet``."""
    from huggingface_hub import utils

    hidden_before = utils.are_progress_bars_disabled()
    if not show:
        utils.disable_progress_bars()
    try:
        yield
    finally:
        if not show and not hidden_before:
            utils.enable_progress_bars()
