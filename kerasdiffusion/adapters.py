"""LoRAs fused into the networks' weights, and textual-inversion tokens added to the tokenizer and text encoder.

A LoRA changes weights, not programs: loading one assigns ``original + Σ scale_i · delta_i`` to every kernel
it adapts (the sum over the LoRAs loaded), so every compiled program keeps running unchanged and generation
costs what it cost before. `FusedLoras` keeps the original value of each kernel it touched; when the last
LoRA on a kernel is unloaded, that original is assigned back, bit for bit.

A textual inversion adds tokens, so it does rebuild: a tokenizer that knows the new token (never split, and
expanded to its vectors' ids) and a text encoder with more embedding rows, its other weights copied from the
current one (LoRAs fused in it included).

Example:

>>> import os, tempfile
>>> import numpy as np
>>> import kerasdiffusion as kd
>>> from kerasdiffusion import training
>>> sd = kd.StableDiffusion.from_pretrained("kerasdiffusion/shapes")
>>> folder = tempfile.mkdtemp()
>>> trainer = training.Trainer(sd, method="lora", seed=0)
>>> for factors in trainer.lora_factors:  # non-zero, as after training
...     _ = factors.up.assign(np.full(factors.up.shape, 0.01, "float32"))
>>> lora = trainer.save(os.path.join(folder, "style.safetensors"), format="kohya")
>>> def unet_weights():
...     return [np.array(variable) for variable in sd.diffusion_model.weights]
>>> original = unet_weights()
>>> name = sd.load_lora(lora, scale=0.8)   # kohya / A1111 or diffusers / PEFT
>>> sd.set_lora_scale(name, 0.5)
>>> any(not np.array_equal(now, before) for now, before in zip(unet_weights(), original))
True
>>> sd.unload_lora(name)                   # the original weights, exactly
>>> all(np.array_equal(now, before) for now, before in zip(unet_weights(), original))
True
>>> embedding = training.Trainer(sd, method="textual_inversion", token="my-shape").save(folder)
>>> sd.load_textual_inversion(embedding)   # A1111 .pt / .safetensors or diffusers' learned_embeds
'my-shape'

Files made for Stable Diffusion 1.5 load into it the same way:

>>> sd = kd.StableDiffusion.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")  # doctest: +SKIP
>>> sd.load_lora("watercolor.safetensors", scale=0.8)                                      # doctest: +SKIP
'watercolor'
>>> sd.load_textual_inversion("EasyNegative.safetensors")                                  # doctest: +SKIP
'EasyNegative'
"""

import dataclasses
import os

import numpy as np
from keras import ops

from kerasdiffusion import config as C
from kerasdiffusion import sources
from kerasdiffusion.layers import to_be_loaded
from kerasdiffusion.text_encoder import build_text_encoder
from weights_conversion.embeddings import read_textual_inversion
from weights_conversion.lora import lora_updates, read_lora

# The networks a LoRA adapts: the LoRA file's name for each, and the `Components` field that holds it.
LORA_NETWORKS = {"unet": "diffusion_model", "text_encoder": "text_encoder"}
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
EMBEDDING_WEIGHT_NAME = "learned_embeds.safetensors"  # what diffusers' textual-inversion training writes


# ------------------------------------------------------------------------------------------------- files


def adapter_file(source, weight_name, default_weight_name):
    """A local file for a LoRA or embedding ``source``: the path itself, or the file of a Hub repository.

    Raises:
        FileNotFoundError: a local path that does not exist.
        OSError: a Hub id that cannot be fetched, in one line (see `sources.hub_error`).
    """
    source = os.fspath(source)
    if os.path.isfile(source):
        return source
    if os.path.isdir(source):
        path = os.path.join(source, weight_name or default_weight_name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{source!r} is a folder without {weight_name or default_weight_name}")
        return path
    if not sources.is_hub_id(source):
        raise FileNotFoundError(f"No file at {source!r}: expected a .safetensors (or .pt / .bin) file, or a "
                                "Hugging Face Hub id (org/name)")
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(source, weight_name or default_weight_name)
    except Exception as error:  # offline, unknown repo or file, gated: many kinds, one message
        raise sources.hub_error(source, error) from error


def adapter_name(path):
    """A file's name without its suffix: what AUTOMATIC1111 calls a LoRA or an embedding by."""
    return os.path.splitext(os.path.basename(path))[0]


def source_name(source, path):
    """What to call an adapter by default: its file's name, or the name of the folder or Hub repository holding it."""
    source = os.fspath(source)
    return adapter_name(path) if os.path.isfile(source) else os.path.basename(os.path.normpath(source))


# -------------------------------------------------------------------------------------------------- LoRA


def lora_shapes(components):
    """``{"unet": {path: shape}, "text_encoder": {...}}``: the kernels a LoRA may adapt, for `lora_updates`."""
    return {network: {v.path: tuple(v.shape) for v in getattr(components, field).weights}
            for network, field in LORA_NETWORKS.items()}


def read_lora_updates(path, components):
    """A LoRA file's updates for these components; strict (`lora_updates` raises before returning anything)."""
    state_dict, metadata = read_lora(path)
    return lora_updates(state_dict, lora_shapes(components), metadata)


@dataclasses.dataclass
class _Lora:
    updates: dict  # {network: {path: LoraUpdate}}
    scales: dict  # {network: multiplier}


class FusedLoras:
    """The LoRAs fused into a model's weights, and the original value of every kernel they touch.

    Every change recomputes the touched kernels from their originals, ``original + Σ scale_i · delta_i``
    in float32, so the order of loading and unloading does not matter and no rounding accumulates.
    """

    def __init__(self):
        self.loras = {}  # name -> _Lora, in loading order
        self.originals = {}  # (network, path) -> numpy array, the kernel before any LoRA

    def __contains__(self, name):
        return name in self.loras

    def scales(self, name):
        """``{network: multiplier}`` of a loaded LoRA."""
        return dict(self._get(name).scales)

    def add(self, name, updates, scales, components):
        if name in self.loras:
            raise ValueError(f"A LoRA named {name!r} is already loaded: unload it first, or pass another name=")
        self.loras[name] = _Lora(updates, dict(scales))
        for network, network_updates in updates.items():
            variables = _variables(components, network)
            for path in network_updates:
                self.originals.setdefault((network, path), _value(variables[path]))
        self._refresh(_touched(updates), components)

    def set_scales(self, name, scales, components):
        lora = self._get(name)
        lora.scales.update(scales)
        self._refresh(_touched(lora.updates), components)

    def remove(self, name, components):
        lora = self._get(name)
        del self.loras[name]
        self._refresh(_touched(lora.updates), components)

    def _get(self, name):
        if name not in self.loras:
            loaded = ", ".join(map(repr, self.loras)) or "none"
            raise KeyError(f"No LoRA named {name!r} is loaded (loaded: {loaded})")
        return self.loras[name]

    def _refresh(self, keys, components):
        """Assigns each kernel its original plus the scaled updates of every LoRA still loaded on it."""
        variables = {network: _variables(components, network) for network in LORA_NETWORKS}
        for network, path in keys:
            original = self.originals[(network, path)]
            contributions = [(lora.scales[network], lora.updates[network][path]) for lora in self.loras.values()
                             if path in lora.updates.get(network, {})]
            variable = variables[network][path]
            if not contributions:
                variable.assign(original)  # exactly the weights before any LoRA
                del self.originals[(network, path)]
                continue
            value = original.astype(np.float32)  # a copy: the original stays as it is
            for scale, update in contributions:
                value += np.float32(scale) * update.delta()
            variable.assign(value.astype(original.dtype, copy=False))


def _value(variable):
    """A variable's current value, as a numpy array of its own."""
    return np.array(ops.convert_to_numpy(variable.value), copy=True)


def _variables(components, network):
    return {v.path: v for v in getattr(components, LORA_NETWORKS[network]).weights}


def _touched(updates):
    return [(network, path) for network, network_updates in updates.items() for path in network_updates]


# ------------------------------------------------------------------------------------- textual inversion


def read_embedding(path, token, width):
    """``(token, vectors [n, D])`` of an embedding file: the token given, else the file's, else its name."""
    embedding = read_textual_inversion(path, width=width)
    return token or embedding.token or adapter_name(path), embedding.vectors


def with_embeddings(base_tokenizer, text_encoder, base_rows, embeddings, family, precision):
    """A tokenizer and a text encoder that know ``embeddings`` (``{token: vectors}``) on top of the base ones.

    The text encoder is rebuilt with the base encoder's ``base_rows`` embedding rows, then one row per vector,
    in order; every other weight is copied from ``text_encoder`` (so fused LoRAs stay fused).
    """
    # 1. The tokenizer: each token's vectors get consecutive ids after the base rows.
    counts = {token: len(vectors) for token, vectors in embeddings.items()}
    tokenizer = base_tokenizer.with_added_tokens(counts, first_id=base_rows) if counts else base_tokenizer
    # 2. The text encoder, with a row for every id.
    weights = {v.path: v for v in text_encoder.weights}
    rows = _value(weights["token_embedding/embeddings"])[:base_rows]
    table = np.concatenate([rows, *(np.asarray(v, rows.dtype) for v in embeddings.values())])
    config = dataclasses.replace(C.text_encoder_config_from_weights(weights, family), vocab_size=len(table))
    with to_be_loaded():
        rebuilt = build_text_encoder(config, dtype=precision, name=text_encoder.name)
    # 3. Its weights: the current ones, with the new embedding table.
    for variable in rebuilt.weights:
        value = table if variable.path == "token_embedding/embeddings" else _value(weights[variable.path])
        variable.assign(value)
    return tokenizer, rebuilt
