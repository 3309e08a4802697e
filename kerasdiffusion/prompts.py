"""Prompts as AUTOMATIC1111 reads them: emphasis, ``BREAK``, 75-token chunks and ``<lora:NAME:SCALE>`` tags.

AUTOMATIC1111's ``prompt_syntax="a1111"`` path, step by step (its ``modules/prompt_parser.py``,
``modules/sd_hijack_clip.py``, ``modules/sd_emphasis.py`` and ``modules/extra_networks.py``):

1. ``extract_loras`` cuts ``<lora:NAME:SCALE>`` tags out of the prompt.
2. ``parse_prompt_attention`` splits the rest into ``(text, weight)`` runs: ``(x)`` multiplies by 1.1,
   ``[x]`` by 1 / 1.1, ``(x:1.3)`` by 1.3, brackets left open act up to the end, ``\\(`` ``\\)`` ``\\[``
   ``\\]`` ``\\\\`` are literal; ``BREAK`` is the marker ``("BREAK", -1.0)``.
3. ``chunk_prompt`` tokenizes each run, gives its tokens the run's weight and fills 75-token chunks: ``BREAK``
   closes a chunk, and a chunk that fills up within 20 tokens after a comma moves the words after the comma
   to the next one. Each chunk is framed as its own 77-token window: start token, 75 tokens (end-token
   padded), end token; where the tokenizer pads with another token (SD 2.x's ``!``), everything after the
   first end token becomes padding. Multipliers are 1 on the frame and the padding.
4. The text encoder encodes each chunk; ``apply_emphasis`` multiplies each token's output by its weight
   and rescales the chunk so its mean is the unweighted one; ``join_chunks`` concatenates the chunks to
   ``[B, 77k, D]``. ``chunk_prompts`` pads shorter prompts (the negative one) with empty chunks, the
   encoding of ``""``, as A1111's "pad prompt/negative prompt to be same length" does.

``plain_prompt_ids`` is the other syntax, KerasCV's and diffusers': one 77-token window, the text cut
after 75 tokens and the cut words returned so that the caller can warn.

Example:

>>> from kerasdiffusion.tokenizer import CLIPTokenizer
>>> parse_prompt_attention("a (red:1.3) [cat]")
[('a ', 1.0), ('red', 1.3), (' ', 1.0), ('cat', 0.9090909090909091)]
>>> ids, multipliers = chunk_prompt(CLIPTokenizer(), "a (red:1.3) cat BREAK on a mat")
>>> ids.shape, multipliers[0, :4].tolist()
((2, 77), [1.0, 1.0, 1.2999999523162842, 1.0])
"""

import re
import typing

import numpy as np

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1  # A1111 multiplies by 1 / 1.1 rather than dividing by 1.1; the last bit differs
BREAK = ("BREAK", -1.0)
COMMA_BACKTRACK = 20  # A1111's default "comma_padding_backtrack"
LORA_KINDS = ("lora", "lyco")  # A1111 reads <lyco:...> as <lora:...>

_ATTENTION_TOKEN = re.compile(
    r"""
      \\[()\[\]\\]                        # an escaped bracket or backslash: that character
    | \\                                  # any other backslash: dropped
    | [(\[]                               # an opening bracket
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)    # ":1.3)": closes a round bracket with its own weight
    | [)\]]                               # a closing bracket
    | [^\\()\[\]:]+                       # text
    | :                                   # a colon that is not a weight: text
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


class PromptLora(typing.NamedTuple):
    """A ``<lora:NAME:SCALE>`` tag: ``scale`` for the text encoder, and for the UNet unless a second
    multiplier, ``<lora:NAME:TE:UNET>`` (or ``te=`` / ``unet=``), gives the UNet its own."""

    name: str
    scale: float
    unet_scale: float


# -------------------------------------------------------------------------------------------- 1. LoRA tags


def extract_loras(prompt):
    """Cuts AUTOMATIC1111's ``<lora:NAME:SCALE>`` tags out of a prompt.

    The tag is removed with nothing put in its place, as A1111 does; ``<lyco:...>`` is read as ``<lora:...>``.
    The scale defaults to 1.

    Returns:
        ``(prompt without the tags, [PromptLora, ...])`` in the order the tags appear.

    Raises:
        ValueError: another kind of extra network (``<hypernet:...>``), or a scale that is not a number.

    Example:
    >>> extract_loras("a cat <lora:watercolor:0.7>")
    ('a cat ', [PromptLora(name='watercolor', scale=0.7, unet_scale=0.7)])
    """
    loras = []

    def cut(match):
        kind, arguments = match.groups()
        if kind not in LORA_KINDS:
            raise ValueError(f"Unsupported extra network <{kind}:...> in the prompt; only <lora:NAME:SCALE> is.")
        loras.append(_prompt_lora(match.group(0), arguments.split(":")))
        return ""

    return _EXTRA_NETWORK.sub(cut, prompt), loras


def _prompt_lora(tag, items):
    """A1111's reading of a tag's items: positional ``NAME[:TE[:UNET]]``, and ``te=`` / ``unet=``."""
    positional = [item for item in items if len(item.split("=")) != 2]
    named = dict(item.split("=") for item in items if len(item.split("=")) == 2)
    try:
        scale = float(named.get("te", positional[1] if len(positional) > 1 else 1.0))
        unet_scale = float(named.get("unet", positional[2] if len(positional) > 2 else scale))
    except ValueError:
        raise ValueError(f"{tag}: the LoRA's scale is not a number") from None
    if not positional or not positional[0]:
        raise ValueError(f"{tag}: the LoRA has no name")
    return PromptLora(positional[0], scale, unet_scale)


# ------------------------------------------------------------------------------------------- 2. emphasis


def parse_prompt_attention(text):
    """AUTOMATIC1111's emphasis: the prompt as ``[(text, weight), ...]``, equal weights merged.

    Each text token is appended with weight 1; a closing bracket multiplies everything since its opening
    bracket; brackets still open at the end multiply up to the end (round ones first, then square ones, in
    the order they were opened). ``BREAK`` in text becomes the marker ``("BREAK", -1.0)``; inside brackets it
    is multiplied like the rest and is then, as in A1111, no longer a break.

    Raises:
        ValueError: a weight such as ``(x:1.2.3)`` that is not a number (A1111 fails on it too).

    Example:
    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    runs, round_opened, square_opened = [], [], []

    def multiply(start, multiplier):
        for run in runs[start:]:
            run[1] *= multiplier

    for match in _ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group("weight")
        if token.startswith("\\"):
            runs.append([token[1:], 1.0])
        elif token == "(":
            round_opened.append(len(runs))
        elif token == "[":
            square_opened.append(len(runs))
        elif weight is not None and round_opened:
            multiply(round_opened.pop(), _weight(weight, token))
        elif token == ")" and round_opened:
            multiply(round_opened.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_opened:
            multiply(square_opened.pop(), SQUARE_MULTIPLIER)
        else:
            runs.extend(_text_runs(token))
    for start in round_opened:
        multiply(start, ROUND_MULTIPLIER)
    for start in square_opened:
        multiply(start, SQUARE_MULTIPLIER)
    return _merged(runs or [["", 1.0]])


def _weight(number, token):
    try:
        return float(number)
    except ValueError:
        raise ValueError(f"Prompt weight {token!r} is not a number.") from None


def _text_runs(text):
    """Plain text as runs of weight 1, with a BREAK marker wherever the word BREAK stands alone."""
    runs = []
    for i, part in enumerate(_BREAK.split(text)):
        if i:
            runs.append(list(BREAK))
        runs.append([part, 1.0])
    return runs


def _merged(runs):
    """Neighbouring runs of exactly equal weight joined (BREAK markers included, as A1111 does)."""
    merged = [tuple(runs[0])]
    for text, weight in runs[1:]:
        if weight == merged[-1][1]:
            merged[-1] = (merged[-1][0] + text, weight)
        else:
            merged.append((text, weight))
    return merged


# ------------------------------------------------------------------------------------------- 3. chunking


def chunk_prompt(tokenizer, prompt, comma_backtrack=COMMA_BACKTRACK, expansions=None):
    """Token ids and weights of one prompt in A1111's 75-token chunks, each framed as a 77-token window.

    Args:
        tokenizer: a `CLIPTokenizer` (its start, end and pad tokens frame the chunks).
        prompt: the prompt, LoRA tags already cut out.
        comma_backtrack: how far back (in tokens) a comma may be for a full chunk to break after it; 0 never.
        expansions: ``{token id: [ids]}``, tokens that stand for several (a textual inversion's vectors);
            their ids are kept in one chunk, as A1111 keeps an embedding's vectors together.

    Returns:
        ``(ids int32 [k, 77], multipliers float32 [k, 77])``; ``k >= 1``.
    """
    chunk_length = tokenizer.max_length - 2
    comma = tokenizer.encoder.get(",</w>")
    chunks, tokens, weights, last_comma = [], [], [], -1

    def close():
        nonlocal tokens, weights, last_comma
        chunks.append(_framed(tokenizer, tokens, weights, chunk_length))
        tokens, weights, last_comma = [], [], -1

    for text, weight in parse_prompt_attention(prompt):
        if (text, weight) == BREAK:
            close()
            continue
        for unit in _token_units(tokenizer, text, expansions, chunk_length):
            if unit == [comma]:
                last_comma = len(tokens)
            elif comma_backtrack and len(tokens) == chunk_length and last_comma != -1 \
                    and len(tokens) - last_comma <= comma_backtrack:
                moved, moved_weights = tokens[last_comma + 1 :], weights[last_comma + 1 :]
                tokens, weights = tokens[: last_comma + 1], weights[: last_comma + 1]
                close()
                tokens, weights = moved, moved_weights
            if len(tokens) == chunk_length or len(tokens) + len(unit) > chunk_length:
                close()
            tokens += unit
            weights += [weight] * len(unit)
    if tokens or not chunks:
        close()
    ids, multipliers = zip(*chunks)
    return np.array(ids, np.int32), np.array(multipliers, np.float32)


def _token_units(tokenizer, text, expansions, chunk_length):
    """A run's tokens as lists of ids that stay together: one id, or a token's whole expansion."""
    units = []
    for token in tokenizer.encode(text)[1:-1]:
        unit = list((expansions or {}).get(token, [token]))
        if len(unit) > chunk_length:
            raise ValueError(f"Token {token} stands for {len(unit)} vectors, more than a chunk's {chunk_length}.")
        units.append(unit)
    return units


def _framed(tokenizer, tokens, weights, chunk_length):
    """One chunk as a window: start, the tokens padded with end tokens to ``chunk_length``, end; then, for a
    tokenizer whose pad token differs (SD 2.x), padding after the first end token, as A1111 does."""
    padding = chunk_length - len(tokens)
    ids = [tokenizer.start_token_id, *tokens, *[tokenizer.end_token_id] * padding, tokenizer.end_token_id]
    multipliers = [1.0, *weights, *[1.0] * padding, 1.0]
    if tokenizer.pad_token_id != tokenizer.end_token_id:
        first_end = ids.index(tokenizer.end_token_id)
        ids[first_end + 1 :] = [tokenizer.pad_token_id] * (len(ids) - first_end - 1)
    return ids, multipliers


def chunk_prompts(tokenizer, prompts, comma_backtrack=COMMA_BACKTRACK, expansions=None):
    """`chunk_prompt` for several prompts (a prompt and its negative), shorter ones padded with empty chunks.

    Returns:
        ``(ids int32 [B, k, 77], multipliers float32 [B, k, 77])``, k the most chunks of any prompt. An
        empty chunk is the chunk of ``""``, so it encodes as A1111's empty-prompt padding.

    Example:
    >>> from kerasdiffusion.tokenizer import CLIPTokenizer
    >>> ids, multipliers = chunk_prompts(CLIPTokenizer(), ["a cat BREAK on a mat", "blurry"])
    >>> ids.shape
    (2, 2, 77)
    """
    chunked = [chunk_prompt(tokenizer, p, comma_backtrack, expansions) for p in prompts]
    empty_ids, empty_multipliers = chunk_prompt(tokenizer, "")
    count = max(len(ids) for ids, _ in chunked)
    ids = [np.concatenate([i, np.repeat(empty_ids, count - len(i), axis=0)]) for i, _ in chunked]
    multipliers = [np.concatenate([m, np.repeat(empty_multipliers, count - len(m), axis=0)]) for _, m in chunked]
    return np.stack(ids), np.stack(multipliers)


# ------------------------------------------------------------------------------------- 4. the encoder output


def apply_emphasis(z, multipliers):
    """Weights the text encoder's output per token and restores its mean, as A1111's "Original" emphasis.

    ``z' = z * m * (mean(z) / mean(z * m))``, the means over each chunk's ``[77, D]`` (A1111 encodes one
    prompt's chunk at a time and takes the mean of that call's output). Backend-neutral (``keras.ops``);
    the arithmetic runs in float32 and the result has ``z``'s dtype.

    Args:
        z: the encoder output of the chunks, ``[N, 77, D]``.
        multipliers: ``[N, 77]``, from `chunk_prompt` / `chunk_prompts` (reshaped to ``[N, 77]``).
    """
    import keras  # here, not at the top: the command line reads LoRA tags before TensorFlow is imported
    from keras import ops

    dtype = keras.backend.standardize_dtype(z.dtype)
    z = ops.cast(z, "float32")
    weighted = z * ops.cast(multipliers, "float32")[..., None]
    original_mean = ops.mean(z, axis=(1, 2), keepdims=True)
    weighted_mean = ops.mean(weighted, axis=(1, 2), keepdims=True)
    return ops.cast(weighted * (original_mean / weighted_mean), dtype)


def join_chunks(z, num_chunks):
    """``[B * k, 77, D]`` chunk encodings (prompt-major) -> ``[B, 77k, D]``, each prompt's chunks in a row."""
    from keras import ops

    return ops.reshape(z, (-1, num_chunks * z.shape[1], z.shape[2]))


# ---------------------------------------------------------------------------------------------- plain mode


def plain_prompt_ids(tokenizer, prompt, expansions=None):
    """One 77-token window as KerasCV and diffusers read a prompt, and what did not fit.

    Returns:
        ``(ids int32 [77], dropped)``: start, at most 75 tokens, end, padding; ``dropped`` is the decoded
        text of the tokens cut off (``""`` when all fit), which diffusers names in its warning.
    """
    ids = [i for token in tokenizer.encode(prompt) for i in (expansions or {}).get(token, [token])]
    dropped = ""
    if len(ids) > tokenizer.max_length:
        dropped = tokenizer.decode(ids[tokenizer.max_length - 1 : -1])
        ids = ids[: tokenizer.max_length - 1] + [tokenizer.end_token_id]
    row = np.full(tokenizer.max_length, tokenizer.pad_token_id, np.int32)
    row[: len(ids)] = ids
    return row, dropped
