"""The cost of loading, re-scaling and unloading a LoRA on full SD 1.5-sized networks.

A random rank-16 LoRA in diffusers / PEFT form over every attention projection (the UNet's self- and
cross-attention q, k, v and out in its 16 transformer blocks, and the text encoder's 12 layers: 176 kernels,
16.7 MiB in float32) is written to a file, then fused into SD 1.5-sized random `Components`
(`benchmarks/random_model.py`) and taken out again. Timings are wall-clock seconds, the median of ``--repeats``;
results in `results/lora-cost-cpu-2026-12-01.md`.

    python benchmarks/lora_cost.py --repeats 3
    OPENBLAS_NUM_THREADS=1 python benchmarks/lora_cost.py --repeats 3   # NumPy's products on one thread
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.random_model import random_components  # noqa: E402
from kerasdiffusion import StableDiffusion  # noqa: E402

RANK = 16
CONTEXT = 768
# diffusers' SD 1.5 UNet: the attention blocks of each level and their width.
UNET_ATTENTIONS = ([(f"down_blocks.{level}.attentions.{i}", width) for level, width in enumerate((320, 640, 1280))
                    for i in range(2)]
                   + [("mid_block.attentions.0", 1280)]
                   + [(f"up_blocks.{level}.attentions.{i}", width) for level, width in ((1, 1280), (2, 640), (3, 320))
                      for i in range(3)])


def attention_modules():
    """``(key prefix, fan_in, fan_out)`` of every attention projection, in diffusers / PEFT names."""
    modules = []
    for block, width in UNET_ATTENTIONS:
        for attention, fan_in in (("attn1", {p: width for p in "qkv"}), ("attn2", dict(q=width, k=CONTEXT, v=CONTEXT))):
            prefix = f"unet.{block}.transformer_blocks.0.{attention}"
            modules += [(f"{prefix}.to_{p}", fan_in[p], width) for p in "qkv"] + [(f"{prefix}.to_out.0", width, width)]
    for layer in range(12):
        modules += [(f"text_encoder.text_model.encoder.layers.{layer}.self_attn.{p}_proj", CONTEXT, CONTEXT)
                    for p in ("q", "k", "v", "out")]
    return modules


def write_random_lora(path, seed=0):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for prefix, fan_in, fan_out in attention_modules():
        tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((RANK, fan_in)) / np.sqrt(fan_in)).astype(np.float32)
        tensors[f"{prefix}.lora_B.weight"] = (rng.standard_normal((fan_out, RANK)) * 0.01).astype(np.float32)
    save_file(tensors, path)
    return len(tensors) // 2


def timed(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="lora-cost-")
    path = os.path.join(folder, "random-rank16.safetensors")
    kernels = write_random_lora(path)
    start = time.perf_counter()
    sd = StableDiffusion.from_components(random_components(), jit_compile=True)
    print(f"built SD 1.5-sized random networks in {time.perf_counter() - start:.1f} s; LoRA: {kernels} kernels, "
          f"rank {RANK}, {os.path.getsize(path) / 2**20:.1f} MiB")
    unet = {v.path: v for v in sd.diffusion_model.weights}
    probe = unet["down0_attn0_block0_self_q/kernel"]
    original = np.array(probe.numpy())
    timings = {"load_lora": [], "set_lora_scale": [], "unload_lora": []}
    for _ in range(args.repeats):
        timings["load_lora"].append(timed(lambda: sd.load_lora(path, scale=0.8, name="random")))
        assert not np.array_equal(probe.numpy(), original)
        timings["set_lora_scale"].append(timed(lambda: sd.set_lora_scale("random", 0.5)))
        timings["unload_lora"].append(timed(lambda: sd.unload_lora("random")))
        assert np.array_equal(probe.numpy(), original)
    for what, seconds in timings.items():
        print(f"{what}: median {statistics.median(seconds):.2f} s (runs: {', '.join(f'{s:.2f}' for s in seconds)})")


if __name__ == "__main__":
    main()
