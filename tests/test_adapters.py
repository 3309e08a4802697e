"""LoRAs, textual inversion, AUTOMATIC1111 prompts and clip skip through the pipeline, against diffusers (tiny model).

LoRA files of both forms are made here (``tests.test_lora``'s makers: PEFT adapters saved by diffusers, kohya
files with alphas and LoCon convolutions); diffusers loads and fuses each (``load_lora_weights``, ``fuse_lora``)
and the images must agree. Embeddings are read by diffusers' ``load_textual_inversion``; AUTOMATIC1111 prompts
are encoded by transformers' ``CLIPTextModel`` following A1111's algorithm (``tests.test_prompts``); clip skip
is diffusers' ``clip_skip`` (one lower than ours).
"""

import copy
import dataclasses
import re

import keras
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from kerasdiffusion import StableDiffusion
from kerasdiffusion import config as C
from kerasdiffusion.prompts import parse_prompt_attention
from tests import reference as R
from tests.test_embeddings import a1111_pt, random_vectors
from tests.test_conversion import CONTEXT, LATENTS, TIMESTEPS, TOKENS
from tests.test_lora import TEXT_ENCODER_TARGETS, UNET_TARGETS, kohya_lora, random_updates, save_peft_lora
from tests.test_prompts import LONG, a1111_chunks, a1111_context
from tests.test_sources_hub import lay_out_hub_cache
from weights_conversion import CheckpointError
from weights_conversion.embeddings import TextualInversion, write_textual_inversion
from weights_conversion.lora import fuse, lora_updates, read_lora, write_lora

SIZE, STEPS, SCHEDULER = 64, 6, "dpmpp_2m"
PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
WIDTH = R.TINY_TEXT_ENCODER["hidden_size"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    pipeline = R.make_reference_pipeline(seed=60)
    pipeline.scheduler = R.diffusers_scheduler(SCHEDULER, R.SD15_SCHEDULER)
    folder = tmp_path_factory.mktemp("tiny") / "diffusers"
    pipeline.save_pretrained(folder)
    return pipeline, folder


@pytest.fixture(scope="module")
def sd(reference):
    return StableDiffusion.from_pretrained(reference[1], img_width=SIZE, img_height=SIZE, jit_compile=R.JIT,
                                           precision="float32", scheduler=SCHEDULER)


@pytest.fixture(scope="module")
def lora_files(reference, tmp_path_factory):
    """A PEFT file (diffusers' writer, both networks, alphas in its metadata) and a kohya one (alpha 3, LoCon 3x3
    and 1x1 convolutions), both random, of about a real LoRA's strength: a much stronger one makes the tiny
    model chaotic enough that float rounding alone (1e-5 in the UNet's output) moves pixels after 6 steps."""
    from peft import LoraConfig

    pipeline, _ = reference
    folder = tmp_path_factory.mktemp("loras")
    peft = save_peft_lora(pipeline, folder, LoraConfig(r=4, lora_alpha=4, target_modules=list(UNET_TARGETS)),
                          LoraConfig(r=2, lora_alpha=3, target_modules=list(TEXT_ENCODER_TARGETS)))
    state_dict, _ = kohya_lora(pipeline.unet, pipeline.text_encoder, alpha=lambda i: 3.0, seed=5)
    save_file(state_dict, str(folder / "kohya-style.safetensors"))
    return {"peft": peft, "kohya": folder / "kohya-style.safetensors"}


NOISE = np.random.default_rng(7).standard_normal((1, SIZE // 8, SIZE // 8, 4)).astype("float32")


def ours(sd, prompt=PROMPT, negative_prompt=NEGATIVE):
    return sd.generate_image(sd.encode_text(prompt), negative_prompt=negative_prompt, num_steps=STEPS,
                             diffusion_noise=NOISE, verbose=False)


def diffusers_images(pipeline, **kwargs):
    images = pipeline(latents=R.nchw(NOISE), num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="np",
                      **kwargs).images
    return np.round(images * 255).astype(np.uint8)


def assert_same_images(ours, expected, what):
    difference = np.abs(ours.astype(int) - expected.astype(int))
    mean, p999 = difference.mean(), np.percentile(difference, 99.9)
    print(f"{what}: mean abs {mean:.4f}, 99.9th percentile {p999:.1f}, max {difference.max()} of 255")
    assert expected.std() > 20, "the reference image is too flat for the comparison to mean anything"
    assert mean <= 0.3 and p999 <= 2, what


def weights_of(sd):
    return {network: {v.path: np.array(keras.ops.convert_to_numpy(v.value)) for v in model.weights}
            for network, model in (("unet", sd.diffusion_model), ("text_encoder", sd.components.text_encoder))}


def assert_weights_equal(a, b):
    for network in a:
        assert a[network].keys() == b[network].keys()
        for path, array in a[network].items():
            np.testing.assert_array_equal(array, b[network][path], err_msg=f"{network} {path}")


def relative_error(a, b):
    return R.relative_error(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------------------------ LoRA


@pytest.mark.parametrize("form", ["peft", "kohya"])
def test_lora_images_match_diffusers_and_unloading_restores_the_weights(reference, sd, lora_files, form):
    pipeline, _ = reference
    before, original = ours(sd), weights_of(sd)
    traces = sd.trace_count
    name = sd.load_lora(lora_files[form], scale=0.7)
    assert name == lora_files[form].stem and sd.loras == {name: 0.7}
    for scale in (0.7, 1.3):
        sd.set_lora_scale(name, scale)
        fused = copy.deepcopy(pipeline)
        fused.load_lora_weights(str(lora_files[form]))
        fused.fuse_lora(lora_scale=scale)
        fused.unload_lora_weights()  # the fused weights stay; the adapter layers go
        assert_same_images(ours(sd), diffusers_images(fused, prompt=PROMPT, negative_prompt=NEGATIVE),
                           f"{form} LoRA at scale {scale}")
    assert np.abs(ours(sd).astype(int) - before.astype(int)).mean() > 1  # the LoRA changes the image
    sd.unload_lora(name)
    assert sd.trace_count == traces  # load, scale and unload assign weights; nothing is traced again
    assert sd.loras == {}
    assert_weights_equal(weights_of(sd), original)
    np.testing.assert_array_equal(ours(sd), before)


def test_sd2_lora_images_match_diffusers(tmp_path):
    """SD 2.x: linear proj_in / proj_out, the 1024-wide OpenCLIP text tower, v-prediction; a kohya file."""
    pipeline = R.make_reference_pipeline(seed=62, family="sd2")
    pipeline.scheduler = R.diffusers_scheduler(SCHEDULER, R.SD2_SCHEDULER)
    pipeline.save_pretrained(tmp_path / "sd2")
    sd2 = StableDiffusion.from_pretrained(tmp_path / "sd2", img_width=SIZE, img_height=SIZE, jit_compile=R.JIT,
                                          precision="float32", scheduler=SCHEDULER, progress=False)
    state_dict, _ = kohya_lora(pipeline.unet, pipeline.text_encoder, alpha=lambda i: 2.0, seed=6)
    save_file(state_dict, str(tmp_path / "sd2-style.safetensors"))
    sd2.load_lora(tmp_path / "sd2-style.safetensors", scale=0.8)
    pipeline.load_lora_weights(str(tmp_path / "sd2-style.safetensors"))
    pipeline.fuse_lora(lora_scale=0.8)
    pipeline.unload_lora_weights()
    assert_same_images(ours(sd2), diffusers_images(pipeline, prompt=PROMPT, negative_prompt=NEGATIVE),
                       "SD 2.x kohya LoRA at scale 0.8")


@pytest.mark.parametrize("format", ["diffusers", "kohya"])
def test_written_lora_gives_diffusers_outputs(reference, sd, tmp_path, format):
    """A LoRA written by `write_lora` for our model: our UNet and text encoder with it loaded compute what
    diffusers' do with ``load_lora_weights`` of the same file (PEFT layers, not fused)."""
    pipeline, _ = reference
    original = weights_of(sd)
    shapes = {network: {path: w.shape for path, w in weights.items()} for network, weights in original.items()}
    alpha = (lambda i: 1.0 + i % 3) if format == "diffusers" else (lambda i: 2.0)
    path = write_lora(tmp_path / "written.safetensors", random_updates(shapes, seed=11, alpha=alpha), format=format)
    name = sd.load_lora(path)
    with_lora = copy.deepcopy(pipeline)
    with_lora.load_lora_weights(str(path))
    with torch.no_grad():
        unet = R.nhwc(with_lora.unet(R.nchw(LATENTS), torch.from_numpy(TIMESTEPS), torch.from_numpy(CONTEXT)).sample)
        text = with_lora.text_encoder(torch.from_numpy(TOKENS).long()).last_hidden_state.numpy()
        text_before = pipeline.text_encoder(torch.from_numpy(TOKENS).long()).last_hidden_state.numpy()
    assert relative_error(text, text_before) > 1e-2  # the LoRA does something
    errors = (relative_error(sd.diffusion_model([LATENTS, TIMESTEPS, CONTEXT]), unet),
              relative_error(sd.text_encoder(TOKENS), text))
    print(f"written {format} LoRA: UNet relative error {errors[0]:.1e}, text encoder {errors[1]:.1e}")
    assert max(errors) < 1e-5
    sd.unload_lora(name)
    assert_weights_equal(weights_of(sd), original)


def test_several_loras_add_up_and_unload_in_any_order(sd, lora_files):
    original = weights_of(sd)
    shapes = {network: {p: a.shape for p, a in w.items()} for network, w in original.items()}
    updates = {}
    for form, path in lora_files.items():
        state_dict, metadata = read_lora(path)
        updates[form] = lora_updates(state_dict, shapes, metadata)

    def expected(*loras):
        weights = original
        for form, scale in loras:
            weights = {n: fuse(weights[n], updates[form][n], scale) for n in weights}
        return weights

    def assert_close(actual, wanted):
        for network in wanted:
            for path, array in wanted[network].items():
                assert relative_error(actual[network][path], array) < 1e-6, f"{network} {path}"

    sd.load_lora(lora_files["peft"], scale=0.5, name="a")
    sd.load_lora(lora_files["kohya"], scale=0.8, name="b")
    assert list(sd.loras) == ["a", "b"]
    assert_close(weights_of(sd), expected(("peft", 0.5), ("kohya", 0.8)))
    sd.unload_lora("a")
    assert_close(weights_of(sd), expected(("kohya", 0.8)))
    sd.unload_lora("b")
    assert_weights_equal(weights_of(sd), original)


def test_a_lora_that_does_not_fit_is_refused_and_nothing_changes(reference, sd, lora_files, tmp_path):
    sd2 = R.make_reference_pipeline(seed=61)
    sd2.unet = R.make_unet(61, **R.SD2_UNET)
    state_dict, _ = kohya_lora(sd2.unet, sd2.text_encoder, alpha=lambda i: 2.0)
    state_dict["lora_unet_down_blocks_0_attentions_0_nowhere.lora_down.weight"] = np.zeros((2, 4), np.float32)
    state_dict["lora_unet_down_blocks_0_attentions_0_nowhere.lora_up.weight"] = np.zeros((4, 2), np.float32)
    save_file(state_dict, str(tmp_path / "sd2.safetensors"))
    original = weights_of(sd)
    with pytest.raises(CheckpointError) as error:
        sd.load_lora(tmp_path / "sd2.safetensors")
    message = str(error.value)
    assert "\n" not in message and "mis-shaped" in message and "(LoRA (64, 1024), model (32, 64)" in message
    assert "no place in the model: unet: down_blocks_0_attentions_0_nowhere" in message
    assert sd.loras == {}
    assert_weights_equal(weights_of(sd), original)
    name = sd.load_lora(lora_files["kohya"], scale=0.3)
    with pytest.raises(ValueError, match="already loaded"):
        sd.load_lora(lora_files["kohya"])
    sd.unload_lora(name)
    for call in (lambda: sd.unload_lora(name), lambda: sd.set_lora_scale("nothing", 1.0)):
        with pytest.raises(KeyError, match="No LoRA named"):
            call()
    with pytest.raises(FileNotFoundError, match="No file at"):
        sd.load_lora(tmp_path / "missing.safetensors")
    assert_weights_equal(weights_of(sd), original)


def test_lora_from_a_hub_id_offline(sd, lora_files, tmp_path, monkeypatch):
    """The Hub's own offline resolution over a local cache laid out as a download leaves it."""
    import huggingface_hub.constants as hub_constants

    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "pytorch_lora_weights.safetensors").write_bytes(lora_files["peft"].read_bytes())
    (folder / "style.safetensors").write_bytes(lora_files["kohya"].read_bytes())
    cache = tmp_path / "hf" / "hub"
    lay_out_hub_cache(cache, "tiny-org/tiny-lora", "0123456789abcdef0123456789abcdef01234567", folder)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    original = weights_of(sd)
    assert sd.load_lora("tiny-org/tiny-lora") == "tiny-lora"
    from_hub = weights_of(sd)
    sd.unload_lora("tiny-lora")
    sd.load_lora(lora_files["peft"])
    assert_weights_equal(from_hub, weights_of(sd))
    sd.unload_lora("pytorch_lora_weights")
    assert sd.load_lora("tiny-org/tiny-lora", weight_name="style.safetensors", name="s") == "s"
    sd.unload_lora("s")
    with pytest.raises(OSError, match="Could not get 'tiny-org/elsewhere'"):
        sd.load_lora("tiny-org/elsewhere")
    assert_weights_equal(weights_of(sd), original)


# -------------------------------------------------------------------------------------- textual inversion


def diffusers_context(pipeline, prompt, **kwargs):
    with torch.no_grad():
        context, _ = pipeline.encode_prompt(prompt, "cpu", 1, False, **kwargs)
    return context.numpy()


@pytest.mark.parametrize("form", ["a1111 .pt", "diffusers learned_embeds.safetensors", "written a1111",
                                  "written diffusers"])
def test_textual_inversion_matches_diffusers(reference, sd, tmp_path, form):
    pipeline, _ = reference
    vectors = random_vectors(3, width=WIDTH, seed=8)
    if form == "a1111 .pt":
        path = tmp_path / "my-style.pt"
        a1111_pt(path, vectors, name="my-style")
    elif form.startswith("written"):
        path = write_textual_inversion(tmp_path, TextualInversion("my-style", vectors), format=form.split()[1])
    else:
        path = tmp_path / "learned_embeds.safetensors"
        save_file({"my-style": vectors}, str(path))
    prompt = "a painting of a fox in my-style, at night"
    before = np.asarray(sd.encode_text(prompt))
    assert sd.load_textual_inversion(path) == "my-style" and sd.embeddings == {"my-style": 3}
    with_embedding = copy.deepcopy(pipeline)
    # diffusers names an emb_params file by the token it is given; AUTOMATIC1111 and we, by the file's name.
    with_embedding.load_textual_inversion(str(path), token="my-style" if form == "written a1111" else None)
    error = relative_error(sd.encode_text(prompt), diffusers_context(with_embedding, prompt))
    print(f"textual inversion ({form}, 3 vectors): context relative error {error:.1e}")
    assert error < 1e-5
    assert sd.tokenizer("my-style")[0, 1:4].tolist() == [49408, 49409, 49410]
    sd.unload_textual_inversion("my-style")
    assert sd.embeddings == {} and sd.tokenizer.vocab_size == 49408
    np.testing.assert_array_equal(sd.encode_text(prompt), before)


def test_textual_inversion_collisions_widths_and_loras(reference, sd, lora_files, tmp_path):
    traces, original = sd.trace_count, weights_of(sd)
    save_file({"emb_params": random_vectors(2, width=WIDTH)}, str(tmp_path / "cat.safetensors"))
    save_file({"emb_params": random_vectors(2, width=WIDTH, seed=1)}, str(tmp_path / "sparkle-x.safetensors"))
    with pytest.raises(ValueError, match="collides with the word 'cat'"):
        sd.load_textual_inversion(tmp_path / "cat.safetensors")
    assert sd.load_textual_inversion(tmp_path / "sparkle-x.safetensors") == "sparkle-x"
    for token in ("sparkle-x", "SPARKLE-X", "sparkle-x_1"):
        with pytest.raises(ValueError, match="already added"):
            sd.load_textual_inversion(tmp_path / "cat.safetensors", token=token)
    save_file({"emb_params": random_vectors(2, width=1024)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(CheckpointError, match="1024-wide vectors .made for SD 2.x., but the text encoder is 64"):
        sd.load_textual_inversion(tmp_path / "wide.safetensors")

    # A LoRA fused into the text encoder survives the rebuild that a new token makes, and unloads exactly.
    name = sd.load_lora(lora_files["peft"], scale=0.9)
    fused = weights_of(sd)
    sd.load_textual_inversion(tmp_path / "cat.safetensors", token="<kitty>")
    assert sd.embeddings == {"sparkle-x": 2, "<kitty>": 2}
    rebuilt = weights_of(sd)
    assert rebuilt["text_encoder"].pop("token_embedding/embeddings").shape[0] == 49408 + 4
    fused["text_encoder"].pop("token_embedding/embeddings")
    assert_weights_equal(rebuilt, fused)
    ours(sd, prompt="a <kitty> sparkle-x")
    sd.unload_lora(name)
    sd.unload_textual_inversion()
    assert_weights_equal(weights_of(sd), original)
    assert sd.trace_count == traces


# ------------------------------------------------------------------------------------- prompt syntax, clip skip


def test_a1111_prompts_match_its_algorithm_and_the_negative_is_padded(reference, sd):
    """A 2-chunk weighted prompt and a 1-chunk negative: the contexts A1111 computes (transformers'
    CLIPTextModel, its chunking and emphasis), and the image diffusers makes from them."""
    pipeline, _ = reference
    a1111 = StableDiffusion.from_components(sd.components, img_width=SIZE, img_height=SIZE, jit_compile=R.JIT,
                                            scheduler=SCHEDULER, prompt_syntax="a1111")
    tokenizer = pipeline.tokenizer

    def reference_context(text):
        chunks = a1111_chunks(tokenizer, parse_prompt_attention(text), tokenizer.pad_token_id)
        return a1111_context(pipeline.text_encoder, chunks)

    prompt, negative = LONG + " (green:1.4) eyes", "[blurry], (low quality:1.2)"
    context = a1111.encode_text(prompt)
    assert context.shape == (1, 2 * 77, WIDTH)
    error = relative_error(context, reference_context(prompt))
    print(f"a1111 prompt, 2 chunks: context relative error {error:.1e}")
    assert error < 1e-5
    negative_context = np.concatenate([reference_context(negative), reference_context("")], axis=1)
    expected = diffusers_images(pipeline, prompt_embeds=torch.from_numpy(reference_context(prompt)),
                                negative_prompt_embeds=torch.from_numpy(negative_context))
    assert_same_images(ours(a1111, prompt, negative), expected, "a1111 prompt with the negative padded to 2 chunks")


def test_a1111_lora_tags_set_the_scale_for_one_call(sd, lora_files):
    a1111 = StableDiffusion.from_components(sd.components, img_width=SIZE, img_height=SIZE, jit_compile=R.JIT,
                                            scheduler=SCHEDULER, prompt_syntax="a1111")
    with pytest.raises(ValueError, match="LoRAs that are not loaded: ink"):
        a1111.text_to_image("a cat <lora:ink:0.5>", num_steps=1)
    sd.load_lora(lora_files["kohya"], scale=0.0, name="ink")
    try:
        tagged = a1111.text_to_image("a cat <lora:ink:0.6>", num_steps=STEPS, seed=3, verbose=False)
        assert a1111.loras == {"ink": 0.0}  # back to its own scale after the call
        sd.set_lora_scale("ink", 0.6)
        np.testing.assert_array_equal(tagged, sd.text_to_image("a cat", num_steps=STEPS, seed=3, verbose=False))
    finally:
        sd.unload_lora("ink")


def test_plain_prompts_are_truncated_as_diffusers_with_a_warning(reference, sd):
    pipeline, _ = reference
    prompt = " ".join(["red apple green pear"] * 20)  # 80 tokens
    with pytest.warns(UserWarning, match="dropped: 'pear red apple green pear'"):
        context = sd.encode_text(prompt)
    assert relative_error(context, diffusers_context(pipeline, prompt)) < 1e-5


def diffusers_clip_skip_context(pipeline, prompt, clip_skip):
    """diffusers' ``encode_prompt(..., clip_skip=)``: ``hidden_states[-(clip_skip + 1)]`` through the final layer
    norm. Written out because diffusers 0.42 reaches the norm as ``text_encoder.text_model``, which transformers 5's
    ``CLIPTextModel`` no longer has."""
    ids = pipeline.tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    encoder = pipeline.text_encoder
    with torch.no_grad():
        hidden = encoder(ids.input_ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
        return getattr(encoder, "text_model", encoder).final_layer_norm(hidden).numpy()


def test_clip_skip_matches_diffusers(reference, sd):
    """Ours counts as AUTOMATIC1111 (2 = penultimate layer), diffusers one lower."""
    pipeline, _ = reference
    skipping = StableDiffusion.from_components(sd.components, img_width=SIZE, img_height=SIZE, jit_compile=R.JIT,
                                               clip_skip=2)
    error = relative_error(skipping.encode_text(PROMPT), diffusers_clip_skip_context(pipeline, PROMPT, 1))
    print(f"clip_skip=2: context relative error {error:.1e}")
    assert error < 1e-5
    assert relative_error(skipping.encode_text(PROMPT), sd.encode_text(PROMPT)) > 1e-2
    assert skipping.text_encoder.outputs[0].shape == sd.text_encoder.outputs[0].shape


def test_bad_prompt_syntax_and_clip_skip_are_refused(sd):
    for keywords, message in [(dict(prompt_syntax="A1111"), "prompt_syntax must be one of plain, a1111, got 'A1111'"),
                              (dict(clip_skip=0), "clip_skip must be an integer >= 1.*got 0"),
                              (dict(clip_skip="2"), "clip_skip must be an integer >= 1.*got '2'")]:
        with pytest.raises(ValueError, match=message):
            StableDiffusion.from_components(sd.components, **keywords)
    sd2_shaped = dataclasses.replace(sd.components, family=C.SD2)
    with pytest.raises(ValueError, match=re.escape("clip_skip=2 applies to SD 1.x only")):
        StableDiffusion.from_components(sd2_shaped, clip_skip=2)
    with pytest.raises(ValueError, match="Cannot skip 2 of the text encoder's 2 layers"):
        StableDiffusion.from_components(sd.components, clip_skip=3)
