"""What the distribution path costs on one device: the same batch through `distribution=` and without.

    python benchmarks/distribution_overhead.py --size 256 --batch-size 2 --steps 3 --path OneDeviceStrategy
    python benchmarks/distribution_overhead.py --size 256 --batch-size 2 --steps 3 --path MirroredStrategy
    KERAS_BACKEND=jax python benchmarks/distribution_overhead.py --size 256 --batch-size 2 --steps 3
    python benchmarks/distribution_overhead.py --model kerasdiffusion/shapes --size 64 --batch-size 4 --steps 25

With ``--model``, the networks are loaded from a source instead: the built-in model's calls are short, so the
fixed cost the distribution path adds to each call weighs most there.

A whole `text_to_image` call (text encoder, denoising loop, decoder; SD 1.5-sized networks with random
weights, `benchmarks/random_model.py`) on the plain one-device path, and through the distribution path
over one device: on TensorFlow a `OneDeviceStrategy` and a `MirroredStrategy` of one device, on JAX a
`keras.distribution.DataParallel` of one device. Each variant's first call compiles; then the variants take
turns ``--repeats`` times, so that a change in the machine's load affects them alike. Each path has its own
networks, built under its distribution's scope (SD 1.5 is 4 GB in float32: ``--path`` picks which to hold
next to the plain one). Prints the load average and the CPU's flags with the table, since this machine's
cores are shared.
"""

import argparse
import os
import time

import keras
import numpy as np

import kerasdiffusion as kd
from kerasdiffusion import distribute
from loop_modes import cpu_flags
from random_model import random_components

PROMPT = "a photograph of an astronaut riding a horse"


def distributions():
    """The one-device distributions of the backend in use, by name, made when asked for."""
    if keras.backend.backend() == "jax":
        return {"DataParallel": lambda: keras.distribution.DataParallel(devices=keras.distribution.list_devices()[:1])}
    import tensorflow as tf

    return {"OneDeviceStrategy": lambda: tf.distribute.OneDeviceStrategy("/cpu:0"),
            "MirroredStrategy": lambda: tf.distribute.MirroredStrategy(["/cpu:0"])}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--path", action="append", choices=sorted(distributions()),
                        help="the distribution path(s) to time next to the plain one (default: all)")
    parser.add_argument("--loop", default="steps", choices=["steps", "compiled"])
    parser.add_argument("--model", default=None,
                        help="a source to load (e.g. kerasdiffusion/shapes, where the fixed cost per call weighs "
                             "most) instead of SD 1.5-sized random networks")
    args = parser.parse_args()
    keywords = dict(img_width=args.size, img_height=args.size, jit_compile=True, scheduler="dpmpp_2m", loop=args.loop)

    def components():
        if args.model:
            return kd.load_components(args.model, precision="float32", progress=False)
        keras.utils.set_random_seed(0)  # the same random weights for every path
        return random_components()

    pipelines = {"plain": kd.StableDiffusion.from_components(components(), **keywords)}
    for name in args.path or sorted(distributions()):
        distribution = distributions()[name]()
        with distribute.scope(distribution):
            parts = components()
        pipelines[name] = kd.StableDiffusion.from_components(parts, distribution=distribution, **keywords)

    def generate(sd):
        return sd.text_to_image(PROMPT, batch_size=args.batch_size, num_steps=args.steps, seed=1, verbose=False)

    firsts, images = {}, {}
    for name, sd in pipelines.items():
        start = time.perf_counter()
        images[name] = generate(sd)
        firsts[name] = time.perf_counter() - start
    times = {name: [] for name in pipelines}
    for _ in range(args.repeats):
        for name, sd in pipelines.items():
            start = time.perf_counter()
            generate(sd)
            times[name].append(time.perf_counter() - start)
    plain_median, plain_min = float(np.median(times["plain"])), min(times["plain"])
    largest = max(int(np.abs(images[name].astype(int) - images["plain"].astype(int)).max()) for name in images)
    print(f"model {args.model or 'SD 1.5-sized, random weights'}; backend {keras.backend.backend()}, CPU flags: {cpu_flags()}; load average {os.getloadavg()}; "
          f"{args.size}x{args.size}, batch {args.batch_size}, {args.steps} steps (loop={args.loop}, dpmpp_2m, "
          f"guidance: UNet batch {2 * args.batch_size}), {args.repeats} runs each in turn; largest pixel difference "
          f"from plain: {largest}")
    print("| backend | path | first call (compile + run) s | runs s | min s | min / plain | median s | "
          "median / plain |")
    print("|---|---|---|---|---|---|---|---|")
    for name in pipelines:
        best, median = min(times[name]), float(np.median(times[name]))
        runs = " ".join(f"{t:.2f}" for t in times[name])
        print(f"| {keras.backend.backend()} | {name} | {firsts[name]:.1f} | {runs} | {best:.2f} | "
              f"{best / plain_min:.3f} | {median:.2f} | {median / plain_median:.3f} |")


if __name__ == "__main__":
    main()
