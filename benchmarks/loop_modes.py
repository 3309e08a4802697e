"""Compile and step times of the two loop modes, on the Keras backend in use (full SD 1.5 UNet, random weights).

    python benchmarks/loop_modes.py --size 256 --steps 4
    KERAS_BACKEND=jax python benchmarks/loop_modes.py --size 256 --steps 4

`loop="steps"` runs one compiled program per denoising step (a live progress bar); `loop="compiled"` runs
the whole loop in one program. Both are timed through `kerasdiffusion.denoise.Denoiser`, the pipeline's own
core, with classifier-free guidance (UNet batch 2): first the call that compiles, then ``--repeats`` calls
of each mode taking turns, so that a change in the machine's load affects both alike.
"""

import argparse
import platform
import time

import keras
import numpy as np

import kerasdiffusion as kd
from kerasdiffusion.denoise import Conditioning, Denoiser
from random_model import random_components


def cpu_flags():
    """The CPU's vector extensions that matter for these kernels (AVX2 and AVX-512 machines differ by 3x)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            flags = next(line for line in info if line.startswith("flags")).split(":")[1].split()
    except (OSError, StopIteration):
        return platform.processor()
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    return " ".join(flag for flag in wanted if flag in flags)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--scheduler", default="dpmpp_2m")
    args = parser.parse_args()
    parts = random_components()
    scheduler = kd.get_scheduler(args.scheduler).for_checkpoint(parts.scheduler_config)
    plan = scheduler.plan(args.steps)
    rng = np.random.default_rng(0)
    latent = args.size // 8
    latents = rng.standard_normal((1, latent, latent, 4)).astype("float32")
    conditioning = Conditioning(rng.standard_normal((1, 77, 768)).astype("float32"),
                                rng.standard_normal((1, 77, 768)).astype("float32"), 7.5)
    denoiser = Denoiser(parts.diffusion_model, jit_compile=True)
    fns = {loop: (lambda loop=loop: denoiser(scheduler, plan, latents, conditioning, loop=loop))
           for loop in ("steps", "compiled")}
    firsts, outputs = {}, {}
    for name, fn in fns.items():
        start = time.perf_counter()
        outputs[name] = fn()
        firsts[name] = time.perf_counter() - start
    times = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    a, b = outputs.values()
    print(f"backend {keras.backend.backend()}, CPU flags: {cpu_flags()}; size {args.size}, {args.steps} steps, "
          f"{args.scheduler}, {args.repeats} runs each in turn; max |steps - compiled| {np.abs(a - b).max():.2e}")
    print("| backend | loop | first call (compile + run) s | min s | median s | per step, min s |")
    print("|---|---|---|---|---|---|")
    for name in fns:
        best, median = min(times[name]), float(np.median(times[name]))
        print(f"| {keras.backend.backend()} | {name} | {firsts[name]:.1f} | {best:.2f} | {median:.2f} | "
              f"{best / args.steps:.2f} |")


if __name__ == "__main__":
    main()
