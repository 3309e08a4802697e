"""Floating-point operations of one model call, counted from the traced TensorFlow graph.

    python benchmarks/flops.py --size 512          # our SD 1.5 UNet on the CFG batch of 2

A multiply-add counts as 2 FLOPs, and only convolutions and matrix products are counted (elementwise
work, norms and softmax are a few percent and are memory-bound anyway). This is the count to divide by
time and by the hardware's peak for the model-FLOP utilisation (MFU): the FLOPs the model needs,
whatever a given implementation executes. The attention is traced with the whole score matrix
(`block_scores = 0`): the blocked loop does the same products, but inside a loop body the graph holds once.
"""

import argparse
import collections
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def _shape(tensor):
    return [int(d) for d in tensor.shape]


def op_flops(op):
    """2 x multiply-adds of a Conv2D, MatMul or BatchMatMul node with static shapes; 0 for anything else."""
    if op.type == "Conv2D":
        kernel = _shape(op.inputs[1])  # [kh, kw, in, out]
        return 2 * int(np.prod(_shape(op.outputs[0]))) * kernel[0] * kernel[1] * kernel[2]
    if op.type == "MatMul":
        a = _shape(op.inputs[0])
        contracted = a[0] if op.get_attr("transpose_a") else a[1]
        return 2 * int(np.prod(_shape(op.outputs[0]))) * contracted
    if op.type.startswith("BatchMatMul"):
        a = _shape(op.inputs[0])
        contracted = a[-2] if op.get_attr("adj_x") else a[-1]
        return 2 * int(np.prod(_shape(op.outputs[0]))) * contracted
    return 0


def graph_flops(function, *args):
    """{op type: FLOPs} over the graph of `tf.function(function)` traced for `args`."""
    graph = tf.function(function).get_concrete_function(*args).graph
    counts = collections.Counter()
    for op in graph.get_operations():
        flops = op_flops(op)
        if flops:
            counts[op.type] += flops
    return dict(counts)


def unet_flops(size, batch=2, config=None):
    """FLOPs of one call of the SD 1.5 UNet (or `config`'s) on `batch` latents of a `size`x`size` image."""
    from kerasdiffusion import config as C
    from kerasdiffusion.layers import ScaledDotProductAttention
    from kerasdiffusion.unet import build_unet

    config = config or C.SD1_UNET
    unet = build_unet(config)
    latent = size // 8
    specs = [tf.TensorSpec((batch, latent, latent, config.in_channels)), tf.TensorSpec((batch,)),
             tf.TensorSpec((batch, 77, config.context_dim))]
    saved = ScaledDotProductAttention.block_scores
    ScaledDotProductAttention.block_scores = 0
    try:
        return graph_flops(lambda x, t, c: unet([x, t, c], training=False), *specs)
    finally:
        ScaledDotProductAttention.block_scores = saved


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    counts = unet_flops(args.size, args.batch)
    total = sum(counts.values())
    print(f"UNet SD 1.5, batch {args.batch}, {args.size}x{args.size} images: {total / 1e12:.3f} TFLOP")
    for kind, flops in sorted(counts.items(), key=lambda item: -item[1]):
        print(f"  {kind}: {flops / 1e12:.3f} TFLOP ({100 * flops / total:.0f}%)")


if __name__ == "__main__":
    main()
