"""Textual-inversion embedding files <-> the token they name and their vectors, as numpy arrays (written by
`write_textual_inversion`, at the end).

Forms read:

- AUTOMATIC1111 ``.pt`` (``torch.save``, read by our restricted unpickler, nothing of it run):
  ``{"string_to_token": {"*": id}, "string_to_param": {"*": [n, D]}, "name": ..., "step": ...}``; embeddings
  saved with torch <= 1.11 hold ``string_to_param`` as a pickled ``ParameterDict``.
- AUTOMATIC1111 / kohya ``.safetensors``: ``{"emb_params": [n, D]}``.
- diffusers ``learned_embeds.bin`` / ``.safetensors``: ``{token: [D] or [n, D]}``.

Refused with a ``CheckpointError`` that says why: SD-XL embeddings (``clip_l`` and ``clip_g``), files holding
several terms, vectors of the wrong rank or width, and anything else.

Which token a file names: diffusers' files their key, AUTOMATIC1111's ``.pt`` its ``name`` (what diffusers'
``load_textual_inversion`` uses; AUTOMATIC1111 itself uses the file's name), ``emb_params`` files none.

Example:

>>> import tempfile
>>> import numpy as np
>>> path = write_textual_inversion(tempfile.mkdtemp(), TextualInversion("my-style", np.zeros((2, 768), "float32")))
>>> embedding = read_textual_inversion(path, width=768)
>>> embedding.token, embedding.vectors.shape  # an AUTOMATIC1111 .safetensors names no token
(None, (2, 768))
>>> embedding = read_textual_inversion("EasyNegative.safetensors", width=768)   # doctest: +SKIP
"""

import dataclasses
import os

import numpy as np

from weights_conversion import readers
from weights_conversion.convert import write_safetensors
from weights_conversion.errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class TextualInversion:
    """One learned token: the name the file gives it (or None) and its vectors, float32 ``[n, D]``."""

    token: str | None
    vectors: np.ndarray


def read_textual_inversion(path, width=None):
    """Reads a textual-inversion file in any of the module's forms.

    Args:
        path: a ``.pt`` / ``.bin`` (pickled) or ``.safetensors`` file.
        width: the text encoder's width (768 for SD 1.x, 1024 for SD 2.x), checked when given.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a textual-inversion embedding of a form we read, or of another width.
        UnsafeCheckpointError: a pickle that asks to run code; nothing of it was run.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"embedding file not found: {path}")
    if path.endswith(".safetensors"):
        data = readers.read_state_dict(path)
    elif path.endswith(readers.PICKLE_SUFFIXES):
        data = readers.read_torch_pickle_tree(path)
    else:
        raise CheckpointError(f"{path}: unknown embedding type; expected .pt, .bin or .safetensors")
    return textual_inversion_from_data(data, path, width)


def textual_inversion_from_data(data, where="embedding", width=None):
    """The `TextualInversion` in an already-read file (``where`` names it in messages)."""
    if not isinstance(data, dict) or not data:
        raise CheckpointError(f"{where}: not a textual-inversion embedding (holds {type(data).__name__})")
    if "string_to_param" in data:
        token, vectors = _a1111_embedding(data, where)
    elif "clip_l" in data and "clip_g" in data:
        raise CheckpointError(f"{where}: an SD-XL embedding (clip_l + clip_g); only SD 1.x / 2.x ones are supported")
    elif len(data) == 1:
        key, vectors = next(iter(data.items()))
        token = None if key == "emb_params" else key
    else:
        raise CheckpointError(
            f"{where}: not a textual-inversion embedding: expected string_to_param, emb_params or one "
            f"{{token: vectors}} entry, found {', '.join(sorted(map(str, data))[:10])}"
        )
    return TextualInversion(token, _vectors(vectors, where, width))


def _a1111_embedding(data, where):
    """``(name, vectors)`` of AUTOMATIC1111's layout; its one term is ``"*"``."""
    params = data["string_to_param"]
    state = getattr(params, "state", None)
    if isinstance(state, dict) and "_parameters" in state:  # a pickled ParameterDict (torch <= 1.11)
        params = state["_parameters"]
    if not isinstance(params, dict) or len(params) != 1:
        count = len(params) if isinstance(params, dict) else "no"
        raise CheckpointError(f"{where}: string_to_param holds {count} terms; an embedding file has exactly one")
    name = data.get("name")
    return (name if isinstance(name, str) and name else None), next(iter(params.values()))


def _vectors(array, where, width):
    """The vectors as float32 ``[n, D]`` (one ``[D]`` vector becomes ``[1, D]``), checked."""
    if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.floating):
        raise CheckpointError(f"{where}: the embedding's vectors are not a floating-point tensor")
    vectors = array.reshape(1, -1) if array.ndim == 1 else array
    if vectors.ndim != 2 or vectors.shape[0] < 1 or vectors.shape[1] < 1:
        raise CheckpointError(f"{where}: the embedding's vectors have shape {array.shape}; expected [n, D] or [D]")
    if width is not None and vectors.shape[1] != width:
        families = {768: "SD 1.x", 1024: "SD 2.x"}
        made_for = f" (made for {families[vectors.shape[1]]})" if vectors.shape[1] in families else ""
        raise CheckpointError(
            f"{where}: {vectors.shape[1]}-wide vectors{made_for}, but the text encoder is {width} wide"
        )
    return np.ascontiguousarray(vectors, np.float32)


# ---------------------------------------------------------------------------------------------- writing

EMBEDDING_FORMATS = ("a1111", "diffusers")
DIFFUSERS_EMBEDDING_NAME = "learned_embeds.safetensors"  # what diffusers' textual-inversion training writes


def write_textual_inversion(path, embedding, format="a1111"):
    """Writes a `TextualInversion` as a ``.safetensors`` file that AUTOMATIC1111 or diffusers loads.

    - ``"a1111"``: ``{"emb_params": [n, D]}``, the form kohya and AUTOMATIC1111 write. AUTOMATIC1111 names an
      embedding by its file, so the file is ``<token>.safetensors``: a folder ``path`` gets that file, and a
      file ``path`` must be named so. The token is also kept in the header's metadata (``"name"``), for the
      record; readers (ours, A1111's, diffusers') go by the file's name.
    - ``"diffusers"``: ``{token: [n, D]}``, diffusers' ``learned_embeds.safetensors`` (the name a folder
      ``path`` gets); diffusers' ``load_textual_inversion`` adds ``token``, ``token_1``, ... for n vectors.

    The file appears only when complete (written beside it, then renamed).

    Args:
        path: the file to write, or an existing folder to write it in.
        embedding: the `TextualInversion`; its token is required.
        format: ``"a1111"`` or ``"diffusers"``.

    Returns:
        The path of the file written.

    Raises:
        ValueError: an unknown format, no token, a file name that differs from the token (a1111), vectors
            that are not ``[n, D]``.

    Example:

    >>> import os, tempfile
    >>> import numpy as np
    >>> vectors = np.zeros((2, 768), "float32")
    >>> path = write_textual_inversion(tempfile.mkdtemp(), TextualInversion("my-style", vectors), "a1111")
    >>> os.path.basename(path)
    'my-style.safetensors'
    """
    if format not in EMBEDDING_FORMATS:
        raise ValueError(f"Unknown embedding format {format!r}; expected one of {', '.join(EMBEDDING_FORMATS)}")
    token = embedding.token
    if not token:
        raise ValueError("The embedding has no token to name it by")
    vectors = np.asarray(embedding.vectors, np.float32)
    if vectors.ndim != 2 or 0 in vectors.shape:
        raise ValueError(f"The embedding's vectors have shape {vectors.shape}; expected [n, D]")
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, f"{token}.safetensors" if format == "a1111" else DIFFUSERS_EMBEDDING_NAME)
    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: an embedding is written as a .safetensors file")
    if format == "a1111":
        if os.path.basename(path) != f"{token}.safetensors":
            raise ValueError(f"{path}: AUTOMATIC1111 names an embedding by its file; name it {token}.safetensors "
                             "(or pass a folder)")
        write_safetensors(path, {"emb_params": vectors}, metadata={"name": token})
    else:
        write_safetensors(path, {token: vectors})
    return path
