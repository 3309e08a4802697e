"""The CLIP tokenizer against transformers' CLIPTokenizer, built in the test from the vocabulary we ship.

The reference files (vocab.json, merges.txt) are derived here from `bpe_simple_vocab_16e6.txt.gz` the way
CLIP defines its vocabulary, independently of `kerasdiffusion.tokenizer`, so that a mistake in our loader
cannot hide in both sides.
"""

import gzip
import json
import os
import random

import numpy as np
import pytest

import kerasdiffusion.tokenizer as tokenizer_module
from kerasdiffusion.tokenizer import CLIPTokenizer

transformers = pytest.importorskip("transformers")
# In transformers 4.x `CLIPTokenizer` is the slow ftfy-based class and `CLIPTokenizerFast` the `tokenizers`
# one; in 5.x both names are the `tokenizers` one. That is the behaviour we match.
Reference = transformers.CLIPTokenizerFast

START, END = 49406, 49407
VOCAB_GZ = os.path.join(os.path.dirname(tokenizer_module.__file__), "data", "bpe_simple_vocab_16e6.txt.gz")

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "A Portrait Of A Cat, Oil On Canvas, Trending On ArtStation",
    "café crème brûlée, naïve façade, Ångström, Øresund, straße, İstanbul",
    "ΟΔΟΣ ΣΑΣ καλημέρα, Москва, Ελλάδα",
    "東京タワーの夜景, 漢字 한국어 ไทย العربية עברית हिन्दी",
    "🐶🎉 a dog at a party 👩‍🚀🏳️‍🌈 ❤️",
    "Tom &amp; Jerry &lt;3 it&#39;s &quot;fine&quot; &amp;amp;",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp  and   spaces \u3000ideographic\u2028line\x85nel\x1cfs\u200bzw",
    "   leading and trailing   ",
    "MiXeD CaSe WoRdS",
    "it's the dog's bone, don't, we're, you've, I'm, they'll, he'd, IT'S, rock'n'roll, ''s",
    "it\u2019s curly \u201cquotes\u201d",
    "numbers 0 1 42 3.14159 1,000,000 2024-01-01 ½ ² ٣",
    "punctuation!!! ??? ... --- (((brackets))) [weight:1.2] {a|b} <lora:x:0.5>",
    "decomposed e\u0301 vs composed é, \u0301 leading combining mark",
    "fullwidth ｆｕｌｌ ligature ﬁne",
    "<|startoftext|> literal <|endoftext|> tokens <|ENDOFTEXT|> x<|endoftext|>! <|startoftext|",
    "!",
    "hello! wow!!! ok !",
    "",
    " ",
]

LONG_PROMPT = ", ".join(f"masterpiece number {i} highly detailed" for i in range(40))

# Characters for the random strings. Everything is assigned in Unicode 14, the version of Python 3.11's
# tables: characters added later can be classified differently by the Rust library behind transformers.
CHARSET = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    " \t\n\r\x0b\x0c\x85\xa0\u2002\u3000"
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
    "éèêëàâäçñöüßÉÀÇŒœøåİıΣσςΑβγδЖжЯя"
    "\u0301\u0308\u200b\u200d\ufe0f"
    "日本語中文字한국어ひらがなカタカナ"
    "😀🎨🐱🚀👍🏽"
    "½²٣①ｆﬁ€£¥©®™—–…“”‘’«»"
)
EXTRA_WORDS = ["<|endoftext|>", "<|startoftext|>", "&amp;", "&#39;", "'s", "'ll", "!!"]


def clip_byte_characters():
    """CLIP's 256 byte characters in vocabulary order: the printable Latin-1 bytes as themselves, then the
    other bytes, in byte order, as chr(256), chr(257), ..."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def write_reference_files(folder):
    """vocab.json and merges.txt as CLIP's tokenizer defines them from the gz file."""
    lines = gzip.open(VOCAB_GZ).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    chars = clip_byte_characters()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def random_texts(count, seed=0):
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        parts = [rng.choice(CHARSET) for _ in range(rng.randint(0, 40))]
        for _ in range(rng.randint(0, 2)):
            parts.insert(rng.randint(0, len(parts)), rng.choice(EXTRA_WORDS))
        texts.append("".join(parts))
    return texts


def reference_rows(reference, texts):
    return np.array(reference(texts, padding="max_length", truncation=True, max_length=77)["input_ids"])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_reference_files(str(tmp_path_factory.mktemp("clip_tokenizer")))


@pytest.fixture(scope="module")
def reference(files):
    return Reference.from_pretrained(files)


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer()


def test_vocabulary_and_special_ids(tokenizer, reference):
    assert tokenizer.vocab_size == len(reference) == 49408
    assert (tokenizer.start_token_id, tokenizer.end_token_id, tokenizer.pad_token_id) == (START, END, END)
    assert tokenizer.encoder == reference.get_vocab()


def test_from_files_matches_the_shipped_vocabulary(tokenizer, files):
    from_files = CLIPTokenizer.from_files(os.path.join(files, "vocab.json"), os.path.join(files, "merges.txt"))
    assert from_files.encoder == tokenizer.encoder
    assert from_files.bpe_ranks == tokenizer.bpe_ranks
    texts = PROMPTS + [LONG_PROMPT] + random_texts(50, seed=1)
    assert [from_files.encode(t) for t in texts] == [tokenizer.encode(t) for t in texts]


@pytest.mark.parametrize("text", PROMPTS + [LONG_PROMPT])
def test_encode_matches_transformers(tokenizer, reference, text):
    ids = tokenizer.encode(text)
    assert ids == reference(text)["input_ids"]
    assert ids[0] == START and ids[-1] == END


def test_random_strings_match_transformers(tokenizer, reference):
    texts = random_texts(400)
    expected = reference(texts)["input_ids"]
    mismatches = [(t, tokenizer.encode(t), e) for t, e in zip(texts, expected) if tokenizer.encode(t) != e]
    assert not mismatches, mismatches[:3]


def test_empty_string(tokenizer):
    assert tokenizer.encode("") == [START, END]
    np.testing.assert_array_equal(tokenizer(""), [[START] + [END] * 76])


def test_truncation_keeps_start_first_75_and_end(tokenizer, reference):
    ids = tokenizer.encode(LONG_PROMPT)
    assert len(ids) > 200
    row = tokenizer(LONG_PROMPT)[0]
    assert row.tolist() == ids[:76] + [END]
    np.testing.assert_array_equal(tokenizer(LONG_PROMPT), reference_rows(reference, [LONG_PROMPT]))


def test_batch_is_padded_with_end_token(tokenizer, reference):
    texts = ["a cat", "", LONG_PROMPT, "Tom &amp; Jerry!", "東京 🐶"]
    rows = tokenizer(texts)
    assert rows.dtype == np.int32 and rows.shape == (5, 77)
    np.testing.assert_array_equal(rows, reference_rows(reference, texts))
    np.testing.assert_array_equal(tokenizer("a cat"), rows[:1])


def test_sd2_pad_token(files):
    """SD 2.x pads with "!" (id 0); transformers then also cuts every "!" of the prompt out as that token."""
    reference = Reference.from_pretrained(files, pad_token="!")
    ours = CLIPTokenizer(pad_token="!")
    assert ours.pad_token_id == reference.pad_token_id == 0
    texts = ["a cat", "hello! wow!!!", "", LONG_PROMPT] + random_texts(100, seed=2)
    np.testing.assert_array_equal(ours(texts), reference_rows(reference, texts))
    assert ours("a cat")[0, 4:].tolist() == [0] * 73


def _added_token(content, normalized, legacy_type=True):
    token = {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}
    return {"__type": "AddedToken", **token} if legacy_type else token


def _diffusers_folders(files, root):
    """Tokenizer folders laid out as the Hub's SD 1.x / 2.x repos and as newer transformers save them."""
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    base = {"do_lower_case": True, "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}
    legacy = dict(base, bos_token=_added_token(bos, True), eos_token=_added_token(eos, True),
                  unk_token=_added_token(eos, True), pad_token=eos)
    token_map = {"bos_token": _added_token(bos, True, False), "eos_token": _added_token(eos, True, False),
                 "unk_token": _added_token(eos, True, False), "pad_token": eos}
    decoder = {"49406": dict(_added_token(bos, True, False), special=True),
               "49407": dict(_added_token(eos, False, False), special=True)}
    layouts = {
        "sd1": (legacy, token_map),
        "sd2": (legacy, dict(token_map, pad_token="!")),
        "sd2_config_only": (dict(legacy, pad_token="!"), None),
        "added_tokens_decoder": (dict(base, added_tokens_decoder=decoder, pad_token="!"), None),
    }
    folders = {}
    for name, (config, special_map) in layouts.items():
        folder = os.path.join(root, name)
        os.makedirs(folder)
        for file in ("vocab.json", "merges.txt"):
            with open(os.path.join(files, file), encoding="utf-8") as src, open(os.path.join(folder, file), "w") as dst:
                dst.write(src.read())
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
        if special_map is not None:
            with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
                json.dump(special_map, f)
        folders[name] = folder
    return folders


def test_from_folder_matches_transformers(files, tmp_path):
    folders = _diffusers_folders(files, str(tmp_path))
    # transformers 5 saves a tokenizer.json and no vocab.json / merges.txt.
    Reference.from_pretrained(folders["sd2"]).save_pretrained(str(tmp_path / "saved"))
    folders["tokenizer_json_only"] = str(tmp_path / "saved")
    texts = PROMPTS + [LONG_PROMPT, "<|StartOfText|> x", "a<|ENDOFTEXT|>b"] + random_texts(40, seed=3)
    for name, folder in folders.items():
        reference = Reference.from_pretrained(folder)
        ours = CLIPTokenizer.from_folder(folder)
        assert ours.pad_token_id == reference.pad_token_id, name
        assert [ours.encode(t) for t in texts] == reference(texts)["input_ids"], name
        np.testing.assert_array_equal(ours(texts), reference_rows(reference, texts), err_msg=name)
    assert CLIPTokenizer.from_folder(folders["sd1"]).pad_token_id == END
    assert CLIPTokenizer.from_folder(folders["sd2"]).pad_token_id == 0


def test_decode_matches_transformers(tokenizer, reference):
    texts = ["a photo of a cat", "Hello, World! it's", "café 東京 🐶", "x  y\tz"]
    for text in texts:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True)
        assert tokenizer.decode(tokenizer(text)[0]) == reference.decode(ids, skip_special_tokens=True)


def test_bad_arguments():
    with pytest.raises(ValueError, match="both"):
        CLIPTokenizer(vocab={"a": 0})
    with pytest.raises(ValueError, match="not in the vocabulary"):
        CLIPTokenizer(pad_token="<pad>")

