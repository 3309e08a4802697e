"""`Trainer`: a `keras.Model` whose training step is the Stable Diffusion objective, for four methods.

One step, for a batch of images and captions (`image_caption_dataset`):

1. latents: the VAE image encoder's posterior, sampled and times the scaling factor (or a batch's cached
   ``moments`` / ``latents``);
2. per item, a timestep uniform in ``[0, T)`` and gaussian noise (plus ``noise_offset`` per channel), drawn
   with `keras.random` from the trainer's `SeedGenerator`, so the step is one compiled program on any backend;
3. the noised latents under the checkpoint's training schedule, the UNet's prediction of ``ε`` or ``v`` given
   the captions' context, and the mean squared error (`objective`).

Keras' own ``train_step`` takes the gradients and applies the optimizer, so ``compile`` / ``fit``, mixed
precision (a `LossScaleOptimizer` for float16, added by ``compile``), ``jit_compile``, distribution and
callbacks work as for any model. What is trained:

- ``"full"``: the UNet (and the text encoder with ``train_text_encoder=True``); the weights change in place.
- ``"lora"``: `LowRankUpdate` factors of the targeted kernels; the step runs the networks with
  ``kernel + (alpha / rank) · down @ up`` in place of each targeted kernel, so the networks never change.
- ``"textual_inversion"``: the vectors of a new token (added to the tokenizer, initialised from an existing
  word); the step runs the text encoder with its embedding table's new rows taken from them.
- ``"dreambooth"``: as ``"full"``, on batches that mix instance and class images (`with_prior_preservation`);
  the class items' loss is weighted by ``prior_loss_weight`` (diffusers' prior preservation).

Frozen weights are not trainable, so the optimizer keeps no state for them.

Example (`kerasdiffusion.training` shows a whole ``compile`` / ``fit`` / ``save``):

>>> import kerasdiffusion as kd
>>> from kerasdiffusion import training
>>> parts = kd.load_components("kerasdiffusion/shapes")
>>> trainer = training.Trainer(parts, method="textual_inversion", token="my-shape", num_vectors=2)
>>> [(variable.path, tuple(variable.shape)) for variable in trainer.trainable_variables]  # the networks are frozen
[('trainer/token_vectors', (2, 64))]
>>> trainer = training.Trainer(parts, method="lora", rank=4)
>>> [variable.path for variable in trainer.trainable_variables][:2]  # per adapted kernel: down [in, r], up [r, out]
['unet_lora_down0_attn0_block0_self_q_kernel/down', 'unet_lora_down0_attn0_block0_self_q_kernel/up']
>>> len(training.Trainer(parts, method="full").trainable_variables) == len(parts.diffusion_model.weights)
True
"""

import contextlib
import dataclasses

import keras
import numpy as np
from keras import ops

from kerasdiffusion import adapters, distribute
from kerasdiffusion.components import Components
from kerasdiffusion.training import lora as lora_lib
from kerasdiffusion.training.objective import TrainingSchedule, per_item_loss, sample_posterior

METHODS = ("full", "lora", "textual_inversion", "dreambooth")
SAVE_FORMATS = {
    "lora": ("diffusers", "kohya"),
    "textual_inversion": ("a1111", "diffusers"),
    "full": ("diffusers", "single-file"),
    "dreambooth": ("diffusers", "single-file"),
}
_TABLE = "token_embedding/embeddings"


@dataclasses.dataclass
class _Adaptation:
    """Which network variables the step replaces, and by what (kept out of Keras' variable tracking)."""

    lora_kernels: list = dataclasses.field(default_factory=list)  # [(network, variable, LowRankUpdate)]
    table: object = None  # the text encoder's embedding table, for textual inversion
    base_rows: int = 0


def _components(sd):
    if isinstance(sd, Components):
        return sd
    if isinstance(getattr(sd, "components", None), Components):
        return sd.components
    raise TypeError(f"Trainer takes a StableDiffusion or a Components, got {type(sd).__name__}")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}")


class Trainer(keras.Model):
    """Fine-tunes a Stable Diffusion model with `fit`: full, LoRA, textual inversion or DreamBooth.

    Args:
        sd: a `StableDiffusion` or its `Components`. ``"full"`` and ``"dreambooth"`` change its networks'
            weights in place; the other methods leave them as they are.
        method: ``"full"``, ``"lora"``, ``"textual_inversion"`` or ``"dreambooth"``.
        rank: LoRA rank.
        alpha: LoRA alpha (the update is scaled by ``alpha / rank``); default ``rank``.
        targets: what LoRA adapts: some of ``"attention"`` (default), ``"feed_forward"``, ``"convolutions"``.
        train_text_encoder: also train the text encoder (full and DreamBooth: all of it; LoRA: its
            attention / feed-forward kernels).
        token: textual inversion: the new word, e.g. ``"<my-cat>"``.
        initializer_token: textual inversion: the word whose embedding the new vectors start from
            (several words: their vectors in turn).
        num_vectors: textual inversion: how many vectors the token stands for.
        prior_loss_weight: DreamBooth: the weight of the class images' loss.
        snr_gamma: min-SNR-γ loss weighting (``None``: plain mean squared error; 5.0 is the usual value).
        noise_offset: adds ``noise_offset`` times a per-item, per-channel gaussian to the noise.
        seed: the seed of the step's random numbers and of the LoRA factors' initial values.

    Batches are dicts: ``"token_ids"`` (int32 ``[B, 77]``) with ``"images"`` (``[B, H, W, 3]`` in [-1, 1]),
    ``"moments"`` (the image encoder's output, cached) or ``"latents"`` (already sampled and scaled);
    optionally ``"prior"`` (1 for DreamBooth class items) and, to reproduce a given recipe exactly,
    ``"timesteps"`` (int ``[B]``) and ``"noise"`` (``[B, h, w, C]``) instead of drawing them.
    """

    def __init__(self, sd, method="lora", *, rank=4, alpha=None, targets=lora_lib.DEFAULT_TARGETS,
                 train_text_encoder=False, token=None, initializer_token="*", num_vectors=1,
                 prior_loss_weight=1.0, snr_gamma=None, noise_offset=0.0, seed=None, name="trainer", **kwargs):
        components = _components(sd)
        _check_choice("training method", method, METHODS)
        if snr_gamma is not None and not snr_gamma > 0:
            raise ValueError(f"snr_gamma must be positive or None, got {snr_gamma!r}")
        if noise_offset < 0 or prior_loss_weight < 0:
            raise ValueError("noise_offset and prior_loss_weight must be non-negative")
        super().__init__(name=name, dtype=components.precision, autocast=False, **kwargs)
        self.method = method
        self.snr_gamma = snr_gamma
        self.noise_offset = float(noise_offset)
        self.prior_loss_weight = float(prior_loss_weight)
        self.train_text_encoder = bool(train_text_encoder)
        self.schedule = TrainingSchedule(components.scheduler_config)
        self.scaling_factor = float(components.vae_config.scaling_factor)
        self.seed_generator = keras.random.SeedGenerator(seed, name="step_seed")
        self._adaptation = _Adaptation()
        self.token = None
        if method == "textual_inversion":
            components = self._add_token(components, token, initializer_token, num_vectors)
        self._components = components
        self.diffusion_model = components.diffusion_model
        self.text_encoder = components.text_encoder
        self.image_encoder = components.image_encoder
        self._freeze(method)
        if method == "lora":
            self._add_lora(rank, rank if alpha is None else alpha, lora_lib.check_targets(targets), seed)
        # Every variable exists now, so `load_weights` (a `ModelCheckpoint`'s file) works before any call.
        self.built = True

    # ---------------------------------------------------------------------------------------- set-up

    def _freeze(self, method):
        trains_networks = method in ("full", "dreambooth")
        self.image_encoder.trainable = False
        self.diffusion_model.trainable = trains_networks
        self.text_encoder.trainable = trains_networks and self.train_text_encoder

    def _add_lora(self, rank, alpha, targets, seed):
        networks = [("unet", self.diffusion_model, False)]
        if self.train_text_encoder:
            networks.append(("text_encoder", self.text_encoder, True))
        self.lora_factors = []
        for network, model, is_text_encoder in networks:
            for kernel in lora_lib.target_kernels(model, targets, text_encoder=is_text_encoder):
                index = len(self.lora_factors)
                update = lora_lib.LowRankUpdate(kernel.shape, rank, alpha, seed=None if seed is None else seed + index,
                                                name=f"{network}_lora_{kernel.path.replace('/', '_')}")
                self.lora_factors.append(update)
                self._adaptation.lora_kernels.append((network, kernel, update))

    def _add_token(self, components, token, initializer_token, num_vectors):
        if not token:
            raise ValueError("textual_inversion needs token=, the new word (e.g. '<my-cat>')")
        if num_vectors < 1:
            raise ValueError(f"num_vectors must be at least 1, got {num_vectors}")
        table_variable = {v.path: v for v in components.text_encoder.weights}[_TABLE]
        table = np.asarray(ops.convert_to_numpy(table_variable), np.float32)
        ids = components.tokenizer.encode(initializer_token)[1:-1]
        if not ids:
            raise ValueError(f"initializer_token {initializer_token!r} has no tokens")
        initial = table[[ids[i % len(ids)] for i in range(num_vectors)]]
        base_rows = len(table)
        tokenizer, text_encoder = adapters.with_embeddings(components.tokenizer, components.text_encoder, base_rows,
                                                           {token: initial}, components.family, components.precision)
        self.token = token
        self.token_vectors = self.add_weight(shape=initial.shape, name="token_vectors", dtype="float32",
                                             initializer=keras.initializers.Constant(initial))
        self._adaptation.table = {v.path: v for v in text_encoder.weights}[_TABLE]
        self._adaptation.base_rows = base_rows
        return dataclasses.replace(components, tokenizer=tokenizer, text_encoder=text_encoder)

    # ------------------------------------------------------------------------------------- the step

    @property
    def tokenizer(self):
        """The tokenizer to make ``token_ids`` with (textual inversion: it knows the new token)."""
        return self._components.tokenizer

    @property
    def components(self):
        """The model with what was trained: full weights in place, the new token's rows written in.

        A LoRA is not fused: save it and load it with `StableDiffusion.load_lora`.
        """
        if self.method == "textual_inversion":
            table = self._adaptation.table
            value = ops.concatenate([table.value[: self._adaptation.base_rows],
                                     ops.cast(self.token_vectors.value, table.dtype)], axis=0)
            table.assign(value)
        return self._components

    def _adapted(self, network):
        """A scope in which ``network`` (``"unet"`` or ``"text_encoder"``) runs with its trained replacements."""
        model = self.diffusion_model if network == "unet" else self.text_encoder
        replacements = {id(kernel): (kernel, kernel.value + ops.cast(update.delta(), kernel.dtype))
                        for name, kernel, update in self._adaptation.lora_kernels if name == network}
        table = self._adaptation.table
        if table is not None and network == "text_encoder":
            rows = ops.stop_gradient(table.value[: self._adaptation.base_rows])
            replacements[id(table)] = (table, ops.concatenate([rows, ops.cast(self.token_vectors, table.dtype)], 0))
        if not replacements:
            return contextlib.nullcontext()
        # Every other variable keeps its current value: on JAX, the one Keras' stateless step passes in.
        return keras.StatelessScope(state_mapping=[replacements.get(id(v), (v, v.value)) for v in model.weights])

    def encode_text(self, token_ids, training=False):
        """The context of ``token_ids`` ``[B, 77]``, from the text encoder as trained so far."""
        with self._adapted("text_encoder"):
            context = self.text_encoder(token_ids, training=training)
        trained = self.method == "textual_inversion" or self.train_text_encoder
        return context if trained else ops.stop_gradient(context)

    def diffusion_loss(self, latents, context, timesteps, noise, training=False):
        """Each item's loss for given clean latents, context, timesteps and noise (float32 ``[B]``).

        The mean over the batch is the training loss; the step calls this after drawing timesteps and noise.
        """
        latents, noise, context = (ops.convert_to_tensor(x, "float32") for x in (latents, noise, context))
        noisy = self.schedule.add_noise(latents, noise, timesteps)
        with self._adapted("unet"):
            prediction = self.diffusion_model([noisy, ops.cast(timesteps, "float32"), context], training=training)
        return per_item_loss(self.schedule, prediction, latents, noise, timesteps, self.snr_gamma)

    def clean_latents(self, batch):
        """A batch's latents, scaled: as given, or sampled from cached moments or from its encoded images."""
        if "latents" in batch:
            return ops.cast(batch["latents"], "float32")
        if "moments" in batch:
            moments = batch["moments"]
        elif "images" in batch:
            moments = ops.stop_gradient(self.image_encoder(batch["images"], training=False))
        else:
            raise ValueError(f"A batch needs 'images', 'moments' or 'latents'; got keys {sorted(batch)}")
        shape = ops.shape(moments)
        noise = keras.random.normal((*shape[:-1], shape[-1] // 2), seed=self.seed_generator)
        return ops.stop_gradient(sample_posterior(moments, noise, self.scaling_factor))

    def cache_latents(self, dataset, shuffle=True, seed=0):
        """A finite dataset's batches with the image encoder's ``"moments"`` in place of ``"images"``, encoded once.

        The step then samples latents from the cached posterior, so each epoch skips the encoder (diffusers'
        ``--cache_latents``); a random flip or crop is fixed at caching time.

        Returns:
            A `tf.data.Dataset` of the same batch size, in a new order every epoch when ``shuffle``.

        Example:

        >>> import tempfile
        >>> import kerasdiffusion as kd
        >>> from kerasdiffusion import shapes, training
        >>> trainer = training.Trainer(kd.load_components("kerasdiffusion/shapes"), method="lora")
        >>> folder = tempfile.mkdtemp()
        >>> _ = shapes.write_dataset(folder, seed=0, count=4)
        >>> photos = training.image_caption_dataset(folder, resolution=64, batch_size=2, tokenizer=trainer.tokenizer)
        >>> cached = trainer.cache_latents(photos)  # then trainer.fit(cached, epochs=100)
        >>> batch = next(iter(cached))
        >>> sorted(batch), tuple(batch["moments"].shape)  # the posterior's mean and log-variance: 2 x 4 channels
        (['moments', 'token_ids'], (2, 8, 8, 8))
        """
        import tensorflow as tf

        columns, batch_size = {}, None
        for batch in dataset:
            batch = dict(batch)
            batch["moments"] = self.image_encoder(batch.pop("images"), training=False)
            for key, value in batch.items():
                columns.setdefault(key, []).append(np.asarray(ops.convert_to_numpy(value)))
            batch_size = batch_size or len(columns["moments"][0])
        if batch_size is None:
            raise ValueError("cache_latents needs a dataset with at least one batch (and a finite one)")
        arrays = {key: np.concatenate(parts) for key, parts in columns.items()}
        data = tf.data.Dataset.from_tensor_slices(arrays)
        if shuffle:
            data = data.shuffle(len(arrays["moments"]), seed=seed, reshuffle_each_iteration=True)
        return data.batch(batch_size, drop_remainder=True)

    def _draws(self, batch, shape):
        """The batch's timesteps and noise: given in the batch, or drawn."""
        if "noise" in batch:
            noise = ops.cast(batch["noise"], "float32")
        else:
            noise = keras.random.normal(shape, seed=self.seed_generator)
            if self.noise_offset:
                offset = keras.random.normal((shape[0], 1, 1, shape[-1]), seed=self.seed_generator)
                noise = noise + self.noise_offset * offset
        if "timesteps" in batch:
            timesteps = ops.cast(batch["timesteps"], "int32")
        else:
            timesteps = keras.random.randint((shape[0],), 0, self.schedule.num_train_timesteps,
                                             seed=self.seed_generator)
        return timesteps, noise

    def call(self, batch, training=False):
        """Each item's loss (float32 ``[B]``) for a batch (see the class docstring for its keys)."""
        latents = self.clean_latents(batch)
        timesteps, noise = self._draws(batch, ops.shape(latents))
        context = self.encode_text(batch["token_ids"], training=training)
        return self.diffusion_loss(latents, context, timesteps, noise, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The mean of the items' losses; with DreamBooth's ``"prior"`` items, the instance mean plus the
        class mean times ``prior_loss_weight``. Under a `tf.distribute` strategy, each replica's share
        (`distribute.per_replica_mean`), so that a step equals the one-device step on the global batch."""
        if not isinstance(x, dict) or "prior" not in x:
            return distribute.per_replica_mean(ops.mean(y_pred))
        prior = ops.cast(x["prior"], "float32")
        instance = 1.0 - prior

        def mean(weights):
            return ops.sum(y_pred * weights) / ops.maximum(ops.sum(weights), 1.0)

        return distribute.per_replica_mean(mean(instance) + self.prior_loss_weight * mean(prior))

    # ------------------------------------------------------------------------------------ results

    def lora_updates(self):
        """The trained LoRA as ``{"unet": [LoraUpdate, ...], "text_encoder": [...]}`` (PyTorch-layout factors)."""
        if self.method != "lora":
            raise ValueError(f"A {self.method!r} trainer has no LoRA")
        updates = {"unet": [], "text_encoder": []}
        for network, kernel, update in self._adaptation.lora_kernels:
            updates[network].append(update.lora_update(kernel.path))
        return {network: items for network, items in updates.items() if items}

    def embedding(self):
        """The trained token and its vectors (float32 ``[n, D]``)."""
        if self.method != "textual_inversion":
            raise ValueError(f"A {self.method!r} trainer has no embedding")
        return self.token, np.asarray(ops.convert_to_numpy(self.token_vectors), np.float32)

    def save(self, path, format=None, **kwargs):
        """Writes what was trained in a form other tools load.

        Args:
            path: the file (LoRA, embedding, single-file model) or folder (diffusers model) to write.
            format: LoRA: ``"diffusers"`` (default, PEFT keys, what ``load_lora_weights`` reads) or
                ``"kohya"`` (AUTOMATIC1111, ComfyUI); embedding: ``"a1111"`` (default) or ``"diffusers"``
                (``learned_embeds.safetensors``); full and DreamBooth: ``"diffusers"`` (default, a folder)
                or ``"single-file"`` (one ``.safetensors`` with the original CompVis names).

        Returns:
            The path written.

        Raises:
            ValueError: an unknown format, or a ``.keras`` path (what Keras' ``ModelCheckpoint`` asks for without
                ``save_weights_only=True``): a Trainer is checkpointed with ``save_weights`` / ``load_weights``.

        Example:

        >>> import os, tempfile
        >>> import kerasdiffusion as kd
        >>> from kerasdiffusion import training
        >>> trainer = training.Trainer(kd.load_components("kerasdiffusion/shapes"), method="lora")
        >>> path = trainer.save(os.path.join(tempfile.mkdtemp(), "style.safetensors"), format="kohya")
        >>> os.path.basename(path)
        'style.safetensors'
        """
        if str(path).endswith(".keras"):
            raise ValueError(f"A Trainer does not save as a .keras model ({path}); checkpoint it with "
                             "ModelCheckpoint(..., save_weights_only=True) or save_weights, and load_weights "
                             "into a Trainer built the same way")
        formats = SAVE_FORMATS[self.method]
        format = format or formats[0]
        _check_choice(f"format for a {self.method!r} trainer", format, formats)
        if self.method == "lora":
            from weights_conversion.lora import write_lora

            return write_lora(path, self.lora_updates(), format)
        elif self.method == "textual_inversion":
            from weights_conversion.embeddings import TextualInversion, write_textual_inversion

            token, vectors = self.embedding()
            return write_textual_inversion(path, TextualInversion(token, vectors), format=format)
        else:
            from kerasdiffusion.exporting import export

            export(self.components, path, format=format)
            return path
