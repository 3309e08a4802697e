"""Where one call of our full-size UNet spends its time: the whole call, then its blocks one by one.

    python benchmarks/profile_unet.py --size 512 --repeats 2

The UNet (SD 1.5 sizes, Keras' random init) is called on the CFG batch of 2, compiled with XLA (or as a
plain graph with --graph). Its blocks are then timed alone, each as a Keras model cut out of the same
functional graph between the block's input and its last named layer, so with the same layers and weights:
every residual block, every spatial transformer, and inside each transformer the attention core
(ScaledDotProductAttention) of the self- and the cross-attention. Blocks of the same shapes are timed once
and counted. "other" is the whole call minus the blocks (convolutions in and out, down- and up-sampling,
the residual adds and concatenations between blocks, and the overhead of cutting the graph).

The attention formulations are compared in the same run: each block is timed with every value of
`ScaledDotProductAttention.block_scores` given in --block-scores (0: the whole score matrix).

The time of one XLA op cannot be read from the TensorFlow profiler on CPU here (XLA's thunks run
asynchronously on its thread pool; their trace events cover only the dispatch), hence block timing.
"""

import argparse
import collections
import os
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kerasdiffusion import config as C  # noqa: E402
from kerasdiffusion.layers import ScaledDotProductAttention  # noqa: E402
from kerasdiffusion.unet import build_unet  # noqa: E402

BATCH = 2


def level_of(prefix, config):
    """UNet level (0 = full latent size) of a block named down{l}_..., up{u}_... or mid_..."""
    levels = len(config.block_channels)
    if prefix.startswith("down"):
        return int(prefix[4:].split("_")[0])
    if prefix.startswith("up"):
        return levels - 1 - int(prefix[2:].split("_")[0])
    return levels - 1


def blocks(unet, config, latent):
    """(kind, level, prefix, sub-model or layer, input shapes) for every block of the UNet."""
    layers = {layer.name: layer for layer in unet.layers}
    emb = layers["time_embed_dense2"].output
    context = unet.inputs[2]
    found = []
    for name, layer in layers.items():
        if name.endswith("_norm1") and "_res" in name:
            prefix = name[: -len("_norm1")]
            x = layer.input
            model = keras.Model([x, emb], layers[f"{prefix}_conv2"].output)
            kind = f"res block {x.shape[-1]}->{model.output.shape[-1]}"
        elif name.endswith("_norm") and "_attn" in name and "_block" not in name:
            prefix = name[: -len("_norm")]
            x = layer.input
            model = keras.Model([x, context], layers[f"{prefix}_proj_out"].output)
            kind = f"transformer {x.shape[-1]}"
        else:
            continue
        level = level_of(prefix, config)
        size = latent // 2**level
        second = (BATCH,) + tuple(77 if d is None else d for d in model.inputs[1].shape[1:])  # emb or context
        found.append((kind, level, prefix, model, [(BATCH, size, size, x.shape[-1]), second]))
    for layer in unet.layers:
        if isinstance(layer, ScaledDotProductAttention):
            q_layer = layer._inbound_nodes[0].parent_nodes[0].operation.name  # e.g. down0_attn0_block0_self_q
            prefix = q_layer[: -len("_q")]
            level = level_of(prefix, config)
            tokens = (latent // 2**level) ** 2
            keys = tokens if prefix.endswith("_self") else 77
            width = layer.input[0].shape[-1]
            kind = f"{'self' if prefix.endswith('_self') else 'cross'}-attention core {tokens}x{keys}, {width} wide"
            found.append((kind, level, prefix, layer, [(BATCH, tokens, width), (BATCH, keys, width), (BATCH, keys, width)]))
    return found


def compiled(model, block_scores, xla):
    def call(*inputs):
        saved = ScaledDotProductAttention.block_scores
        ScaledDotProductAttention.block_scores = block_scores  # read while tracing
        try:
            return model(list(inputs), training=False)
        finally:
            ScaledDotProductAttention.block_scores = saved

    return tf.function(call, jit_compile=xla)


def time_calls(calls, repeats):
    """Round robin over the calls after one warm-up each: min wall seconds and min process CPU seconds.

    On a machine shared with other work the CPU time (both threads together) moves less than the wall
    time, so the shares below are computed from it.
    """
    for call in calls.values():
        call()
    walls, cpus = collections.defaultdict(list), collections.defaultdict(list)
    for _ in range(repeats):
        for key, call in calls.items():
            wall, cpu = time.perf_counter(), time.process_time()
            call()
            walls[key].append(time.perf_counter() - wall)
            cpus[key].append(time.process_time() - cpu)
    return {key: (min(walls[key]), min(cpus[key])) for key in calls}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--graph", action="store_true", help="plain tf.function graphs instead of XLA")
    parser.add_argument("--block-scores", default=f"0,{ScaledDotProductAttention.block_scores}")
    parser.add_argument("--whole-only", action="store_true", help="time only the whole call (the A/B of block_scores)")
    args = parser.parse_args()
    settings = [int(s) for s in args.block_scores.split(",")]
    xla = not args.graph
    config = C.SD1_UNET
    unet = build_unet(config)
    latent = args.size // 8
    rng = np.random.default_rng(0)

    def tensor(shape):
        return tf.constant(rng.standard_normal(shape).astype("float32"))

    whole_inputs = [tensor((BATCH, latent, latent, 4)), tf.constant([500.0] * BATCH), tensor((BATCH, 77, 768))]
    whole = {s: compiled(unet, s, xla) for s in settings}
    whole_times = time_calls({s: (lambda f=f: f(*whole_inputs).numpy()) for s, f in whole.items()}, args.repeats)
    if args.whole_only:
        base = whole_times[settings[0]]
        print(f"\nWhole UNet call, batch {BATCH}, {latent}x{latent} latents, {'XLA' if xla else 'graph'}, min of "
              f"{args.repeats} interleaved runs; load average {os.getloadavg()[0]:.1f}\n")
        print("| block_scores | wall s | CPU s | wall / first | CPU / first |\n|---|---|---|---|---|")
        for s, (wall, cpu) in whole_times.items():
            print(f"| {s} | {wall:.2f} | {cpu:.2f} | {wall / base[0]:.2f} | {cpu / base[1]:.2f} |")
        return

    unique = collections.OrderedDict()  # (kind, level, shapes) -> [count, block]
    for kind, level, prefix, block, shapes in blocks(unet, config, latent):
        key = (kind, level, tuple(shapes))
        unique.setdefault(key, [0, block])[0] += 1
    calls = {}
    for (kind, level, shapes), (count, block) in unique.items():
        inputs = [tensor(s) for s in shapes]
        for s in settings:
            function = compiled(block, s, xla)
            calls[(kind, level, shapes, s)] = lambda f=function, i=inputs: f(*i).numpy()
    block_times = time_calls(calls, args.repeats)

    mode = "XLA" if xla else "graph"
    print(f"\nUNet SD 1.5, batch {BATCH}, {latent}x{latent} latents ({args.size}x{args.size} images), {mode}; "
          f"min of {args.repeats} runs after a warm-up; wall and process CPU seconds; {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}. Share: count x CPU time over the whole call's CPU time.\n")
    header = " | ".join(f"block_scores={s}: wall each, CPU each, share" for s in settings)
    print(f"| block | level | count | {header} |")
    print("|---|---|---|" + "---|" * len(settings))
    totals = collections.defaultdict(float)
    for (kind, level, shapes), (count, _) in unique.items():
        cells = []
        for s in settings:
            wall, cpu = block_times[(kind, level, shapes, s)]
            if "attention core" not in kind:  # already inside its transformer's time
                totals[s] += count * cpu
            cells.append(f"{wall:.3f}, {cpu:.3f}, {100 * count * cpu / whole_times[s][1]:.0f}%")
        print(f"| {kind} | {level} | {count} | " + " | ".join(cells) + " |")
    cells = [f"—, {whole_times[s][1] - totals[s]:.2f}, {100 * (1 - totals[s] / whole_times[s][1]):.0f}%" for s in settings]
    print("| other (convs in/out, resampling, concatenations) | | | " + " | ".join(cells) + " |")
    cells = [f"**{whole_times[s][0]:.2f}**, {whole_times[s][1]:.2f}, 100%" for s in settings]
    print("| **whole UNet call** | | | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
