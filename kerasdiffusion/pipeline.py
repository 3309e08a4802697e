"""`StableDiffusion`: the public API over `Components` and the denoising core.

Python tokenizes prompts, draws the seeds' noise and handles pixels; everything between runs compiled
(`kerasdiffusion.denoise`), on Keras' TensorFlow or JAX backend. Only a call with new shapes, a new
sampler or a new number of steps compiles; going back to one used before reuses its program.

Example:

>>> import kerasdiffusion as kd
>>> sd = kd.StableDiffusion.from_pretrained("kerasdiffusion/shapes")  # built in: 64x64 pictures of shapes
>>> images = sd.text_to_image("a red circle on a blue background", batch_size=2, num_steps=2)
>>> images.shape, images.dtype
((2, 64, 64, 3), dtype('uint8'))

Stable Diffusion 1.5 from the Hub, at its own 512x512:

>>> sd = kd.StableDiffusion.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")  # doctest: +SKIP
"""

import contextlib
import copy
import dataclasses
import os
import warnings

import numpy as np
from keras import ops

from kerasdiffusion import adapters, backend, distribute, prompts, seeds, sources
from kerasdiffusion import images as I
from kerasdiffusion import schedulers as S
from kerasdiffusion.components import Components, check_precision, load_components
from kerasdiffusion.config import PROMPT_SYNTAXES
from kerasdiffusion.denoise import LOOPS, Conditioning, Denoiser, Keep
from kerasdiffusion.text_encoder import skip_last_layers


def _check_size(name, value):
    if not isinstance(value, (int, np.integer)) or value < 8 or value % 8:
        raise ValueError(f"{name} must be a positive multiple of 8, got {value!r}")


def _check_positive(name, value):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _texts(prompt):
    """A prompt or a list of prompts, as a list."""
    return [prompt] if isinstance(prompt, str) else list(prompt)


def default_loop():
    """The loop mode for the current device: one program for the whole loop on TPU (where each program
    launch costs a host round trip), one per step elsewhere (a live progress bar; same speed on CPU)."""
    return "compiled" if backend.device_type() == "tpu" else "steps"


def _check_loop(loop):
    if loop is not None and loop not in LOOPS:
        raise ValueError(f"loop must be one of {', '.join(LOOPS)} or None, got {loop!r}")


def check_prompt_syntax(prompt_syntax):
    if prompt_syntax not in PROMPT_SYNTAXES:
        raise ValueError(f"prompt_syntax must be one of {', '.join(PROMPT_SYNTAXES)}, got {prompt_syntax!r}")


def check_clip_skip(clip_skip):
    if not isinstance(clip_skip, (int, np.integer)) or isinstance(clip_skip, bool) or clip_skip < 1:
        raise ValueError(f"clip_skip must be an integer >= 1 (1: the last layer, AUTOMATIC1111's numbering), "
                         f"got {clip_skip!r}")


def _placed(components, distribution):
    """``components`` with every network's variables living as ``distribution`` wants (copied where not)."""
    networks = {name: distribute.placed(model, distribution) for name, model in components.networks.items()}
    if all(networks[name] is model for name, model in components.networks.items()):
        return components
    return dataclasses.replace(components, **networks, loras=copy.deepcopy(components.loras))


class StableDiffusion:
    """Stable Diffusion 1.x / 2.x in Keras: text-to-image, image-to-image and inpainting.

    Args:
        img_width, img_height: the size of generated images; any multiple of 8. `None` (the default): the
            model's own size (`Components.image_size`: 512 for SD 1.x, the UNet's sample size times 8 where the
            source says it, 64 for ``"kerasdiffusion/shapes"``), as diffusers does.
        jit_compile: compile the text encoder, the denoising loop and the decoder with XLA.
        precision: `"float32"`, `"mixed_float16"` or `"mixed_bfloat16"`; `None` picks float16 on GPU,
            bfloat16 on TPU and float32 on CPU. Applies to this model's layers only.
        scheduler: a scheduler name (`"ddim"`, `"pndm"`, `"lms"`, `"euler"`, `"euler_ancestral"`,
            `"dpmpp_2m"`, `"dpmpp_2m_karras"`) or a scheduler object; one made without a config takes the
            checkpoint's training schedule and prediction type.
        source: where the weights come from (see `from_pretrained`); the default is SD v1.5 from the Hub,
            loaded on first use, as in KerasCV. A built-in model's name, ``"kerasdiffusion/shapes"``, loads the
            small model shipped inside the package.
        prediction_type: `"epsilon"` or `"v_prediction"`, overriding what the source's scheduler config says.
        prompt_syntax: `"plain"` (the prompt as KerasCV and diffusers read it: one 77-token window, longer
            prompts truncated with a warning) or `"a1111"` (AUTOMATIC1111's: `(emphasis:1.2)`, `[less]`,
            `BREAK`, any length in 75-token chunks, `<lora:NAME:SCALE>` for LoRAs loaded under NAME).
        clip_skip: the text encoder layer the UNet attends to, in AUTOMATIC1111's numbering: 1 the last,
            2 the penultimate (diffusers' `clip_skip=1`). SD 1.x only.
        loop: `"steps"` (one compiled program per denoising step, with a live progress bar) or
            `"compiled"` (the whole loop in one program); `None` picks per device type. Same images.
        distribution: generate on several devices: on TensorFlow a `tf.distribute.Strategy`
            (`OneDeviceStrategy`, `MirroredStrategy`, `TPUStrategy`, `MultiWorkerMirroredStrategy`), on JAX a
            `keras.distribution.DataParallel`; `None` is one device. The networks are built under its scope,
            the global batch is split over the replicas (padded to a multiple of their number, the padding
            dropped), and the text encoder, the denoising loop and the decoder run on every replica. The
            images equal a one-device run's for the same seeds. See `kerasdiffusion.distribute`.
        revision: for a Hub id, the branch, tag or commit to load (default: the main branch).
        cache: whether converted weights are read from and written to the conversion cache; `None`
            follows ``$KERASDIFFUSION_NO_CACHE`` (on unless it is set).
        progress: show progress bars while weights are read (and, when converted, written to the cache).

    Example:

    >>> sd = StableDiffusion(img_width=128, img_height=64, source="kerasdiffusion/shapes")
    >>> sd.text_to_image("a small red circle on the left, blue background", num_steps=2, seed=1).shape
    (1, 64, 128, 3)

    Without a source: Stable Diffusion 1.5, from the Hub on first use.

    >>> sd = StableDiffusion(img_width=512, img_height=512)                   # doctest: +SKIP
    """

    def __init__(self, img_width=None, img_height=None, jit_compile=True, precision=None, scheduler="ddim",
                 source=None, prediction_type=None, *, prompt_syntax="plain", clip_skip=1, loop=None,
                 distribution=None, revision=None, cache=None, progress=True):
        for name, value in (("img_width", img_width), ("img_height", img_height)):
            if value is not None:
                _check_size(name, value)
        check_precision(precision)
        check_prompt_syntax(prompt_syntax)
        check_clip_skip(clip_skip)
        _check_loop(loop)
        backend.name()
        self.distribution = distribute.check_distribution(distribution, jit_compile)
        # None: the model's own size, known once the components are.
        self._size = tuple(None if value is None else int(value) for value in (img_width, img_height))
        self.jit_compile = jit_compile
        self.prompt_syntax = prompt_syntax
        self.clip_skip = int(clip_skip)
        self.loop = loop
        self.source = os.fspath(source) if source is not None else sources.DEFAULT_MODEL
        sources.check_revision(self.source, revision)  # now, not at the lazy first load
        self._load_options = dict(precision=precision, prediction_type=prediction_type, revision=revision,
                                  cache=cache, progress=progress)
        self._scheduler = S.get_scheduler(scheduler)  # fails on an unknown name now, not at first use
        self._components = None

    @classmethod
    def from_pretrained(cls, source, img_width=None, img_height=None, jit_compile=True, precision=None,
                        scheduler="ddim", prediction_type=None, *, prompt_syntax="plain", clip_skip=1, loop=None,
                        distribution=None, revision=None, cache=None, progress=True):
        """Loads weights from a Hub id, a diffusers folder, a single `.safetensors`/`.ckpt` or a converted folder.

        `load_components` and `from_components` together. The family (SD 1.x, 2.x, 9-channel inpainting)
        and all sizes are read from the weights' shapes; `img_width` / `img_height` default to the model's own
        image size (`Components.image_size`). `prediction_type` (`"epsilon"` /
        `"v_prediction"`) overrides what the source's scheduler config says. `distribution` (a
        `tf.distribute.Strategy` / `keras.distribution.DataParallel`) builds the networks under its scope and
        runs every program over its replicas (see the constructor). `revision` picks a Hub id's
        branch, tag or commit; `cache=False` neither reads nor writes the conversion cache (`None` follows
        ``$KERASDIFFUSION_NO_CACHE``); `progress=False` hides the bars. `prompt_syntax` and `clip_skip` are
        the constructor's.

        Example:

        >>> sd = StableDiffusion.from_pretrained("kerasdiffusion/shapes")
        >>> sd.img_width, sd.img_height, sd.components.family.name
        (64, 64, 'shapes')
        >>> sd = StableDiffusion.from_pretrained("v1-5-pruned-emaonly.safetensors")   # doctest: +SKIP
        """
        model = cls(img_width, img_height, jit_compile, precision, scheduler, source, prediction_type,
                    prompt_syntax=prompt_syntax, clip_skip=clip_skip, loop=loop, distribution=distribution,
                    revision=revision, cache=cache, progress=progress)
        model.components  # load now
        return model

    @classmethod
    def from_components(cls, components, img_width=None, img_height=None, jit_compile=True, scheduler="ddim", *,
                        prompt_syntax="plain", clip_skip=1, loop=None, distribution=None):
        """A pipeline over ready `Components` (from `load_components`, or networks of your own).

        LoRAs are fused into the components' networks: pipelines sharing components share their LoRAs.
        With a `distribution`, networks whose variables were not built under its scope are copied under it
        (weights and fused LoRAs included): the pipeline then runs, and adapts, its own copies.

        Example:

        >>> import kerasdiffusion as kd
        >>> parts = kd.load_components("kerasdiffusion/shapes")
        >>> sd = StableDiffusion.from_components(parts, scheduler="euler", loop="compiled")
        >>> sd.components is parts, sd.scheduler.name
        (True, 'euler')
        """
        if not isinstance(components, Components):
            raise TypeError(f"from_components takes a Components, got {type(components).__name__}")
        model = cls(img_width, img_height, jit_compile, components.precision, scheduler, components.source or None,
                    prompt_syntax=prompt_syntax, clip_skip=clip_skip, loop=loop, distribution=distribution)
        model._set_components(components)
        return model

    # Components, loaded on first use.

    def _set_components(self, components):
        if self.clip_skip > 1 and components.family.name != "sd1":
            raise ValueError(f"clip_skip={self.clip_skip} applies to SD 1.x only (AUTOMATIC1111 ignores it for "
                             f"{components.family.name}, whose text encoder already stops at its penultimate layer)")
        components = _placed(components, self.distribution)
        self._components = components
        self._base_tokenizer = components.tokenizer
        self._base_rows = components.text_encoder.get_layer("token_embedding").input_dim
        self._embeddings = {}  # textual-inversion token -> vectors [n, D], in loading order
        self._denoiser = Denoiser(components.diffusion_model, self.jit_compile, self.distribution)
        self._programs = {}
        self._set_text_side(components.tokenizer, components.text_encoder)
        self._scheduler = self._scheduler.for_checkpoint(components.scheduler_config)

    def _set_text_side(self, tokenizer, text_encoder):
        """A new tokenizer and text encoder (textual inversion); the UNet, the VAE and their programs stay."""
        if (tokenizer, text_encoder) != (self._components.tokenizer, self._components.text_encoder):
            self._components = dataclasses.replace(self._components, tokenizer=tokenizer, text_encoder=text_encoder)
        self._context_encoder = skip_last_layers(text_encoder, self.clip_skip - 1)
        self._programs.pop("text_encoder", None)

    @property
    def components(self):
        """The `Components` this pipeline runs (loaded from the source on first use)."""
        if self._components is None:
            with distribute.scope(self.distribution):
                self._set_components(load_components(self.source, **self._load_options))
        return self._components

    @property
    def img_width(self):
        """The width of generated images: the constructor's, else the model's own size."""
        return self._size[0] or self.components.image_size

    @property
    def img_height(self):
        """The height of generated images: the constructor's, else the model's own size."""
        return self._size[1] or self.components.image_size

    @property
    def tokenizer(self):
        return self.components.tokenizer

    @property
    def text_encoder(self):
        """Token ids ``[B, 77]`` -> the context the UNet attends to (with `clip_skip`, an earlier layer's)."""
        self.components
        return self._context_encoder

    @property
    def diffusion_model(self):
        return self.components.diffusion_model

    @property
    def decoder(self):
        return self.components.decoder

    @property
    def image_encoder(self):
        return self.components.image_encoder

    @property
    def precision(self):
        return self.components.precision

    @property
    def scheduler(self):
        """The sampler, bound to the checkpoint's training schedule; assign a name or a scheduler object."""
        self.components
        return self._scheduler

    @scheduler.setter
    def scheduler(self, value):
        scheduler = S.get_scheduler(value)
        if self._components is not None:
            scheduler = scheduler.for_checkpoint(self._components.scheduler_config)
        self._scheduler = scheduler

    @property
    def trace_count(self):
        """How many times a denoising program was traced (compiled): only new shapes, samplers or step
        counts add to it."""
        return self._denoiser.trace_count if self._components is not None else 0

    # Adapters: LoRAs fused into the weights, textual-inversion tokens.

    def load_lora(self, source, scale=1.0, name=None, *, weight_name=None):
        """Fuses a LoRA into the UNet and text encoder weights; returns the name it is loaded under.

        Reads kohya / AUTOMATIC1111 files (``lora_unet_*``, ``lora_te_*``, ``.alpha``, LoCon / LyCORIS
        convolution LoRAs) and diffusers / PEFT ones (``unet.*.lora_A`` / ``lora_B``, ``text_encoder.*``, with
        or without alphas), for SD 1.x and 2.x. Each adapted kernel becomes ``original + Σ scale · delta`` over
        the LoRAs loaded: no program is traced again and generation costs what it did without. Loading is
        strict: keys that map to nothing and shapes that do not fit (an SD 2.x LoRA on an SD 1.x model) are
        named in one `CheckpointError`, and nothing changes.

        Args:
            source: a LoRA file (``.safetensors``, or a pickled ``.bin`` / ``.pt``), a folder holding
                ``weight_name``, or a Hub id.
            scale: the LoRA's multiplier (AUTOMATIC1111's ``<lora:NAME:SCALE>``).
            name: what to call it; default the file's name without its suffix (for a folder or a Hub id, its
                name). In ``prompt_syntax="a1111"``, ``<lora:NAME:SCALE>`` in a prompt sets its scale for a call.
            weight_name: the file in a Hub repository or folder (default ``pytorch_lora_weights.safetensors``).

        Example:

        >>> import os, tempfile
        >>> from kerasdiffusion import training
        >>> sd = StableDiffusion.from_pretrained("kerasdiffusion/shapes")
        >>> folder = tempfile.mkdtemp()
        >>> lora = training.Trainer(sd, method="lora").save(os.path.join(folder, "style.safetensors"))  # untrained
        >>> name = sd.load_lora(lora, scale=0.8)
        >>> name, sd.loras
        ('style', {'style': 0.8})
        >>> sd.unload_lora(name)

        A file of yours, made for the model loaded (this one is for Stable Diffusion 1.5):

        >>> name = sd.load_lora("watercolor.safetensors", scale=0.8)                 # doctest: +SKIP
        """
        path = adapters.adapter_file(source, weight_name, adapters.LORA_WEIGHT_NAME)
        name = name or adapters.source_name(source, path)
        if name in self._lora_state():
            raise ValueError(f"A LoRA named {name!r} is already loaded: unload it first, or pass another name=")
        updates = adapters.read_lora_updates(path, self.components)
        self._lora_state().add(name, updates, {"unet": float(scale), "text_encoder": float(scale)}, self.components)
        return name

    def set_lora_scale(self, name, scale, *, unet_scale=None):
        """Changes a loaded LoRA's multiplier (``unet_scale``, if given, for the UNet alone), in place.

        Example:

        >>> import os, tempfile
        >>> from kerasdiffusion import training
        >>> sd = StableDiffusion.from_pretrained("kerasdiffusion/shapes")
        >>> folder = tempfile.mkdtemp()
        >>> lora = training.Trainer(sd, method="lora").save(os.path.join(folder, "style.safetensors"))  # untrained
        >>> sd.load_lora(lora)
        'style'
        >>> sd.set_lora_scale("style", 0.5)
        >>> sd.loras
        {'style': 0.5}
        """
        scales = {"text_encoder": float(scale), "unet": float(scale if unet_scale is None else unet_scale)}
        self._lora_state().set_scales(name, scales, self.components)

    def unload_lora(self, name):
        """Removes a LoRA; every kernel no other LoRA adapts gets its original value back, bit for bit.

        Example:

        >>> import os, tempfile
        >>> from kerasdiffusion import training
        >>> sd = StableDiffusion.from_pretrained("kerasdiffusion/shapes")
        >>> folder = tempfile.mkdtemp()
        >>> lora = training.Trainer(sd, method="lora").save(os.path.join(folder, "style.safetensors"))  # untrained
        >>> sd.load_lora(lora)
        'style'
        >>> sd.unload_lora("style")
        >>> sd.loras
        {}
        """
        self._lora_state().remove(name, self.components)

    @property
    def loras(self):
        """``{name: scale}`` of the LoRAs loaded, in loading order (the text encoder's scale)."""
        return {name: self._lora_state().scales(name)["text_encoder"] for name in self._lora_state().loras}

    def _lora_state(self):
        return self.components.loras

    def load_textual_inversion(self, source, token=None, *, weight_name=None):
        """Adds a textual-inversion embedding: its token, in a prompt, stands for its learned vectors.

        Reads AUTOMATIC1111 embeddings (``.pt``, through a restricted unpickler that runs nothing of the file,
        or ``.safetensors``; one or several vectors) and diffusers' ``learned_embeds.{bin,safetensors}``. The
        tokenizer and the text encoder are rebuilt with the new token (its other weights, fused LoRAs
        included, copied); the UNet and its compiled programs stay.

        Args:
            source: an embedding file, a folder holding ``weight_name``, or a Hub id.
            token: the word to write in prompts; default the file's own token (diffusers' key, A1111's
                ``name``), else the file's name without its suffix (as AUTOMATIC1111 names it).
            weight_name: the file in a Hub repository or folder (default ``learned_embeds.safetensors``).

        Returns:
            The token.

        Raises:
            ValueError: a token that is already a word of the vocabulary or already added.
            CheckpointError: not an embedding, or one for another text encoder width.

        Example:

        >>> import tempfile
        >>> from kerasdiffusion import training
        >>> sd = StableDiffusion.from_pretrained("kerasdiffusion/shapes")
        >>> trainer = training.Trainer(sd, method="textual_inversion", token="my-shape")  # untrained
        >>> embedding = trainer.save(tempfile.mkdtemp())
        >>> sd.load_textual_inversion(embedding)
        'my-shape'
        >>> sd.embeddings
        {'my-shape': 1}
        >>> tuple(sd.encode_text("a my-shape on a blue background").shape)
        (1, 77, 64)

        A file of yours, made for the model loaded (this one is for Stable Diffusion 1.5):

        >>> sd.load_textual_inversion("EasyNegative.safetensors")                     # doctest: +SKIP
        'EasyNegative'
        """
        path = adapters.adapter_file(source, weight_name, adapters.EMBEDDING_WEIGHT_NAME)
        width = self.components.text_encoder.outputs[0].shape[-1]
        token, vectors = adapters.read_embedding(path, token, width)
        if token in self._embeddings:
            raise ValueError(f"Token {token!r} is already added: unload it first, or pick another")
        self._set_embeddings({**self._embeddings, token: vectors})
        return token

    def unload_textual_inversion(self, token=None):
        """Removes a textual-inversion token (``None``: all of them); the tokenizer and text encoder are as before.

        Example:

        >>> import tempfile
        >>> from kerasdiffusion import training
        >>> sd = StableDiffusion.from_pretrained("kerasdiffusion/shapes")
        >>> trainer = training.Trainer(sd, method="textual_inversion", token="my-shape")  # untrained
        >>> embedding = trainer.save(tempfile.mkdtemp())
        >>> sd.load_textual_inversion(embedding)
        'my-shape'
        >>> sd.unload_textual_inversion("my-shape")
        >>> sd.embeddings
        {}
        """
        self.components
        if token is not None and token not in self._embeddings:
            loaded = ", ".join(map(repr, self._embeddings)) or "none"
            raise KeyError(f"No textual-inversion token {token!r} is loaded (loaded: {loaded})")
        self._set_embeddings({} if token is None else {t: v for t, v in self._embeddings.items() if t != token})

    @property
    def embeddings(self):
        """The textual-inversion tokens loaded, with their number of vectors."""
        self.components
        return {token: len(vectors) for token, vectors in self._embeddings.items()}

    def _set_embeddings(self, embeddings):
        parts = self.components
        with distribute.scope(self.distribution):
            tokenizer, text_encoder = adapters.with_embeddings(self._base_tokenizer, parts.text_encoder,
                                                               self._base_rows, embeddings, parts.family,
                                                               parts.precision)
        self._embeddings = dict(embeddings)
        self._set_text_side(tokenizer, text_encoder)

    # Compiled networks.

    def _network_call(self, name):
        if name not in self._programs:
            model = self.text_encoder if name == "text_encoder" else self.components.networks[name]
            self._programs[name] = distribute.compile_function(lambda x: model(x, training=False), model.weights,
                                                               self.jit_compile, self.distribution)
        return self._programs[name]

    def encode_text(self, prompt):
        """Encodes a prompt (or a list of prompts) into the context the UNet attends to.

        With ``prompt_syntax="plain"`` a prompt is one 77-token window (longer ones are truncated, with a
        warning naming the words dropped). With ``"a1111"`` it is read as AUTOMATIC1111 reads it: emphasis
        weights scale the encoder output per token (the mean then restored), and ``BREAK`` or every 75 tokens
        starts a new 77-token chunk, each encoded alone and all concatenated; ``<lora:NAME:SCALE>`` tags are
        cut out, and set the scales of LoRAs loaded under those names while encoding.

        Returns:
            A float32 tensor `[1, 77, D]` for a string, `[len(prompt), 77, D]` for a list; with `"a1111"`,
            `[.., 77k, D]` for prompts of k chunks (shorter prompts of a list padded with empty chunks).

        Example:

        >>> sd = StableDiffusion.from_pretrained("kerasdiffusion/shapes")
        >>> context = sd.encode_text("a red circle on a blue background")
        >>> tuple(context.shape), context.dtype.name  # D = 64 here, 768 for SD 1.x, 1024 for SD 2.x
        ((1, 77, 64), 'float32')
        >>> tuple(sd.encode_text(["a red circle", "a green square"]).shape)
        (2, 77, 64)
        """
        texts = _texts(prompt)
        with self._prompt_loras(texts):
            return self._encode(texts)

    def _encode(self, texts):
        """Prompts -> contexts, in this pipeline's prompt syntax (LoRA tags are `_prompt_loras`' business)."""
        tokenizer = self.tokenizer
        if self.prompt_syntax == "plain":
            return self._run_text_encoder(np.stack([self._plain_ids(text) for text in texts]))
        texts = [prompts.extract_loras(text)[0] for text in texts]
        # AUTOMATIC1111: every 75-token chunk through the encoder alone, weighted, then side by side.
        ids, multipliers = prompts.chunk_prompts(tokenizer, texts, expansions=tokenizer.expansions)
        _, chunks, window = ids.shape
        z = self._run_text_encoder(ids.reshape(-1, window))
        return prompts.join_chunks(prompts.apply_emphasis(z, multipliers.reshape(-1, window)), chunks)

    def _plain_ids(self, text):
        ids, dropped = prompts.plain_prompt_ids(self.tokenizer, text, self.tokenizer.expansions)
        if dropped:
            warnings.warn(f"The prompt is longer than the text encoder's {self.tokenizer.max_length} tokens; these "
                          f"words were dropped: {dropped!r}. prompt_syntax='a1111' reads prompts of any length.",
                          stacklevel=4)
        return ids

    def _run_text_encoder(self, ids):
        tokens = ops.convert_to_tensor(np.asarray(ids, np.int32))
        return ops.cast(self._network_call("text_encoder")(tokens), "float32")

    @contextlib.contextmanager
    def _prompt_loras(self, texts):
        """With ``prompt_syntax="a1111"``: the scales of the prompts' ``<lora:NAME:SCALE>`` tags, for one call."""
        if self.prompt_syntax != "a1111":
            yield
            return
        tags = [tag for text in texts for tag in prompts.extract_loras(text)[1]]
        state = self._lora_state()
        missing = sorted({tag.name for tag in tags if tag.name not in state})
        if missing:
            raise ValueError(f"The prompt names LoRAs that are not loaded: {', '.join(missing)}; load each first with "
                             "sd.load_lora(path, name=NAME) (on the command line: --lora-dir)")
        wanted = {tag.name: {"text_encoder": tag.scale, "unet": tag.unet_scale} for tag in tags}
        before = {name: state.scales(name) for name in wanted}
        changed = [name for name in wanted if wanted[name] != before[name]]
        for name in changed:
            state.set_scales(name, wanted[name], self.components)
        try:
            yield
        finally:
            for name in changed:
                state.set_scales(name, before[name], self.components)

    def _decode(self, latents):
        scale = self.components.vae_config.scaling_factor
        decoded = self._network_call("decoder")(ops.convert_to_tensor(np.asarray(latents, np.float32) / scale))
        return I.to_uint8(ops.convert_to_numpy(ops.cast(decoded, "float32")))

    def _encode_images(self, images):
        """Images in [-1, 1] -> scaled latents (the posterior mean, so results do not depend on extra noise)."""
        moments = self._network_call("image_encoder")(ops.convert_to_tensor(np.asarray(images, np.float32)))
        mean = ops.convert_to_numpy(ops.cast(moments, "float32"))[..., : self.components.latent_channels]
        return mean * self.components.vae_config.scaling_factor

    # The denoising loop.

    def _denoise(self, latents, context, unconditional, guidance, plan, keys, start=0, extra_channels=None,
                 keep=None, verbose=True):
        scheduler = self.scheduler
        noises = None
        if scheduler.stochastic:
            noises = seeds.keys_step_normals(keys, len(plan.timesteps), latents.shape[1:])
        conditioning = Conditioning(context, unconditional, guidance, extra_channels, keep)
        loop = self.loop or default_loop()
        return self._denoiser(scheduler, plan, latents, conditioning, start=start, noises=noises, loop=loop,
                              progress=verbose and loop == "steps")

    # Public generation API.

    def _resolve_batch(self, prompt, batch_size):
        _check_positive("batch_size", batch_size)
        if isinstance(prompt, (list, tuple)):
            if not prompt:
                raise ValueError("prompt list is empty")
            if batch_size not in (1, len(prompt)):
                raise ValueError(f"{len(prompt)} prompts given but batch_size={batch_size}")
            return len(prompt)
        return batch_size

    def _repeat_context(self, context, batch_size, what):
        context = ops.cast(ops.convert_to_tensor(context), "float32")
        if len(context.shape) != 3:
            raise ValueError(f"{what} must be [1, 77, D] or [batch_size, 77, D] (77k with prompt_syntax='a1111'), "
                             f"got shape {tuple(context.shape)}")
        if context.shape[0] == 1:
            return ops.repeat(context, batch_size, axis=0)
        if context.shape[0] != batch_size:
            raise ValueError(f"{what} has batch {context.shape[0]}, but batch_size={batch_size}")
        return context

    def _unconditional(self, negative_prompt, batch_size):
        if isinstance(negative_prompt, (list, tuple)) and len(negative_prompt) not in (1, batch_size):
            raise ValueError(f"{len(negative_prompt)} negative prompts given but batch_size={batch_size}")
        return self._repeat_context(self._encode(_texts(negative_prompt or "")), batch_size, "negative prompt")

    def _contexts(self, context, negative_prompt, batch_size, what):
        """The prompt's and the negative prompt's contexts, the shorter padded to the longer's length."""
        context = self._repeat_context(context, batch_size, what)
        unconditional = self._unconditional(negative_prompt, batch_size)
        length = max(context.shape[1], unconditional.shape[1])
        return self._padded(context, length), self._padded(unconditional, length)

    def _padded(self, context, length):
        """``context`` extended to ``length`` tokens with the empty prompt's encoding, a 77-token window at a time
        (AUTOMATIC1111 pads the prompt and the negative prompt to the same number of chunks this way)."""
        missing, window = length - context.shape[1], self.tokenizer.max_length
        if missing == 0:
            return context
        if missing % window:
            raise ValueError(f"Cannot pad a context of {context.shape[1]} tokens to the other's {length}: both must "
                             f"be multiples of {window} tokens")
        empty = self._run_text_encoder(self.tokenizer([""]))
        padding = ops.tile(empty, (context.shape[0], missing // window, 1))
        return ops.concatenate([context, padding], axis=1)

    def _check_common(self, num_steps, unconditional_guidance_scale):
        _check_positive("num_steps", num_steps)
        if not np.isfinite(unconditional_guidance_scale):
            raise ValueError(f"unconditional_guidance_scale must be finite, got {unconditional_guidance_scale!r}")

    def _noise(self, diffusion_noise, shape, keys):
        """The given noise (``[1, ...]`` repeated to the batch), or each item's standard normal from its key."""
        if diffusion_noise is None:
            return seeds.keys_normal(keys, 0, shape[1:])
        noise = np.asarray(ops.convert_to_numpy(diffusion_noise), np.float32)
        if noise.ndim == 4 and noise.shape[0] == 1 and shape[0] > 1:
            noise = np.repeat(noise, shape[0], axis=0)
        if noise.shape != tuple(shape):
            raise ValueError(f"diffusion_noise must have shape {tuple(shape)}, got {noise.shape}")
        return noise

    def _latent_shape(self, batch_size, height, width):
        return (batch_size, height // 8, width // 8, self.components.latent_channels)

    def generate_image(self, encoded_text, negative_prompt=None, batch_size=1, num_steps=50,
                       unconditional_guidance_scale=7.5, diffusion_noise=None, seed=None, verbose=True):
        """Generates images from encoded text (`encode_text`'s output), as in KerasCV.

        Args:
            encoded_text: `[1, 77, D]` (repeated to `batch_size`) or `[batch_size, 77, D]`; with
                `prompt_syntax="a1111"`, 77k tokens (the negative prompt's encoding is padded to match).
            negative_prompt: a string or list of strings the guidance steers away from; `None` is "".
            batch_size: number of images.
            num_steps: number of scheduler steps.
            unconditional_guidance_scale: classifier-free guidance scale; <= 1 disables guidance.
            diffusion_noise: initial latents `[batch_size, H/8, W/8, 4]`, standard normal (the scheduler's
                initial sigma is applied here); `None` draws them from `seed`.
            seed: makes the result reproducible: `None` (drawn at random), an integer (image ``b`` of the
                batch has the key ``(seed, b)``), or a list of `batch_size` pairs ``(seed, index)``, one key per
                image, so that one batch can hold images of different seeds. An image's noise depends only on
                its key: ``seed=[(s, b)]`` alone gives image ``b`` of ``seed=s``, on every backend and device.

        Returns:
            uint8 numpy array `[batch_size, img_height, img_width, 3]`.

        Example:

        >>> sd = StableDiffusion.from_pretrained("kerasdiffusion/shapes")
        >>> context = sd.encode_text("a green square on a white background")
        >>> sd.generate_image(context, batch_size=2, num_steps=2, seed=3).shape
        (2, 64, 64, 3)
        """
        _check_positive("batch_size", batch_size)
        self._check_common(num_steps, unconditional_guidance_scale)
        keys = seeds.item_keys(seed, batch_size)
        context, unconditional = self._contexts(encoded_text, negative_prompt, batch_size, "encoded_text")
        noise = self._noise(diffusion_noise, self._latent_shape(batch_size, self.img_height, self.img_width), keys)
        plan = self.scheduler.plan(num_steps)
        latents = self._denoise(noise * plan.init_noise_sigma, context, unconditional, unconditional_guidance_scale,
                                plan, keys, verbose=verbose)
        return self._decode(latents)

    def text_to_image(self, prompt, negative_prompt=None, batch_size=1, num_steps=50,
                      unconditional_guidance_scale=7.5, seed=None, verbose=True):
        """Generates images from a prompt (a string, or a list with one prompt per image).

        `seed` is as in `generate_image`: an integer, `None`, or one ``(seed, index)`` pair per image.

        Returns:
            uint8 numpy array `[batch_size, img_height, img_width, 3]`.

        Example:

        >>> sd = StableDiffusion.from_pretrained("kerasdiffusion/shapes")
        >>> sd.text_to_image(["a red circle on a blue background", "a large yellow triangle at the top, black "
        ...                   "background"], num_steps=2, seed=0).shape
        (2, 64, 64, 3)
        """
        batch_size = self._resolve_batch(prompt, batch_size)
        self._check_common(num_steps, unconditional_guidance_scale)
        seeds.item_keys(seed, batch_size)  # a bad seed fails before the prompt is encoded
        texts = _texts(prompt)
        with self._prompt_loras(texts):
            return self.generate_image(self._encode(texts), negative_prompt, batch_size, num_steps,
                                       unconditional_guidance_scale, seed=seed, verbose=verbose)

    def image_to_image(self, prompt, image, strength=0.8, negative_prompt=None, batch_size=1, num_steps=50,
                       unconditional_guidance_scale=7.5, diffusion_noise=None, seed=None, verbose=True):
        """Re-draws an image after a prompt; `strength` in [0, 1] sets how much of it is noised away.

        As in diffusers, the encoded image (the VAE posterior's mean) is noised to the step `strength`
        selects and only the remaining `int(num_steps * strength)` steps run. The output has the input
        image's size (a multiple of 8). `diffusion_noise` (`[batch_size, H/8, W/8, 4]`, standard normal) is
        the noise added to the encoded image; `None` draws it from `seed` (an integer, or one
        ``(seed, index)`` pair per image, as in `generate_image`).

        Example:

        >>> from kerasdiffusion import shapes
        >>> sd = StableDiffusion.from_pretrained("kerasdiffusion/shapes")
        >>> picture = shapes.render(shapes.Scene(shape="square", colour="red", background="blue"))
        >>> picture.shape, picture.dtype
        ((64, 64, 3), dtype('uint8'))
        >>> sd.image_to_image("a red circle on a blue background", picture, strength=0.6, num_steps=4, seed=0).shape
        (1, 64, 64, 3)
        """
        batch_size = self._resolve_batch(prompt, batch_size)
        self._check_common(num_steps, unconditional_guidance_scale)
        if not 0.0 <= float(strength) <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength!r}")
        keys = seeds.item_keys(seed, batch_size)
        pixels = self._image_input(image, batch_size)
        init_latents = self._encode_images(pixels)
        noise = self._noise(diffusion_noise, init_latents.shape, keys)
        plan = self.scheduler.plan(num_steps)
        start = self.scheduler.start_index(plan, float(strength))
        if start == len(plan.timesteps):
            return self._decode(init_latents)
        latents = ops.convert_to_numpy(self.scheduler.add_noise(plan, init_latents, noise, start))
        with self._prompt_loras(_texts(prompt)):
            context, unconditional = self._contexts(self._encode(_texts(prompt)), negative_prompt, batch_size, "prompt")
            latents = self._denoise(latents, context, unconditional, unconditional_guidance_scale, plan, keys,
                                    start=start, verbose=verbose)
            return self._decode(latents)

    def inpaint(self, prompt, image, mask, negative_prompt=None, batch_size=1, num_steps=50,
                unconditional_guidance_scale=7.5, diffusion_noise=None, seed=None, verbose=True):
        """Repaints the masked part of an image after a prompt.

        `mask` is `[H, W]` with 1 (or 255) where to repaint. A 9-channel inpainting UNet gets the mask and
        the masked image's latents as extra input channels, as diffusers feeds them; an ordinary UNet
        repaints by blending the re-noised original latents outside the mask after every step.
        `diffusion_noise` (`[batch_size, H/8, W/8, 4]`, standard normal) is the starting noise, and for an
        ordinary UNet also the noise that re-noises the kept region; `None` draws it from `seed` (an integer,
        or one ``(seed, index)`` pair per image, as in `generate_image`).

        Example:

        >>> import numpy as np
        >>> from kerasdiffusion import shapes
        >>> sd = StableDiffusion.from_pretrained("kerasdiffusion/shapes")
        >>> picture = shapes.render(shapes.Scene(shape="square", colour="red", background="blue"))
        >>> mask = np.zeros((64, 64), np.uint8)
        >>> mask[16:48, 16:48] = 1  # repaint the middle
        >>> sd.inpaint("a green circle", picture, mask, num_steps=2, seed=0).shape
        (1, 64, 64, 3)
        """
        batch_size = self._resolve_batch(prompt, batch_size)
        self._check_common(num_steps, unconditional_guidance_scale)
        keys = seeds.item_keys(seed, batch_size)
        pixels = self._image_input(image, batch_size)
        mask = I.mask_from_input(mask, pixels.shape[1], pixels.shape[2])
        latent_mask = np.ascontiguousarray(
            np.broadcast_to(mask[::8, ::8][None, :, :, None], (batch_size, *mask[::8, ::8].shape, 1)), np.float32
        )
        noise = self._noise(diffusion_noise, self._latent_shape(batch_size, pixels.shape[1], pixels.shape[2]), keys)
        plan = self.scheduler.plan(num_steps)
        extra_channels = keep = None
        if self.components.unet_channels > self.components.latent_channels:
            masked = self._encode_images(pixels * (mask[None, :, :, None] < 0.5))
            extra_channels = np.concatenate([latent_mask, masked], axis=-1)
        else:
            keep = Keep(latent_mask, self._encode_images(pixels), noise)
        with self._prompt_loras(_texts(prompt)):
            context, unconditional = self._contexts(self._encode(_texts(prompt)), negative_prompt, batch_size, "prompt")
            latents = self._denoise(noise * plan.init_noise_sigma, context, unconditional,
                                    unconditional_guidance_scale, plan, keys, extra_channels=extra_channels, keep=keep,
                                    verbose=verbose)
            return self._decode(latents)

    def _image_input(self, image, batch_size):
        pixels = I.from_uint8(image, batch_size)
        _check_size("image height", pixels.shape[1])
        _check_size("image width", pixels.shape[2])
        return pixels
