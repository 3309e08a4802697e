"""Per-step compiled programs against one XLA program for the whole loop (full SD 1.5 UNet, random weights).

    python benchmarks/loop_modes.py --size 256 --steps 4

The pipeline runs one compiled step per iteration (which keeps a per-step progress bar honest). This script
builds the alternative, the same step body inside a `tf.while_loop` in one XLA program, and times both in
one run, after a warm-up call that compiles each.
"""

import argparse
import time

import numpy as np
import tensorflow as tf

import kerasdiffusion as kd
from kerasdiffusion import config as C
from kerasdiffusion.tokenizer import CLIPTokenizer
from kerasdiffusion.unet import build_unet


def make_pipeline(size, scheduler):
    """A StableDiffusion whose UNet is the full SD 1.5 one with Keras' random init (timing ignores values)."""
    sd = kd.StableDiffusion(img_width=size, img_height=size, jit_compile=True, precision="float32",
                            scheduler=scheduler)
    sd._components = dict(diffusion_model=build_unet(C.SD1_UNET), tokenizer=CLIPTokenizer(),
                          scheduler_config=kd.SchedulerConfig())
    sd._scheduler = kd.get_scheduler(scheduler)
    return sd


def fused_loop(sd, plan, step):
    body = step.python_function

    @tf.function(jit_compile=True)
    def run(latents, state, context, guidance, seeds):
        def loop(i, latents, state):
            latents, state = body(latents, state, i, context, guidance, seeds, ())
            return i + 1, latents, state

        n = len(plan.timesteps)
        _, latents, state = tf.while_loop(lambda i, *_: i < n, loop, (tf.constant(0), latents, state))
        return latents

    return run


def timed_in_turn(fns, repeats):
    """``repeats`` timed calls of each function, taking turns, so that a change in the machine's load
    affects both alike; returns (min, median) per name."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: (min(t), float(np.median(t))) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--scheduler", default="dpmpp_2m")
    args = parser.parse_args()
    sd = make_pipeline(args.size, args.scheduler)
    scheduler = sd.scheduler
    plan = scheduler.plan(args.steps)
    latent = args.size // 8
    latents = tf.random.normal((1, latent, latent, 4))
    context = tf.random.normal((2, 77, 768))
    seeds = tf.constant([[0, 0]], tf.int32)
    guidance = tf.constant(7.5)
    step = sd._step_function(scheduler, plan, "text", True)

    def per_step():
        x, state = latents, scheduler.initial_state(latents)
        for i in range(len(plan.timesteps)):
            x, state = step(x, state, tf.constant(i), context, guidance, seeds, ())
        return x.numpy()

    fused = fused_loop(sd, plan, step)

    def whole():
        return fused(latents, scheduler.initial_state(latents), context, guidance, seeds).numpy()

    fns = {"per-step programs": per_step, "one program": whole}
    firsts, outputs = {}, {}
    for name, fn in fns.items():
        start = time.perf_counter()
        outputs[name] = fn()
        firsts[name] = time.perf_counter() - start
    timings = timed_in_turn(fns, args.repeats)
    a, b = outputs.values()
    print(f"size {args.size}, {args.steps} steps, {args.scheduler}, {args.repeats} runs each in turn; "
          f"max |difference| {np.abs(a - b).max():.2e}")
    print("| loop | first call (compile + run) s | min s | median s |")
    print("|---|---|---|---|")
    for name in fns:
        print(f"| {name} | {firsts[name]:.1f} | {timings[name][0]:.2f} | {timings[name][1]:.2f} |")


if __name__ == "__main__":
    main()
