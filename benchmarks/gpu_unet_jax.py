"""Our full-size SD 1.5 UNet on a GPU through Keras' JAX backend, against diffusers' UNet on the same GPU.

    KERAS_BACKEND=jax python benchmarks/gpu_unet_jax.py --out results.json

Why JAX: the GPU machines this project is lent carry PyTorch and JAX but no TensorFlow, and a TensorFlow
wheel (over 500 MB) cannot be carried there. Our networks are plain Keras 3 functional models, so the same
code runs on the JAX backend; this checks them on real hardware (float32 parity with diffusers on the GPU,
mixed_float16 and mixed_bfloat16 against float32, no NaN) and times one UNet call (the CFG batch) against
diffusers' float16 UNet with SDPA attention. The TensorFlow pipeline itself is not measured here.

FLOPs per UNet call are counted by PyTorch's `FlopCounterMode` on diffusers' UNet with the same config
and shapes (convolutions, matrix products and attention; the same math as ours). XLA's own
`cost_analysis()` is not used: on GPU it leaves out the convolutions and matrix products it hands to
cuDNN / cuBLAS. Model-FLOP utilisation is FLOPs / time / the GPU's dense fp16/bf16 peak (989 TFLOP/s
for an H100 SXM, as NVIDIA states it).
"""

import argparse
import json
import os
import sys
import time
import types

os.environ.setdefault("KERAS_BACKEND", "jax")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Import our network modules without the package __init__, which loads the TensorFlow pipeline.
_package = types.ModuleType("kerasdiffusion")
_package.__path__ = [os.path.join(ROOT, "kerasdiffusion")]
sys.modules["kerasdiffusion"] = _package

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from kerasdiffusion import config as C  # noqa: E402
from kerasdiffusion.unet import build_unet  # noqa: E402
from kerasdiffusion.weights import assign_weights  # noqa: E402
from tests import reference as R  # noqa: E402
from tests.test_full_size import SD15_UNET  # noqa: E402
from weights_conversion.keras_names import convert_unet  # noqa: E402

PEAK_TFLOPS = 989.0


def unet_flops(batch, latent):
    """FLOPs of one UNet call, counted on diffusers' module on the meta device (no memory, no compute)."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        args = (torch.zeros(batch, 4, latent, latent), torch.zeros(batch), torch.zeros(batch, 77, 768))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(*args)
    return counter.get_total_flops()


def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), float(np.median(times))


def keras_unet(weights, policy):
    model = build_unet(C.SD1_UNET, dtype=policy)
    assign_weights(model, weights, "unet")
    return model


def jax_call(model):
    """A jitted stateless call of the model; returns the function and its trainable-variable values."""
    values = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    @jax.jit
    def call(values, latents, timesteps, context):
        out, _ = model.stateless_call(values, non_trainable, [latents, timesteps, context])
        return out

    return call, values


def inputs(batch, latent, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, latent, latent, 4)).astype("float32"),
            np.full((batch,), 801.0, "float32"), rng.standard_normal((batch, 77, 768)).astype("float32"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu_unet.json")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    results = {"device": str(jax.devices()[0]), "torch_device": torch.cuda.get_device_name(0),
               "jax": jax.__version__, "torch": torch.__version__}
    torch_unet = R.make_unet(seed=10, **SD15_UNET)
    weights = convert_unet(R.state_dict_numpy(torch_unet))
    torch_unet = torch_unet.cuda()

    # 1. Numerics on the GPU: float32 against diffusers, mixed precision against float32.
    latents, t, context = inputs(2, 64)
    with torch.no_grad():
        expected = R.nhwc(torch_unet(R.nchw(latents).cuda(), torch.from_numpy(t).cuda(),
                                     torch.from_numpy(context).cuda()).sample)
    outputs = {}
    for policy in ("float32", "mixed_float16", "mixed_bfloat16"):
        call, values = jax_call(keras_unet(weights, policy))
        outputs[policy] = np.asarray(call(values, latents, t, context), np.float32)
        results[f"{policy}_relative_error_vs_diffusers_fp32"] = R.relative_error(outputs[policy], expected)
        results[f"{policy}_finite"] = bool(np.isfinite(outputs[policy]).all())
        print(policy, results[f"{policy}_relative_error_vs_diffusers_fp32"], flush=True)

    # 2. Timing one UNet call on the CFG batch (2 x images), 64x64 latents (512x512 images).
    half = torch_unet.half()
    for images in (1, 8):
        batch = 2 * images
        latents, t, context = inputs(batch, 64)
        for policy in ("mixed_float16", "mixed_bfloat16"):
            call, values = jax_call(keras_unet(weights, policy))
            flops = unet_flops(batch, 64)
            device_args = jax.device_put((values, latents, t, context))
            start = time.perf_counter()
            call(*device_args).block_until_ready()
            first = time.perf_counter() - start
            best, median = timed(lambda: call(*device_args).block_until_ready(), args.repeats)
            results[f"ours_{policy}_batch{images}"] = dict(
                first_call_s=first, min_s=best, median_s=median, flops=flops,
                mfu=flops / best / (PEAK_TFLOPS * 1e12))
            print(policy, images, results[f"ours_{policy}_batch{images}"], flush=True)
        x = R.nchw(latents).cuda().half()
        tt = torch.from_numpy(t).cuda()
        c = torch.from_numpy(context).cuda().half()

        def reference_call():
            with torch.no_grad():
                half(x, tt, c)
            torch.cuda.synchronize()

        best, median = timed(reference_call, args.repeats)
        results[f"diffusers_fp16_batch{images}"] = dict(min_s=best, median_s=median)
        print("diffusers", images, best, median, flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
