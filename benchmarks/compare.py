"""kerasdiffusion, KerasCV and diffusers side by side: the same work, on the same machine, in the same run.

    python benchmarks/compare.py --size 512 --steps 10 --repeats 3
    python benchmarks/compare.py --size 256 --steps 2 --repeats 1          # smoke test, a few minutes

Every peer and configuration runs in its own process, one after the other, with the full Stable
Diffusion 1.5 sizes and random weights (see peers.py). Each timed call runs once to compile or warm up
(reported as "first call") and then `--repeats` times; we report the min and the median of those, the
process's peak RSS (and peak GPU memory on GPU), and every time's ratio to the fastest configuration of
that component. Results go to benchmarks/results/<name>.json and .md with the machine, the versions and
the command line.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

COMPONENTS = ("text_encoder", "step", "step_own_loop", "vae_decode", "end_to_end")
TITLES = {
    "text_encoder": "text encoder, 1 prompt",
    "step": "denoising step (CFG batch 2)",
    "step_own_loop": "step as its own loop runs it",
    "vae_decode": "VAE decode",
    "end_to_end": "end to end",
}


# Configurations.


def configurations(device):
    """(peer, precision, xla, attention) for each process, in running order.

    The first configuration of each peer is its default one (the one `--e2e default` runs end to end).
    `attention="whole"` is ours with `ScaledDotProductAttention.block_scores = 0`, the whole-matrix
    attention it had before the blocked one: the before/after of that change, in the same run.
    """
    if device == "gpu":
        ours = [("mixed_float16", True), ("mixed_bfloat16", True), ("mixed_float16", False), ("float32", True)]
        peers = [("kerascv", "mixed_float16", True), ("kerascv", "mixed_float16", False),
                 ("diffusers", "float16", False)]
        return [("ours", p, x, "blocked") for p, x in ours] + [(*c, None) for c in peers]
    ours = [("float32", True, "blocked"), ("float32", True, "whole"), ("float32", False, "blocked"),
            ("mixed_bfloat16", True, "blocked"), ("mixed_bfloat16", False, "blocked")]
    peers = [("kerascv", "float32", True), ("kerascv", "float32", False), ("diffusers", "float32", False)]
    # The same pipeline on Keras' JAX backend (its own worker process, KERAS_BACKEND=jax).
    return [("ours", *c) for c in ours] + [("ours-jax", "float32", True, "blocked")] + [(*c, None) for c in peers]


def label(peer, precision, xla, attention):
    if peer == "diffusers":
        return f"diffusers {precision} eager+SDPA"
    name = {"ours": "kerasdiffusion", "ours-jax": "kerasdiffusion on JAX", "kerascv": "KerasCV"}[peer]
    text = f"{name} {precision} {'XLA' if xla else 'graph'}"
    return text + (", whole-matrix attention (before)" if attention == "whole" else "")


def detect_gpu():
    """NVIDIA GPU present? Asked of nvidia-smi, so that the parent process imports no framework."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# The worker: one peer and configuration, in its own process.


def timed(fn, repeats, warm_up=True):
    """First call (compile / warm-up) timed apart, then `repeats` timed calls.

    Without `warm_up` (end to end, which runs after every component has compiled its programs), the
    first of the `repeats` calls is also reported as the first call.
    """
    times, first = [], None
    if warm_up:
        start = time.perf_counter()
        fn()
        first = time.perf_counter() - start
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    first = times[0] if first is None else first
    return {"first_s": first, "times_s": times, "min_s": min(times), "median_s": statistics.median(times)}


def worker(spec):
    from peers import PEERS

    result = dict(spec, load_before=os.getloadavg())
    start = time.perf_counter()
    options = {"attention": spec["attention"]} if spec["peer"] in ("ours", "ours-jax") else {}
    peer = PEERS[spec["peer"]](spec["size"], spec["steps"], spec["precision"], spec["xla"], spec["device"], **options)
    result["build_s"] = time.perf_counter() - start
    components = {}
    names = [c for c in spec["components"] if hasattr(peer, c) and (c != "end_to_end" or spec["end_to_end"])]
    for name in names:
        print(f"[{spec['label']}] {name} ...", file=sys.stderr, flush=True)
        repeats = spec["repeats"] if name != "text_encoder" else max(spec["repeats"], 5)
        if name == "end_to_end":
            repeats = spec["e2e_repeats"]
        components[name] = timed(getattr(peer, name), repeats, warm_up=name != "end_to_end")
        print(f"[{spec['label']}] {name}: first {components[name]['first_s']:.2f} s, "
              f"min {components[name]['min_s']:.2f} s", file=sys.stderr, flush=True)
    result["components"] = components
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if spec.get("count_flops"):  # after the timings, so that tracing does not disturb them
        from flops import unet_flops

        result["unet_flops"] = sum(unet_flops(spec["size"], batch=2).values())
    result["gpu_peak_mb"] = peer.gpu_peak_mb()
    result["notes"] = peer.notes() if hasattr(peer, "notes") else {}
    result["load_after"] = os.getloadavg()
    result["threads"] = _threads(spec["peer"])
    return result


def _threads(peer):
    if peer == "diffusers":
        import torch

        return {"torch_num_threads": torch.get_num_threads()}
    if peer == "ours-jax":
        return {}
    import tensorflow as tf

    return {"tf_intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "tf_inter_op": tf.config.threading.get_inter_op_parallelism_threads()}


def run_worker_process(spec, timeout):
    """Runs one configuration in a fresh Python; its result comes back through a JSON file."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "result.json")
        command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec), "--worker-out", path]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                   KERAS_BACKEND="jax" if spec["peer"] == "ours-jax" else "tensorflow")
        start = time.perf_counter()
        try:
            process = subprocess.run(command, env=env, timeout=timeout, stdout=subprocess.DEVNULL)
            error = None if process.returncode == 0 else f"exit status {process.returncode}"
        except subprocess.TimeoutExpired:
            error = f"timed out after {timeout} s"
        if error is None and os.path.exists(path):
            with open(path) as f:
                result = json.load(f)
        else:
            result = dict(spec, error=error or "no result written")
        result["process_s"] = time.perf_counter() - start
        return result


def merge_rounds(results):
    """One configuration's results over several rounds: all timed runs pooled, the first calls kept apart."""
    good = [r for r in results if "error" not in r]
    if not good:
        return results[0]
    merged = dict(good[0], rounds=len(results), failed_rounds=len(results) - len(good))
    merged["components"] = {}
    for name in good[0]["components"]:
        timings = [r["components"][name] for r in good if name in r["components"]]
        times = [t for timing in timings for t in timing["times_s"]]
        merged["components"][name] = {
            "first_s": statistics.median(t["first_s"] for t in timings), "firsts_s": [t["first_s"] for t in timings],
            "times_s": times, "min_s": min(times), "median_s": statistics.median(times)}
    merged["peak_rss_mb"] = max(r["peak_rss_mb"] for r in good)
    merged["load_before"] = good[0]["load_before"]
    merged["load_after"] = good[-1]["load_after"]
    merged["unet_flops"] = next((r["unet_flops"] for r in good if "unet_flops" in r), None)
    if merged["unet_flops"] is None:
        merged.pop("unet_flops")
    return merged


# Machine, versions, report.


def machine_info(gpu):
    info = {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count(), "gpu": gpu}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        info["cpu_model"] = fields.get("Model name", "").strip()
        info["cpu_flags_avx512"] = "avx512f" in fields.get("Flags", "")
        # The vector extensions behind a step's speed: AVX2 and AVX-512 machines differ by 3x on it.
        wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
        info["cpu_flags"] = " ".join(flag for flag in wanted if flag in fields.get("Flags", "").split())
        info["hypervisor"] = fields.get("Hypervisor vendor", "").strip() or None
    except OSError:
        info["cpu_model"] = platform.processor()
    with open("/proc/meminfo") as f:
        info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    return info


def versions():
    from importlib import metadata

    found = {}
    for name in ("tensorflow", "keras", "keras-cv", "torch", "diffusers", "transformers", "numpy"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_state():
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty_files": git("status", "--porcelain").splitlines()}


def fastest(runs):
    """The fastest configuration's min time per component (the step also against KerasCV's own loop)."""
    best = {}
    for run in runs:
        for name, timing in run.get("components", {}).items():
            key = "step" if name == "step_own_loop" else name
            if key not in best or timing["min_s"] < best[key][1]:
                best[key] = (run["label"], timing["min_s"])
    return best


def target(runs):
    """Our fastest step over the fastest other peer's step (either step form): the number the issue asks for."""
    ours = [r for r in runs if r["peer"] == "ours" and "step" in r.get("components", {})]
    others = [(r["label"], t["min_s"]) for r in runs if r["peer"] != "ours"
              for n, t in r.get("components", {}).items() if n in ("step", "step_own_loop")]
    if not ours or not others:
        return None
    mine = min(ours, key=lambda r: r["components"]["step"]["min_s"])
    peer_label, peer_time = min(others, key=lambda item: item[1])
    step = mine["components"]["step"]
    return {"ours": mine["label"], "ours_min_s": step["min_s"], "ours_median_s": step["median_s"],
            "peer": peer_label, "peer_min_s": peer_time, "ratio": step["min_s"] / peer_time}


def before_after(runs):
    """Blocked against whole-matrix attention: our runs that differ only in that, component by component."""
    found = []
    for before in (r for r in runs if r.get("attention") == "whole" and "components" in r):
        for after in runs:
            same = all(after.get(key) == before[key] for key in ("peer", "precision", "xla"))
            if same and after.get("attention") == "blocked" and "components" in after:
                ratios = {name: after["components"][name]["min_s"] / timing["min_s"]
                          for name, timing in before["components"].items() if name in after["components"]}
                found.append({"before": before["label"], "after": after["label"], "ratio_after_to_before": ratios})
    return found


def _cell(run, name, best):
    timing = run.get("components", {}).get(name)
    if timing is None:
        return "—"
    ratio = timing["min_s"] / best["step" if name == "step_own_loop" else name][1]
    return f"{timing['min_s']:.2f} / {timing['median_s']:.2f} (×{ratio:.2f})"


def markdown(report):
    s = report["settings"]
    m = report["machine"]
    best = {k: tuple(v) for k, v in report["fastest"].items()}
    shown = [c for c in COMPONENTS if any(c in r.get("components", {}) for r in report["runs"])]
    lines = [
        f"# Side-by-side timings, {report['date']}",
        "",
        f"Machine: {m.get('cpu_model')} (flags: {m.get('cpu_flags') or 'unknown'}), {m['cores']} cores, "
        f"{m['memory_gib']} GiB"
        + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU") + f"; {m['platform']}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
        f"Command: `{report['command']}` (git {report['git']['commit'][:10]}"
        + (", with uncommitted changes" if report["git"]["dirty_files"] else "") + ").",
        "",
        f"Full SD 1.5 sizes, random weights, {s['size']}x{s['size']} images ({s['size'] // 8}x{s['size'] // 8} latents), "
        f"DDIM, guidance 7.5; end to end = prompt to uint8 image with {s['steps']} steps. "
        + (f"{s['rounds']} rounds: every configuration ran {s['rounds']} times, one after the other in turn, and "
           "its timed runs are pooled; first calls are the median over rounds. " if s.get("rounds", 1) > 1 else "")
        + f"Seconds: min / median of {s['repeats']} runs{' per round' if s.get('rounds', 1) > 1 else ''} after a warm-up "
        f"call (text encoder: {max(s['repeats'], 5)} runs; "
        f"end to end: {s['e2e_repeats']} run(s) after all the components had compiled, no extra warm-up), and "
        "(×ratio) of the min to the fastest configuration of that component. The step is also compared with "
        "KerasCV's own loop step. Each configuration ran in its own process, one after the other.",
        "",
        "| configuration | " + " | ".join(TITLES[c] for c in shown) + " | step GFLOP/s | first step call (compile) "
        "| peak RSS |" + (" peak GPU memory |" if m.get("gpu") else ""),
        "|---" * (len(shown) + 4 + bool(m.get("gpu"))) + "|",
    ]
    flops = report.get("unet_flops")
    for run in report["runs"]:
        if "error" in run:
            lines.append(f"| {run['label']} | failed: {run['error']} |")
            continue
        first = run["components"].get("step", {}).get("first_s")
        row = [run["label"]] + [_cell(run, c, best) for c in shown]
        step = run["components"].get("step")
        row.append(f"{flops / step['min_s'] / 1e9:.0f}" if flops and step else "—")
        row += [f"{first:.1f} s" if first is not None else "—", f"{run['peak_rss_mb'] / 1024:.1f} GiB"]
        if m.get("gpu"):
            row.append(f"{run['gpu_peak_mb'] / 1024:.1f} GiB" if run.get("gpu_peak_mb") else "—")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "First calls (compile or warm-up, seconds):", "",
              "| configuration | build | " + " | ".join(TITLES[c] for c in shown) + " | load average before → after |",
              "|---" * (len(shown) + 3) + "|"]
    for run in report["runs"]:
        if "error" in run:
            continue
        firsts = [f"{run['components'][c]['first_s']:.1f}" if c in run["components"] else "—" for c in shown]
        load = f"{run['load_before'][0]:.1f} → {run['load_after'][0]:.1f}"
        lines.append(f"| {run['label']} | {run['build_s']:.1f} | " + " | ".join(firsts) + f" | {load} |")
    if flops:
        lines += ["", f"One UNet call on the CFG batch of 2 is {flops / 1e12:.2f} TFLOP (2 x the multiply-adds of its "
                      "convolutions and matrix products, counted from our traced graph, benchmarks/flops.py); "
                      "step GFLOP/s is that over the step's min time (the guidance and update add a negligible amount)."]
    for pair in report.get("before_after", []):
        ratios = ", ".join(f"{TITLES[n]} ×{r:.2f}" for n, r in pair["ratio_after_to_before"].items())
        lines += ["", f"Blocked attention against the whole-matrix one ({pair['after']} over {pair['before']}, "
                      f"min over min): {ratios}."]
    t = report.get("target")
    if t:
        lines += ["", f"Denoising step: {t['ours']} {t['ours_min_s']:.2f} s (min) against the fastest other peer, "
                      f"{t['peer']}, {t['peer_min_s']:.2f} s: ratio **{t['ratio']:.2f}** (target ≤ 0.80)."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512, help="image height and width (a multiple of 128)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps of the end-to-end runs")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per component after the warm-up")
    parser.add_argument("--e2e-repeats", type=int, default=1, help="timed end-to-end runs after the warm-ups")
    parser.add_argument("--e2e", choices=("all", "default", "none"), default="all",
                        help="which configurations run end to end: all, each peer's default (first) one, none")
    parser.add_argument("--only", default=None,
                        help="comma-separated substrings; run only configurations whose label contains one")
    parser.add_argument("--components", default=",".join(COMPONENTS),
                        help=f"comma-separated subset of {', '.join(COMPONENTS)}")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the whole sequence of configurations this many times and pool the timings, so "
                             "that a burst of other load on a shared machine does not decide a comparison")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds allowed per configuration")
    parser.add_argument("--name", default=None, help="results file name, without extension")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = worker(json.loads(args.worker))
        with open(args.worker_out, "w") as f:
            json.dump(result, f)
        return

    gpu = detect_gpu()
    device = "gpu" if gpu else "cpu"
    date = datetime.date.today().isoformat()
    name = args.name or (f"{device}-{date}" if args.size == 512 else f"{device}-{date}-{args.size}px")
    specs, seen = [], set()
    for peer, precision, xla, attention in configurations(device):
        spec = dict(peer=peer, precision=precision, xla=xla, attention=attention,
                    label=label(peer, precision, xla, attention), size=args.size,
                    steps=args.steps, repeats=args.repeats, e2e_repeats=args.e2e_repeats, device=device,
                    components=args.components.split(","))
        if args.only and not any(s in spec["label"] for s in args.only.split(",")):
            continue
        spec["end_to_end"] = args.e2e == "all" or (args.e2e == "default" and peer not in seen)
        spec["count_flops"] = peer == "ours" and peer not in seen
        seen.add(peer)
        specs.append(spec)
    rounds = {spec["label"]: [] for spec in specs}
    for round_index in range(args.rounds):
        for spec in specs:
            print(f"== {spec['label']}" + (f" (round {round_index + 1})" if args.rounds > 1 else ""), flush=True)
            rounds[spec["label"]].append(run_worker_process(dict(spec, count_flops=spec["count_flops"]
                                                                 and round_index == 0), args.timeout))
            if "error" in rounds[spec["label"]][-1]:
                print(f"   failed: {rounds[spec['label']][-1]['error']}", flush=True)
    runs = [merge_rounds(results) for results in rounds.values()]
    report = {
        "date": date, "command": "python " + shlex.join([os.path.relpath(os.path.abspath(sys.argv[0]), ROOT), *sys.argv[1:]]),
        "machine": machine_info(gpu), "versions": versions(), "git": git_state(),
        "settings": {"size": args.size, "steps": args.steps, "repeats": args.repeats, "e2e_repeats": args.e2e_repeats,
                     "rounds": args.rounds,
                     "e2e": args.e2e, "device": device, "components": args.components.split(",")},
        "runs": runs,
    }
    report["fastest"] = fastest(runs)
    report["unet_flops"] = next((r["unet_flops"] for r in runs if "unet_flops" in r), None)
    report["target"] = target(runs)
    report["before_after"] = before_after(runs)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    base = os.path.join(HERE, "results", name)
    with open(base + ".json", "w") as f:
        json.dump(report, f, indent=1)
    table = markdown(report)
    with open(base + ".md", "w") as f:
        f.write(table)
    print(table)
    print(f"wrote {base}.json and {base}.md")


if __name__ == "__main__":
    main()
