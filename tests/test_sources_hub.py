"""Hub ids through huggingface_hub's own offline resolution, and the conversion cache (tiny random model).

No network: the tiny model is laid out in a local Hugging Face cache exactly as `snapshot_download` leaves it
(``models--org--name/{blobs,snapshots/<commit>,refs/main}``) and the Hub is switched offline, so the
revision -> commit -> snapshot resolution that runs is huggingface_hub's.
"""

import hashlib
import json
import os
import shutil
import time

import numpy as np
import pytest

from kerasdiffusion import StableDiffusion, sources
from tests import reference as R
from weights_conversion import convert as C
from weights_conversion import readers, save_converted

REPO = "tiny-org/tiny-sd"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
PROMPT = "a photograph of an astronaut riding a horse"


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "diffusers"
    R.make_reference_pipeline(seed=5).save_pretrained(folder)
    return folder


def lay_out_hub_cache(cache, repo_id, commit, folder):
    """``folder``'s files as a Hugging Face cache holds a downloaded snapshot: blobs named by their hash,
    snapshot entries linking to them, and ``refs/main`` naming the commit."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    (storage / "blobs").mkdir(parents=True)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)  # no newline: huggingface_hub reads it verbatim
    for file in sorted(folder.rglob("*")):
        if file.is_file():
            blob = storage / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
            shutil.copyfile(file, blob)
            link = storage / "snapshots" / commit / file.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    return storage


@pytest.fixture
def offline_hub(tmp_path, monkeypatch, diffusers_folder):
    """An offline Hub whose local cache holds ``REPO``; our conversion cache in a fresh folder."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hf" / "hub"
    lay_out_hub_cache(cache, REPO, COMMIT, diffusers_folder)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these environment variables once, at import: set the constants it consults.
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def kd_cache(tmp_path, monkeypatch):
    folder = tmp_path / "kd-cache"
    monkeypatch.setenv(sources.CACHE_ENV, str(folder))
    monkeypatch.delenv(sources.NO_CACHE_ENV, raising=False)
    return folder


@pytest.fixture
def conversions(monkeypatch):
    """Counts real conversions: reads of a diffusers folder's PyTorch weights (cache hits read none)."""
    calls = []
    read = readers.read_diffusers_folder

    def counting(path):
        calls.append(os.fspath(path))
        return read(path)

    monkeypatch.setattr(readers, "read_diffusers_folder", counting)
    return calls


def entries(cache):
    folder = cache / "converted"
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def load(source, **options):
    options = {"img_width": 64, "img_height": 64, **options}
    return StableDiffusion.from_pretrained(source, jit_compile=False, precision="float32", **options)


def assert_same_weights(a, b):
    for network in C.NETWORKS:
        assert a.weights[network].keys() == b.weights[network].keys()
        for name, array in a.weights[network].items():
            np.testing.assert_array_equal(array, b.weights[network][name], err_msg=f"{network}: {name}")


def test_hub_id_loads_offline_and_matches_the_local_folder(offline_hub, kd_cache, diffusers_folder):
    from_hub = load(REPO).text_to_image(PROMPT, num_steps=2, seed=1, verbose=False)
    from_folder = load(diffusers_folder).text_to_image(PROMPT, num_steps=2, seed=1, verbose=False)
    np.testing.assert_array_equal(from_hub, from_folder)
    assert sources.resolve(REPO).image_size == 64  # the repository's unet/config.json: sample_size 8
    assert from_hub.std() > 5
    assert any(name.startswith("tiny-org--tiny-sd-") for name in entries(kd_cache))


def test_revision_picks_a_tag_of_the_hub_repo(offline_hub, kd_cache, diffusers_folder, tmp_path):
    """A second snapshot, of other weights, under the tag ``v2``: ``revision="v2"`` loads it, the default
    (``main``) the first; each has its own cache entry."""
    other = tmp_path / "other"
    R.make_reference_pipeline(seed=6).save_pretrained(other)
    storage = lay_out_hub_cache(tmp_path / "staging", REPO, OTHER_COMMIT, other)
    shutil.copytree(storage / "blobs", offline_hub / storage.name / "blobs", dirs_exist_ok=True)
    shutil.copytree(storage / "snapshots" / OTHER_COMMIT, offline_hub / storage.name / "snapshots" / OTHER_COMMIT,
                    symlinks=True)
    (offline_hub / storage.name / "refs" / "v2").write_text(OTHER_COMMIT)
    tagged = sources.resolve(REPO, revision="v2")
    assert_same_weights(tagged, sources.resolve(other, use_cache=False))
    main = sources.resolve(REPO)
    assert_same_weights(main, sources.resolve(diffusers_folder, use_cache=False))
    assert len(entries(kd_cache)) == 2
    image = load(REPO, revision="v2").text_to_image(PROMPT, num_steps=2, seed=1, verbose=False)
    np.testing.assert_array_equal(image, load(other).text_to_image(PROMPT, num_steps=2, seed=1, verbose=False))


def test_revision_of_a_local_source_is_refused(diffusers_folder):
    with pytest.raises(ValueError, match="applies to Hub ids only"):
        sources.resolve(diffusers_folder, revision="main")
    with pytest.raises(ValueError, match="applies to Hub ids only"):
        StableDiffusion.from_pretrained(diffusers_folder, revision="main")


def test_unknown_repo_offline_names_it_and_suggests_a_local_path(offline_hub, kd_cache):
    with pytest.raises(OSError) as caught:
        sources.resolve("tiny-org/no-such-model")
    message = str(caught.value)
    assert "'tiny-org/no-such-model'" in message and "local Hugging Face cache" in message
    assert "pass a local path instead" in message and "\n" not in message
    assert entries(kd_cache) == []


def test_second_load_reads_the_cache(offline_hub, kd_cache, conversions):
    start = time.perf_counter()
    first = sources.resolve(REPO)
    converted_in = time.perf_counter() - start
    assert len(conversions) == 1 and len(entries(kd_cache)) == 1
    start = time.perf_counter()
    second = sources.resolve(REPO)
    cached_in = time.perf_counter() - start
    print(f"tiny model: first load (convert + cache) {converted_in:.2f} s, cached load {cached_in:.2f} s")
    assert len(conversions) == 1, "the second load converted again"
    assert second.source == REPO and second.scheduler_config == first.scheduler_config
    assert sorted(os.listdir(second.tokenizer_dir)) == sorted(os.listdir(first.tokenizer_dir))
    assert_same_weights(first, second)


def test_half_precision_falls_back_to_full_precision_files_and_has_its_own_entry(offline_hub, kd_cache, conversions):
    full = sources.resolve(REPO, half_precision=False)
    half = sources.resolve(REPO, half_precision=True)  # the repo has no fp16 variant
    assert len(conversions) == 2 and len(entries(kd_cache)) == 2
    assert_same_weights(full, half)


def test_hub_weight_files_prefer_safetensors_and_the_requested_precision():
    full = [f"{n}/{b}.safetensors" for n, b in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                                                 ("text_encoder", "model"))]
    half = [name.replace(".safetensors", ".fp16.safetensors") for name in full]
    pickles = [name.replace(".safetensors", ".bin") for name in full]
    assert sources.hub_weight_files(full + half + pickles, half_precision=True) == half
    assert sources.hub_weight_files(full + half + pickles, half_precision=False) == full
    assert sources.hub_weight_files(full + pickles, half_precision=True) == full
    assert sources.hub_weight_files(half, half_precision=False) == half
    assert sources.hub_weight_files(pickles, half_precision=False) == pickles
    sharded = ["unet/diffusion_pytorch_model.safetensors.index.json",
               "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
               "unet/diffusion_pytorch_model-00002-of-00002.safetensors"]
    assert sources.hub_weight_files(sharded + full[1:])[:3] == sharded
    with pytest.raises(LookupError, match="vae"):
        sources.hub_weight_files([full[0], full[2]])


def test_local_folder_is_cached_and_a_changed_file_gets_a_new_entry(diffusers_folder, tmp_path, kd_cache, conversions):
    folder = tmp_path / "model"
    shutil.copytree(diffusers_folder, folder)
    first = sources.resolve(folder)
    sources.resolve(folder)
    assert len(conversions) == 1 and len(entries(kd_cache)) == 1
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    again = sources.resolve(folder)
    assert len(conversions) == 2 and len(entries(kd_cache)) == 2
    assert_same_weights(first, again)


def test_file_key_follows_size_mtime_and_content(tmp_path):
    path = tmp_path / "model.safetensors"
    data = bytearray(np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes())
    path.write_bytes(data)
    key = sources.file_key(path)
    assert sources.file_key(path) == key
    stat = path.stat()
    data[10] ^= 1  # same size, same mtime after the rewrite: only the sampled head tells
    path.write_bytes(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed_head = sources.file_key(path)
    assert changed_head != key
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert sources.file_key(path) not in (key, changed_head)


def test_interrupted_conversion_leaves_no_entry(diffusers_folder, kd_cache, conversions, monkeypatch):
    writes = []
    write = C.write_safetensors

    def interrupted(path, arrays, advance):
        writes.append(path)
        if len(writes) == 2:  # after the first network's file is written
            raise KeyboardInterrupt
        write(path, arrays, advance)

    monkeypatch.setattr(C, "write_safetensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sources.resolve(diffusers_folder)
    assert entries(kd_cache) == []  # neither an entry nor a staging folder
    monkeypatch.setattr(C, "write_safetensors", write)
    sources.resolve(diffusers_folder)
    sources.resolve(diffusers_folder)
    assert len(conversions) == 2 and len(entries(kd_cache)) == 1


def test_a_concurrent_writer_of_the_same_entry_wins_cleanly(diffusers_folder, kd_cache, conversions, monkeypatch):
    write = C.write_safetensors

    def racing(path, arrays, advance):
        monkeypatch.setattr(C, "write_safetensors", write)
        sources.resolve(diffusers_folder)  # another process stores the same entry while we are still writing
        write(path, arrays, advance)

    monkeypatch.setattr(C, "write_safetensors", racing)
    ours = sources.resolve(diffusers_folder)
    assert len(conversions) == 2 and len(entries(kd_cache)) == 1  # theirs; our staging folder is gone
    assert_same_weights(ours, sources.resolve(diffusers_folder))
    assert len(conversions) == 2


def test_staging_folders_of_killed_writers_are_removed_later(diffusers_folder, kd_cache):
    staging = kd_cache / "converted"
    (staging / ".converting-killed").mkdir(parents=True)
    (staging / ".converting-running").mkdir()
    long_ago = time.time() - 2 * sources.STALE_STAGING_SECONDS
    os.utime(staging / ".converting-killed", (long_ago, long_ago))
    sources.resolve(diffusers_folder)
    assert [name for name in entries(kd_cache) if name.startswith(".")] == [".converting-running"]


def test_failing_cache_write_still_loads(diffusers_folder, kd_cache, conversions, monkeypatch):
    def disk_full(path, arrays, advance):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(C, "write_safetensors", disk_full)
    converted = sources.resolve(diffusers_folder)
    assert set(converted.weights) == set(C.NETWORKS)
    assert entries(kd_cache) == []


def test_unreadable_entry_is_rebuilt(diffusers_folder, kd_cache, conversions):
    sources.resolve(diffusers_folder)
    (entry,) = entries(kd_cache)
    unet = kd_cache / "converted" / entry / "unet.safetensors"
    unet.write_bytes(unet.read_bytes()[:1000])  # truncated behind our back
    sources.resolve(diffusers_folder)
    assert len(conversions) == 2
    assert entries(kd_cache) == [entry]
    sources.resolve(diffusers_folder)
    assert len(conversions) == 2


def test_converted_folders_are_not_cached_again(diffusers_folder, tmp_path, kd_cache, conversions):
    output = tmp_path / "converted"
    save_converted(sources.resolve(diffusers_folder, use_cache=False), output)
    assert len(conversions) == 1
    sources.resolve(output)
    assert len(conversions) == 1 and entries(kd_cache) == []


def test_cache_can_be_turned_off(diffusers_folder, kd_cache, conversions, monkeypatch):
    monkeypatch.setenv(sources.NO_CACHE_ENV, "1")
    sources.resolve(diffusers_folder)
    sources.resolve(diffusers_folder)
    assert len(conversions) == 2 and entries(kd_cache) == []
    monkeypatch.delenv(sources.NO_CACHE_ENV)
    sources.resolve(diffusers_folder, use_cache=False)
    assert len(conversions) == 3 and entries(kd_cache) == []


def test_from_pretrained_cache_argument_overrides_the_environment(diffusers_folder, kd_cache, conversions,
                                                                  monkeypatch):
    load(diffusers_folder, cache=False)
    assert len(conversions) == 1 and entries(kd_cache) == []
    monkeypatch.setenv(sources.NO_CACHE_ENV, "1")
    load(diffusers_folder, cache=True)
    assert len(conversions) == 2 and len(entries(kd_cache)) == 1
    load(diffusers_folder, cache=True)
    assert len(conversions) == 2, "cache=True did not read the entry"
    load(diffusers_folder)  # None: follows the environment, which turns the cache off
    assert len(conversions) == 3


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv(sources.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert sources.cache_dir() == str(tmp_path / "xdg" / "kerasdiffusion")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert sources.cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "kerasdiffusion")
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / "mine"))
    assert sources.cache_dir() == str(tmp_path / "mine")


def test_source_kinds(diffusers_folder, tmp_path):
    assert sources.source_kind(REPO) == "hub"
    assert sources.source_kind(diffusers_folder) == "diffusers"
    assert not sources.is_hub_id("./missing") and not sources.is_hub_id("models/missing.safetensors")
    with pytest.raises(FileNotFoundError, match="No model at"):
        sources.source_kind("models/missing.safetensors")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="unsupported file type"):
        sources.source_kind(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="neither a diffusers folder"):
        sources.source_kind(tmp_path)


# ------------------------------------------------------------------------------------------- built-in models


def test_builtin_name_is_read_from_the_package_offline_and_never_cached(builtin_shapes, tiny_shapes_folder, kd_cache,
                                                                        conversions, monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked for a built-in model")

    monkeypatch.setattr(sources, "_snapshot", no_hub)
    assert sources.is_builtin(builtin_shapes) and not sources.is_hub_id(builtin_shapes)
    assert sources.source_kind(builtin_shapes) == "builtin"
    converted = sources.resolve(builtin_shapes)
    assert converted.source == builtin_shapes and converted.image_size == 64
    assert_same_weights(converted, C.convert_source(tiny_shapes_folder))
    assert conversions == [] and entries(kd_cache) == []
    assert sources.model_name(builtin_shapes) == builtin_shapes
    assert sources.model_hash(builtin_shapes) == sources.model_hash(tiny_shapes_folder) is not None
    with pytest.raises(ValueError, match="applies to Hub ids only"):
        sources.check_revision(builtin_shapes, "main")


def test_builtin_name_takes_precedence_over_a_local_folder_of_that_name(builtin_shapes, tmp_path, monkeypatch):
    (tmp_path / "kerasdiffusion" / "shapes").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert sources.source_kind(builtin_shapes) == "builtin"
    with pytest.raises(ValueError, match="neither a diffusers folder"):
        sources.source_kind("./kerasdiffusion/shapes")


def test_a_missing_builtin_folder_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sources.BUILTIN_MODELS, "kerasdiffusion/shapes", str(tmp_path / "absent"))
    for call in (sources.source_kind, sources.resolve, sources.model_hash, lambda name: load(name)):
        with pytest.raises(FileNotFoundError, match="built-in model 'kerasdiffusion/shapes' is missing"):
            call("kerasdiffusion/shapes")


def test_the_shipped_builtin_model_is_issue_16s_and_runs_at_64_pixels(shipped_shapes):
    """The package's own weights (skipped until they are committed): float16, the sizes its recipe trains
    (`shapes_model`), and 64x64 images by default, loaded by name alone."""
    from kerasdiffusion import config
    from kerasdiffusion.training.shapes_model import TEXT_ENCODER, UNET, VAE

    converted = sources.resolve(shipped_shapes)
    assert converted.image_size == 64 and converted.tokenizer_dir is None  # the shipped CLIP vocabulary
    assert {array.dtype.name for weights in converted.weights.values() for array in weights.values()} == {"float16"}
    text_encoder = config.text_encoder_config_from_weights(converted.weights["text_encoder"], config.SHAPES)
    unet = config.unet_config_from_weights(converted.weights["unet"])
    vae = config.vae_config_from_weights(converted.weights["vae"])
    assert converted.family == "shapes"
    assert converted.norm_groups == {"unet": UNET.norm_groups, "vae": VAE.norm_groups}  # the recipe's, not SD's 32
    assert converted.text_encoder_heads == TEXT_ENCODER.num_heads == 4  # not CLIP's 64-wide heads' 1

    def same(ours, recipe, *fields):
        return all(getattr(ours, field) == getattr(recipe, field) for field in fields)

    assert text_encoder.vocab_size == 49408
    assert same(text_encoder, TEXT_ENCODER, "width", "num_layers", "mlp_dim", "num_heads")
    assert same(unet, UNET, "block_channels", "attention_levels", "layers_per_level", "context_dim", "num_heads")
    assert same(vae, VAE, "block_channels", "layers_per_level")
    images = load(shipped_shapes, img_width=None, img_height=None).text_to_image(
        "a red circle on a blue background", num_steps=2, seed=0, verbose=False)
    assert images.shape == (1, 64, 64, 3) and images.std() > 1


# ------------------------------------------------------------------------------------------ the image size


def test_image_size_is_read_recorded_and_cached(diffusers_folder, kd_cache, tmp_path):
    """The tiny UNet's sample_size of 8 latents is a 64-pixel model: read from unet/config.json, written into the
    converted folder's manifest and the cache's entry, and read back from both."""
    assert sources.resolve(diffusers_folder).image_size == 64
    (entry,) = entries(kd_cache)
    manifest = kd_cache / "converted" / entry / C.MANIFEST
    assert readers.read_json_object(manifest)["image_size"] == 64
    assert sources.resolve(diffusers_folder).image_size == 64  # from the entry
    save_converted(sources.resolve(diffusers_folder), tmp_path / "converted")
    assert sources.resolve(tmp_path / "converted").image_size == 64


def test_entries_and_folders_without_an_image_size_fall_back(diffusers_folder, kd_cache, tmp_path):
    """Written before the size was recorded: a cache entry of a diffusers folder reads it from the folder's UNet
    config; a converted folder has none, and `load_components` applies the family's rule."""
    sources.resolve(diffusers_folder)
    (entry,) = entries(kd_cache)
    for folder in (kd_cache / "converted" / entry, tmp_path / "converted"):
        if not folder.exists():
            save_converted(sources.resolve(diffusers_folder), folder)
        manifest = folder / C.MANIFEST
        recorded = json.loads(manifest.read_text())
        manifest.write_text(json.dumps({k: v for k, v in recorded.items() if k != "image_size"}))
    assert sources.resolve(diffusers_folder).image_size == 64
    assert sources.resolve(tmp_path / "converted").image_size is None
    assert load(tmp_path / "converted", img_width=None, img_height=None).img_width == 512


def test_bad_recorded_image_sizes_are_named(diffusers_folder, tmp_path):
    save_converted(sources.resolve(diffusers_folder, use_cache=False), tmp_path / "converted")
    manifest = tmp_path / "converted" / C.MANIFEST
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "image_size": "64"}))
    with pytest.raises(ValueError, match="image size '64' is not a positive integer"):
        sources.resolve(tmp_path / "converted")
