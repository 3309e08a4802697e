"""``python -m weights_conversion SOURCE OUTPUT_DIR``: convert a checkpoint to a folder kerasdiffusion loads
without PyTorch. Bad input prints one line on stderr and exits with status 2."""

import argparse
import sys
import time

from weights_conversion import progress
from weights_conversion.convert import convert_source, save_converted
from weights_conversion.errors import CheckpointError


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m weights_conversion",
        description="Convert a Stable Diffusion checkpoint (diffusers folder, or an original .safetensors / "
        ".ckpt file) into a kerasdiffusion folder. Needs neither TensorFlow nor PyTorch.",
    )
    parser.add_argument("source", help="a diffusers folder, or a single .safetensors / .ckpt checkpoint file")
    parser.add_argument("output_dir", help="the folder to write (must not exist, or be empty)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars or messages")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        with progress.shown(not args.quiet):
            converted = convert_source(args.source)
            save_converted(converted, args.output_dir)
    except (CheckpointError, OSError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)  # one line, whatever a file's names hold
        return 2
    if not args.quiet:
        print(f"Converted {args.source} -> {args.output_dir} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
