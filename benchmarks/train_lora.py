"""LoRA training speed and peak memory on full SD 1.5-sized networks (random weights), batch 1.

`Trainer(method="lora")` (rank 4 on every UNet attention projection) is compiled with AdamW and run for
``--warmup`` steps (tracing / compiling) then ``--steps`` timed steps of ``fit`` on random images; each step
encodes the images with the VAE encoder, runs the frozen text encoder and the UNet forward and backward.
Prints steps per second (timed steps only) and the process's peak resident memory (``VmHWM``). A watchdog
ends the run (exit 3) when the resident memory passes ``--max-rss-gib``, so that a machine shared with others
is not driven into swapping or the OOM killer.

    python benchmarks/train_lora.py --resolution 512 --steps 3 --jit
"""

import argparse
import os
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.random_model import random_components  # noqa: E402


def rss_gib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def watchdog(limit_gib):
    def watch():
        while True:
            if rss_gib("VmRSS") > limit_gib:
                print(f"stopped: resident memory passed {limit_gib} GiB", flush=True)
                os._exit(3)
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()


class StepTimes:
    """Keras callback that records each batch's end time."""

    def __init__(self):
        import keras

        outer = self

        class Callback(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                outer.ends.append(time.perf_counter())

        self.ends, self.callback = [], Callback()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--jit", action="store_true", help="compile the step with XLA")
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--max-rss-gib", type=float, default=9.0)
    args = parser.parse_args()
    watchdog(args.max_rss_gib)

    import keras
    import tensorflow as tf

    from kerasdiffusion.training import Trainer

    components = random_components(args.precision)
    trainer = Trainer(components, method="lora", rank=args.rank, seed=0)
    trainer.compile(optimizer=keras.optimizers.AdamW(1e-4), jit_compile=args.jit)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (1, args.resolution, args.resolution, 3)).astype("float32")
    batch = {"images": images, "token_ids": components.tokenizer(["a photograph of an astronaut riding a horse"])}
    data = tf.data.Dataset.from_tensors(batch).repeat()
    times = StepTimes()
    start = time.perf_counter()
    trainer.fit(data, epochs=1, steps_per_epoch=args.warmup + args.steps, verbose=0, shuffle=False,
                callbacks=[times.callback])
    timed = times.ends[args.warmup - 1 :] if args.warmup else [start, *times.ends]
    seconds = (timed[-1] - timed[0]) / args.steps
    print(f"backend {keras.backend.backend()}, {args.resolution}x{args.resolution}, batch 1, rank {args.rank}, "
          f"{len(trainer.trainable_variables)} trainable variables, jit {args.jit}, {args.precision}")
    print(f"first {args.warmup} step(s) (with tracing/compiling): {times.ends[args.warmup - 1] - start:.1f} s")
    print(f"timed steps: {seconds:.2f} s/step = {1 / seconds:.3f} steps/s; peak RSS {rss_gib('VmHWM'):.2f} GiB")


if __name__ == "__main__":
    main()
