"""Probe: float32 matrix products at the SD 1.5 UNet's dense-layer shapes, in every GEMM this machine offers.

    python benchmarks/gemm_probe.py                 # about 5 minutes on 2 cores
    python benchmarks/gemm_probe.py --rounds 3

The UNet's dense layers (attention projections, the GEGLU feed-forward) are a third of a step's FLOPs. Each row
is one ``[M, K] x [K, N]`` product of a UNet call on the CFG batch of 2 at 512x512 (M = 2 x tokens). Each
backend runs in its own process, because XLA reads its flags once per process:

- ``xla``: ``tf.matmul`` under ``jit_compile=True``, what our compiled step runs;
- ``xla-ynn``: the same with ``--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT``,
  which hands each dot to the YNNPACK library (the optimised HLO shows a ``__ynn_fusion``);
- ``graph``: ``tf.matmul`` in a plain ``tf.function``, TensorFlow's own (oneDNN) kernel;
- ``torch``: ``torch.matmul``, what diffusers' UNet runs;
- ``numpy``: NumPy's BLAS (OpenBLAS in the PyPI wheels), as a yardstick for the machine.

Results are GFLOP/s (2 x M x K x N over the best of the timed runs), rounds pooled.
"""

import argparse
import json
import os
import subprocess
import sys
import time

SHAPES = [  # (M, K, N): where in the UNet
    (8192, 320, 320, "level 0: projections, q/k/v/out"),
    (8192, 320, 2560, "level 0: GEGLU input"),
    (8192, 1280, 320, "level 0: feed-forward output"),
    (2048, 640, 640, "level 1: projections"),
    (2048, 640, 5120, "level 1: GEGLU input"),
    (2048, 2560, 640, "level 1: feed-forward output"),
    (512, 1280, 1280, "level 2: projections"),
    (512, 1280, 10240, "level 2: GEGLU input"),
]
BACKENDS = {
    "xla": "",
    "xla-ynn": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    "graph": "",
    "torch": "",
    "numpy": "",
}


def worker(backend, repeats):
    """Times every shape with one backend; prints a JSON list of the best seconds per shape."""
    import numpy as np

    rng = np.random.default_rng(0)
    best = []
    for m, k, n, _ in SHAPES:
        a = rng.standard_normal((m, k)).astype(np.float32)
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        if backend.startswith("xla") or backend == "graph":
            import tensorflow as tf

            ta, tw = tf.constant(a), tf.constant(w)
            function = tf.function(lambda: tf.matmul(ta, tw), jit_compile=backend != "graph")

            def call():
                function().numpy()
        elif backend == "torch":
            import torch

            ta, tw = torch.from_numpy(a), torch.from_numpy(w)

            def call():
                torch.matmul(ta, tw)
        else:
            def call():
                a @ w
        call()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        best.append(min(times))
    print(json.dumps(best))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="times the sequence of backends runs")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per shape after a warm-up")
    parser.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.repeats)
    best = {name: [float("inf")] * len(SHAPES) for name in BACKENDS}
    for _ in range(args.rounds):
        for name, flags in BACKENDS.items():
            env = dict(os.environ, XLA_FLAGS=flags, TF_CPP_MIN_LOG_LEVEL="3")
            out = subprocess.run([sys.executable, __file__, "--worker", name, "--repeats", str(args.repeats)],
                                 env=env, check=True, capture_output=True, text=True).stdout
            times = json.loads(out.strip().splitlines()[-1])
            best[name] = [min(old, new) for old, new in zip(best[name], times)]
    print(f"GFLOP/s, best of {args.rounds} rounds x {args.repeats} runs; float32\n")
    print("| M x K x N | where | " + " | ".join(BACKENDS) + " |")
    print("|---|---|" + "---|" * len(BACKENDS))
    for i, (m, k, n, where) in enumerate(SHAPES):
        cells = " | ".join(f"{2 * m * k * n / best[name][i] / 1e9:.0f}" for name in BACKENDS)
        print(f"| {m} x {k} x {n} | {where} | {cells} |")


if __name__ == "__main__":
    main()
