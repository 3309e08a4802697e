"""LoRA files <-> low-rank updates of our weights, as pure functions over numpy arrays (`write_lora` at the end).

Two families of files, told apart by their key names:

- kohya / AUTOMATIC1111: one entry per adapted PyTorch module, named by its path with ``_`` for ``.`` after
  ``lora_unet_`` or ``lora_te_`` (``lora_unet_down_blocks_0_attentions_0_proj_in``), holding
  ``.lora_down.weight``, ``.lora_up.weight`` and optionally ``.alpha``. UNet modules carry diffusers' names
  (kohya trains SD 1.x/2.x on diffusers' UNet) or, in files made with the original code, LDM's
  (``lora_unet_input_blocks_1_1_proj_in``). LoCon / LyCORIS convolution LoRAs have a ``[r, in, kh, kw]``
  down and a ``[out, r, 1, 1]`` up; LyCORIS may add a Tucker core ``.lora_mid.weight`` ``[r, r, kh, kw]``.
- diffusers / PEFT: ``unet.<module>.lora_A.weight`` and ``.lora_B.weight`` (``text_encoder.<module>`` for
  the text encoder), with alphas as ``<module>.alpha`` tensors, in the ``lora_adapter_metadata`` that
  diffusers writes into the safetensors header (``lora_alpha``, ``alpha_pattern``, ``use_rslora``), or
  absent (scale 1). Older diffusers files name the pairs ``lora.down`` / ``lora.up``,
  ``lora_linear_layer.down`` / ``.up``, ``processor.to_q_lora.down`` / ``.up`` (UNet attention) or
  ``self_attn.to_q_lora.down`` / ``.up`` (text encoder).

Each adapted weight becomes a `LoraUpdate`: ``delta = scale * up @ down`` (``scale = alpha / rank``; with
``use_rslora``, ``alpha / sqrt(rank)``), computed in PyTorch's layout and then laid out as our kernel (HWIO
convolutions, ``[in, out]`` dense kernels) by the converter's own ``kernel_layout``. Fusing is
``kernel + multiplier * update.delta()``.

Module names become our layer names through the converter's renaming rules (``keras_names``), read with
``_`` accepted wherever a rule expects ``.``; LDM's UNet numbering is laid out from our UNet's own levels.

Strict: a key that maps to nothing, a factor missing its partner, a delta whose shape differs from the
model's kernel (an SD 2.x LoRA on an SD 1.x model) and an unsupported network type are all named in one
``CheckpointError``; nothing is returned in part.

Example:

>>> import os, tempfile
>>> import numpy as np
>>> from weights_conversion.readers import read_state_dict
>>> from kerasdiffusion.sources import BUILTIN_MODELS  # the built-in model: a converted folder, plain files
>>> shapes_model = BUILTIN_MODELS["kerasdiffusion/shapes"]
>>> unet_weights = read_state_dict(os.path.join(shapes_model, "unet.safetensors"))  # our names
>>> unet_shapes = {path: array.shape for path, array in unet_weights.items()}
>>> kernel = "down0_attn0_block0_self_q/kernel"
>>> width = unet_shapes[kernel][0]
>>> update = LoraUpdate(kernel, (width, width), up=np.ones((width, 4), "float32"), down=np.ones((4, width), "float32"),
...                     scale=0.25)
>>> path = write_lora(os.path.join(tempfile.mkdtemp(), "style.safetensors"), {"unet": [update]}, format="kohya")
>>> state_dict, metadata = read_lora(path)
>>> sorted(state_dict)
['lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha',
 'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight',
 'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight']
>>> updates = lora_updates(state_dict, {"unet": unet_shapes}, metadata)
>>> list(updates["unet"]), updates["text_encoder"]
(['down0_attn0_block0_self_q/kernel'], {})
>>> fused_unet = fuse(unet_weights, updates["unet"], multiplier=0.8)
>>> [path for path in unet_weights if fused_unet[path] is not unet_weights[path]]  # the others are shared
['down0_attn0_block0_self_q/kernel']
"""

import dataclasses
import json
import math
import os
import re

import numpy as np

from weights_conversion import keras_names, ldm, readers
from weights_conversion.convert import write_safetensors
from weights_conversion.errors import CheckpointError

NETWORKS = ("unet", "text_encoder")
_MAX_LISTED = 40

# A key's tail -> which factor it holds. kohya / LyCORIS first, then PEFT, then older diffusers names.
_FACTOR_SUFFIXES = {
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_mid.weight": "mid",
    ".alpha": "alpha",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
}
# diffusers' attention-processor LoRAs: "<attn1>.processor.to_q_lora.down.weight" adapts the UNet's "<attn1>.to_q",
# "<self_attn>.to_q_lora.down.weight" the text encoder's "<self_attn>.q_proj".
_PROCESSOR_FACTOR = re.compile(r"(.+?)(\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
_PROCESSOR_TARGETS = {"to_q": ("to_q", "q_proj"), "to_k": ("to_k", "k_proj"), "to_v": ("to_v", "v_proj"),
                      "to_out": ("to_out.0", "out_proj")}

# Other LyCORIS / PEFT network types, recognised by their tensors' names so the error can say what they are.
_UNSUPPORTED_TYPES = [
    (re.compile(r"\.hada_(w|t)\d"), "LoHa (hada_*)"),
    (re.compile(r"\.lokr_"), "LoKr (lokr_*)"),
    (re.compile(r"\.(dora_scale|lora_magnitude_vector)"), "DoRA"),
    (re.compile(r"\.(on_input|weight_ia3)"), "(IA)^3"),
    (re.compile(r"\.(a1|a2|b1|b2)\.weight$"), "GLoRA"),
    (re.compile(r"\.oft_"), "OFT"),
    (re.compile(r"\.diff(_b)?$"), "full weight difference (diff)"),
    (re.compile(r"\.lora_B\.bias$"), "LoRA with a bias (lora_B.bias)"),
    (re.compile(r"\.lora_embedding_[AB]$"), "embedding LoRA"),
]
_SD_XL_PREFIXES = ("lora_te1_", "lora_te2_", "text_encoder_2.")

# The converter's rules, reading "_" where they expect ".": kohya names are module paths joined by "_".
_UNET_RULES = [(p.replace(r"\.", "[._]"), r) for p, r in keras_names.UNET_RULES]
_TEXT_ENCODER_RULES = [(p.replace(r"\.", "[._]"), r) for p, r in keras_names.TEXT_ENCODER_RULES]
_LDM_BLOCK = re.compile(r"(input_blocks_\d+_\d+|middle_block_\d+|output_blocks_\d+_\d+)_(.+)")
_LDM_TOP = {ldm_name.replace(".", "_"): name.replace(".", "_") for ldm_name, name in ldm.UNET_TOP.items()}
_LDM_RESNET_PARTS = {ldm_name.replace(".", "_"): name for ldm_name, name in ldm.RESNET_PARTS.items()}


@dataclasses.dataclass(frozen=True)
class LoraUpdate:
    """The low-rank update of one kernel, kept as its factors (PyTorch layout, float32).

    ``delta()`` is ``scale * up @ down`` (through the Tucker core ``mid`` when there is one), laid out as our
    kernel at ``path``.
    """

    path: str  # our variable, e.g. "down0_attn0_block0_self_q/kernel"
    torch_shape: tuple  # the PyTorch weight it updates: [out, in] or [out, in, kh, kw]
    up: np.ndarray  # [out, r]
    down: np.ndarray  # [r, in] or [r, in, kh, kw]
    scale: float  # alpha / rank
    mid: np.ndarray | None = None  # [r, r, kh, kw]; then down is [r, in]
    source: str = ""  # the file's name for the adapted module, for messages

    def torch_delta(self):
        """``scale * up @ down`` in PyTorch's layout: ``[out, in]`` or ``[out, in, kh, kw]``."""
        if self.mid is not None:
            # LyCORIS' Tucker form: a 1x1 down, a kh x kw core and a 1x1 up, composed into one kernel.
            delta = np.einsum("nmkl,in,mj->ijkl", self.mid, self.up, self.down)
        else:
            delta = self.up @ self.down.reshape(self.down.shape[0], -1)
        # A 1x1 convolution LoRA on a layer that is dense here (SD 1.x's proj_in) loses its 1x1 axes.
        return delta.reshape(self.torch_shape) * np.float32(self.scale)

    def delta(self):
        """The update in our kernel layout: HWIO for convolutions, ``[in, out]`` for dense layers."""
        return keras_names.kernel_layout(self.path.rsplit("/", 1)[0], self.torch_delta())


def read_lora(path):
    """A LoRA file's tensors and its safetensors metadata (``{}`` for pickled ``.bin`` / ``.pt`` files).

    Returns:
        ``(state_dict, metadata)``, to pass to `lora_updates`.
    """
    path = os.fspath(path)
    state_dict = readers.read_state_dict(path)
    metadata = readers.read_safetensors_metadata(path) if path.endswith(".safetensors") else {}
    return state_dict, metadata


def lora_updates(state_dict, model_shapes, metadata=None, where=None):
    """A LoRA state dict as updates of our weights, checked against the model's shapes.

    Args:
        state_dict: ``{name: array}`` of a kohya / A1111 or diffusers / PEFT LoRA file.
        model_shapes: ``{"unet": {path: shape}, "text_encoder": {path: shape}}``: the variables of the
            model the LoRA is for (our paths; e.g. ``{v.path: tuple(v.shape) for v in model.weights}``).
        metadata: the file's safetensors metadata (``read_lora``), for diffusers' ``lora_adapter_metadata``.
        where: what the error messages name (the file's path), if anything.

    Returns:
        ``{"unet": {path: LoraUpdate}, "text_encoder": {path: LoraUpdate}}`` (a network the file does not
        adapt maps to ``{}``).

    Raises:
        CheckpointError: naming every key with no place in the model, every incomplete or mis-shaped pair
            and every unsupported network type, all at once.
    """
    # 1. The file's tensors grouped by the module they adapt; keys that cannot be read are problems.
    modules, problems = _group_by_module(state_dict)
    # 2. Each module's kernel in our model, and its factors checked against that kernel.
    prefix = f"{where}: " if where else ""
    configs = {network: _peft_config(metadata, network, prefix) for network in NETWORKS}
    ldm_blocks = ldm_unet_blocks(model_shapes.get("unet", {}))
    updates = {network: {} for network in NETWORKS}
    for (network, module), factors in sorted(modules.items()):
        source, shapes = f"{network}: {module}", model_shapes.get(network, {})
        layer = _layer_name(network, module, ldm_blocks)
        path = layer and f"{layer}/kernel"
        if path not in shapes:
            problems.append(("no place in the model", f"{source} ({', '.join(sorted(factors))})"))
        elif path in updates[network]:
            problems.append(("adapting a layer twice", f"{source} -> {path}"))
        else:
            update, problem = _update(path, source, factors, shapes[path], configs[network], module)
            if problem:
                problems.append(problem)
            else:
                updates[network][path] = update
    # 3. All or nothing.
    if problems:
        raise CheckpointError(prefix + _problems_message(problems))
    return updates


def fuse(weights, updates, multiplier=1.0):
    """``weights`` with one network's LoRA updates added: ``kernel + multiplier * delta``.

    Args:
        weights: ``{path: array}`` of one network (not modified).
        updates: ``{path: LoraUpdate}``, one network's part of `lora_updates`' result.
        multiplier: the LoRA's strength (A1111's ``<lora:NAME:multiplier>``).

    Returns:
        A new ``{path: array}``; untouched arrays are shared, updated ones are new, in their own dtype.
    """
    fused = dict(weights)
    for path, update in updates.items():
        kernel = weights[path]
        fused[path] = (kernel.astype(np.float32) + np.float32(multiplier) * update.delta()).astype(kernel.dtype)
    return fused


# --------------------------------------------------------------------------------------------- key names


def _group_by_module(state_dict):
    """``{(network, module): {"down"/"up"/"mid"/"alpha": array}}`` and the keys that could not be read."""
    modules, problems = {}, []
    for key, array in state_dict.items():
        if key.startswith(_SD_XL_PREFIXES):
            problems.append(("SD-XL (lora_te1_ / lora_te2_ / text_encoder_2), not SD 1.x / 2.x", key))
            continue
        kind = next((name for pattern, name in _UNSUPPORTED_TYPES if pattern.search(key)), None)
        if kind is not None:
            problems.append((f"unsupported network type {kind}", key))
            continue
        split = _split_key(key)
        if split is None:
            problems.append(("not a LoRA factor of unet / text_encoder this reader knows", key))
            continue
        network, module, factor = split
        modules.setdefault((network, module), {})[factor] = np.asarray(array, np.float32)
    return modules, problems


def _split_key(key):
    """``(network, module, factor)`` of one LoRA tensor name, or None."""
    processor = _PROCESSOR_FACTOR.fullmatch(key)
    if processor:
        attention, _, target, factor = processor.groups()
        name = f"{attention}.{_PROCESSOR_TARGETS[target][attention.endswith('self_attn')]}"
    else:
        suffix = next((s for s in _FACTOR_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            return None
        name, factor = key[: -len(suffix)], _FACTOR_SUFFIXES[suffix]
    for prefix, network in (("lora_unet_", "unet"), ("lora_te_", "text_encoder"), ("unet.", "unet"),
                            ("text_encoder.", "text_encoder")):
        if name.startswith(prefix):
            return network, name[len(prefix) :], factor
    return None


def _layer_name(network, module, ldm_blocks):
    """Our layer for a module named as in diffusers / transformers (dots or underscores) or in LDM."""
    if network == "text_encoder":
        return keras_names.rename_module(module, _TEXT_ENCODER_RULES)
    module = _ldm_to_diffusers(module, ldm_blocks)
    return None if module is None else keras_names.rename_module(module, _UNET_RULES)


def _ldm_to_diffusers(module, ldm_blocks):
    """An LDM UNet module (``input_blocks_4_0_in_layers_2``) as diffusers' (``down_blocks_1_resnets_0_conv1``),
    underscore-joined; other names pass unchanged; None for an LDM name with no counterpart."""
    if module in _LDM_TOP:
        return _LDM_TOP[module]
    match = _LDM_BLOCK.fullmatch(module)
    if not match:
        return module
    if match.group(1) not in ldm_blocks:
        return None
    block, kind = ldm_blocks[match.group(1)]
    part = match.group(2)
    if kind == "resnet":
        part = _LDM_RESNET_PARTS.get(part)
    elif kind in ("downsample", "upsample"):
        part = "conv" if part == {"downsample": "op", "upsample": "conv"}[kind] else None
    return None if part is None else f"{block}_{part}"


def ldm_unet_blocks(unet_paths):
    """`ldm.unet_block_layout` with ``_``-joined names, as kohya files name modules.

    Example:

    >>> ldm_unet_blocks(["down0_res0_conv1/kernel", "down0_attn0_proj_in/kernel"])["input_blocks_1_1"]
    ('down_blocks_0_attentions_0', 'attention')
    """
    return {block.replace(".", "_"): (module.replace(".", "_"), kind)
            for block, (module, kind) in ldm.unet_block_layout(unet_paths).items()}


# ------------------------------------------------------------------------------------------------ factors


def _peft_config(metadata, network, prefix=""):
    """One network's PEFT ``LoraConfig`` fields from diffusers' ``lora_adapter_metadata`` (``{}`` if none),
    those this reader uses checked: the metadata comes from the file, like its tensors."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    if not isinstance(raw, str):
        raise CheckpointError(f"{prefix}corrupt lora_adapter_metadata: a {type(raw).__name__}, not JSON text")
    try:
        packed = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, digits past Python's limit, deep nesting
        raise CheckpointError(f"{prefix}corrupt lora_adapter_metadata: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(packed, dict):
        raise CheckpointError(f"{prefix}corrupt lora_adapter_metadata: a JSON {type(packed).__name__}, not an object")
    config = {k[len(network) + 1 :]: v for k, v in packed.items() if k.startswith(network + ".")}
    if config.get("use_dora"):
        raise CheckpointError(f"{prefix}{network}: a DoRA adapter (use_dora) is not supported")
    problem = _config_problem(config)
    if problem:
        raise CheckpointError(f"{prefix}corrupt lora_adapter_metadata: {network}.{problem}")
    return config


def _is_number(value):
    return type(value) in (int, float) and math.isfinite(value)


# PEFT matches alpha_pattern keys as regular expressions. Ours run only when they cannot backtrack
# without end: module names, "|" alternatives, anchors and at most two ".*" (PEFT's documented uses).
_SAFE_PATTERN = re.compile(r"[\w.|^$-]*(\.\*[\w.|^$-]*){0,2}")
_MAX_PATTERN = 256


def _config_problem(config):
    """What is wrong with the fields of one network's config that this reader uses, or None."""
    if "lora_alpha" in config and not _is_number(config["lora_alpha"]):
        return f"lora_alpha is {_clip(config['lora_alpha'])}, not a finite number"
    if not isinstance(config.get("use_rslora", False), bool):
        return f"use_rslora is {_clip(config['use_rslora'])}, not true or false"
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        return f"alpha_pattern is {_clip(patterns)}, not an object"
    for pattern, value in patterns.items():
        if len(pattern) > _MAX_PATTERN or not _SAFE_PATTERN.fullmatch(pattern):
            return (f"alpha_pattern key {_clip(pattern)} is not a module name (letters, digits, _ . - |, "
                    "anchors and at most two .*)")
        if not _is_number(value):
            return f"alpha_pattern[{_clip(pattern)}] is {_clip(value)}, not a finite number"
    return None


def _clip(value):
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _pattern_value(patterns, module, default):
    """PEFT's rank/alpha patterns: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", module)``."""
    for pattern, value in (patterns or {}).items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", module):
                return value
        except re.error as e:  # "a|" is fine, "^$|" too; an empty group or a stray "|" at worst
            raise CheckpointError(f"corrupt lora_adapter_metadata: alpha_pattern key {_clip(pattern)}: {e}") from None
    return default


def _scale(factors, rank, config, module):
    """``alpha / rank``: alpha from the file's ``.alpha``, else from the PEFT metadata, else the rank."""
    if "alpha" in factors:
        return float(factors["alpha"].reshape(-1)[0]) / rank  # one finite number: _update
    if "lora_alpha" in config:
        alpha = _pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
        return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    return 1.0


def _torch_kernel_shape(model_shape):
    """The PyTorch weight shape behind one of our kernels: ``[out, in]`` or ``[out, in, kh, kw]``."""
    if len(model_shape) == 2:
        return (model_shape[1], model_shape[0])
    kh, kw, fan_in, fan_out = model_shape
    return (fan_out, fan_in, kh, kw)


def _factor_shapes(factors):
    """``(up [out, r], down, mid, delta shape)`` with 1x1 kernels squeezed, or a message."""
    up, down, mid = factors["up"], factors["down"], factors.get("mid")
    if up.ndim == 4:
        if up.shape[2:] != (1, 1):
            return f"up of shape {up.shape} is not 1x1"
        up = up[:, :, 0, 0]
    if mid is not None:
        if down.ndim != 4 or down.shape[2:] != (1, 1) or mid.ndim != 4:
            return f"Tucker factors down {down.shape}, mid {mid.shape} are not 1x1 and kh x kw"
        down = down[:, :, 0, 0]
        if up.ndim != 2 or mid.shape[:2] != (up.shape[1], down.shape[0]):
            return f"mid of shape {mid.shape} does not join up {up.shape} and down {down.shape}"
        return up, down, mid, (up.shape[0], down.shape[1], *mid.shape[2:])
    if up.ndim != 2 or down.ndim not in (2, 4) or up.shape[1] != down.shape[0]:
        return f"up {factors['up'].shape} and down {factors['down'].shape} do not multiply"
    return up, down, None, (up.shape[0], *down.shape[1:])


def _update(path, source, factors, model_shape, config, module):
    """One `LoraUpdate`, or ``(None, problem)`` where the factors are incomplete or do not fit the kernel."""
    missing = [f for f in ("down", "up") if f not in factors]
    if missing:
        return None, ("incomplete", f"{source} lacks its {' and '.join(missing)} factor")
    shapes = _factor_shapes(factors)
    if isinstance(shapes, str):
        return None, ("malformed", f"{source}: {shapes}")
    up, down, mid, delta_shape = shapes
    if down.shape[0] == 0:
        return None, ("malformed", f"{source}: rank 0 (down {factors['down'].shape})")
    alpha = factors.get("alpha")
    if alpha is not None and not (alpha.size == 1 and np.isfinite(alpha).all()):
        return None, ("malformed", f"{source}: alpha of shape {alpha.shape} is not one finite number")
    expected = _torch_kernel_shape(model_shape)
    fits = delta_shape == expected or (len(expected) == 2 and delta_shape == (*expected, 1, 1))
    if not fits:
        return None, ("mis-shaped", f"{source} -> {path} (LoRA {delta_shape}, model {expected}, PyTorch layout)")
    scale = _scale(factors, down.shape[0], config, module)
    # The file's own layout: an SD 1.x proj_in is a 1x1 convolution in PyTorch though dense here.
    return LoraUpdate(path, delta_shape, up, down, scale, mid, source), None


def _problems_message(problems):
    """One message listing every problem, grouped by kind."""
    groups = {}
    for kind, item in problems:
        groups.setdefault(kind, []).append(item)
    parts = []
    for kind, items in groups.items():
        listed = "; ".join(items[:_MAX_LISTED])
        more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
        parts.append(f"{kind}: {listed}{more}")
    return f"LoRA does not fit the model ({len(problems)} problems): " + " | ".join(parts)


# ---------------------------------------------------------------------------------------------- writing

LORA_FORMATS = ("diffusers", "kohya")
# The networks' prefixes in each format (the reader's `_split_key` reads the same ones).
_TEXT_ATTENTION = (".q_proj", ".k_proj", ".v_proj", ".out_proj")
_WRITE_PREFIXES = {"diffusers": {"unet": "unet.", "text_encoder": "text_encoder."},
                   "kohya": {"unet": "lora_unet_", "text_encoder": "lora_te_"}}


def lora_state_dict(updates, format="diffusers"):
    """LoRA updates as the tensors and safetensors metadata of a diffusers / PEFT or a kohya / A1111 file.

    - ``"diffusers"``: ``unet.<module>.lora_A.weight`` (down) and ``.lora_B.weight`` (up), ``text_encoder.<module>``
      for the text encoder, and the ``lora_adapter_metadata`` that diffusers' ``save_lora_weights`` writes: per
      network the PEFT ``LoraConfig`` fields ``r``, ``lora_alpha``, ``target_modules`` (every adapted module),
      and ``rank_pattern`` / ``alpha_pattern`` for the modules whose rank or alpha differ from the most common.
      A text encoder LoRA without attention (the MLP alone) is named ``lora_linear_layer.down`` / ``.up``, the
      form diffusers reads it in (`_diffusers_reads_peft_names`).
    - ``"kohya"``: ``lora_unet_<module with _ for .>.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``
      (``lora_te_`` for the text encoder), as kohya's sd-scripts write them; a Tucker core as ``.lora_mid.weight``.

    Module names are diffusers' / transformers' (``keras_names.torch_modules``); each update's ``torch_shape``
    gives the factors' layout (``[out, r, 1, 1]`` / ``[r, in, kh, kw]`` for convolutions, SD 1.x's 1x1
    ``proj_in`` / ``proj_out`` included); alpha is ``scale * rank``.

    Args:
        updates: ``{"unet": updates, "text_encoder": updates}``, each a list of `LoraUpdate` or
            ``{path: LoraUpdate}`` (as `lora_updates` returns); a network may be left out.
        format: ``"diffusers"`` or ``"kohya"``.

    Returns:
        ``(state_dict, metadata)``: ``{name: float32 array}`` and ``{str: str}``.

    Raises:
        ValueError: an unknown format or network, a Tucker core in a diffusers file, factors that do not
            fit their ``torch_shape``.

    Example:

    >>> up, down = np.ones((320, 4), "float32"), np.ones((4, 320), "float32")
    >>> update = LoraUpdate("down0_attn0_block0_self_q/kernel", (320, 320), up, down, scale=0.5)
    >>> state_dict, _ = lora_state_dict({"unet": [update]}, "kohya")
    >>> sorted(state_dict)[0], float(state_dict[sorted(state_dict)[0]])
    ('lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha', 2.0)
    """
    if format not in LORA_FORMATS:
        raise ValueError(f"Unknown LoRA format {format!r}; expected one of {', '.join(LORA_FORMATS)}")
    state_dict, configs = {}, {}
    for network, network_updates in updates.items():
        if network not in NETWORKS:
            raise ValueError(f"Unknown network {network!r} in the LoRA updates; expected {', '.join(NETWORKS)}")
        network_updates = list(network_updates.values() if isinstance(network_updates, dict) else network_updates)
        if not network_updates:
            continue
        modules = keras_names.torch_modules(network, [u.path.rsplit("/", 1)[0] for u in network_updates])
        peft_names = format == "diffusers" and _diffusers_reads_peft_names(network, modules.values())
        ranks, alphas = {}, {}
        for update in network_updates:
            module = modules[update.path.rsplit("/", 1)[0]]
            factors = _torch_factors(update)
            ranks[module], alphas[module] = factors["down"].shape[0], float(update.scale) * factors["down"].shape[0]
            name = _WRITE_PREFIXES[format][network] + (module.replace(".", "_") if format == "kohya" else module)
            if format == "kohya":
                state_dict.update(_kohya_factors(name, factors, alphas[module]))
            else:
                state_dict.update(_diffusers_factors(name, factors, peft_names))
        configs[network] = _peft_config_fields(_peft_names(ranks), _peft_names(alphas))
    metadata = {}
    if format == "diffusers" and configs:
        packed = {f"{network}.{k}": v for network, config in configs.items() for k, v in config.items()}
        metadata["lora_adapter_metadata"] = json.dumps(packed, indent=2, sort_keys=True)
    return state_dict, metadata


def write_lora(path, updates, format="diffusers"):
    """Writes LoRA updates as a ``.safetensors`` file that diffusers (``load_lora_weights``), AUTOMATIC1111 and
    ComfyUI load, and `read_lora` / `lora_updates` read back; see `lora_state_dict` for the two formats.

    The file appears only when complete (written beside ``path``, then renamed).

    Example:

    >>> import os, tempfile
    >>> import numpy as np
    >>> update = LoraUpdate("down0_attn0_block0_self_q/kernel", (64, 64), up=np.ones((64, 4), "float32"),
    ...                     down=np.ones((4, 64), "float32"), scale=0.25)
    >>> path = write_lora(os.path.join(tempfile.mkdtemp(), "style.safetensors"), {"unet": [update]}, format="kohya")
    >>> sorted(read_lora(path)[0])
    ['lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha',
     'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight',
     'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight']
    """
    state_dict, metadata = lora_state_dict(updates, format)
    if not state_dict:
        raise ValueError("No LoRA updates to write")
    write_safetensors(path, state_dict, metadata=metadata)
    return os.fspath(path)


def _torch_factors(update):
    """``{"down", "up"[, "mid"]}`` of an update in PyTorch's layout for its ``torch_shape``, float32."""
    shape, rank = tuple(update.torch_shape), update.down.shape[0]
    out, fan_in, spatial = shape[0], shape[1], shape[2:]
    down_shape = (rank, fan_in, 1, 1) if update.mid is not None else (rank, fan_in, *spatial)
    mid_fits = update.mid is None or (update.mid.shape[:2] == (rank, rank) and update.mid.shape[2:] == spatial)
    if update.up.size != out * rank or update.down.size != np.prod(down_shape) or not mid_fits:
        raise ValueError(f"{update.path}: LoRA factors up {update.up.shape}, down {update.down.shape} do not make "
                         f"the PyTorch weight {shape}")
    factors = {"up": np.asarray(update.up, np.float32).reshape(out, rank, *(1,) * len(spatial)),
               "down": np.asarray(update.down, np.float32).reshape(down_shape)}
    if update.mid is not None:
        factors["mid"] = np.asarray(update.mid, np.float32)
    return factors


def _kohya_factors(name, factors, alpha):
    named = {f"{name}.lora_{factor}.weight": array for factor, array in factors.items()}
    return {**named, f"{name}.alpha": np.array(alpha, np.float32)}


def _diffusers_factors(name, factors, peft_names):
    if "mid" in factors:
        raise ValueError(f"{name}: a Tucker-core (LyCORIS) LoRA has no diffusers / PEFT form; write it as kohya")
    if peft_names:
        return {f"{name}.lora_A.weight": factors["down"], f"{name}.lora_B.weight": factors["up"]}
    return {f"{name}.lora_linear_layer.down.weight": factors["down"],
            f"{name}.lora_linear_layer.up.weight": factors["up"]}


def _diffusers_reads_peft_names(network, modules):
    """Whether diffusers' ``load_lora_weights`` reads this network's factors under PEFT's names (``lora_A``/``B``).

    Its text encoder loader recognises a PEFT file by an attention projection's factors (``q_proj.lora_A``, ...):
    a text encoder LoRA of the MLP alone (``fc1`` / ``fc2``) it refuses ("Could not automatically infer state dict
    type"), while it reads the same factors under its own older names, ``lora_linear_layer.down`` / ``.up``.
    """
    return network != "text_encoder" or any(m.endswith(_TEXT_ATTENTION) for m in modules)



def _peft_names(by_module):
    """Module names as PEFT matches them whatever the transformers version: without ``text_model.``, which
    transformers 5 drops (PEFT matches a target at the end of a module's path, so older versions match too)."""
    return {module.removeprefix("text_model."): value for module, value in by_module.items()}


def _most_common(values):
    values = list(values)
    return max(sorted(set(values)), key=values.count)


def _peft_config_fields(ranks, alphas):
    """The PEFT ``LoraConfig`` fields that give each module its rank and alpha (module names as patterns:
    PEFT matches ``(.*\\.)?(<pattern>)$``, and our module names are whole paths)."""
    rank, alpha = _most_common(ranks.values()), _most_common(alphas.values())
    return {
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {m: r for m, r in sorted(ranks.items()) if r != rank},
        "alpha_pattern": {m: a for m, a in sorted(alphas.items()) if a != alpha},
        "use_rslora": False,
        "use_dora": False,
    }
