"""AUTOMATIC1111's prompt syntax: its own documented examples for the parser, and weighted, chunked contexts
against transformers' ``CLIPTextModel`` driven by A1111's algorithm, written out here (tiny random encoder).
"""

import dataclasses
import re
import tempfile

import numpy as np
import pytest
import torch

from kerasdiffusion import prompts
from kerasdiffusion.config import text_encoder_config_from_weights
from kerasdiffusion.text_encoder import build_text_encoder
from kerasdiffusion.tokenizer import CLIPTokenizer
from kerasdiffusion.weights import assign_weights
from tests import reference as R
from weights_conversion import keras_names

# modules/prompt_parser.py's docstring (its doctests), then the wiki's emphasis cheat sheet and BREAK entry
# ("Features": "Attention/emphasis", "Infinite prompt length": "BREAK keyword (must be uppercase)").
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("a (word)", [("a ", 1.0), ("word", 1.1)]),
    ("a ((word))", [("a ", 1.0), ("word", 1.1 * 1.1)]),
    ("a [word]", [("a ", 1.0), ("word", 1 / 1.1)]),
    ("a (word:1.5)", [("a ", 1.0), ("word", 1.5)]),
    ("a (word:0.25)", [("a ", 1.0), ("word", 0.25)]),
    (r"a \(word\)", [("a (word)", 1.0)]),
    (r"anime_\(character\)", [("anime_(character)", 1.0)]),
    ("a cat BREAK a dog", [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]),
    ("a cat break a dog", [("a cat break a dog", 1.0)]),
    ("", [("", 1.0)]),
]

LONG = ", ".join(["a photo of a cat"] * 20) + ", (masterpiece:1.3), [blurry]"  # comma-separated, 130 tokens
NO_COMMAS = " ".join(["red apple green pear"] * 25)  # 100 tokens, no comma to break at
BREAKS = "a (red:1.2) cat BREAK on a [mat] BREAK"
PROMPTS = [LONG, NO_COMMAS, BREAKS, " ".join(["cat"] * 75), "((a photo)) of a dog", ""]


@pytest.fixture(scope="module")
def clip():
    """transformers' tokenizer and tiny random CLIPTextModel, and ours built from its converted weights."""
    from transformers import CLIPTokenizer as ReferenceTokenizer

    folder = R.write_clip_tokenizer_files(tempfile.mkdtemp())
    reference_encoder = R.make_text_encoder(seed=50)
    weights = keras_names.convert_text_encoder(R.state_dict_numpy(reference_encoder))
    encoder = build_text_encoder(text_encoder_config_from_weights(weights))
    assign_weights(encoder, weights, "text_encoder")
    return dict(reference_tokenizer=ReferenceTokenizer.from_pretrained(folder), reference_encoder=reference_encoder,
                weights=weights, encoder=encoder)


# ------------------------------------------------------------------ A1111's algorithm, with transformers


def a1111_chunks(tokenizer, runs, pad_id, comma_backtrack=20, embeddings=None):
    """``sd_hijack_clip.tokenize_line`` and ``process_tokens``' padding, over transformers' tokenizer.

    ``embeddings`` maps a token to the ids it stands for; as A1111's embedding vectors they stay in one chunk.
    """
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    comma = tokenizer.get_vocab()[",</w>"]
    embeddings = embeddings or {}
    chunks, chunk, weights, last_comma = [], [], [], -1

    def next_chunk():
        nonlocal chunk, weights, last_comma
        fill = 75 - len(chunk)
        tokens = [start] + chunk + [end] * fill + [end]
        if pad_id != end:  # process_tokens: SD 2.x pads after the first end token
            first = tokens.index(end)
            tokens = tokens[: first + 1] + [pad_id] * (76 - first)
        chunks.append((tokens, [1.0] + weights + [1.0] * fill + [1.0]))
        chunk, weights, last_comma = [], [], -1

    texts = [text for text, _ in runs]
    for ids, (text, weight) in zip(tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"], runs):
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue
        for token in ids:
            if token == comma:
                last_comma = len(chunk)
            elif comma_backtrack and len(chunk) == 75 and last_comma != -1 \
                    and len(chunk) - last_comma <= comma_backtrack:
                moved, moved_weights = chunk[last_comma + 1 :], weights[last_comma + 1 :]
                chunk, weights = chunk[: last_comma + 1], weights[: last_comma + 1]
                next_chunk()
                chunk, weights = moved, moved_weights
            if len(chunk) == 75:
                next_chunk()
            vectors = embeddings.get(token, [token])
            if len(vectors) > 1 and len(chunk) + len(vectors) > 75:
                next_chunk()
            chunk += vectors
            weights += [weight] * len(vectors)
    if chunk or not chunks:
        next_chunk()
    return chunks


def a1111_context(encoder, chunks):
    """``process_tokens`` and the "Original" emphasis per chunk, then the chunks side by side."""
    zs = []
    with torch.no_grad():
        for tokens, multipliers in chunks:
            z = encoder(torch.tensor([tokens])).last_hidden_state
            original_mean = z.mean()
            z = z * torch.tensor([multipliers]).reshape(1, -1, 1).expand(z.shape)
            zs.append(z * (original_mean / z.mean()))
    return torch.hstack(zs).numpy()


def our_context(clip, ids, multipliers):
    """Our encoder over every chunk as a batch, emphasis, and the chunks joined per prompt."""
    batch, chunks, length = ids.shape
    z = clip["encoder"](ids.reshape(-1, length))
    z = prompts.apply_emphasis(z, multipliers.reshape(-1, length))
    return np.asarray(prompts.join_chunks(z, chunks))


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("text, expected", A1111_EXAMPLES)
def test_parser_reads_a1111_documented_examples(text, expected):
    assert prompts.parse_prompt_attention(text) == expected


def test_parser_reads_odd_input_as_a1111_does():
    assert prompts.parse_prompt_attention("(a BREAK b)") == [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]
    assert prompts.parse_prompt_attention("x:1.2) y] z") == [("x:1.2) y] z", 1.0)]
    assert prompts.parse_prompt_attention("(x: 1.5 ) [a:b:0.5]") == [("x", 1.5), (" ", 1.0), ("a:b:0.5", 1 / 1.1)]
    assert prompts.parse_prompt_attention("a\\b \\\\") == [("ab \\", 1.0)]
    with pytest.raises(ValueError, match=re.escape("':1.2.3)' is not a number")):
        prompts.parse_prompt_attention("(x:1.2.3)")


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_chunks_match_a1111(clip, pad_token):
    ours_tokenizer = CLIPTokenizer(pad_token=pad_token)
    for prompt in PROMPTS:
        runs = prompts.parse_prompt_attention(prompt)
        expected = a1111_chunks(clip["reference_tokenizer"], runs, ours_tokenizer.pad_token_id)
        ids, multipliers = prompts.chunk_prompt(ours_tokenizer, prompt)
        np.testing.assert_array_equal(ids, [tokens for tokens, _ in expected], err_msg=prompt)
        np.testing.assert_array_equal(multipliers, np.float32([m for _, m in expected]), err_msg=prompt)
    ids, _ = prompts.chunk_prompt(ours_tokenizer, LONG)
    assert ids.shape == (2, 77) and ids[0, 73] == ours_tokenizer.end_token_id  # broke after a comma
    assert prompts.chunk_prompt(ours_tokenizer, NO_COMMAS)[0].shape == (2, 77)
    assert prompts.chunk_prompt(ours_tokenizer, LONG, comma_backtrack=0)[0][0, 73] != ours_tokenizer.end_token_id


def test_multi_vector_tokens_stay_in_one_chunk(clip):
    tokenizer = CLIPTokenizer()
    trigger = tokenizer.encode("sks")[1]
    embeddings = {trigger: [trigger, 1000, 1001, 1002]}
    prompt = " ".join(["cat"] * 73) + " sks dog"
    expected = a1111_chunks(clip["reference_tokenizer"], [(prompt, 1.0)], tokenizer.pad_token_id, embeddings=embeddings)
    ids, _ = prompts.chunk_prompt(tokenizer, prompt, expansions=embeddings)
    np.testing.assert_array_equal(ids, [tokens for tokens, _ in expected])
    assert list(ids[1, 1:6]) == [trigger, 1000, 1001, 1002, tokenizer.encode("dog")[1]]


def test_weighted_long_context_matches_a1111(clip):
    """Emphasis, BREAK and 75-token chunks, and the negative prompt padded with empty chunks."""
    tokenizer = CLIPTokenizer()
    prompt, negative = LONG + " BREAK (green:1.4) eyes", "[blurry]"
    ids, multipliers = prompts.chunk_prompts(tokenizer, [prompt, negative])
    assert ids.shape == (2, 3, 77)
    ours = our_context(clip, ids, multipliers)

    def reference(runs):
        chunks = a1111_chunks(clip["reference_tokenizer"], runs, tokenizer.pad_token_id)
        return a1111_context(clip["reference_encoder"], chunks)

    empty = reference([("", 1.0)])  # A1111's cond_stage_model_empty_prompt, what pad_cond_uncond pads with
    negative_context = np.concatenate([reference(prompts.parse_prompt_attention(negative)), empty, empty], axis=1)
    expected = np.concatenate([reference(prompts.parse_prompt_attention(prompt)), negative_context])
    assert ours.shape == expected.shape == (2, 3 * 77, R.TINY_TEXT_ENCODER["hidden_size"])
    error = R.relative_error(ours, expected)
    assert error < 1e-5, f"relative error {error:.1e}"
    assert R.relative_error(ours[0], np.asarray(clip["encoder"](ids[0])).reshape(-1, ours.shape[-1])) > 1e-3


def test_emphasis_is_backend_neutral_and_a_no_op_at_weight_one():
    z = np.random.default_rng(0).standard_normal((2, 77, 8)).astype(np.float16)
    np.testing.assert_array_equal(np.asarray(prompts.apply_emphasis(z, np.ones((2, 77), np.float32))), z)
    weighted = np.asarray(prompts.apply_emphasis(z, np.full((2, 77), 1.3, np.float32)))
    assert weighted.dtype == np.float16
    np.testing.assert_allclose(weighted.astype(np.float32).mean(axis=(1, 2)), z.astype(np.float32).mean(axis=(1, 2)),
                               atol=1e-3)


def test_clip_skip_recipe_matches_a1111(clip):
    """The integrator's recipe for ``clip_skip=2``: our encoder with its last layer dropped equals A1111's
    ``hidden_states[-2]`` through the final layer norm."""
    weights, config = clip["weights"], text_encoder_config_from_weights(clip["weights"])
    kept = config.num_layers - 1
    shorter = {k: v for k, v in weights.items() if not (m := re.match(r"layer(\d+)_", k)) or int(m.group(1)) < kept}
    encoder = build_text_encoder(dataclasses.replace(config, num_layers=kept))
    assign_weights(encoder, shorter, "text_encoder")
    tokens = prompts.chunk_prompt(CLIPTokenizer(), "a (red:1.2) cat on a mat")[0]
    reference = clip["reference_encoder"]
    with torch.no_grad():
        hidden = reference(torch.from_numpy(tokens).long(), output_hidden_states=True).hidden_states[-2]
        final_layer_norm = getattr(reference, "text_model", reference).final_layer_norm  # text_model: transformers 4
        expected = final_layer_norm(hidden).numpy()
    assert R.relative_error(np.asarray(encoder(tokens)), expected) < 1e-5


def test_lora_tags_are_cut_out_as_a1111_reads_them():
    prompt = "a <lora:ink:0.8>cat, <lora:detail> <lyco:soft:0.3:0.6> <lora:x:te=0.2:unet=1.5>"
    cut, loras = prompts.extract_loras(prompt)
    assert cut == "a cat,   "
    assert loras == [("ink", 0.8, 0.8), ("detail", 1.0, 1.0), ("soft", 0.3, 0.6), ("x", 0.2, 1.5)]
    assert prompts.extract_loras("no tags (here:1.2)") == ("no tags (here:1.2)", [])
    with pytest.raises(ValueError, match="hypernet"):
        prompts.extract_loras("a <hypernet:anime:1>")
    with pytest.raises(ValueError, match="not a number"):
        prompts.extract_loras("a <lora:ink:strong>")


def test_plain_mode_truncates_as_diffusers_and_names_the_dropped_words(clip):
    tokenizer, reference = CLIPTokenizer(), clip["reference_tokenizer"]
    for prompt in ("a photo of a cat", NO_COMMAS):
        ids, dropped = prompts.plain_prompt_ids(tokenizer, prompt)
        expected = reference(prompt, padding="max_length", max_length=77, truncation=True)["input_ids"]
        np.testing.assert_array_equal(ids, expected)
        untruncated = reference(prompt, padding="longest", return_tensors="np")["input_ids"]
        removed = reference.batch_decode(untruncated[:, 76:-1])[0] if untruncated.shape[1] > 77 else ""
        assert dropped == removed.strip()
    assert prompts.plain_prompt_ids(tokenizer, NO_COMMAS)[1].startswith("pear red apple")
