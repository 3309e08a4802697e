"""The attention core alone: formulations of ``softmax(q k^T / sqrt(d)) v`` timed side by side, XLA on and off.

    python benchmarks/attention.py                       # the UNet's and the VAE's long attentions
    python benchmarks/attention.py --shapes 4096x40 --repeats 5

Shapes are ``NxD`` (tokens x head width) with 8 heads and batch 2 as in the UNet on the CFG batch
(``4096x40``: the 64x64 level at 512x512; ``1024x80``: the 32x32 level), ``4096x77x40`` for the
cross-attention on the 77 context tokens, and ``vae`` for the VAE decoder's single 512-wide head over
4096 pixels (batch 1). Inputs are ``[B, N, C]`` projected queries, keys and values, as the layer gets them.

Formulations:
- ``whole``: ScaledDotProductAttention with ``block_scores = 0`` (the whole score matrix, one batched product);
- ``layer default``: the layer as it ships (blocked or whole, as it chooses for the shape);
- ``blocked/<rows>``: the layer's blocked loop, one (batch, head) and ``rows`` queries per iteration;
- ``ops.dot_product_attention``: Keras' fused op (on TensorFlow, the whole matrix as well);
- ``einsum``: the whole matrix in the ``[B, N, H, d]`` layout, no head transposes;
- ``chunks-all-heads/<rows>``: a loop over query chunks, every batch item and head in each iteration;
- ``chunks-unrolled/<rows>``: query chunks as Python-unrolled slices, concatenated;
- ``torch SDPA``: PyTorch's scaled_dot_product_attention (tiled on CPU), for reference, same process.

Reported: min and median wall time, min process CPU time (less disturbed by other load on a shared
machine), and the max error relative to a float64 NumPy reference.
"""

import argparse
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
from keras import ops  # noqa: E402

from kerasdiffusion.layers import ScaledDotProductAttention  # noqa: E402

SHAPES = {  # name: (batch, heads, queries, keys, head width)
    "4096x40": (2, 8, 4096, 4096, 40),
    "1024x80": (2, 8, 1024, 1024, 80),
    "4096x77x40": (2, 8, 4096, 77, 40),
    "vae": (1, 1, 4096, 4096, 512),
}


def layer_formulation(heads, block_scores):
    """The layer itself, with its class-level block size set while it is traced."""
    layer = ScaledDotProductAttention(heads)

    def run(q, k, v):
        saved = ScaledDotProductAttention.block_scores
        ScaledDotProductAttention.block_scores = block_scores
        try:
            return layer([q, k, v])
        finally:
            ScaledDotProductAttention.block_scores = saved

    return run


def keras_fused(heads):
    def run(q, k, v):
        b, n, c = q.shape
        split = [ops.reshape(t, (b, t.shape[1], heads, c // heads)) for t in (q, k, v)]
        return ops.reshape(ops.dot_product_attention(*split), (b, n, c))

    return run


def einsum(heads):
    def run(q, k, v):
        b, n, c = q.shape
        q, k, v = (tf.reshape(t, (b, t.shape[1], heads, c // heads)) for t in (q, k, v))
        scores = tf.einsum("bqhd,bkhd->bhqk", q / np.sqrt(c // heads), k)
        return tf.reshape(tf.einsum("bhqk,bkhd->bqhd", tf.nn.softmax(scores, -1), v), (b, n, c))

    return run


def _heads_first(t, heads):
    b, n, c = t.shape
    return tf.transpose(tf.reshape(t, (b, n, heads, c // heads)), (0, 2, 1, 3))


def _merge(o):
    b, h, n, d = o.shape
    return tf.reshape(tf.transpose(o, (0, 2, 1, 3)), (b, n, h * d))


def chunks_all_heads(heads, rows):
    def run(q, k, v):
        q, k, v = (_heads_first(t, heads) for t in (q, k, v))
        b, h, n, d = q.shape
        chunks = tf.transpose(tf.reshape(q / np.sqrt(d), (b, h, n // rows, rows, d)), (2, 0, 1, 3, 4))

        def body(x):
            return tf.matmul(tf.nn.softmax(tf.matmul(x, k, transpose_b=True), -1), v)

        out = tf.map_fn(body, chunks, fn_output_signature=tf.float32)
        return _merge(tf.reshape(tf.transpose(out, (1, 2, 0, 3, 4)), (b, h, n, v.shape[-1])))

    return run


def chunks_unrolled(heads, rows):
    def run(q, k, v):
        q, k, v = (_heads_first(t, heads) for t in (q, k, v))
        q = q / np.sqrt(q.shape[-1])
        outs = [tf.matmul(tf.nn.softmax(tf.matmul(q[:, :, i:i + rows], k, transpose_b=True), -1), v)
                for i in range(0, q.shape[2], rows)]
        return _merge(tf.concat(outs, axis=2))

    return run


def reference(q, k, v, heads):
    """float64 NumPy, one (batch, head) at a time."""
    q, k, v = (np.asarray(_heads_first(tf.constant(t), heads), np.float64) for t in (q, k, v))
    out = np.empty(q.shape[:3] + v.shape[3:])
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            s = q[b, h] @ k[b, h].T / np.sqrt(q.shape[-1])
            e = np.exp(s - s.max(-1, keepdims=True))
            out[b, h] = (e / e.sum(-1, keepdims=True)) @ v[b, h]
    return np.asarray(_merge(tf.constant(out)))


def torch_sdpa(heads):
    import torch

    def run(q, k, v):
        with torch.inference_mode():
            q, k, v = (torch.from_numpy(t).unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return out.transpose(1, 2).flatten(2).numpy()

    return run


def formulations(heads, queries, keys, rows_options):
    found = {"whole": layer_formulation(heads, 0),
             "layer default": layer_formulation(heads, ScaledDotProductAttention.block_scores)}
    for rows in rows_options:
        if rows < queries:
            found[f"blocked/{rows}"] = layer_formulation(heads, rows * keys)
    found["ops.dot_product_attention"] = keras_fused(heads)
    found["einsum"] = einsum(heads)
    for rows in (512, 1024):
        if rows < queries and queries % rows == 0:
            found[f"chunks-all-heads/{rows}"] = chunks_all_heads(heads, rows)
            found[f"chunks-unrolled/{rows}"] = chunks_unrolled(heads, rows)
    return found


def bench_shape(name, repeats, rows_options, with_torch):
    batch, heads, queries, keys, depth = SHAPES[name]
    rng = np.random.default_rng(0)
    q = rng.standard_normal((batch, queries, heads * depth)).astype("float32")
    k, v = (rng.standard_normal((batch, keys, heads * depth)).astype("float32") for _ in range(2))
    expected = reference(q, k, v, heads)
    tensors = [tf.constant(t) for t in (q, k, v)]
    calls = {}
    for formulation, fn in formulations(heads, queries, keys, rows_options).items():
        for xla in (True, False):
            compiled = tf.function(fn, jit_compile=xla)
            calls[f"{formulation} {'XLA' if xla else 'graph'}"] = lambda c=compiled: np.asarray(c(*tensors))
    if with_torch:
        sdpa = torch_sdpa(heads)
        calls["torch SDPA"] = lambda: sdpa(q, k, v)
    errors = {}
    for key, call in calls.items():  # the first call compiles
        out = call()
        errors[key] = float(np.abs(out - expected).max() / np.abs(expected).max())
    walls, cpus = {key: [] for key in calls}, {key: [] for key in calls}
    for _ in range(repeats):  # round robin, so that a burst of other load spreads over all formulations
        for key, call in calls.items():
            wall, cpu = time.perf_counter(), time.process_time()
            call()
            walls[key].append(time.perf_counter() - wall)
            cpus[key].append(time.process_time() - cpu)
    base = min(cpus["whole XLA"])
    print(f"\n### {name}: batch {batch}, {heads} heads, {queries} queries x {keys} keys x {depth}\n")
    print("| formulation | wall min s | wall median s | CPU min s | CPU vs whole XLA | rel. error |")
    print("|---|---|---|---|---|---|")
    for key in sorted(calls, key=lambda key: min(cpus[key])):
        print(f"| {key} | {min(walls[key]):.3f} | {statistics.median(walls[key]):.3f} | {min(cpus[key]):.3f} | "
              f"{min(cpus[key]) / base:.2f} | {errors[key]:.1e} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="4096x40,1024x80,4096x77x40,vae")
    parser.add_argument("--rows", default="256,512,1024", help="query rows per block for the blocked loop")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    print(f"tensorflow {tf.__version__}, keras {keras.__version__}, {os.cpu_count()} cores; "
          f"default block: {ScaledDotProductAttention.block_scores} scores")
    for name in args.shapes.split(","):
        bench_shape(name, args.repeats, [int(r) for r in args.rows.split(",")], not args.no_torch)


if __name__ == "__main__":
    main()
