"""Run by test_training.py in a fresh process (logical devices must exist before TensorFlow starts).

``python -m tests.training_distribution_worker FOLDER`` splits the CPU into two devices and makes one LoRA SGD
step on a batch of two from the diffusers folder FOLDER: on one device, and under a `MirroredStrategy` over
both (one item per replica) from the same starting factors. Prints one JSON line: how far the mirrored step
is from the one-device step, relative to the step's size, the two losses, and the kind of the mirrored
run's factor variables.
"""

import contextlib
import json
import sys

import keras
import numpy as np

from tests.distribution_worker import split_cpu_in_two

LR, RANK = 0.05, 4
CAPTIONS = ["a red cube on a table", "a watercolor fox"]


def factor_variables(trainer):
    return [v for _, _, update in trainer._adaptation.lora_kernels for v in (update.down, update.up)]


def flat(variables):
    return np.concatenate([np.asarray(keras.ops.convert_to_numpy(v)).ravel() for v in variables])


def lora_trainer(folder, strategy=None):
    from kerasdiffusion import load_components
    from kerasdiffusion.training import Trainer

    with strategy.scope() if strategy else contextlib.nullcontext():
        parts = load_components(folder, precision="float32", cache=False, progress=False)
        trainer = Trainer(parts, method="lora", rank=RANK)
        trainer.compile(optimizer=keras.optimizers.SGD(LR), jit_compile=False)
    return trainer, parts.tokenizer


def one_step(trainer, tokenizer):
    import tensorflow as tf

    rng = np.random.default_rng(3)
    batch = dict(latents=rng.standard_normal((2, 8, 8, 4)).astype("float32"), timesteps=np.array([17, 912], "int32"),
                 noise=rng.standard_normal((2, 8, 8, 4)).astype("float32"), token_ids=np.asarray(tokenizer(CAPTIONS)))
    history = trainer.fit(tf.data.Dataset.from_tensor_slices(batch).batch(2), epochs=1, verbose=0)
    return float(history.history["loss"][0])


def main(folder):
    split_cpu_in_two()
    import tensorflow as tf

    single, tokenizer = lora_trainer(folder)
    start = [np.array(keras.ops.convert_to_numpy(v)) for v in factor_variables(single)]
    single_loss = one_step(single, tokenizer)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    mirrored, _ = lora_trainer(folder, strategy)
    for variable, value in zip(factor_variables(mirrored), start):
        variable.assign(value)
    mirrored_loss = one_step(mirrored, tokenizer)
    begin, expected, ours = flat(start), flat(factor_variables(single)), flat(factor_variables(mirrored))
    print(json.dumps({
        "step_size": float(np.linalg.norm(expected - begin)),
        "step_relative_difference": float(np.linalg.norm(ours - expected) / np.linalg.norm(expected - begin)),
        "losses": [single_loss, mirrored_loss],
        "replicas": strategy.num_replicas_in_sync,
        "variable_kind": type(factor_variables(mirrored)[0].value).__name__,
    }))


if __name__ == "__main__":
    main(sys.argv[1])
