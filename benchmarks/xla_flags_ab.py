"""A/B of XLA CPU flags on one whole call of our full-size UNet (SD 1.5, CFG batch of 2, XLA).

    python benchmarks/xla_flags_ab.py --size 512 --rounds 2
    python benchmarks/xla_flags_ab.py --variants default,ynn-dot,ynn-conv

XLA reads its flags once per process, so each variant runs in its own process: build the UNet with the same
seeded Keras initialisation, compile, time ``--repeats`` calls. Variants alternate round by round, so that a
burst of other load on a shared machine does not land on one variant only. Each variant's output is compared
with the first variant's (the libraries may sum in another order, nothing more).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

VARIANTS = {
    "default": "",
    "ynn-dot": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    "ynn-dot-eltwise": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE",
    "ynn-conv": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
    "xnn-conv": "--xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
}


def worker(size, repeats, output):
    """Builds, compiles and times the UNet in this process; prints one JSON line and saves the output."""
    import keras
    import tensorflow as tf

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from kerasdiffusion import config as C
    from kerasdiffusion.unet import build_unet

    keras.utils.set_random_seed(0)
    unet = build_unet(C.SD1_UNET)
    rng = np.random.default_rng(0)
    latent = size // 8
    inputs = (tf.constant(rng.standard_normal((2, latent, latent, 4)).astype("float32")), tf.constant([500.0] * 2),
              tf.constant(rng.standard_normal((2, 77, 768)).astype("float32")))
    call = tf.function(lambda x, t, c: unet([x, t, c]), jit_compile=True)
    start = time.perf_counter()
    result = call(*inputs).numpy()
    first = time.perf_counter() - start
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        call(*inputs).numpy()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    np.save(output, result)
    print(json.dumps({"first": first, "wall": walls, "cpu": cpus}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image size (latents are size / 8)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per process after the compile")
    parser.add_argument("--variants", default="default,ynn-dot,ynn-conv",
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--worker", metavar="OUTPUT.npy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.size, args.repeats, args.worker)
    names = args.variants.split(",")
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    runs = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.rounds):
            for name in names:
                env = dict(os.environ, XLA_FLAGS=VARIANTS[name], TF_CPP_MIN_LOG_LEVEL="3")
                command = [sys.executable, __file__, "--worker", os.path.join(folder, f"{name}.npy"),
                           "--size", str(args.size), "--repeats", str(args.repeats)]
                out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
                runs[name].append(json.loads(out.strip().splitlines()[-1]))
        reference = np.load(os.path.join(folder, f"{names[0]}.npy"))
        print(f"UNet SD 1.5, CFG batch 2, {args.size // 8}x{args.size // 8} latents, XLA; {args.rounds} processes per "
              f"variant, alternating, {args.repeats} timed calls each\n")
        print(f"| variant | XLA_FLAGS | wall s, min / median | CPU s, min | first call s, median | "
              f"max abs difference to {names[0]} |")
        print("|---|---|---|---|---|---|")
        for name in dict.fromkeys(names):  # a variant named twice was run twice per round
            walls = [w for run in runs[name] for w in run["wall"]]
            cpus = [c for run in runs[name] for c in run["cpu"]]
            firsts = [run["first"] for run in runs[name]]
            difference = np.abs(np.load(os.path.join(folder, f"{name}.npy")) - reference).max()
            print(f"| {name} | `{VARIANTS[name] or '(none)'}` | {min(walls):.2f} / {np.median(walls):.2f} | "
                  f"{min(cpus):.2f} | {np.median(firsts):.1f} | {difference:.1e} |")


if __name__ == "__main__":
    main()
