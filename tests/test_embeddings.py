"""Textual-inversion files of every form give the vectors diffusers' ``load_textual_inversion`` adds (tiny models).

Each file is written here in its form's own layout with several random vectors; diffusers reads it into a copy
of the reference text encoder, and the embedding rows it appends are what our reader must return.
"""

import copy
import re
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from tests import reference as R
from weights_conversion import CheckpointError, UnsafeCheckpointError
from weights_conversion.embeddings import TextualInversion, read_textual_inversion, write_textual_inversion

WIDTH = R.TINY_TEXT_ENCODER["hidden_size"]


@pytest.fixture(scope="module")
def pipeline():
    return R.make_reference_pipeline(seed=40)


def rows_added_by_diffusers(pipeline, path, token=None, text_encoder=None):
    """The token embedding rows diffusers appends for the file, in order."""
    tokenizer, text_encoder = copy.deepcopy(pipeline.tokenizer), text_encoder or copy.deepcopy(pipeline.text_encoder)
    before = text_encoder.get_input_embeddings().weight.shape[0]
    pipeline.load_textual_inversion(str(path), token=token, tokenizer=tokenizer, text_encoder=text_encoder)
    return text_encoder.get_input_embeddings().weight[before:].detach().numpy()


def a1111_pt(path, vectors, name):
    """AUTOMATIC1111's ``Embedding.save`` layout."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.from_numpy(vectors)}, "name": name,
                "step": 500, "sd_checkpoint": "0123abcd", "sd_checkpoint_name": "v1-5-pruned"}, path)


def random_vectors(n, width=WIDTH, seed=0):
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)


def test_a1111_pt(pipeline, tmp_path):
    vectors = random_vectors(3)
    a1111_pt(tmp_path / "style.pt", vectors, name="my-style")
    ours = read_textual_inversion(tmp_path / "style.pt", width=WIDTH)
    assert ours.token == "my-style"
    np.testing.assert_array_equal(ours.vectors, rows_added_by_diffusers(pipeline, tmp_path / "style.pt"))
    np.testing.assert_array_equal(ours.vectors, vectors)


def test_a1111_safetensors_emb_params(pipeline, tmp_path):
    save_file({"emb_params": random_vectors(4, seed=1)}, str(tmp_path / "negative.safetensors"))
    ours = read_textual_inversion(tmp_path / "negative.safetensors")
    assert ours.token is None  # A1111 names it after the file
    expected = rows_added_by_diffusers(pipeline, tmp_path / "negative.safetensors", token="negative")
    np.testing.assert_array_equal(ours.vectors, expected)


@pytest.mark.parametrize("form", ["bin, one vector", "safetensors, several vectors"])
def test_diffusers_learned_embeds(pipeline, tmp_path, form):
    if form.startswith("bin"):
        path = tmp_path / "learned_embeds.bin"
        torch.save({"<cat-toy>": torch.from_numpy(random_vectors(1, seed=2)[0])}, path)
    else:
        path = tmp_path / "learned_embeds.safetensors"
        save_file({"<cat-toy>": random_vectors(5, seed=3)}, str(path))
    ours = read_textual_inversion(path, width=WIDTH)
    assert ours.token == "<cat-toy>" and ours.vectors.ndim == 2
    np.testing.assert_array_equal(ours.vectors, rows_added_by_diffusers(pipeline, path))


def test_1024_wide_embedding(pipeline, tmp_path):
    """An SD 2.x-wide embedding into a 1024-wide text encoder."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(**{**R.TINY_TEXT_ENCODER, **R.SD2_TEXT_ENCODER, "num_hidden_layers": 1})
    a1111_pt(tmp_path / "wide.pt", random_vectors(2, width=1024, seed=4), name="<wide-style>")
    ours = read_textual_inversion(tmp_path / "wide.pt", width=1024)
    expected = rows_added_by_diffusers(pipeline, tmp_path / "wide.pt", text_encoder=CLIPTextModel(config))
    np.testing.assert_array_equal(ours.vectors, expected)


def test_a1111_pt_of_torch_1_11_parameter_dict(tmp_path):
    """Old A1111 files pickle ``string_to_param`` as a whole ParameterDict; its parameter is still read."""
    vectors = random_vectors(2, seed=5)
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.from_numpy(vectors))})
    torch.save({"string_to_token": {"*": 265}, "string_to_param": params, "name": "old", "step": 1}, tmp_path / "o.pt")
    ours = read_textual_inversion(tmp_path / "o.pt")
    assert ours.token == "old"
    np.testing.assert_array_equal(ours.vectors, vectors)


def test_bad_embeddings_are_refused(tmp_path):
    vectors = random_vectors(2, width=768)
    cases = {
        "sdxl.safetensors": ({"clip_l": vectors, "clip_g": random_vectors(2, width=1280)}, "SD-XL"),
        "two.safetensors": ({"<a>": vectors, "<b>": vectors}, "found <a>, <b>"),
        "cube.safetensors": ({"emb_params": vectors[None]}, re.escape("shape (1, 2, 768)")),
        "empty.safetensors": ({"emb_params": np.zeros((2, 0), np.float32)}, re.escape("shape (2, 0)")),
        "lora.safetensors": ({"lora_unet_x.lora_down.weight": vectors, "lora_unet_x.alpha": vectors[0, :1]},
                             "not a textual-inversion embedding"),
    }
    for name, (tensors, message) in cases.items():
        save_file(tensors, str(tmp_path / name))
        with pytest.raises(CheckpointError, match=message):
            read_textual_inversion(tmp_path / name)
    save_file({"emb_params": vectors}, str(tmp_path / "sd1.safetensors"))
    with pytest.raises(CheckpointError, match=r"768-wide vectors \(made for SD 1.x\), but the text encoder is 1024"):
        read_textual_inversion(tmp_path / "sd1.safetensors", width=1024)
    torch.save({"string_to_param": {"*": torch.zeros(1, 4), "x": torch.zeros(1, 4)}, "name": "n"}, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="2 terms"):
        read_textual_inversion(tmp_path / "m.pt")


def test_embedding_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"string_to_param": {"*": Exploit()}, "name": "evil"}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="system"):
        read_textual_inversion(tmp_path / "evil.pt")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ writing


@pytest.mark.parametrize("format", ["a1111", "diffusers"])
def test_written_embeddings_read_back_and_load_in_diffusers(pipeline, tmp_path, format):
    vectors = random_vectors(3, seed=9)
    path = write_textual_inversion(tmp_path, TextualInversion("my-style", vectors), format=format)
    assert os.path.basename(path) == {"a1111": "my-style.safetensors", "diffusers": "learned_embeds.safetensors"}[format]
    ours = read_textual_inversion(path, width=WIDTH)
    assert ours.token == {"a1111": None, "diffusers": "my-style"}[format]  # A1111 goes by the file's name
    np.testing.assert_array_equal(ours.vectors, vectors)
    token = "my-style" if format == "a1111" else None  # diffusers names an emb_params file by the caller's token
    np.testing.assert_array_equal(rows_added_by_diffusers(pipeline, path, token=token), vectors)
    assert [os.path.basename(p) for p in tmp_path.iterdir()] == [os.path.basename(path)]  # no staging file left


def test_written_embedding_names_and_shapes_are_checked(tmp_path):
    embedding = TextualInversion("my-style", random_vectors(2))
    with pytest.raises(ValueError, match="name it my-style.safetensors"):
        write_textual_inversion(tmp_path / "other.safetensors", embedding, format="a1111")
    with pytest.raises(ValueError, match="Unknown embedding format 'pt'"):
        write_textual_inversion(tmp_path, embedding, format="pt")
    with pytest.raises(ValueError, match="no token"):
        write_textual_inversion(tmp_path, TextualInversion(None, random_vectors(2)), format="diffusers")
    with pytest.raises(ValueError, match=r"shape \(4,\); expected \[n, D\]"):
        write_textual_inversion(tmp_path, TextualInversion("t", np.ones(4, np.float32)), format="diffusers")
    assert list(tmp_path.iterdir()) == []
