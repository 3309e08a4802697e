"""CLIP's byte-level BPE tokenizer, in pure Python and NumPy.

The ids match `transformers.CLIPTokenizer` (transformers 5, backed by the `tokenizers` library), which is
what diffusers uses to tokenize Stable Diffusion prompts:

1. special tokens are cut out of the raw text first (before normalization) unless they are flagged as
   "normalized", in which case they are matched in the normalized text;
2. each remaining piece is normalized: Unicode NFC, every whitespace run to one space, lower case;
3. CLIP's regex splits it into words (contractions, letter runs, single digits, other symbol runs);
4. each word's UTF-8 bytes become printable characters, the last one carrying the `</w>` end-of-word
   marker, and the BPE merges are applied in rank order.

Unlike the original CLIP tokenizer, transformers 5 does not run ftfy or unescape HTML entities, so neither
do we: `&amp;` is tokenized as written.

The match is exact for every character Python's own Unicode tables know (Unicode 14 in Python 3.11);
characters assigned later may be classified differently from the Rust tables behind transformers.
"""

import functools
import gzip
import json
import os
import unicodedata

import numpy as np
import regex

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

_VOCAB_GZ = os.path.join(os.path.dirname(__file__), "data", "bpe_simple_vocab_16e6.txt.gz")
# CLIP keeps the first 49152 - 256 - 2 merges of the file (line 0 is a version header), so that the
# vocabulary is 256 bytes, 256 bytes + </w>, the merges and two special tokens: 49408 entries.
_NUM_CLIP_MERGES = 49152 - 256 - 2

# The pre-tokenizer pattern of CLIP (and of transformers' CLIPTokenizer). The special-token
# alternatives only matter for text that was not already cut out as a special token, e.g.
# "<|ENDOFTEXT|>" lowercased; such text is then BPE-encoded like other words.
_WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# transformers' ByteLevel pre-tokenizer then re-splits each word with GPT-2's pattern. On CLIP's words
# this only ever splits the special-token literals: "<|endoftext|>" becomes "<|", "endoftext", "|>".
_BYTE_LEVEL_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
_WHITESPACE = regex.compile(r"\s+")

# The attributes transformers reads special tokens from, in the order it registers them: when two name
# the same text, the later one's "normalized" flag wins.
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@functools.lru_cache(maxsize=1)
def bytes_to_unicode():
    """Maps each byte to a printable character, as GPT-2 and CLIP do.

    Printable Latin-1 bytes map to themselves; the others (controls, space, soft hyphen) are shifted to
    code points from 256 on, so that every BPE symbol is a visible, non-whitespace character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in mapping)
    for offset, b in enumerate(shifted):
        mapping[b] = chr(256 + offset)
    return mapping


def load_clip_vocabulary(path=_VOCAB_GZ):
    """Builds CLIP's vocabulary and merges from the `bpe_simple_vocab_16e6.txt.gz` file.

    Returns:
        `(vocab, merges)`: a dict from token to id, and the list of merged pairs in rank order.
    """
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_CLIP_MERGES + 1]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + END_OF_WORD for c in chars] + ["".join(pair) for pair in merges] + [START_TOKEN, END_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, merges


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_merges(path):
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    # The first line of a transformers merges.txt is a "#version: ..." header.
    return [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]


def _token_text(value):
    return value["content"] if isinstance(value, dict) else value


def _is_normalized(value, special):
    # transformers' AddedToken defaults to normalized=True for ordinary tokens and False for special ones;
    # a token given as a plain string is special.
    if isinstance(value, dict):
        return value.get("normalized", not value.get("special", special))
    return False


class CLIPTokenizer:
    """The CLIP byte-level BPE tokenizer used by Stable Diffusion's text encoder.

    `encode()` returns the same ids as `transformers.CLIPTokenizer`; calling the tokenizer returns
    the fixed-length batch the text encoder takes: a start token, at most `max_length - 2` text tokens,
    an end token, then pad tokens up to `max_length`.

    Args:
        vocab: dict from token to id. Defaults to CLIP's vocabulary, which ships with this package.
        merges: list of `(left, right)` symbol pairs in merge order. Must be given with `vocab`.
        pad_token: the token that fills sequences up to `max_length`. Stable Diffusion 1.x pads
            with `"<|endoftext|>"` (id 49407), 2.x with `"!"` (id 0).
        max_length: length of the sequences returned by `__call__`, start and end tokens included.
        added_tokens: optional dict from token text to its "normalized" flag: the tokens cut out of the
            text before BPE. A normalized one is also found in upper case, since it is matched after
            lower-casing. Defaults to the start, end and pad tokens, none normalized, as in transformers.
        expansions: optional dict from a token id to the ids it stands for in `__call__` (a textual
            inversion's vectors); see `with_added_tokens`.

    Example:
    >>> tok = CLIPTokenizer()
    >>> tok.encode("a photo")[:1]
    [49406]
    >>> tok(["a photo of a cat"]).shape
    (1, 77)
    >>> tok.decode(tok.encode("a photo of a cat"))
    'a photo of a cat'
    """

    def __init__(self, vocab=None, merges=None, *, pad_token=END_TOKEN, max_length=77, added_tokens=None,
                 expansions=None):
        if (vocab is None) != (merges is None):
            raise ValueError("Pass both `vocab` and `merges`, or neither to use CLIP's vocabulary.")
        if vocab is None:
            vocab, merges = load_clip_vocabulary()
        if max_length < 2:
            raise ValueError(f"`max_length` must leave room for the start and end tokens, got {max_length}.")
        self.encoder = dict(vocab)
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.merges = [tuple(pair) for pair in merges]
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.max_length = max_length
        if added_tokens is None:
            added_tokens = {START_TOKEN: False, END_TOKEN: False, pad_token: False}
        for token in (START_TOKEN, END_TOKEN, pad_token, *added_tokens):
            if token not in self.encoder:
                raise ValueError(f"Token {token!r} is not in the vocabulary.")
        self.start_token_id = self.encoder[START_TOKEN]
        self.end_token_id = self.encoder[END_TOKEN]
        self.pad_token = pad_token
        self.pad_token_id = self.encoder[pad_token]
        self.added_tokens = dict(added_tokens)
        self.expansions = {int(i): [int(j) for j in ids] for i, ids in (expansions or {}).items()}
        self._raw_special = self._special_pattern(t for t, normalized in added_tokens.items() if not normalized)
        self._normalized_special = self._special_pattern(
            self._normalize(t) for t, normalized in added_tokens.items() if normalized
        )
        self._cache = {}

    @classmethod
    def from_files(cls, vocab_json, merges_txt, **kwargs):
        """Builds the tokenizer from a transformers `vocab.json` and `merges.txt`.

        Args:
            vocab_json: path of the JSON dict from token to id.
            merges_txt: path of the merges, one `left right` pair a line, after a `#version` header.
            **kwargs: `pad_token`, `max_length` and `added_tokens`, as for the constructor.

        Example:
        >>> tok = CLIPTokenizer.from_files(  # doctest: +SKIP
        ...     "tokenizer/vocab.json", "tokenizer/merges.txt", pad_token="!")
        """
        return cls(_read_json(vocab_json), _read_merges(merges_txt), **kwargs)

    @classmethod
    def from_folder(cls, path, **kwargs):
        """Builds the tokenizer from a diffusers/transformers `tokenizer/` folder.

        Reads `vocab.json` and `merges.txt` (or a `tokenizer.json` alone, as transformers 5 saves it) and
        takes the pad token and the special tokens' flags from `tokenizer_config.json`,
        `special_tokens_map.json` and `tokenizer.json`, resolving them the way transformers does. An added
        token followed by added tokens ``token_1``, ``token_2``, ... (a multi-vector textual inversion, as
        diffusers and `save` write it) expands to all of them in `__call__`, as diffusers' pipelines expand it.

        Args:
            path: the folder.
            **kwargs: `pad_token` overrides the folder's; `max_length` as for the constructor.

        Example:
        >>> tok = CLIPTokenizer.from_folder("stable-diffusion-2-1/tokenizer")  # doctest: +SKIP
        >>> tok.pad_token_id  # doctest: +SKIP
        0
        """
        def read(name, default=None):
            file = os.path.join(path, name)
            return _read_json(file) if os.path.isfile(file) else default

        fast = read("tokenizer.json")
        vocab, merges = _read_folder_vocabulary(path, fast)
        config, token_map = read("tokenizer_config.json", {}), read("special_tokens_map.json", {})
        added, named = _resolve_special_tokens(config, token_map, fast, kwargs.get("pad_token"))
        vocab = dict(vocab)
        for token_id, (token, _) in added.items():
            vocab.setdefault(token, token_id)
        kwargs["pad_token"] = _token_text(named["pad_token"])
        flags = _added_token_flags(added, named)
        return cls(vocab, merges, added_tokens=flags, expansions=_multi_vector_expansions(vocab, flags), **kwargs)

    def save(self, folder):
        """Writes the tokenizer as transformers' ``CLIPTokenizer`` files, which `from_folder` reads back.

        ``vocab.json`` and ``merges.txt`` hold the BPE vocabulary; ``tokenizer_config.json`` (and
        ``special_tokens_map.json``) the special tokens, the length and every added token with its id, as
        transformers' ``added_tokens_decoder`` (textual-inversion tokens among them: diffusers' pipelines
        expand a ``token`` followed by ``token_1`` ... to its vectors, and so does `from_folder`).

        Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> CLIPTokenizer().with_added_tokens({"<my-style>": 1}).save(folder)
        >>> CLIPTokenizer.from_folder(folder).encode("a <my-style> cat")
        [49406, 320, 49408, 2368, 49407]
        """
        added = {token: normalized for token, normalized in self.added_tokens.items()}
        vocab = {token: i for token, i in self.encoder.items() if not added.get(token, False)}
        special = {"bos_token": START_TOKEN, "eos_token": END_TOKEN, "unk_token": END_TOKEN, "pad_token": self.pad_token}
        decoder = {str(self.encoder[token]): {"content": token, "lstrip": False, "normalized": normalized,
                                              "rstrip": False, "single_word": False, "special": not normalized}
                   for token, normalized in sorted(added.items(), key=lambda item: self.encoder[item[0]])}
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length, "do_lower_case": True,
                  "errors": "replace", **special, "added_tokens_decoder": decoder}
        files = {"vocab.json": vocab, "tokenizer_config.json": config, "special_tokens_map.json": special}
        for name, value in files.items():
            with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
                json.dump(value, f, ensure_ascii=False, indent=None if name == "vocab.json" else 2)
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in self.merges))

    @property
    def vocab_size(self):
        """Number of ids, the text encoder's embedding rows."""
        return len(self.encoder)

    def with_added_tokens(self, tokens, first_id=None):
        """A new tokenizer that also knows ``tokens`` (``{token: number of vectors}``), as textual inversion adds them.

        Each token gets the next free id (from ``first_id``, default the first after the vocabulary's) and,
        for n > 1 vectors, diffusers' names ``token_1`` ... ``token_{n-1}`` the ids after it; all are added
        tokens (never split by BPE, matched after lower-casing, as transformers' ``add_tokens`` makes them),
        and `__call__` expands the token to its n ids in place.

        Raises:
            ValueError: a token (or one of its ``token_i``) that is already a word of the vocabulary, with or
                without the end-of-word marker, or already added.

        Example:
        >>> tok = CLIPTokenizer().with_added_tokens({"<my-style>": 3})
        >>> ids = tok("a <my-style> cat")[0]
        >>> [tok.decoder[int(i)] for i in ids[2:5]]
        ['<my-style>', '<my-style>_1', '<my-style>_2']
        """
        vocab, added, expansions = dict(self.encoder), dict(self.added_tokens), dict(self.expansions)
        next_id = max(self.decoder) + 1 if first_id is None else first_id
        if next_id <= max(self.decoder):
            raise ValueError(f"first_id={first_id} is taken: the vocabulary's ids go up to {max(self.decoder)}")
        for token, count in tokens.items():
            names = [_vector_name(token, i) for i in range(count)]
            for name in names:
                self._check_new_token(name, vocab)
            ids = list(range(next_id, next_id + count))
            vocab.update(zip(names, ids))
            added.update({name: True for name in names})
            if count > 1:
                expansions[ids[0]] = ids
            next_id += count
        return CLIPTokenizer(vocab, self.merges, pad_token=self.pad_token, max_length=self.max_length,
                             added_tokens=added, expansions=expansions)

    def _check_new_token(self, token, vocab):
        if not token or token != token.strip():
            raise ValueError(f"Token {token!r} must be a non-empty word without surrounding spaces")
        for name in dict.fromkeys((token, self._normalize(token))):
            if name in self.added_tokens or (name in vocab and name not in self.encoder):
                raise ValueError(f"Token {token!r} is already added ({name!r}): unload it first, or pick another")
            if name in vocab or name + END_OF_WORD in vocab:
                raise ValueError(f"Token {token!r} collides with the word {name!r} of the vocabulary: pick another")

    def encode(self, text):
        """Tokenizes one text into ids, with start and end tokens, neither truncated nor padded.

        Args:
            text: a string.

        Returns:
            A list of int ids.

        Example:
        >>> tok = CLIPTokenizer()
        >>> ids = tok.encode("A photo of a cat")
        >>> ids[0] == tok.start_token_id and ids[-1] == tok.end_token_id
        True
        """
        ids = [self.start_token_id]
        for piece, is_special in self._split_special(text):
            if is_special:
                ids.append(self.encoder[piece])
                continue
            for word in _WORD_PATTERN.findall(piece):
                for subword in _BYTE_LEVEL_PATTERN.findall(word):
                    ids.extend(self._bpe_ids(subword))
        ids.append(self.end_token_id)
        return ids

    def __call__(self, texts):
        """Tokenizes a text or a batch into fixed-length rows for the text encoder.

        Each row is the start token, the first `max_length - 2` text tokens, the end token, then the
        pad token (transformers' `padding="max_length", truncation=True`).

        Args:
            texts: a string or a list of strings.

        Returns:
            An int32 array of shape `[batch, max_length]`.

        Example:
        >>> tok = CLIPTokenizer()
        >>> tok(["a cat", "a dog"]).shape
        (2, 77)
        >>> int(tok("a cat")[0, -1]) == tok.pad_token_id
        True
        """
        if isinstance(texts, str):
            texts = [texts]
        rows = np.full((len(texts), self.max_length), self.pad_token_id, dtype=np.int32)
        for row, text in zip(rows, texts):
            ids = self.expand(self.encode(text))
            if len(ids) > self.max_length:
                ids = ids[: self.max_length - 1] + [self.end_token_id]
            row[: len(ids)] = ids
        return rows

    def expand(self, ids):
        """``ids`` with every multi-vector token replaced by its ids (see `with_added_tokens`)."""
        return [j for i in ids for j in self.expansions.get(i, [i])]

    def decode(self, ids, skip_special_tokens=True):
        """Turns ids back into text; end-of-word markers become spaces.

        Args:
            ids: a sequence of ints (a list or an array row).
            skip_special_tokens: drop the start, end, pad and other added tokens.

        Example:
        >>> tok = CLIPTokenizer()
        >>> tok.decode(tok("Hello, World!")[0])
        'hello , world !'
        """
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if self.decoder[i] not in self.added_tokens]
        text = "".join(self.decoder[i] for i in ids)
        data = bytes(self.byte_decoder.get(c, ord(" ")) for c in text.replace(END_OF_WORD, " "))
        return data.decode("utf-8", errors="replace").strip()

    def _split_special(self, text):
        """Yields `(piece, is_special)`: added tokens cut out, the rest normalized."""
        for piece, is_special in _split_on(self._raw_special, text):
            if is_special:
                yield piece, True
            else:
                yield from _split_on(self._normalized_special, self._normalize(piece))

    @staticmethod
    def _normalize(text):
        text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
        # Lower-case character by character: str.lower() would turn a word-final capital sigma into
        # "ς", which the `tokenizers` library (and so transformers) does not do.
        return "".join(c.lower() for c in text)

    @staticmethod
    def _special_pattern(tokens):
        # Longest first, so that the leftmost match is also the longest, as in `tokenizers`.
        tokens = sorted(set(tokens), key=len, reverse=True)
        return regex.compile("|".join(regex.escape(t) for t in tokens)) if tokens else None

    def _bpe_ids(self, word):
        if word not in self._cache:
            symbols = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            self._cache[word] = [self.encoder[s] for s in self._bpe(symbols)]
        return self._cache[word]

    def _bpe(self, symbols):
        """Merges a word's byte characters, lowest-ranked pair first, all its occurrences at once."""
        word = [*symbols[:-1], symbols[-1] + END_OF_WORD]
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if best not in self.bpe_ranks:
                break
            word = _merge_pair(word, best)
        return word


def _merge_pair(word, pair):
    merged, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            merged.append(word[i] + word[i + 1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged


def _split_on(pattern, text):
    """Yields `(piece, is_match)` for the matches of `pattern` and the text between them."""
    start = 0
    if pattern is not None:
        for match in pattern.finditer(text):
            if match.start() > start:
                yield text[start : match.start()], False
            yield match.group(), True
            start = match.end()
    if start < len(text):
        yield text[start:], False


def _read_folder_vocabulary(path, fast):
    """`(vocab, merges)` from a folder's vocab.json + merges.txt, else from its parsed tokenizer.json."""
    vocab_json, merges_txt = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    if os.path.isfile(vocab_json) and os.path.isfile(merges_txt):
        return _read_json(vocab_json), _read_merges(merges_txt)
    if fast is None:
        raise FileNotFoundError(f"{path} holds neither vocab.json + merges.txt nor tokenizer.json.")
    # tokenizers writes merges as "left right" strings in older files and as [left, right] lists in newer ones.
    merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in fast["model"]["merges"]]
    return fast["model"]["vocab"], merges


def _resolve_special_tokens(config, token_map, fast, pad_token):
    """Which tokens a transformers tokenizer folder registers as added tokens, and its named ones.

    Returns:
        `(added, named)`: `added` maps id to `(text, normalized)` for the explicitly listed added tokens
        (`added_tokens_decoder` in the config, else `tokenizer.json`'s list); `named` maps each special
        token name (`bos_token`, ...) to its string or dict value.
    """
    named = {"bos_token": START_TOKEN, "eos_token": END_TOKEN, "unk_token": END_TOKEN, "pad_token": END_TOKEN}
    named.update({k: v for k, v in config.items() if k in _SPECIAL_TOKEN_NAMES and v is not None})
    if "added_tokens_decoder" in config:
        listed = config["added_tokens_decoder"].items()
    else:
        # Only configs without their own added-token list defer to the older special_tokens_map.json.
        named.update({k: v for k, v in token_map.items() if k in _SPECIAL_TOKEN_NAMES and v is not None})
        listed = [(t["id"], t) for t in fast["added_tokens"]] if fast is not None else []
    if pad_token is not None:
        named["pad_token"] = pad_token
    added = {int(i): (t["content"], _is_normalized(t, special=False)) for i, t in listed}
    return added, named


def _vector_name(token, index):
    """The added token that holds a textual inversion's vector ``index``: diffusers' ``token``, ``token_1``, ..."""
    return f"{token}_{index}" if index else token


def _multi_vector_expansions(vocab, added_tokens):
    """The expansions of a folder's multi-vector tokens: each added token followed by added tokens ``token_1``,
    ``token_2``, ... stands for all of them, in that order (diffusers' ``maybe_convert_prompt`` rule)."""
    expansions = {}
    for token in added_tokens:
        names = [token]
        while _vector_name(token, len(names)) in added_tokens:
            names.append(_vector_name(token, len(names)))
        if len(names) > 1:
            expansions[vocab[token]] = [vocab[name] for name in names]
    return expansions


def _added_token_flags(added, named):
    flags = {token: normalized for token, normalized in added.values()}
    listed = set(flags)
    for name in _SPECIAL_TOKEN_NAMES:
        if name in named and _token_text(named[name]) not in listed:
            flags[_token_text(named[name])] = _is_normalized(named[name], special=True)
    return flags
