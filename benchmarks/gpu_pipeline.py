"""The whole pipeline on a GPU through Keras' JAX backend, side by side with diffusers (eager and
`torch.compile`) on the same machine, in one run.

    KERAS_BACKEND=jax python benchmarks/gpu_pipeline.py --out benchmarks/results/gpu-pipeline-DEVICE-DATE

Defaults are the issue's table: 512x512, 50 DDIM steps, guidance 7.5, batch 1, 4 and 16, our two loop modes
in mixed_float16 and mixed_bfloat16 against diffusers in float16 with SDPA attention, eager and with
`torch.compile` on the UNet. Both sides run SD 1.5-sized networks with random weights (time does not depend
on the values). Per configuration: the first call (compilation included) and the best of ``--repeats``
calls after it, from which seconds per image, images per second, milliseconds per step (the whole call over
the steps, so text encoding and decoding are spread over them), compile time (first call minus best), model
FLOP utilisation and peak device memory.

FLOPs are counted by PyTorch's `FlopCounterMode` on diffusers' modules of the same configs on the meta device
(two text-encoder passes, ``steps`` UNet calls on the doubled batch, one decoder pass): the same math as ours.
MFU divides them by the best time and the chip's dense 16-bit peak (``--peak-tflops``; known for the chips
in `PEAK_TFLOPS`). Peak memory: JAX's ``peak_bytes_in_use`` (monotonic over the process, so configurations
run in increasing batch order and each row is the peak so far) and PyTorch's ``max_memory_allocated`` (reset
per row). On a CPU both are absent.

Without a GPU the same script runs end to end at a tiny size, which is what the tests do:

    KERAS_BACKEND=jax python benchmarks/gpu_pipeline.py --tiny --size 64 --steps 2 --batches 1 2 \\
        --precisions float32 --torch-dtype float32 --repeats 1 --out /tmp/gpu-pipeline-smoke

Writes ``OUT.json``, ``OUT.md`` (the table, with the machine) and ``OUT.svg`` (images per second against
batch size, one line per configuration).
"""

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
# Compile time is part of the table: measure it, not a read of an earlier run's programs.
os.environ.setdefault("KERASDIFFUSION_NO_COMPILE_CACHE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import kerasdiffusion as kd  # noqa: E402,I001  (first: see kerasdiffusion/load_order.py)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from kerasdiffusion import config as C  # noqa: E402
from random_model import random_components  # noqa: E402
from tests import reference as R  # noqa: E402
from tests.test_full_size import SD15_TEXT, SD15_UNET, SD15_VAE  # noqa: E402

# Dense float16 / bfloat16 peak TFLOP/s, as the vendors state them (SXM parts).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}
PROMPT = "a photograph of an astronaut riding a horse"
GUIDANCE = 7.5


@dataclasses.dataclass(frozen=True)
class Networks:
    """One architecture, in diffusers' configs (the peer, and FLOP counting) and ours."""

    unet: dict
    vae: dict
    text_encoder: dict
    ours: dict  # keyword arguments of random_components


SD15 = Networks(SD15_UNET, SD15_VAE, SD15_TEXT, {})
TINY = Networks(R.TINY_UNET, R.PIPELINE_VAE, R.TINY_TEXT_ENCODER, dict(
    text_encoder=dataclasses.replace(C.SD1_TEXT_ENCODER, width=64, num_layers=2, num_heads=1, mlp_dim=96),
    unet=dataclasses.replace(C.SD1_UNET, block_channels=(32, 64), attention_levels=(True, False), context_dim=64),
    vae=dataclasses.replace(C.SD_VAE, block_channels=(32, 32, 32, 32), layers_per_level=1),
))


@dataclasses.dataclass
class Row:
    name: str  # "ours compiled mixed_bfloat16", "diffusers torch.compile float16", ...
    batch: int
    first_s: float
    best_s: float
    steps: int
    flops: float
    peak_tflops: float | None
    peak_memory_gib: float | None

    def summary(self):
        per_image = self.best_s / self.batch
        mfu = self.flops / self.best_s / (self.peak_tflops * 1e12) if self.peak_tflops else None
        return dict(dataclasses.asdict(self), seconds_per_image=per_image, images_per_second=1 / per_image,
                    ms_per_step=1000 * self.best_s / self.steps, compile_s=self.first_s - self.best_s, mfu=mfu)


def timed(call, repeats):
    """(first call's seconds, best of ``repeats`` further calls)."""
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return first, min(times)


def generation_flops(networks, batch, size, steps):
    """FLOPs of one guided generation of ``batch`` images, counted on diffusers' modules on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel

    latent = size // 8
    with torch.device("meta"):
        unet = UNet2DConditionModel(**networks.unet)
        decoder = AutoencoderKL(**networks.vae)
        text_encoder = CLIPTextModel(CLIPTextConfig(**networks.text_encoder))
        width = networks.text_encoder["hidden_size"]
        counts = {}
        with torch.no_grad():
            for name, run in [
                ("text", lambda: text_encoder(torch.zeros(2 * batch, 77, dtype=torch.long))),
                ("unet", lambda: unet(torch.zeros(2 * batch, 4, latent, latent), torch.zeros(2 * batch),
                                      torch.zeros(2 * batch, 77, width))),
                ("decode", lambda: decoder.decode(torch.zeros(batch, 4, latent, latent))),
            ]:
                with FlopCounterMode(display=False) as counter:
                    run()
                counts[name] = counter.get_total_flops()
    return counts["text"] + steps * counts["unet"] + counts["decode"]


def device_name():
    import jax

    device = jax.devices()[0]
    return getattr(device, "device_kind", str(device))


def peak_tflops(name, given):
    if given:
        return given
    return next((value for chip, value in PEAK_TFLOPS.items() if chip in name), None)


def jax_peak_memory_gib():
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


def time_ours(args, networks, peak, flops):
    rows = []
    for precision in args.precisions:
        components = random_components(precision, **networks.ours)
        for batch in args.batches:
            for loop in args.loops:
                sd = kd.StableDiffusion.from_components(components, img_width=args.size, img_height=args.size,
                                                        scheduler="ddim", loop=loop)
                first, best = timed(lambda: sd.text_to_image([PROMPT] * batch, num_steps=args.steps, seed=0,
                                                             unconditional_guidance_scale=GUIDANCE, verbose=False),
                                    args.repeats)
                rows.append(Row(f"ours {loop} {precision}", batch, first, best, args.steps, flops[batch], peak,
                                jax_peak_memory_gib()))
                print(rows[-1].summary(), flush=True)
    return rows


def diffusers_pipeline(networks, dtype, device):
    """diffusers' pipeline of the same architecture with random weights, DDIM, SDPA attention (its default)."""
    import tempfile

    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    tokenizer_dir = R.write_clip_tokenizer_files(tempfile.mkdtemp(prefix="gpu-pipeline-tokenizer-"))
    pipe = StableDiffusionPipeline(
        unet=R.make_unet(0, **networks.unet), vae=R.make_vae(1, **networks.vae),
        text_encoder=R.make_text_encoder(2, **networks.text_encoder),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77),
        scheduler=DDIMScheduler.from_config(R.SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def time_diffusers(args, networks, peak, flops):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.torch_dtype)
    rows = []
    for mode in args.peers:
        pipe = diffusers_pipeline(networks, dtype, device)
        if mode == "torch.compile":
            pipe.unet = torch.compile(pipe.unet)
        for batch in args.batches:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()

            def generate():
                pipe([PROMPT] * batch, num_inference_steps=args.steps, guidance_scale=GUIDANCE, height=args.size,
                     width=args.size, output_type="np", generator=torch.Generator(device).manual_seed(0))
                if device == "cuda":
                    torch.cuda.synchronize()

            first, best = timed(generate, args.repeats)
            memory = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
            rows.append(Row(f"diffusers {mode} {args.torch_dtype}", batch, first, best, args.steps, flops[batch],
                            peak, memory))
            print(rows[-1].summary(), flush=True)
        del pipe
    return rows


def markdown(results):
    lines = [f"Device: {results['device']}; jax {results['jax']}, keras {results['keras']}, torch {results['torch']}; "
             f"{results['size']}x{results['size']}, {results['steps']} DDIM steps, guidance {GUIDANCE}; CPU flags: "
             f"{results['cpu_flags']}", "",
             "| configuration | batch | s/image | images/s | ms/step | compile s | MFU | peak memory GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "-"
        memory = f"{row['peak_memory_gib']:.2f}" if row["peak_memory_gib"] is not None else "-"
        lines.append(f"| {row['name']} | {row['batch']} | {row['seconds_per_image']:.3f} | "
                     f"{row['images_per_second']:.2f} | {row['ms_per_step']:.1f} | {row['compile_s']:.1f} | {mfu} | "
                     f"{memory} |")
    return "\n".join(lines) + "\n"


def svg_chart(results, width=640, height=400, margin=60):
    """Images per second against batch size, a polyline per configuration (plain SVG: no plotting library)."""
    series = {}
    for row in results["rows"]:
        series.setdefault(row["name"], []).append((row["batch"], row["images_per_second"]))
    batches = sorted({row["batch"] for row in results["rows"]})
    top = max(row["images_per_second"] for row in results["rows"]) * 1.1

    def x(batch):
        return margin + (width - 2 * margin) * (batches.index(batch) / max(len(batches) - 1, 1))

    def y(value):
        return height - margin - (height - 2 * margin) * value / top

    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
             f'<text x="{width / 2}" y="20" text-anchor="middle">images per second, {results["size"]}x'
             f'{results["size"]}, {results["steps"]} steps: {results["device"]}</text>',
             f'<line x1="{margin}" y1="{height - margin}" x2="{width - margin}" y2="{height - margin}" stroke="black"/>',
             f'<line x1="{margin}" y1="{margin}" x2="{margin}" y2="{height - margin}" stroke="black"/>']
    for batch in batches:
        parts.append(f'<text x="{x(batch)}" y="{height - margin + 18}" text-anchor="middle">{batch}</text>')
    parts.append(f'<text x="{width / 2}" y="{height - 15}" text-anchor="middle">batch size</text>')
    for tick in np.linspace(0, top, 5):
        parts.append(f'<text x="{margin - 6}" y="{y(tick) + 4}" text-anchor="end">{tick:.2f}</text>')
    for i, (name, points) in enumerate(sorted(series.items())):
        colour = colours[i % len(colours)]
        path = " ".join(f"{x(b):.1f},{y(v):.1f}" for b, v in sorted(points))
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts.append(f'<text x="{width - margin + 4 - 180}" y="{margin + 14 * i}" fill="{colour}">{name}</text>')
    return "\n".join(parts + ["</svg>"]) + "\n"


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as file:
            flags = next(line for line in file if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return platform.processor()
    return " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="path prefix of the .json, .md and .svg written")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--precisions", nargs="+", default=["mixed_float16", "mixed_bfloat16"], choices=C.PRECISIONS)
    parser.add_argument("--loops", nargs="+", default=["steps", "compiled"], choices=["steps", "compiled"])
    parser.add_argument("--peers", nargs="*", default=["eager", "torch.compile"], choices=["eager", "torch.compile"])
    parser.add_argument("--torch-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, help="the chip's dense 16-bit peak, if not in PEAK_TFLOPS")
    parser.add_argument("--tiny", action="store_true", help="tiny networks (a smoke run on any machine)")
    args = parser.parse_args(argv)
    args.batches = sorted(args.batches)
    return args


def main(argv=None):
    args = parse_args(argv)
    if keras.backend.backend() != "jax":
        sys.exit("run with KERAS_BACKEND=jax: the GPU machines carry jax and torch, not TensorFlow")
    networks = TINY if args.tiny else SD15
    name = device_name()
    peak = peak_tflops(name, args.peak_tflops)
    flops = {batch: generation_flops(networks, batch, args.size, args.steps) for batch in args.batches}
    rows = time_ours(args, networks, peak, flops) + time_diffusers(args, networks, peak, flops)
    import jax

    results = dict(device=name, jax=jax.__version__, keras=keras.__version__, torch=torch.__version__,
                   size=args.size, steps=args.steps, tiny=args.tiny, cpu_flags=cpu_flags(),
                   rows=[row.summary() for row in rows])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as file:
        json.dump(results, file, indent=2)
    with open(args.out + ".md", "w") as file:
        file.write(markdown(results))
    with open(args.out + ".svg", "w") as file:
        file.write(svg_chart(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
