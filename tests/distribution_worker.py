"""Run by test_distribution.py in a fresh process, because logical devices must exist before the backend starts.

``python -m tests.distribution_worker FOLDER`` (``KERAS_BACKEND`` picks the backend) splits the CPU into two
devices, generates with and without a distribution from the diffusers folder FOLDER, and prints one JSON
line: for each case, the largest pixel difference from the one-device run with the same seeds, and how the
networks' variables are placed.
"""

import json
import os
import sys

import numpy as np

STEPS = 2
SIZE = 64
SEED = 5
# MirroredStrategy's cases: each loop at a batch size two replicas split evenly (2, the steps loop) or not
# (1: a replica with padding only; 3: padding, the compiled loop), each a few programs to build.
MIRRORED = {"steps": (2,), "compiled": (1, 3)}
PROMPTS = ["a photograph of an astronaut riding a horse", "a cat", "a red door"]


def split_cpu_in_two():
    """Two logical CPU devices, before anything starts the backend."""
    if os.environ.get("KERAS_BACKEND") == "jax":
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
        return
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)


def generate(sd, loop, batch_size):
    sd.loop = loop
    return sd.text_to_image(PROMPTS[:batch_size], num_steps=STEPS, seed=SEED, verbose=False)


def largest_difference(a, b):
    return int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max())


def compare(single, distributed, cases):
    """``{"loop/batch": largest difference}`` of ``distributed`` against ``single`` for ``cases``, ``{loop:
    batch sizes}``. Each image depends only on its prompt and its key ``(seed, index)``, so the one-device run
    makes the largest batch once."""
    differences = {}
    for loop, batch_sizes in cases.items():
        expected = generate(single, loop, max(batch_sizes))
        for batch_size in batch_sizes:
            ours = generate(distributed, loop, batch_size)
            differences[f"{loop}/{batch_size}"] = largest_difference(ours, expected[:batch_size])
    return differences


def placement(sd):
    """The kinds of the UNet's variable values (mirrored, or sharded over which devices)."""
    import keras

    value = sd.diffusion_model.weights[0].value
    if keras.backend.backend() == "jax":
        return f"{len(value.sharding.device_set)} devices, replicated={value.sharding.is_fully_replicated}"
    return f"{type(value).__name__} on {value.device.split('device:')[-1]}"


def main(folder):
    split_cpu_in_two()
    import keras

    from kerasdiffusion import StableDiffusion

    jax = keras.backend.backend() == "jax"
    keywords = dict(img_width=SIZE, img_height=SIZE, precision="float32", scheduler="euler_ancestral", cache=False,
                    progress=False)
    # XLA on TensorFlow cannot run replicas on two CPU devices (the pipeline says so); JAX compiles anyway.
    single = StableDiffusion.from_pretrained(folder, jit_compile=jax, **keywords)
    report = {"devices": keras.distribution.list_devices()}
    if jax:
        data_parallel = keras.distribution.DataParallel(devices=keras.distribution.list_devices())
        sharded = StableDiffusion.from_components(single.components, img_width=SIZE, img_height=SIZE,
                                                  jit_compile=True, scheduler="euler_ancestral",
                                                  distribution=data_parallel)
        # 3 does not divide between the two devices: padding, sharding and gathering all happen.
        report["data_parallel"] = compare(single, sharded, {"compiled": (3,)})
        report["data_parallel_placement"] = placement(sharded)
    else:
        import tensorflow as tf

        mirrored = StableDiffusion.from_components(single.components, img_width=SIZE, img_height=SIZE,
                                                   jit_compile=False, scheduler="euler_ancestral",
                                                   distribution=tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
        report["mirrored"] = compare(single, mirrored, MIRRORED)
        report["mirrored_placement"] = placement(mirrored)
        try:
            StableDiffusion(jit_compile=True, distribution=tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
            report["xla_on_two_cpus"] = "accepted"
        except ValueError as error:
            report["xla_on_two_cpus"] = str(error)
        # Networks loaded under the strategy's scope (from_pretrained), rather than copied into it.
        one_device = StableDiffusion.from_pretrained(folder, jit_compile=False,
                                                     distribution=tf.distribute.OneDeviceStrategy("/cpu:1"), **keywords)
        report["one_device"] = compare(single, one_device, {"compiled": (3,)})
        report["one_device_placement"] = placement(one_device)
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
