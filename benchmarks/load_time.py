"""Load time and peak memory, ours from a converted folder and diffusers' from a diffusers folder, side by side.

    python benchmarks/load_time.py /tmp/sd15-converted                                  # ours alone
    python benchmarks/load_time.py /tmp/sd15-converted --diffusers /tmp/sd15-diffusers --rounds 3

Each measurement is a fresh process, timed from its start (imports included), the two libraries taking turns:
- load: ours `StableDiffusion.from_pretrained(folder)` (float32, conversion cache off, so the folder itself is
  read), diffusers `StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)`;
- first UNet call: one call at 64x64 pixels (8x8 latents, batch 1) right after, where both libraries read any
  weights they left in the file at load time (both may map the file rather than read it).
Peak RSS is the process's, after the load and after the first call. The CPU's flags are printed first.
"""

import argparse
import json
import os
import subprocess
import sys
import time

OURS = """
import numpy as np
import kerasdiffusion as kd
sd = kd.StableDiffusion.from_pretrained(FOLDER, jit_compile=False, precision="float32", progress=False)
unet = sd.diffusion_model
mark("load")
channels, context = unet.inputs[0].shape[-1], unet.inputs[2].shape[-1]
unet([np.zeros((1, 8, 8, channels), "float32"), np.zeros((1,), "float32"), np.zeros((1, 77, context), "float32")])
mark("first UNet call")
"""

DIFFUSERS = """
import torch
from diffusers import StableDiffusionPipeline
pipeline = StableDiffusionPipeline.from_pretrained(FOLDER, torch_dtype=torch.float32)
mark("load")
with torch.no_grad():
    config = pipeline.unet.config
    pipeline.unet(torch.zeros(1, config.in_channels, 8, 8), torch.zeros(1),
                  encoder_hidden_states=torch.zeros(1, 77, config.cross_attention_dim))
mark("first UNet call")
"""

CHILD = """
import json, resource, sys, time
START = float(sys.argv[1])
FOLDER = sys.argv[2]
marks = {}
def mark(name):
    marks[name] = (time.time() - START, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
"""


def measure(code, folder):
    """``{mark: (seconds from the process's start, peak RSS GiB)}`` of one fresh process running ``code``."""
    env = dict(os.environ, KERASDIFFUSION_NO_CACHE="1", TF_CPP_MIN_LOG_LEVEL="3")
    script = CHILD + code + "\nprint('MARKS ' + json.dumps(marks))\n"
    result = subprocess.run([sys.executable, "-c", script, repr(time.time()), folder], env=env,
                            capture_output=True, text=True, check=True)
    line = next(line for line in result.stdout.splitlines() if line.startswith("MARKS "))
    return json.loads(line[len("MARKS "):])


def cpu_flags():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            flags = next(line for line in file if line.startswith("flags")).split(":")[1].split()
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(flag for flag in flags if flag.startswith(("avx", "amx", "fma")))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("converted", help="our converted folder (what the conversion cache holds)")
    parser.add_argument("--diffusers", help="a diffusers folder of the same model, to time diffusers on")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    print(f"CPU flags: {cpu_flags()}; {os.cpu_count()} cores")
    peers = [("kerasdiffusion", OURS, args.converted)]
    if args.diffusers:
        peers.append(("diffusers", DIFFUSERS, args.diffusers))
    print("| round | library | load s | peak RSS after load GiB | first UNet call done s | peak RSS then GiB |")
    print("|---|---|---|---|---|---|")
    for round_ in range(1, args.rounds + 1):
        for name, code, folder in peers:
            marks = measure(code, folder)
            (load, load_rss), (first, first_rss) = marks["load"], marks["first UNet call"]
            print(f"| {round_} | {name} | {load:.1f} | {load_rss:.2f} | {first:.1f} | {first_rss:.2f} |", flush=True)


if __name__ == "__main__":
    main()
