"""Every checkpoint form, through our loading code, gives the reference's outputs (tiny configs).

The original single-file (CompVis/LDM) fixtures come from `tests.ldm_fixtures.diffusers_to_ldm`, whose exactness
`tests/test_ldm.py` proves against diffusers' own single-file converters.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from kerasdiffusion import StableDiffusion
from tests import ldm_fixtures
from tests import reference as R
from weights_conversion import CheckpointError, UnsafeCheckpointError
from weights_conversion.__main__ import main as convert_main

TOLERANCE = 1e-4
RNG = np.random.default_rng(0)
LATENTS = RNG.standard_normal((2, 5, 7, 4)).astype("float32")
TIMESTEPS = np.array([999.0, 3.0], "float32")
CONTEXT = RNG.standard_normal((2, 77, 64)).astype("float32")
IMAGES = RNG.uniform(-1, 1, (1, 40, 56, 3)).astype("float32")
TOKENS = RNG.integers(0, 49408, (2, 77)).astype("int32")


def reference_outputs(pipeline):
    with torch.no_grad():
        return {
            "unet": R.nhwc(pipeline.unet(R.nchw(LATENTS), torch.from_numpy(TIMESTEPS), torch.from_numpy(CONTEXT)).sample),
            "decoder": R.nhwc(pipeline.vae.decode(R.nchw(LATENTS)).sample),
            "image_encoder": R.nhwc(pipeline.vae.quant_conv(pipeline.vae.encoder(R.nchw(IMAGES)))),
            "text_encoder": pipeline.text_encoder(torch.from_numpy(TOKENS).long()).last_hidden_state.numpy(),
        }


def our_outputs(sd):
    return {
        "unet": np.asarray(sd.diffusion_model([LATENTS, TIMESTEPS, CONTEXT])),
        "decoder": np.asarray(sd.decoder(LATENTS)),
        "image_encoder": np.asarray(sd.image_encoder(IMAGES)),
        "text_encoder": np.asarray(sd.text_encoder(TOKENS)),
    }


def assert_matches(ours, expected, tolerance=TOLERANCE):
    for name in expected:
        error = R.relative_error(ours[name], expected[name])
        assert error < tolerance, f"{name}: relative error {error:.2e}"


def load(source):
    return StableDiffusion.from_pretrained(source, img_width=64, img_height=64, jit_compile=False,
                                           precision="float32")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The reference pipeline, its outputs, and the same weights in every on-disk form."""
    folder = tmp_path_factory.mktemp("forms")
    pipeline = R.make_reference_pipeline(seed=20)
    pipeline.save_pretrained(folder / "diffusers")
    pipeline.save_pretrained(folder / "diffusers-bin", safe_serialization=False)  # pickled .bin weights
    ldm = ldm_fixtures.diffusers_to_ldm(R.state_dict_numpy(pipeline.unet), R.state_dict_numpy(pipeline.vae),
                                        R.state_dict_numpy(pipeline.text_encoder))
    ldm.update(ldm_fixtures.latent_diffusion_extras(ldm))
    save_file({k: np.ascontiguousarray(v) for k, v in ldm.items()}, str(folder / "model.safetensors"))
    torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in ldm.items()}, "global_step": 7},
               folder / "model.ckpt")
    return dict(pipeline=pipeline, expected=reference_outputs(pipeline), folder=folder, ldm=ldm)


@pytest.mark.parametrize("form", ["diffusers", "diffusers-bin", "model.safetensors", "model.ckpt"])
def test_every_source_form_matches_reference(model, form):
    if form == "diffusers-bin":
        assert os.path.isfile(model["folder"] / form / "unet" / "diffusion_pytorch_model.bin")
    sd = load(model["folder"] / form)
    assert_matches(our_outputs(sd), model["expected"])


def test_converted_folder_loads_without_torch(model, tmp_path):
    output = tmp_path / "converted"
    assert convert_main([str(model["folder"] / "model.ckpt"), str(output)]) == 0
    assert sorted(os.listdir(output)) == ["kerasdiffusion.json", "text_encoder.safetensors", "unet.safetensors",
                                          "vae.safetensors"]
    np.savez(tmp_path / "inputs.npz", latents=LATENTS, timesteps=TIMESTEPS, context=CONTEXT, images=IMAGES,
             tokens=TOKENS)
    script = f"""
import sys
sys.modules["torch"] = None  # any import of torch now fails
import numpy as np
from kerasdiffusion import StableDiffusion
x = np.load({str(tmp_path / 'inputs.npz')!r})
sd = StableDiffusion.from_pretrained({str(output)!r}, jit_compile=False, precision="float32")
np.savez({str(tmp_path / 'ours.npz')!r},
         unet=sd.diffusion_model([x["latents"], x["timesteps"], x["context"]]),
         decoder=sd.decoder(x["latents"]), image_encoder=sd.image_encoder(x["images"]),
         text_encoder=sd.text_encoder(x["tokens"]))
"""
    subprocess.run([sys.executable, "-c", script], check=True)
    ours = dict(np.load(tmp_path / "ours.npz"))
    assert_matches(ours, model["expected"])


def test_loading_a_converted_folder_reads_each_tensor_once_and_draws_no_random_weights(model, tmp_path,
                                                                                       monkeypatch):
    """Loading builds each variable from its tensor as the tensor is read: no Keras random initializer runs
    (their cost, and one compiled program per shape on JAX) and no tensor is read, so held, twice. On
    TensorFlow, the tensors our writer put at a multiple of 64 bytes (all but a few small biases) are not
    read at all: their variables are made over the file's memory map."""
    import keras

    from weights_conversion import readers

    output = tmp_path / "converted"
    assert convert_main([str(model["folder"] / "model.safetensors"), str(output)]) == 0
    reads, draws = {}, []
    read = readers.LazyTensor._read

    def counted_read(tensor, *args, **kwargs):
        reads[(tensor.path, tensor.name)] = reads.get((tensor.path, tensor.name), 0) + 1
        return read(tensor, *args, **kwargs)

    monkeypatch.setattr(readers.LazyTensor, "_read", counted_read)
    for initializer in (keras.initializers.GlorotUniform, keras.initializers.RandomUniform):
        monkeypatch.setattr(initializer, "__call__", lambda *args, **kwargs: draws.append(args))
    sd = load(output)
    assert_matches(our_outputs(sd), model["expected"])
    tensors = {(tensor.path, name): tensor for network in ("unet", "vae", "text_encoder")
               for name, tensor in readers.read_state_dict(str(output / f"{network}.safetensors"), lazy=True).items()}
    assert set(reads.values()) == {1} and draws == []
    if keras.backend.backend() == "tensorflow":
        mapped = {key for key, tensor in tensors.items() if tensor.offset % readers.ALIGNMENT == 0}
        assert set(reads) == set(tensors) - mapped
        assert len(mapped) > 0.95 * len(tensors)
    else:
        assert set(reads) == set(tensors)


def test_weights_used_where_the_file_is_mapped_are_never_written_back(model, tmp_path):
    """A variable over the file's memory map (TensorFlow) takes writes, as any variable does, in a copy: the
    file keeps its bytes, and a second load sees them."""
    output = tmp_path / "converted"
    assert convert_main([str(model["folder"] / "model.safetensors"), str(output)]) == 0
    before = (output / "unet.safetensors").read_bytes()
    variable = load(output).diffusion_model.get_layer("input_conv").kernel
    original = np.asarray(variable.numpy()).copy()
    variable.assign(original + 1.0)
    np.testing.assert_array_equal(variable.numpy(), original + 1.0)
    assert (output / "unet.safetensors").read_bytes() == before
    np.testing.assert_array_equal(load(output).diffusion_model.get_layer("input_conv").kernel.numpy(), original)


def test_half_precision_checkpoint_loads(model, tmp_path):
    half = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in model["ldm"].items()}
    save_file(half, str(tmp_path / "half.safetensors"))
    pipeline = model["pipeline"]
    rounded = {name: R.state_dict_numpy(getattr(pipeline, name)) for name in ("unet", "vae", "text_encoder")}
    for name, state in rounded.items():
        module = getattr(pipeline, name)
        module.load_state_dict({k: torch.from_numpy(v.astype(np.float16).astype(v.dtype)) for k, v in state.items()})
    try:
        expected = reference_outputs(pipeline)
    finally:
        for name, state in rounded.items():
            getattr(pipeline, name).load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    assert_matches(our_outputs(load(tmp_path / "half.safetensors")), expected)


def test_truncated_file_is_named(model, tmp_path):
    data = (model["folder"] / "model.safetensors").read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load(truncated)


def test_missing_and_misshaped_tensors_are_named(model, tmp_path):
    ldm = dict(model["ldm"])
    del ldm["model.diffusion_model.out.2.bias"]
    ldm["first_stage_model.decoder.conv_out.bias"] = np.zeros(5, np.float32)
    save_file({k: np.ascontiguousarray(v) for k, v in ldm.items()}, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError) as error:
        load(tmp_path / "broken.safetensors")
    message = str(error.value)
    assert "unet weights do not fit the model: missing tensors: output_conv/bias" in message
    assert "decoder_output_conv/bias (checkpoint (5,), model (3,))" in message


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {"x": Exploit()}}, tmp_path / "evil.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_missing_source_and_cli_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        load(tmp_path / "nothing-here.safetensors")
    assert convert_main([str(tmp_path / "nothing-here.ckpt"), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and "\n" not in error
    assert not (tmp_path / "out").exists()


def test_converted_files_read_back_with_the_safetensors_library(model, tmp_path):
    """Our streaming writer against the format's own reader, on a real conversion and on odd arrays."""
    from safetensors.numpy import load_file

    from weights_conversion import convert_source, save_converted
    from weights_conversion.convert import write_safetensors

    converted = convert_source(model["folder"] / "model.safetensors")
    save_converted(converted, tmp_path / "converted")
    for network, weights in converted.weights.items():
        stored = load_file(tmp_path / "converted" / f"{network}.safetensors")
        assert stored.keys() == weights.keys()
        for name, array in weights.items():
            np.testing.assert_array_equal(stored[name], array, err_msg=f"{network}: {name}")
            assert stored[name].dtype == array.dtype
    odd = {
        "transposed": np.arange(12, dtype="float32").reshape(3, 4).T,  # not contiguous
        "big_endian": np.arange(5, dtype=">f4"),
        "half": np.linspace(-1, 1, 6, dtype="float16").reshape(2, 3),
        "ids": np.arange(4, dtype="int64"),
        "flags": np.array([True, False, True]),
        "empty": np.zeros((0, 3), "float32"),
        "scalar": np.array(2.5, "float32"),
    }
    write_safetensors(tmp_path / "odd.safetensors", odd)
    stored = load_file(tmp_path / "odd.safetensors")
    for name, array in odd.items():
        np.testing.assert_array_equal(stored[name], array, err_msg=name)
        assert stored[name].shape == array.shape
    with pytest.raises(CheckpointError, match="cannot store dtype"):
        write_safetensors(tmp_path / "bad.safetensors", {"text": np.array(["a"])})
