"""Time to the first image in a fresh process, with the persistent compile cache cold, then warm, then off.

    python benchmarks/first_image.py SOURCE --size 64 --steps 2
    python benchmarks/first_image.py --random --size 256 --steps 2      # SD 1.5 sizes, random weights
    KERAS_BACKEND=jax python benchmarks/first_image.py SOURCE --size 64 --steps 2

Each run is its own Python process, one after the other: the first writes the compiled programs to an
empty cache directory (``$KERASDIFFUSION_COMPILE_CACHE`` pointed at a fresh temporary folder), the second
reads them, and a third runs with ``KERASDIFFUSION_NO_COMPILE_CACHE=1`` for reference. Per process: the
seconds from interpreter start to the pipeline's being loaded, and from there to the first image (text
encoder, denoising loop and decoder, compiled or read from the cache, then run), and the cache's files.
The conversion cache is the user's (a converted source is read as it is).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def child(args):
    """One process: load, then one image; prints a JSON line."""
    import kerasdiffusion as kd
    from kerasdiffusion import backend

    loaded_from = time.perf_counter()
    if args.random:
        sys.path.insert(0, HERE)
        from random_model import random_components

        sd = kd.StableDiffusion.from_components(random_components(), img_width=args.size, img_height=args.size)
    else:
        sd = kd.StableDiffusion.from_pretrained(args.source, img_width=args.size, img_height=args.size,
                                                precision="float32", progress=False)
    loaded = time.perf_counter()
    sd.text_to_image("a red circle on a blue background", num_steps=args.steps, seed=0)
    done = time.perf_counter()
    print(json.dumps({"import_s": loaded_from - args.started, "load_s": loaded - loaded_from,
                      "first_image_s": done - loaded, "total_s": done - args.started,
                      "cache_dir": backend.use_compile_cache()}))


def run(args, env):
    command = [sys.executable, os.path.abspath(__file__), "--child", "--size", str(args.size), "--steps",
               str(args.steps), *(["--random"] if args.random else [args.source])]
    started = time.time()
    result = subprocess.run(command, env={**env, "KD_STARTED": str(started)}, capture_output=True, text=True)
    if result.returncode:
        sys.exit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def folder_size(path):
    files = [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
    return len(files), sum(os.path.getsize(f) for f in files)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", nargs="?")
    parser.add_argument("--random", action="store_true", help="SD 1.5-sized random weights instead of a source")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        # Interpreter start, as near as the parent can tell: just before it spawned this process.
        args.started = time.perf_counter() - (time.time() - float(os.environ["KD_STARTED"]))
        return child(args)
    if not args.random and not args.source:
        parser.error("give a SOURCE or --random")
    cache = tempfile.mkdtemp(prefix="kd-compile-cache-")
    env = {k: v for k, v in os.environ.items() if k != "KERASDIFFUSION_NO_COMPILE_CACHE"}
    env["KERASDIFFUSION_COMPILE_CACHE"] = cache
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    rows = []
    try:
        for label, extra in (("first process (cache empty)", {}), ("second process (cache warm)", {}),
                             ("cache off", {"KERASDIFFUSION_NO_COMPILE_CACHE": "1"})):
            row = run(args, {**env, **extra})
            row["files"], row["bytes"] = folder_size(cache)
            rows.append((label, row))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(f"backend {os.environ.get('KERAS_BACKEND', 'tensorflow')}, size {args.size}, {args.steps} steps, "
          f"{'random SD 1.5 weights' if args.random else args.source}")
    print("| process | import s | load s | first image s | total s | cache files after | cache MB after |")
    print("|---|---|---|---|---|---|---|")
    for label, row in rows:
        print(f"| {label} | {row['import_s']:.1f} | {row['load_s']:.1f} | {row['first_image_s']:.1f} | "
              f"{row['total_s']:.1f} | {row['files']} | {row['bytes'] / 2**20:.1f} |")


if __name__ == "__main__":
    main()
