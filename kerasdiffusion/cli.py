"""The ``kerasdiffusion`` command (also ``python -m kerasdiffusion``): argparse over the pipeline, no model logic.

    kerasdiffusion generate "a watercolor fox" --steps 25 --seed 1 --out fox.png
    kerasdiffusion batch prompts.txt --out renders --images-per-prompt 4 --batch-size 8
    kerasdiffusion convert v1-5-pruned-emaonly.safetensors sd15-keras/

Every input is checked before any weights are read; bad input prints one line starting with ``error:`` on
stderr and exits with a non-zero status, and no output file is left behind. TensorFlow's and XLA's own
start-up lines are kept off the terminal unless ``--verbose`` is given.

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
import typing
import warnings

from kerasdiffusion import images as I
from kerasdiffusion import jobs, prompts, sources
from kerasdiffusion.config import PRECISIONS, PROMPT_SYNTAXES, SCHEDULER_NAMES
from weights_conversion import progress as conversion_progress
from weights_conversion.convert import SINGLE_FILE_SUFFIXES, save_converted
from weights_conversion.export import EXPORT_FORMATS

DEBUG_ENV = "KERASDIFFUSION_DEBUG"

EXAMPLES = f"""\
examples:
  # one 512x512 image from Stable Diffusion v1.5 (downloaded from the Hugging Face Hub on first use)
  kerasdiffusion generate "a photograph of an astronaut riding a horse"

  # a 64x64 image from the small model shipped with the package (no download)
  kerasdiffusion generate "a red circle on a blue background" --model kerasdiffusion/shapes

  # choose the sampler, steps and seed; write fox.png
  kerasdiffusion generate "a watercolor fox" --negative-prompt "blurry, low quality" \\
      --scheduler dpmpp_2m_karras --steps 25 --seed 42 --out fox.png

  # four images (cabin-0.png ... cabin-3.png) from a local checkpoint file
  kerasdiffusion generate "a cabin in the snow" --model ./v1-5-pruned-emaonly.safetensors \\
      --batch-size 4 --out cabin.png

  # convert a checkpoint once, then load the converted folder (no PyTorch needed)
  kerasdiffusion convert ./v1-5-pruned-emaonly.safetensors ./sd15-keras
  kerasdiffusion generate "a lighthouse at dusk" --model ./sd15-keras

Models: the built-in kerasdiffusion/shapes (small, offline), a Hub id (org/name, diffusers layout), a
diffusers folder, a .safetensors / .ckpt file, or a folder written by `kerasdiffusion convert`. Images
are the model's own size unless --width / --height say otherwise. Converted weights are cached in
{sources.cache_dir()} (set ${sources.CACHE_ENV} to move it, ${sources.NO_CACHE_ENV}=1 to turn it off), so
only the first use of a model converts it. Each PNG stores its prompt and settings, also in the "parameters" text
AUTOMATIC1111's web UI reads.
"""

GENERATE_EXAMPLES = """\
examples:
  kerasdiffusion generate "a photograph of an astronaut riding a horse" --seed 1
  kerasdiffusion generate "a watercolor fox" --model ./sd15-keras --scheduler euler_ancestral \\
      --steps 30 --guidance 6 --width 768 --height 512 --batch-size 2 --out fox.png
  kerasdiffusion generate "a (red:1.2) fox <lora:ink:0.7>, EasyNegative" --lora-dir ./loras \\
      --lora ./detail.safetensors:0.5 --embedding ./EasyNegative.safetensors --clip-skip 2
  kerasdiffusion generate --from-png fox.png --out fox-again.png --lora-dir ./loras
"""

BATCH_EXAMPLES = """\
examples:
  # two images of each prompt of prompts.txt, eight at a time over all devices, into renders/
  kerasdiffusion batch prompts.txt --out renders --images-per-prompt 2 --batch-size 8 --steps 25 --seed 1

  # a .jsonl file: each line may set its own negative prompt, seed, steps, guidance, size and image count
  #   {"prompt": "a red fox", "seed": 7, "images": 4}
  #   {"prompt": "a cabin in the snow", "width": 768, "height": 512, "num_steps": 30}
  kerasdiffusion batch prompts.jsonl --out renders --model ./sd15-keras --devices 2

  # after a crash or preemption: the same command again finishes the job
"""

# The generate options a PNG given with --from-png may set; each takes this value when neither says. A width or
# height of None is the model's own size.
GENERATE_DEFAULTS = dict(model=sources.DEFAULT_MODEL, negative_prompt="", steps=50, guidance=7.5, seed=None,
                         width=None, height=None, batch_size=1, scheduler="ddim", prompt_syntax="a1111", clip_skip=1)
MODEL_SIZE_HELP = ("the model's own size: 512 for SD 1.x, its UNet's sample size x 8 where the source says it, "
                   "64 for kerasdiffusion/shapes")
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")

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
    """The ``kerasdiffusion`` parser: the ``generate``, ``batch`` and ``convert`` commands."""
    parser = _Parser(
        prog="kerasdiffusion",
        description="Stable Diffusion in Keras 3 / TensorFlow: generate images from a text prompt, or convert\n"
        "a PyTorch checkpoint into weights that load without PyTorch.",
        epilog=EXAMPLES,
        formatter_class=_Formatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_generate(commands)
    _add_batch(commands)
    _add_convert(commands)
    _add_train(commands)
    _add_export(commands)
    return parser


def _add_generate(commands):
    generate = commands.add_parser(
        "generate", help="generate images from a text prompt and save them as PNG files",
        description="Generate images from a text prompt and save them as PNG files that carry their parameters.",
        epilog=GENERATE_EXAMPLES, formatter_class=_Formatter,
    )
    generate.add_argument("prompt", nargs="?", default=None,
                          help='what to draw, in quotes: "a watercolor fox in the snow" (with --from-png: the '
                          "PNG's, unless given)")
    generate.add_argument("--model", "-m", metavar="SOURCE", default=None,
                          help="kerasdiffusion/shapes (built in), a Hub id (org/name), a diffusers folder, a "
                          ".safetensors / .ckpt file or a folder written by `kerasdiffusion convert` "
                          f"(default: {GENERATE_DEFAULTS['model']})")
    generate.add_argument("--out", "-o", metavar="PATH", default="out.png",
                          help="the PNG to write; with --batch-size N > 1, out.png becomes out-0.png ... "
                          "out-{N-1}.png (default: %(default)s)")
    generate.add_argument("--negative-prompt", "-n", metavar="TEXT", default=None,
                          help='what to steer away from: "blurry, low quality" (default: none)')
    generate.add_argument("--steps", type=int, default=None, metavar="N",
                          help="denoising steps: more is slower and usually finer "
                          f"(default: {GENERATE_DEFAULTS['steps']})")
    generate.add_argument("--guidance", "--cfg-scale", type=float, default=None, metavar="G",
                          help="how closely to follow the prompt (classifier-free guidance scale); 1 turns guidance "
                          f"off (default: {GENERATE_DEFAULTS['guidance']})")
    generate.add_argument("--seed", type=int, default=None, metavar="S",
                          help="the same seed and settings give the same images (default: a random seed, printed "
                          "and stored in the PNG)")
    generate.add_argument("--width", type=int, default=None, metavar="W",
                          help=f"image width in pixels, a multiple of 8 (default: {MODEL_SIZE_HELP})")
    generate.add_argument("--height", type=int, default=None, metavar="H",
                          help=f"image height in pixels, a multiple of 8 (default: {MODEL_SIZE_HELP})")
    generate.add_argument("--batch-size", "-b", type=int, default=None, metavar="B",
                          help=f"how many images to make at once (default: {GENERATE_DEFAULTS['batch_size']})")
    generate.add_argument("--scheduler", "--sampler", default=None, choices=SCHEDULER_NAMES, metavar="NAME",
                          help=f"the sampler; in brackets, the name AUTOMATIC1111 gives it: {SCHEDULER_HELP} "
                          f"(default: {GENERATE_DEFAULTS['scheduler']})")
    generate.add_argument("--prompt-syntax", default=None, choices=PROMPT_SYNTAXES, metavar="SYNTAX",
                          help="a1111: AUTOMATIC1111's (emphasis (word:1.2) and [word], BREAK, prompts of any length, "
                          "<lora:NAME:SCALE>); plain: as diffusers reads a prompt, cut after 75 tokens "
                          f"(default: {GENERATE_DEFAULTS['prompt_syntax']})")
    generate.add_argument("--clip-skip", type=int, default=None, metavar="N",
                          help="the text encoder layer to use, counted from the last: 1 the last, 2 the penultimate "
                          f"(AUTOMATIC1111's setting; SD 1.x only) (default: {GENERATE_DEFAULTS['clip_skip']})")
    generate.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                          help="a LoRA (kohya / AUTOMATIC1111 or diffusers .safetensors) and its scale (default 1); "
                          "repeat for several")
    generate.add_argument("--lora-dir", metavar="DIR", default=None,
                          help="where <lora:NAME:SCALE> in the prompt finds NAME.safetensors (or .pt, .ckpt; "
                          "sub-folders too)")
    generate.add_argument("--embedding", action="append", default=[], metavar="FILE",
                          help="a textual-inversion embedding (AUTOMATIC1111 .pt / .safetensors or diffusers "
                          "learned_embeds); its token is the file's name (or the token it holds); repeatable")
    generate.add_argument("--from-png", metavar="FILE", default=None,
                          help="make again the image a PNG of ours or of AUTOMATIC1111 describes (its prompt and "
                          "settings; options given here override them)")
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


def _add_batch(commands):
    batch = commands.add_parser(
        "batch", help="generate the images of a file of prompts into a folder, resumably, on every device",
        description="Generate the images of a file of prompts into a folder: a PNG per image (named LINE-INDEX.png,\n"
        "with generate's text chunks) and manifest.jsonl (a line per finished image). Run the same command\n"
        "again after a crash or preemption to finish the job: finished images are skipped. All local devices\n"
        "are used; with TF_CONFIG (several hosts), each worker makes its share into the same folder.",
        epilog=BATCH_EXAMPLES, formatter_class=_Formatter,
    )
    batch.add_argument("prompts", metavar="PROMPTS",
                       help="a .txt file (a prompt per line; blank lines and lines starting with # skipped) or a "
                       ".jsonl file (per line: {\"prompt\": ..., and optionally \"negative_prompt\", \"seed\", "
                       "\"num_steps\", \"guidance\", \"width\", \"height\", \"images\"})")
    batch.add_argument("--out", "-o", metavar="DIR", required=True,
                       help="the output folder (made if missing; a folder of another job is refused)")
    batch.add_argument("--model", "-m", metavar="SOURCE", default=GENERATE_DEFAULTS["model"],
                       help="as for generate (default: %(default)s)")
    batch.add_argument("--images-per-prompt", type=int, default=1, metavar="N",
                       help="images per prompt, unless its record says \"images\" (default: %(default)s)")
    batch.add_argument("--batch-size", "-b", type=int, default=GENERATE_DEFAULTS["batch_size"], metavar="B",
                       help="images made at once, over all devices together (default: %(default)s)")
    batch.add_argument("--negative-prompt", "-n", metavar="TEXT", default=GENERATE_DEFAULTS["negative_prompt"],
                       help="for records without one (default: none)")
    batch.add_argument("--steps", type=int, default=GENERATE_DEFAULTS["steps"], metavar="N",
                       help="denoising steps, for records without num_steps (default: %(default)s)")
    batch.add_argument("--guidance", "--cfg-scale", type=float, default=GENERATE_DEFAULTS["guidance"], metavar="G",
                       help="guidance scale, for records without one (default: %(default)s)")
    batch.add_argument("--seed", type=int, default=None, metavar="S",
                       help="the job's seed: a record without its own seed gets one made of S and its line number "
                       "(default: a random seed, kept in DIR/job.json for reruns)")
    batch.add_argument("--width", type=int, default=GENERATE_DEFAULTS["width"], metavar="W",
                       help=f"image width, a multiple of 8, for records without one (default: {MODEL_SIZE_HELP})")
    batch.add_argument("--height", type=int, default=GENERATE_DEFAULTS["height"], metavar="H",
                       help=f"image height, a multiple of 8, for records without one (default: {MODEL_SIZE_HELP})")
    batch.add_argument("--scheduler", "--sampler", default=GENERATE_DEFAULTS["scheduler"], choices=SCHEDULER_NAMES,
                       metavar="NAME", help="the sampler (see generate) (default: %(default)s)")
    batch.add_argument("--prompt-syntax", default=GENERATE_DEFAULTS["prompt_syntax"], choices=PROMPT_SYNTAXES,
                       metavar="SYNTAX", help="as for generate (default: %(default)s)")
    batch.add_argument("--precision", default="auto", choices=("auto", *PRECISIONS), metavar="P",
                       help="as for generate (default: %(default)s)")
    batch.add_argument("--devices", type=int, default=None, metavar="N",
                       help="use the first N local devices (default: all)")
    batch.add_argument("--no-xla", action="store_true", help="do not compile with XLA")
    batch.add_argument("--no-cache", action="store_true",
                       help=f"neither read nor write the conversion cache (same as {sources.NO_CACHE_ENV}=1)")
    _add_revision(batch)
    _add_quiet(batch)
    batch.set_defaults(run=run_batch)


def _add_convert(commands):
    convert = commands.add_parser(
        "convert", help="convert a checkpoint into a folder that loads without PyTorch",
        description="Convert a checkpoint (a Hub id, a diffusers folder, or an original .safetensors / .ckpt\n"
        "file) into a kerasdiffusion folder for `--model` and `StableDiffusion.from_pretrained`, which loads\n"
        "without PyTorch. The same as `python -m weights_conversion SOURCE OUTPUT_DIR`, plus Hub ids.",
        epilog="example:\n  kerasdiffusion convert ./v1-5-pruned-emaonly.safetensors ./sd15-keras\n",
        formatter_class=_Formatter,
    )
    convert.add_argument("source", help="a Hub id (org/name), a diffusers folder, or a .safetensors / .ckpt file (or "
                         "kerasdiffusion/shapes, copied as it is)")
    convert.add_argument("output_dir", help="the folder to write (must not exist, or be empty)")
    _add_revision(convert)
    _add_quiet(convert)
    convert.set_defaults(run=run_convert)


TRAIN_EXAMPLES = """\
examples:
  # a LoRA of rank 8 from images with same-name .txt captions (or a metadata.jsonl), as a kohya file
  kerasdiffusion train lora --model ./sd15 --data ./photos --out ./run --rank 8 --steps 2000 --format kohya

  # a textual-inversion token, then continue the same run to 3000 steps
  kerasdiffusion train textual-inversion --model ./sd15 --data ./cat --out ./cat-run --token "<my-cat>" \\
      --initializer-token cat --prompt "a photo of <my-cat>"
  kerasdiffusion train textual-inversion --model ./sd15 --data ./cat --out ./cat-run --token "<my-cat>" \\
      --initializer-token cat --prompt "a photo of <my-cat>" --steps 3000 --resume

  # DreamBooth with prior preservation, the result as one original-format .safetensors
  kerasdiffusion train dreambooth --model ./sd15 --data ./dog --prompt "a photo of sks dog" \\
      --class-data ./dogs --class-prompt "a photo of dog" --out ./db --format single-file
"""
TRAIN_METHODS = {"full": "full", "lora": "lora", "textual-inversion": "textual_inversion", "dreambooth": "dreambooth"}


def _add_train(commands):
    train = commands.add_parser(
        "train", help="fine-tune a model on images and captions: full, LoRA, textual inversion or DreamBooth",
        description="Fine-tune a model on a folder of images with captions (kohya: same-name .txt files; Hugging\n"
        "Face imagefolder: metadata.jsonl with file_name and text). A checkpoint is written into OUT every\n"
        "--checkpoint-every steps; --resume continues from it to the result of an uninterrupted run. The\n"
        "result goes into OUT: a LoRA, an embedding, or a whole model.",
        epilog=TRAIN_EXAMPLES, formatter_class=_Formatter,
    )
    train.add_argument("method", choices=list(TRAIN_METHODS), help="what to train")
    train.add_argument("--model", "-m", metavar="SOURCE", default=sources.DEFAULT_MODEL,
                       help="the model to fine-tune, any source `generate` takes (default: %(default)s)")
    train.add_argument("--data", required=True, metavar="DIR", help="the images and their captions")
    train.add_argument("--out", required=True, metavar="DIR", help="the run's folder: checkpoint and result")
    train.add_argument("--resolution", type=int, default=None, metavar="R",
                       help=f"train on R x R crops, a multiple of 8 (default: {MODEL_SIZE_HELP})")
    train.add_argument("--batch-size", type=int, default=1, metavar="B", help="(default: %(default)s)")
    train.add_argument("--steps", type=int, default=1000, metavar="N", help="optimizer steps (default: %(default)s)")
    train.add_argument("--learning-rate", "--lr", type=float, default=1e-4, metavar="LR",
                       help="AdamW's learning rate (default: %(default)s)")
    train.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                       help="after the warm-up (default: %(default)s)")
    train.add_argument("--warmup-steps", type=int, default=0, metavar="N", help="(default: %(default)s)")
    train.add_argument("--rank", type=int, default=4, metavar="R", help="LoRA rank (default: %(default)s)")
    train.add_argument("--alpha", type=float, default=None, metavar="A", help="LoRA alpha (default: the rank)")
    train.add_argument("--token", metavar="T", default=None, help="textual inversion: the new word, e.g. '<my-cat>'")
    train.add_argument("--initializer-token", metavar="WORD", default="*",
                       help="textual inversion: the word the new vectors start from (default: %(default)s)")
    train.add_argument("--num-vectors", type=int, default=1, metavar="N",
                       help="textual inversion: vectors per token (default: %(default)s)")
    train.add_argument("--prompt", metavar="TEXT", default=None,
                       help="one caption for every image (DreamBooth's instance prompt) instead of the folder's")
    train.add_argument("--class-data", metavar="DIR", default=None, help="DreamBooth: the class images")
    train.add_argument("--class-prompt", metavar="TEXT", default=None, help="DreamBooth: the class images' caption")
    train.add_argument("--prior-loss-weight", type=float, default=1.0, metavar="W", help="(default: %(default)s)")
    train.add_argument("--train-text-encoder", action="store_true", help="also train the text encoder")
    train.add_argument("--snr-gamma", type=float, default=None, metavar="G",
                       help="min-SNR-gamma loss weighting, e.g. 5 (default: none)")
    train.add_argument("--noise-offset", type=float, default=0.0, metavar="X", help="(default: %(default)s)")
    train.add_argument("--format", default=None,
                       help="LoRA: diffusers (default) or kohya; textual inversion: a1111 (default) or diffusers; "
                       "full and DreamBooth: diffusers (default, a folder) or single-file")
    train.add_argument("--precision", choices=PRECISIONS, default=None,
                       help="default: mixed_float16 on GPU, mixed_bfloat16 on TPU, float32 on CPU")
    train.add_argument("--seed", type=int, default=0, metavar="S", help="(default: %(default)s)")
    train.add_argument("--checkpoint-every", type=int, default=500, metavar="N", help="(default: %(default)s)")
    train.add_argument("--resume", action="store_true", help="continue the run in OUT from its checkpoint")
    train.add_argument("--no-xla", action="store_true", help="do not compile the training step with XLA")
    train.add_argument("--eager", action="store_true",
                       help="run the step op by op (no compilation: for debugging, or a few steps of a tiny model)")
    _add_quiet(train)
    train.set_defaults(run=run_train)


def _add_export(commands):
    export = commands.add_parser(
        "export", help="export a model as a diffusers folder or one original .safetensors file",
        description="Write a model (any source --model takes) in a form diffusers, AUTOMATIC1111 and ComfyUI load:\n"
        "a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), or one\n"
        ".safetensors with the original checkpoints' (CompVis / LDM) names. Nothing is left under OUT unless\n"
        "the export completes.",
        epilog="examples:\n  kerasdiffusion export ./v1-5-pruned-emaonly.safetensors ./sd15-diffusers\n"
        "  kerasdiffusion export ./sd15-diffusers ./sd15.safetensors --format single-file\n",
        formatter_class=_Formatter,
    )
    export.add_argument("source", help="kerasdiffusion/shapes, a Hub id (org/name), a diffusers or converted folder, "
                        "or a .safetensors / .ckpt file")
    export.add_argument("out", help="the folder (diffusers; must not exist, or be empty) or .safetensors file "
                        "(single-file; must not exist) to write")
    export.add_argument("--format", choices=EXPORT_FORMATS, default="diffusers",
                        help="diffusers (default) or single-file")
    _add_revision(export)
    _add_quiet(export)
    export.set_defaults(run=run_export)


def _add_revision(parser):
    parser.add_argument("--revision", metavar="REV", default=None,
                        help="for a Hub id: the branch, tag or commit to use (default: main)")


def _add_quiet(parser):
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars or messages")
    parser.add_argument("--verbose", action="store_true",
                        help="show TensorFlow's and XLA's own start-up and log lines (hidden by default)")


def main(argv=None):
    """Runs the command line; returns the exit status (argparse exits by itself on malformed arguments)."""
    args = build_parser().parse_args(argv)
    if not args.verbose:
        quiet_framework_logs()
    try:
        with _messages_on_stdout(args.quiet), _hub_progress_bars(not args.quiet):
            return args.run(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    # Well-formed arguments that cannot be used, and a job folder holding another job: argparse's status for
    # bad usage.
    except (UsageError, jobs.JobConflictError) as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
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


class LoraFile(typing.NamedTuple):
    """A LoRA a generation loads: from --lora (its scale), or for a <lora:NAME:SCALE> tag (the tag's scale)."""

    name: str
    path: str
    scale: float
    from_prompt: bool


def run_generate(args):
    png = read_generation_png(args.from_png) if args.from_png else {}
    keep = png.get("batch_index") if args.batch_size is None else None  # one image of the PNG's batch
    fill_generate_args(args, png)
    check_generate_args(args)
    loras = lora_files(args, png)
    paths = output_paths(args.out, 1 if keep is not None else args.batch_size)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    say = _printer(args.quiet)
    start = time.perf_counter()
    start_backend(args.verbose)  # TensorFlow loads only once the arguments are valid
    from kerasdiffusion.pipeline import StableDiffusion

    sd = StableDiffusion.from_pretrained(args.model, img_width=args.width, img_height=args.height,
                                         jit_compile=not args.no_xla, scheduler=args.scheduler,
                                         precision=None if args.precision == "auto" else args.precision,
                                         prompt_syntax=args.prompt_syntax, clip_skip=args.clip_skip,
                                         revision=args.revision, cache=False if args.no_cache else None,
                                         progress=not args.quiet)
    for lora in loras:
        sd.load_lora(lora.path, scale=lora.scale, name=lora.name)
    embeddings = {sd.load_textual_inversion(path): path for path in args.embedding}
    _check_png_embeddings(args.from_png, png, embeddings)
    args.width, args.height = sd.img_width, sd.img_height  # the model's own size where not given, for the PNGs
    say(f"Loaded {args.model} in {time.perf_counter() - start:.1f} s; seed {seed}")
    images = sd.text_to_image(args.prompt, negative_prompt=args.negative_prompt or None, batch_size=args.batch_size,
                              num_steps=args.steps, unconditional_guidance_scale=args.guidance, seed=seed,
                              verbose=not args.quiet)
    cache = False if args.no_cache else None
    settings = dict(
        model_hash=sources.model_hash(args.model, cache), clip_skip=args.clip_skip, prompt_syntax=args.prompt_syntax,
        lora_hashes={lora.name: sources.lora_hash(lora.path, cache) for lora in loras},
        lora_scales={lora.name: lora.scale for lora in loras if not lora.from_prompt},
        ti_hashes={token: sources.embedding_hash(path, cache) for token, path in embeddings.items()},
    )
    indices = [keep] if keep is not None else range(args.batch_size)
    texts = [
        I.png_parameters(args.prompt, args.negative_prompt, args.steps, args.guidance, seed, args.scheduler,
                         sources.model_name(args.model), args.width, args.height, args.batch_size, index, **settings)
        for index in indices
    ]
    for path in I.write_pngs([images[index] for index in indices], paths, texts):
        say(f"Wrote {path}")
    return 0


def run_batch(args):
    check_batch_args(args)
    if args.no_cache:  # for the model hash the job records, too
        os.environ[sources.NO_CACHE_ENV] = "1"
    settings = jobs.JobSettings(seed=batch_seed(args), negative_prompt=args.negative_prompt, num_steps=args.steps,
                                guidance=args.guidance, width=args.width, height=args.height,
                                images=args.images_per_prompt, batch_size=args.batch_size)
    job = jobs.read_job(args.prompts, settings, args.prompt_syntax)  # every record checked before any work
    say = _printer(args.quiet)
    start = time.perf_counter()
    start_backend(args.verbose)
    from kerasdiffusion import distribute
    from kerasdiffusion.pipeline import StableDiffusion

    distribution = distribute.local_distribution(args.devices)
    sd = StableDiffusion.from_pretrained(args.model, img_width=args.width, img_height=args.height,
                                         jit_compile=not args.no_xla, scheduler=args.scheduler,
                                         precision=None if args.precision == "auto" else args.precision,
                                         prompt_syntax=args.prompt_syntax, distribution=distribution,
                                         revision=args.revision, progress=not args.quiet)
    worker = jobs.current_worker()
    devices = distribute.replica_count(distribution)
    on = f"{devices} device{'s' if devices > 1 else ''}"
    say(f"Loaded {args.model} in {time.perf_counter() - start:.1f} s; job seed {settings.seed}; {on}"
        + (f"; worker {worker.index + 1} of {worker.count}" if worker.count > 1 else ""))
    summary = jobs.run_job(sd, job, args.out, worker=worker, progress=not args.quiet)
    say(f"Made {summary} -> {args.out}")
    return 0


def check_batch_args(args):
    """The batch options that can be checked before the prompts file is read."""
    for option, value in (("--steps", args.steps), ("--batch-size", args.batch_size),
                          ("--images-per-prompt", args.images_per_prompt), ("--devices", args.devices or 1)):
        if value < 1:
            raise UsageError(f"{option} must be at least 1, got {value}")
    for option, value in (("--width", args.width), ("--height", args.height)):
        if value is not None and (value < 8 or value % 8):
            raise UsageError(f"{option} must be a positive multiple of 8, got {value}")
    if not math.isfinite(args.guidance):
        raise UsageError(f"--guidance must be a finite number, got {args.guidance}")
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed must be 0 or more, got {args.seed}")
    if not os.path.isfile(args.prompts):
        raise FileNotFoundError(f"no prompts file {args.prompts!r}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} is a file, not a folder")
    sources.source_kind(args.model)
    sources.check_revision(args.model, args.revision)


def batch_seed(args):
    """--seed; without it, the seed of the job already in --out (a rerun resumes it), else a random one."""
    if args.seed is not None:
        return args.seed
    described = jobs.read_description(args.out) if os.path.isdir(args.out) else None
    if described is not None and isinstance(described.get("seed"), int):
        return described["seed"]
    return random.SystemRandom().randrange(2**31)


def fill_generate_args(args, png):
    """Each generate option the command line left out takes the PNG's value (--from-png), else its default."""
    if args.prompt is None:
        args.prompt = png.get("prompt")
    if args.model is None and "model" in png:
        name = png["model"]
        if not (sources.is_builtin(name) or sources.is_hub_id(name) or os.path.exists(name)):
            made_with = f"{name!r}" + (f" (hash {png['model_hash']})" if png.get("model_hash") else "")
            raise UsageError(f"{args.from_png} was made with the model {made_with}: pass it with --model")
    for key, default in GENERATE_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, png.get(key, default))


def read_generation_png(path):
    """The generation a PNG's ``parameters`` text describes (ours or AUTOMATIC1111's), as generate's options.

    Returns:
        A dict of option names (``prompt``, ``steps``, ``scheduler``, ...) and ``lora_scales`` (LoRAs given
        outside the prompt), ``embeddings`` (tokens used) and ``batch_index`` where the text says them.
    """
    text = I.read_png_text(path)
    if not text.get("parameters"):
        raise UsageError(f"{path} carries no generation parameters (no 'parameters' text in the PNG)")
    prompt, negative, fields = I.parse_a1111_parameters(text["parameters"])
    if "Seed" not in fields or "Steps" not in fields:
        raise UsageError(f"{path}: its parameters give no {'Seed' if 'Seed' not in fields else 'Steps'}")
    png = {"prompt": prompt, "negative_prompt": negative}
    scheduler = text.get("scheduler")  # ours: the exact name; A1111's: its sampler's
    png["scheduler"] = scheduler if scheduler in SCHEDULER_NAMES else I.scheduler_from_a1111(
        fields.get("Sampler"), fields.get("Schedule type"))
    for option, field, convert in (("steps", "Steps", int), ("guidance", "CFG scale", float), ("seed", "Seed", int),
                                   ("clip_skip", "Clip skip", int), ("batch_size", "Batch size", int),
                                   ("batch_index", "Batch pos", int), ("model", "Model", str),
                                   ("model_hash", "Model hash", str), ("prompt_syntax", "Prompt syntax", str)):
        if field in fields:
            png[option] = _convert(path, field, fields[field], convert)
    if "Size" in fields:
        png["width"], png["height"] = (_convert(path, "Size", size, int) for size in fields["Size"].split("x", 1))
    png["lora_scales"] = {name: _convert(path, "Lora scales", scale, float)
                          for name, scale in I.parse_a1111_list(fields.get("Lora scales")).items()}
    png["embeddings"] = list(I.parse_a1111_list(fields.get("TI hashes")))
    return png


def _convert(path, field, value, convert):
    try:
        return convert(value)
    except ValueError:
        raise UsageError(f"{path}: {field} {value!r} is not a {convert.__name__}") from None


def lora_files(args, png):
    """Every LoRA to load: --lora FILE[:SCALE], those the PNG of --from-png names outside its prompt, and, with
    the a1111 syntax, those the prompt's <lora:NAME:SCALE> tags name, from --lora-dir."""
    loras = {}
    for option in args.lora:
        path, scale = parse_lora_option(option)
        name = os.path.splitext(os.path.basename(path))[0]
        if name in loras:
            raise UsageError(f"--lora {option}: a LoRA named {name!r} is given twice")
        loras[name] = LoraFile(name, path, scale, from_prompt=False)
    for name, scale in png.get("lora_scales", {}).items():
        if name not in loras:
            loras[name] = LoraFile(name, find_lora(args.lora_dir, name, f"{args.from_png}'s Lora scales"), scale, False)
    if args.prompt_syntax == "a1111":
        for tag in prompts.extract_loras(args.prompt)[1]:
            if tag.name not in loras:
                loras[tag.name] = LoraFile(tag.name, find_lora(args.lora_dir, tag.name, "the prompt"), 1.0, True)
    return list(loras.values())


def parse_lora_option(option):
    """``FILE[:SCALE]`` -> ``(FILE, SCALE)``; the scale defaults to 1 (a file whose own name holds a colon is
    taken whole)."""
    path, colon, scale = option.rpartition(":")
    if colon and path and not os.path.isfile(option):
        try:
            scale = float(scale)
        except ValueError:
            raise UsageError(f"--lora {option}: the scale {scale!r} is not a number") from None
    else:
        path, scale = option, 1.0
    if not (os.path.isfile(path) or sources.is_hub_id(path)):
        raise FileNotFoundError(f"--lora {option}: no such file {path!r}")
    return path, scale


def find_lora(folder, name, where):
    """The file ``NAME.safetensors`` (or ``.pt``, ``.ckpt``, ``.bin``) in ``folder`` or below, as A1111 finds it."""
    if folder is None:
        raise UsageError(f"{where} names the LoRA {name!r}: give the folder that holds it with --lora-dir")
    for root, _, names in sorted(os.walk(folder)):
        for suffix in LORA_SUFFIXES:
            if name + suffix in names:
                return os.path.join(root, name + suffix)
    raise UsageError(f"{where} names the LoRA {name!r}, which --lora-dir {folder} does not hold (looked for "
                     f"{name}{', '.join(LORA_SUFFIXES)}, in sub-folders too)")


def _check_png_embeddings(png_path, png, loaded):
    missing = [token for token in png.get("embeddings", []) if token not in loaded]
    if missing:
        raise UsageError(f"{png_path} was made with the embedding(s) {', '.join(map(repr, missing))}: pass each "
                         "file with --embedding")


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


def run_train(args):
    from kerasdiffusion.training.run import RunSettings, train

    settings = RunSettings(
        method=TRAIN_METHODS[args.method], model=args.model, data=args.data, out=args.out, resolution=args.resolution,
        batch_size=args.batch_size, steps=args.steps, learning_rate=args.learning_rate, lr_schedule=args.lr_schedule,
        warmup_steps=args.warmup_steps, rank=args.rank, alpha=args.alpha, token=args.token,
        initializer_token=args.initializer_token, num_vectors=args.num_vectors, prompt=args.prompt,
        class_data=args.class_data, class_prompt=args.class_prompt, prior_loss_weight=args.prior_loss_weight,
        train_text_encoder=args.train_text_encoder, snr_gamma=args.snr_gamma, noise_offset=args.noise_offset,
        format=args.format, precision=args.precision, seed=args.seed, checkpoint_every=args.checkpoint_every,
        jit_compile=not args.no_xla, eager=args.eager, resume=args.resume, quiet=args.quiet,
    )
    result = train(settings, log=_printer(args.quiet))
    _printer(args.quiet)(f"Wrote {result}")
    return 0


def run_export(args):
    check_export_args(args)
    start = time.perf_counter()
    from kerasdiffusion.components import load_components
    from kerasdiffusion.exporting import export

    components = load_components(args.source, precision="float32", revision=args.revision, progress=not args.quiet)
    export(components, args.out, format=args.format)
    _printer(args.quiet)(f"Exported {args.source} -> {args.out} ({args.format}) in {time.perf_counter() - start:.1f} s")
    return 0


def check_export_args(args):
    """What can be checked before reading weights; raises `UsageError` (exit status 2)."""
    out = args.out
    if args.format == "single-file":
        if not out.endswith(".safetensors"):
            raise UsageError(f"a single-file export is a .safetensors file, got {out!r}")
        if os.path.exists(out):
            raise UsageError(f"{out!r} exists; not overwriting it")
    elif os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UsageError(f"output folder {out!r} exists and is not empty")
    parent = os.path.dirname(os.path.abspath(out))
    if os.path.exists(parent):
        _check_writable(parent)
    try:
        sources.source_kind(args.source)
        sources.check_revision(args.source, args.revision)
    except (OSError, ValueError) as error:
        raise UsageError(str(error)) from None


def check_generate_args(args):
    """Everything that can be checked before reading weights; raises `UsageError`, `FileNotFoundError` or
    `CheckpointError` with a one-line message."""
    if args.prompt is None:
        raise UsageError("give a prompt (or --from-png FILE to make an image again)")
    for option, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--clip-skip", args.clip_skip)):
        if value < 1:
            raise UsageError(f"{option} must be at least 1, got {value}")
    for option, value in (("--width", args.width), ("--height", args.height)):
        if value is not None and (value < 8 or value % 8):
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
    if args.lora_dir is not None and not os.path.isdir(args.lora_dir):
        raise UsageError(f"--lora-dir {args.lora_dir!r} is not a folder")
    for path in args.embedding:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--embedding {path}: no such file")
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


# ---------------------------------------------------------------------------------------------------- output


def quiet_framework_logs():
    """Keeps TensorFlow's, XLA's and absl's log lines off the terminal (the command line's default; ``--verbose``
    leaves them be). Set before TensorFlow is imported: its C++ log level, and Python's loggers of TensorFlow
    and absl. What TensorFlow's C++ side prints while it loads, before its log level is read, is
    `start_backend`'s business."""
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    for name in ("tensorflow", "absl", "jax"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"(tensorflow|absl|jax|tf_keras)(\.|$)")


def start_backend(verbose):
    """Imports Keras' backend and finds its devices, with the C++ start-up lines (oneDNN, CUDA probing) that
    TensorFlow and XLA print meanwhile sent to /dev/null unless ``verbose``."""
    with contextlib.nullcontext() if verbose else _stderr_to_devnull():
        from kerasdiffusion import backend

        backend.device_type()


@contextlib.contextmanager
def _stderr_to_devnull():
    """File descriptor 2 (where C++ code writes) points to /dev/null for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


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
