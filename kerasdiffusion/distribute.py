"""Generation on several devices: after `backend`, the second and last place that names TensorFlow or JAX.

A pipeline made with ``distribution=`` runs each of its programs (the text encoder, the denoising loop in
either loop mode, the image encoder and the decoder) over the global batch split across the replicas:

- TensorFlow: a `tf.distribute.Strategy` (`OneDeviceStrategy`, `MirroredStrategy`, `TPUStrategy`,
  `MultiWorkerMirroredStrategy`). The networks' variables are created under ``strategy.scope()`` (mirrored
  on every replica); a program is ``strategy.run`` of the compiled function on each replica's slice of the
  batch, and ``strategy.gather`` puts the slices back together, on every worker.
- JAX: a `keras.distribution.DataParallel`. The networks' variables are created under its scope (so
  replicated on every device of its mesh); the batch is sharded over the mesh's batch axis
  (`keras.distribution.distribute_tensor`) and the one jitted program runs on all devices at once.

The global batch is padded to a multiple of the number of replicas (with copies of its last item) and the
padding dropped from every output. Every random number is drawn on the host from each image's seed and
index (`kerasdiffusion.seeds`), so the images do not depend on the split.

Example:

>>> import kerasdiffusion as kd
>>> sd = kd.StableDiffusion(source="kerasdiffusion/shapes", distribution=local_distribution())  # every device here
>>> sd.text_to_image("a red circle on a blue background", batch_size=3, num_steps=2, seed=1).shape
(3, 64, 64, 3)

Or a strategy of your own (TensorFlow), e.g. over the GPUs of this machine:

>>> import tensorflow as tf                                                                # doctest: +SKIP
>>> sd = kd.StableDiffusion(distribution=tf.distribute.MirroredStrategy())                 # doctest: +SKIP
>>> sd.text_to_image("a lighthouse at dusk", batch_size=8, seed=1).shape                   # doctest: +SKIP
(8, 512, 512, 3)
"""

import contextlib

import keras
from keras import ops

from kerasdiffusion import backend

ACCEPTED = {
    "tensorflow": "a tf.distribute.Strategy (OneDeviceStrategy, MirroredStrategy, TPUStrategy, "
                  "MultiWorkerMirroredStrategy)",
    "jax": "a keras.distribution.DataParallel",
}


def check_distribution(distribution, jit_compile=True):
    """``distribution`` if the current backend can run it: `None` (one device), or `ACCEPTED`'s kind.

    Raises:
        TypeError: another kind of object (a JAX distribution on TensorFlow, a strategy on JAX, ...).
        ValueError: TensorFlow's XLA with several replicas on CPU devices, which it cannot run (XLA places
            every CPU program on the first CPU device, away from the other replicas' variables).
    """
    if distribution is None:
        return None
    kind = backend.name()
    if not _is_accepted(distribution, kind):
        raise TypeError(f"distribution= on Keras' {kind} backend takes {ACCEPTED[kind]}, or None for one "
                        f"device; got {type(distribution).__module__}.{type(distribution).__name__}")
    if kind == "tensorflow" and jit_compile and replica_count(distribution) > 1 and _has_cpu_replicas(distribution):
        raise ValueError("jit_compile=True cannot run a tf.distribute strategy's replicas on several CPU devices "
                         "(TensorFlow's XLA places every CPU program on the first one): pass jit_compile=False, or "
                         "one CPU device")
    return distribution


def _is_accepted(distribution, kind):
    if kind == "tensorflow":
        import tensorflow as tf

        return isinstance(distribution, tf.distribute.Strategy)
    return isinstance(distribution, keras.distribution.DataParallel)


def _has_cpu_replicas(strategy):
    return any("CPU" in device.upper() for device in strategy.extended.worker_devices)


def replica_count(distribution):
    """How many slices the global batch is cut into: 1 for `None`."""
    if distribution is None:
        return 1
    if backend.name() == "tensorflow":
        return distribution.num_replicas_in_sync
    return int(distribution.device_mesh.devices.size)


def per_replica_mean(loss):
    """A loss averaged over one replica's slice of the batch, scaled so that the replicas' gradients, which
    a `tf.distribute` strategy sums, add up to the gradient of the mean over the global batch (Keras' own
    losses scale the same way). On JAX, and outside a strategy, the loss is already the global mean."""
    if backend.name() != "tensorflow":
        return loss
    import tensorflow as tf

    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return loss if replicas == 1 else loss / replicas


def scope(distribution):
    """The context in which networks are built so that their variables live as ``distribution`` wants."""
    return contextlib.nullcontext() if distribution is None else distribution.scope()


def placed(model, distribution):
    """``model`` if its variables already live as ``distribution`` wants, else a copy built under its scope
    (same layers, names and weights)."""
    if distribution is None or all(_is_placed(variable, distribution) for variable in model.weights):
        return model
    with scope(distribution):
        copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def _is_placed(variable, distribution):
    if backend.name() == "tensorflow":
        return distribution.extended.variable_created_in_scope(variable.value)
    wanted = set(distribution.device_mesh.devices.flatten())
    sharding = variable.value.sharding
    return set(sharding.device_set) == wanted and sharding.is_fully_replicated


def compile_function(function, variables, jit_compile=True, distribution=None):
    """`backend.compile_function`, run over the replicas of ``distribution`` (`None`: one device).

    Every argument and result of ``function`` is a tensor, or a nested tuple of tensors and `None`s, whose
    batch axis is the first; scalars (the step index, the guidance scale, a step counter) are the same on
    every replica. The compiled function takes and returns the global batch, of any size.
    """
    if distribution is None:
        return backend.compile_function(function, variables, jit_compile)
    if backend.name() == "tensorflow":
        run = _tensorflow_replicated(function, distribution, jit_compile)
    else:
        run = _jax_sharded(backend.compile_function(function, variables, jit_compile), distribution)
    replicas = replica_count(distribution)

    def call(*args):
        size = _batch_size(args)
        if size % replicas == 0:  # no padding to take off again
            return run(*args)
        outputs = run(*keras.tree.map_structure(lambda x: _pad(x, replicas), args))
        return keras.tree.map_structure(lambda x: x if _is_scalar(x) else x[:size], outputs)

    return call


def _is_scalar(x):
    return x is None or len(x.shape) == 0


def _batch_size(args):
    sizes = {x.shape[0] for x in keras.tree.flatten(args) if not _is_scalar(x)}
    if len(sizes) != 1:
        raise ValueError(f"The arguments of a replicated program must share one batch size, got {sorted(sizes)}")
    return sizes.pop()


def _pad(x, replicas):
    """``x`` with copies of its last item appended until its batch divides among ``replicas``."""
    if _is_scalar(x):
        return x
    missing = -x.shape[0] % replicas
    if missing == 0:
        return x
    return ops.concatenate([x, ops.repeat(x[-1:], missing, axis=0)], axis=0)


def _tensorflow_replicated(function, strategy, jit_compile):
    """``function`` on each replica's slice of the (padded) batch; the results gathered on every worker."""
    import tensorflow as tf

    replica_function = tf.function(function, jit_compile=jit_compile)

    def gathered(x):
        if x is None:
            return None
        first = strategy.experimental_local_results(x)[0]
        return first if first.shape.rank == 0 else strategy.gather(x, axis=0)

    @tf.function
    def run(args):
        return tf.nest.map_structure(gathered, strategy.run(replica_function, args=args))

    def sliced(x):
        if _is_scalar(x):
            return x

        def replica_slice(context):
            share = x.shape[0] // context.num_replicas_in_sync
            return x[context.replica_id_in_sync_group * share:][:share]

        return strategy.experimental_distribute_values_from_function(replica_slice)

    def call(*args):
        if strategy.num_replicas_in_sync == 1:  # the one replica's slice is the whole batch
            return run(args)
        return run(tf.nest.map_structure(sliced, args))

    return call


def _jax_sharded(compiled, distribution):
    """``compiled`` on the batch sharded over the mesh's batch axis; scalars replicated."""

    def sharded(x):
        if _is_scalar(x):
            return x
        return keras.distribution.distribute_tensor(x, distribution.get_data_layout(x.shape))

    def call(*args):
        return compiled(*keras.tree.map_structure(sharded, args))

    return call


def input_share(count, worker_index, worker_count, replicas=1):
    """The items ``0 .. count - 1`` that input pipeline ``worker_index`` of ``worker_count`` reads, in order.

    TensorFlow: a ``tf.data.Dataset.range(count)`` sharded by the worker's `tf.distribute.InputContext`, the
    context a strategy's ``distribute_datasets_from_function`` hands each worker (``replicas``: the worker's
    own, so the context counts every replica of the job). JAX: the same rule by process, every
    ``worker_count``-th item from ``worker_index``. Together the workers read each item exactly once.

    Example:

    >>> [input_share(5, index, 2) for index in range(2)]
    [[0, 2, 4], [1, 3]]
    """
    if not 0 <= worker_index < worker_count:
        raise ValueError(f"worker {worker_index} of {worker_count} does not exist")
    if backend.name() != "tensorflow":
        return list(range(worker_index, count, worker_count))
    import tensorflow as tf

    context = tf.distribute.InputContext(num_input_pipelines=worker_count, input_pipeline_id=worker_index,
                                         num_replicas_in_sync=worker_count * replicas)
    items = tf.data.Dataset.range(count).shard(context.num_input_pipelines, context.input_pipeline_id)
    return [int(item) for item in items.as_numpy_iterator()]


def local_distribution(count=None):
    """Data parallelism over the first ``count`` devices of this host (all of them: None); None for one device.

    A `tf.distribute.MirroredStrategy` over those devices on TensorFlow, a `keras.distribution.DataParallel`
    on JAX: what ``kerasdiffusion batch --devices N`` runs on.

    Example:

    >>> import kerasdiffusion as kd
    >>> local_distribution(1) is None  # one device: no distribution
    True
    >>> sd = kd.StableDiffusion(source="kerasdiffusion/shapes", distribution=local_distribution())
    """
    devices = keras.distribution.list_devices()
    if count is not None:
        if count > len(devices):
            raise ValueError(f"{count} devices asked for, but this host has {len(devices)}: {', '.join(devices)}")
        devices = devices[:count]
    if len(devices) == 1:
        return None
    if backend.name() == "tensorflow":
        import tensorflow as tf

        logical = tf.config.list_logical_devices(backend.device_type().upper())
        return tf.distribute.MirroredStrategy([device.name for device in logical[: len(devices)]])
    return keras.distribution.DataParallel(devices=devices)
