"""Probe: Winograd F(2x2, 3x3) against XLA's own 3x3 convolution at the SD 1.5 UNet's shapes (CPU, float32).

    python benchmarks/winograd_probe.py

3x3 convolutions are 52% of a UNet call's FLOPs. Winograd F(2x2, 3x3) needs 2.25x fewer multiplications: each
4x4 input tile is transformed (B^T d B), multiplied channel-wise with the transformed kernel (G g G^T) in 16
batched matrix products, and transformed back (A^T m A) into a 2x2 output tile. This script writes it with
plain TensorFlow ops under XLA, checks it against `tf.nn.conv2d`, and times both in turn. The kernel
transform is done once, outside the timed call (as a converted checkpoint could store it).
"""

import time

import numpy as np
import tensorflow as tf
# F(2x2, 3x3) transforms (Lavin and Gray, 2015): input B^T, kernel G, output A^T.
BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)
SHAPES = [(2, 64, 320), (2, 32, 640), (2, 16, 1280)]  # batch, height = width, channels in = out: levels 0-2
REPEATS = 5


def combine(matrix, row, terms):
    """``sum_i matrix[row, i] * terms[i]``, skipping zero coefficients (the transforms are adds and halves)."""
    return sum(float(matrix[row, i]) * term for i, term in enumerate(terms) if matrix[row, i])


def winograd_conv(x, u):
    """A stride-1 'same' 3x3 convolution of ``x [N, H, W, C]`` (H, W even) with the transformed kernel
    ``u [4, 4, C, K]``."""
    n, h, w, c = x.shape
    k = u.shape[-1]
    padded = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
    d = [[padded[:, i:i + h:2, j:j + w:2, :] for j in range(4)] for i in range(4)]  # tile element (i, j)
    rows = [[combine(BT, a, [d[i][j] for i in range(4)]) for j in range(4)] for a in range(4)]
    v = [[combine(BT, b, rows[a]) for b in range(4)] for a in range(4)]
    products = tf.matmul(tf.reshape(tf.stack([v[a][b] for a in range(4) for b in range(4)]), (16, -1, c)),
                         tf.reshape(u, (16, c, k)))
    products = tf.reshape(products, (4, 4, n, h // 2, w // 2, k))
    m = [[products[a, b] for b in range(4)] for a in range(4)]
    rows = [[combine(AT, p, [m[a][b] for a in range(4)]) for b in range(4)] for p in range(2)]
    y = [[combine(AT, q, rows[p]) for q in range(2)] for p in range(2)]
    return tf.nn.depth_to_space(tf.concat([y[0][0], y[0][1], y[1][0], y[1][1]], axis=-1), 2)


def transform_kernel(g):
    """``G g G^T`` for a Keras kernel ``g [3, 3, C, K]``."""
    return np.einsum("ai,ijck,bj->abck", G, g, G).astype(np.float32)


def main():
    rng = np.random.default_rng(0)
    print(f"min of {REPEATS} runs each, in turn, XLA; equivalent GFLOP/s = direct convolution FLOPs / time\n")
    print("| input | max error / max output | direct ms (GFLOP/s) | Winograd ms (GFLOP/s eq.) | Winograd / direct |")
    print("|---|---|---|---|---|")
    for n, size, c in SHAPES:
        x = tf.constant(rng.standard_normal((n, size, size, c)), tf.float32)
        g = (rng.standard_normal((3, 3, c, c)) / np.sqrt(9 * c)).astype(np.float32)
        kernel, transformed = tf.constant(g), tf.constant(transform_kernel(g))
        calls = {
            "direct": tf.function(lambda x: tf.nn.conv2d(x, kernel, 1, "SAME"), jit_compile=True),
            "winograd": tf.function(lambda x: winograd_conv(x, transformed), jit_compile=True),
        }
        direct, winograd = (f(x).numpy() for f in calls.values())  # also the compile
        error = np.abs(direct - winograd).max() / np.abs(direct).max()
        times = {name: [] for name in calls}
        for _ in range(REPEATS):
            for name, f in calls.items():
                start = time.perf_counter()
                f(x).numpy()
                times[name].append(time.perf_counter() - start)
        best = {name: min(t) for name, t in times.items()}
        flops = 2 * n * size * size * c * c * 9
        print(f"| {n}x{size}x{size}x{c} | {error:.1e} | {best['direct'] * 1e3:.1f} ({flops / best['direct'] / 1e9:.0f}) "
              f"| {best['winograd'] * 1e3:.1f} ({flops / best['winograd'] / 1e9:.0f}) "
              f"| {best['winograd'] / best['direct']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
