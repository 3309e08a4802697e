"""Floating-point operations of one model call, counted from the traced TensorFlow graph.

    python benchmarks/flops.py --size 512 --steps 50     # UNet (CFG batch of 2), VAE decoder, text encoder

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


def _whole_attention_flops(model, *specs):
    from kerasdiffusion.layers import ScaledDotProductAttention

    saved = ScaledDotProductAttention.block_scores
    ScaledDotProductAttention.block_scores = 0
    try:
        return graph_flops(lambda *inputs: model(list(inputs) if len(inputs) > 1 else inputs[0], training=False),
                           *specs)
    finally:
        ScaledDotProductAttention.block_scores = saved


def unet_flops(size, batch=2):
    """FLOPs of one call of the SD 1.5 UNet on `batch` latents of a `size`x`size` image."""
    from kerasdiffusion import config as C
    from kerasdiffusion.unet import build_unet

    latent = size // 8
    return _whole_attention_flops(build_unet(C.SD1_UNET), tf.TensorSpec((batch, latent, latent, 4)),
                                  tf.TensorSpec((batch,)), tf.TensorSpec((batch, 77, 768)))


def decoder_flops(size, batch=1):
    """FLOPs of the SD VAE decoder on `batch` latents of a `size`x`size` image."""
    from kerasdiffusion import config as C
    from kerasdiffusion.vae import build_decoder

    latent = size // 8
    return _whole_attention_flops(build_decoder(C.SD_VAE), tf.TensorSpec((batch, latent, latent, 4)))


def text_encoder_flops(batch=1):
    """FLOPs of the SD 1.x CLIP text encoder on `batch` prompts of 77 tokens."""
    from kerasdiffusion import config as C
    from kerasdiffusion.text_encoder import build_text_encoder

    return _whole_attention_flops(build_text_encoder(C.SD1_TEXT_ENCODER), tf.TensorSpec((batch, 77), tf.int32))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50, help="denoising steps, for the end-to-end total")
    args = parser.parse_args()
    parts = {"UNet, CFG batch 2": unet_flops(args.size), "VAE decoder, batch 1": decoder_flops(args.size),
             "text encoder, 1 prompt": text_encoder_flops()}
    totals = {name: sum(counts.values()) for name, counts in parts.items()}
    for name, counts in parts.items():
        detail = ", ".join(f"{kind} {flops / 1e12:.3f}" for kind, flops in sorted(counts.items(), key=lambda i: -i[1]))
        print(f"{name}, {args.size}x{args.size}: {totals[name] / 1e12:.3f} TFLOP ({detail})")
    total = (args.steps * totals["UNet, CFG batch 2"] + totals["VAE decoder, batch 1"]
             + 2 * totals["text encoder, 1 prompt"])
    print(f"end to end with {args.steps} steps (prompt and negative prompt encoded): {total / 1e12:.2f} TFLOP")


if __name__ == "__main__":
    main()
