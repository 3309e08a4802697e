"""Times `StableDiffusion.from_pretrained` on one source and reports the process's peak RSS.

    python benchmarks/load_time.py /tmp/sd15-random.safetensors
"""

import resource
import sys
import time

import kerasdiffusion as kd

start = time.perf_counter()
sd = kd.StableDiffusion.from_pretrained(sys.argv[1], jit_compile=False, precision="float32")
sd.diffusion_model
elapsed = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(f"loaded {sys.argv[1]} in {elapsed:.1f} s, peak RSS {peak:.2f} GiB")
