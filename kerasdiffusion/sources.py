"""Where weights come from: built-in models, Hub ids, local diffusers folders, single checkpoint files,
converted folders.

Everything ends as a `weights_conversion.Converted`: our weights per network, plus the scheduler config and
tokenizer files when the source has them. The model family and every size are read from the weights.

Converting a checkpoint takes seconds to minutes, so the result is cached as a converted folder, keyed by
the source's identity: under ``$KERASDIFFUSION_CACHE`` if set, else ``$XDG_CACHE_HOME/kerasdiffusion``, else
``~/.cache/kerasdiffusion``. ``KERASDIFFUSION_NO_CACHE=1`` (or ``resolve(..., use_cache=False)``) turns the
cache off. Converted folders are loaded as they are, never cached again.

Built-in models (`BUILTIN_MODELS`) are converted folders shipped inside the package under a name of the Hub's
form; the name is looked up before anything else (no network, no cache).

Example:

>>> from kerasdiffusion.sources import is_builtin, is_hub_id
>>> is_hub_id("stable-diffusion-v1-5/stable-diffusion-v1-5"), is_hub_id("./my-model")
(True, False)
>>> is_builtin("kerasdiffusion/shapes"), is_hub_id("kerasdiffusion/shapes")
(True, False)
"""

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid

from weights_conversion import progress as conversion_progress
from weights_conversion.convert import (
    FORMAT_VERSION,
    SINGLE_FILE_SUFFIXES,
    convert_source,
    diffusers_image_size,
    is_converted_folder,
    is_diffusers_folder,
    save_converted,
)
from weights_conversion.errors import CheckpointError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# The models shipped inside the package: name -> its converted folder. The names take precedence over Hub ids
# and local paths alike (a local folder of that name is reached as ./kerasdiffusion/shapes).
BUILTIN_MODELS = {
    "kerasdiffusion/shapes": os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "shapes"),
}
# The non-weight files of a diffusers repository our pipeline reads; all small.
HUB_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    "text_encoder/config.json",
    "unet/config.json",
    "vae/config.json",
]
HUB_NETWORKS = ("unet", "vae", "text_encoder")
WEIGHT_BASENAMES = ("diffusion_pytorch_model", "model", "pytorch_model")

CACHE_ENV = "KERASDIFFUSION_CACHE"
NO_CACHE_ENV = "KERASDIFFUSION_NO_CACHE"
# Part of every cache key: bump it when the conversion's output changes, so older entries are not reused.
CACHE_VERSION = 1
# A local file's key hashes this much of its head and of its tail (see `file_key`).
EDGE_BYTES = 1 << 20
# Staging folders of writers killed outright (no chance to clean up) are removed after this long.
STALE_STAGING_SECONDS = 24 * 3600

# A Hub repo id as huggingface_hub validates it: two names of word characters, '.' and '-', each starting
# and ending with a word character.
_HUB_NAME = r"\w(?:[\w.-]*\w)?"
_HUB_ID = re.compile(f"{_HUB_NAME}/{_HUB_NAME}")


# ------------------------------------------------------------------------------------------ what a source is


def is_builtin(source):
    """A name of `BUILTIN_MODELS`, a model shipped inside the package."""
    return os.fspath(source) in BUILTIN_MODELS


def builtin_folder(name):
    """The converted folder of the built-in model ``name``.

    Raises:
        FileNotFoundError: the package was installed without it.
    """
    folder = BUILTIN_MODELS[os.fspath(name)]
    if not is_converted_folder(folder):
        raise FileNotFoundError(f"The built-in model {name!r} is missing from this installation: no converted "
                                f"folder at {folder!r}. Reinstall kerasdiffusion (the package data holds it).")
    return folder


def is_hub_id(source):
    """``org/name`` that is not a built-in model's name, nor an existing local path (nor looks like a
    checkpoint file)."""
    source = os.fspath(source)
    if is_builtin(source) or os.path.exists(source) or source.endswith(SINGLE_FILE_SUFFIXES):
        return False
    return _HUB_ID.fullmatch(source) is not None and ".." not in source and "--" not in source


def source_kind(source):
    """``"builtin"``, ``"hub"``, ``"converted"``, ``"diffusers"`` or ``"file"``; checks only what is cheap to check.

    Raises:
        FileNotFoundError: a local path that does not exist; a built-in model missing from the installation.
        CheckpointError: a folder or file of a form we cannot read.
    """
    source = os.fspath(source)
    if is_builtin(source):
        builtin_folder(source)
        return "builtin"
    if is_hub_id(source):
        return "hub"
    if not os.path.exists(source):
        raise FileNotFoundError(
            f"No model at {source!r}: expected a Hugging Face Hub id (org/name), a diffusers folder, "
            "a converted folder, or a .safetensors / .ckpt file."
        )
    if os.path.isdir(source):
        if is_converted_folder(source):
            return "converted"
        if is_diffusers_folder(source):
            return "diffusers"
        raise CheckpointError(f"{source!r} is a folder but neither a diffusers folder (no unet/) nor a "
                              "converted one (no kerasdiffusion.json).")
    if not source.endswith(SINGLE_FILE_SUFFIXES):
        raise CheckpointError(f"{source!r}: unsupported file type; expected one of {', '.join(SINGLE_FILE_SUFFIXES)}")
    return "file"


def check_revision(source, revision):
    """A revision names a Hub branch, tag or commit: a ValueError for any other source."""
    source = os.fspath(source)
    if revision is not None and not is_hub_id(source):
        raise ValueError(f"revision={revision!r} applies to Hub ids only, not to the local path {source!r}")


def resolve(source, half_precision=False, use_cache=None, revision=None, progress=False, lazy=False):
    """Reads (and converts, where needed) the weights of any supported source, through the cache.

    Args:
        source: a built-in model's name, a Hub repo id, a diffusers folder, a single `.safetensors` / `.ckpt` file,
            or a converted folder.
        half_precision: for Hub ids, fetch the fp16 weight files when the repository has them.
        use_cache: `None` follows ``$KERASDIFFUSION_NO_CACHE``; `False` neither reads nor writes the cache;
            `True` uses it whatever the environment says.
        revision: for Hub ids, a branch, tag or commit (default: the main branch).
        progress: show progress bars (on stderr) while reading and writing weights. The Hub's
            download bars follow huggingface_hub's own setting.
        lazy: weights read from a converted folder (the cache's entries included) are
            `weights_conversion.readers.LazyTensor`s, read one at a time as they are assigned.

    Raises:
        FileNotFoundError, CheckpointError: see `source_kind` and `weights_conversion.convert_source`.
        ValueError: a ``revision`` for a source that is not a Hub id.
        OSError: a Hub id that cannot be fetched (offline, unknown, gated), with the reason in one line.
    """
    source = os.fspath(source)
    kind = source_kind(source)
    check_revision(source, revision)
    with conversion_progress.shown(progress):
        if kind == "builtin":
            converted = convert_source(builtin_folder(source), lazy)
            converted.source = source
            return converted
        if kind == "hub":
            return _resolve_hub(source, half_precision, use_cache, revision, lazy)
        if kind == "converted":
            return convert_source(source, lazy)
        key = file_key(source) if kind == "file" else folder_key(source)
        label = os.path.basename(os.path.normpath(source))
        converted = _cached(_entry_name(label, key), source, lambda: convert_source(source), use_cache, lazy)
        if kind == "diffusers":
            _fill_image_size(converted, source)
        return converted


def _fill_image_size(converted, folder):
    """A cache entry written before converted folders recorded the image size: read it from the diffusers
    folder's UNet config, as a fresh conversion would."""
    if converted.image_size is None:
        converted.image_size = diffusers_image_size(folder)


# ------------------------------------------------------------------------------------------------ cache keys


def _digest(*identity):
    return hashlib.sha256(json.dumps([CACHE_VERSION, FORMAT_VERSION, *identity]).encode()).hexdigest()


def file_key(path):
    """The cache key of a checkpoint file: its real path, size and mtime, and a hash of its first and last MiB.

    A full sha256 would read the whole file (2 to 7 GB for SD checkpoints) on every load, as slow as a good
    part of the conversion it saves. The stat fields change with any rewrite or replacement of the file; the
    sampled bytes guard against a replacement that keeps size and mtime (``cp -p``, ``rsync -t``): they hold a
    safetensors file's header (every name, shape and offset) and a ``.ckpt`` zip's central directory.
    """
    path = os.path.realpath(path)
    stat = os.stat(path)
    digest = hashlib.sha256(_digest("file", path, stat.st_size, stat.st_mtime_ns).encode())
    with open(path, "rb") as f:
        digest.update(f.read(EDGE_BYTES))
        if stat.st_size > EDGE_BYTES:
            f.seek(max(EDGE_BYTES, stat.st_size - EDGE_BYTES))
            digest.update(f.read(EDGE_BYTES))
    return digest.hexdigest()


def folder_key(path):
    """The cache key of a diffusers folder: its real path, and the name, size and mtime of each file we read.

    Config and tokenizer files count too, since the converted folder carries copies of them.
    """
    path = os.path.realpath(path)
    files = []
    for part in ("model_index.json", "scheduler", "tokenizer", *HUB_NETWORKS):
        for file in _files_under(os.path.join(path, part)):
            stat = os.stat(file)  # follows links, as into a Hugging Face cache's blobs
            files.append([os.path.relpath(file, path), stat.st_size, stat.st_mtime_ns])
    return _digest("diffusers", path, sorted(files))


def hub_key(repo_id, commit, half_precision):
    """The cache key of a Hub repository at a resolved commit, for the precision of the files fetched."""
    return _digest("hub", repo_id, commit, "fp16" if half_precision else "full")


def _files_under(path):
    if os.path.isfile(path):
        return [path]
    return sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names)


def _entry_name(label, key):
    """A readable, unique folder name: ``v1-5-pruned-emaonly-<16 hex digits>``."""
    for suffix in SINGLE_FILE_SUFFIXES:
        label = label.removesuffix(suffix)
    stem = re.sub(r"[^\w.-]+", "-", label).strip(".-")[:60] or "model"
    return f"{stem}-{key[:16]}"


# ----------------------------------------------------------------------------------------------------- cache


def cache_dir():
    """Where converted weights are cached: ``$KERASDIFFUSION_CACHE``, ``$XDG_CACHE_HOME/kerasdiffusion`` or
    ``~/.cache/kerasdiffusion``."""
    if os.environ.get(CACHE_ENV):
        return os.path.abspath(os.path.expanduser(os.environ[CACHE_ENV]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kerasdiffusion")


def cache_enabled(use_cache=None):
    if use_cache is not None:
        return bool(use_cache)
    return os.environ.get(NO_CACHE_ENV, "").strip().lower() not in ("1", "true", "yes", "on")


def _cached(name, source, convert, use_cache, lazy=False):
    """The converted weights of ``source``: from the cache entry ``name``, or converted and stored there.

    An entry appears only by renaming a complete staging folder (`save_converted`), so a reader sees a whole
    entry or none; an entry that still fails to load is moved aside and rebuilt.
    """
    if not cache_enabled(use_cache):
        return _convert(source, convert)
    entry = os.path.join(cache_dir(), "converted", name)
    if is_converted_folder(entry):
        try:
            converted = convert_source(entry, lazy)
        except (ValueError, OSError) as error:  # CheckpointError is a ValueError, as is a corrupt manifest's
            logger.warning("Ignoring unreadable cache entry %s (%s); converting again.", entry, error)
            _discard(entry)
        else:
            logger.info("Loaded converted weights of %s from the cache (%s).", source, entry)
            return converted
    converted = _convert(source, convert)
    _store(converted, entry)
    return converted


def _convert(source, convert):
    logger.info("Converting %s to kerasdiffusion weights...", source)
    start = time.perf_counter()
    converted = convert()
    logger.info("Converted %s in %.1f s.", source, time.perf_counter() - start)
    return converted


def _store(converted, entry):
    """Writes a cache entry atomically; a failure to write costs only the caching, never the load."""
    parent = os.path.dirname(entry)
    try:
        save_converted(converted, entry)
    except OSError as error:
        if not is_converted_folder(entry):  # else another process stored the same entry first: fine
            logger.warning("Could not cache the converted weights in %s: %s", entry, error)
        return
    logger.info("Cached the converted weights in %s.", entry)
    _remove_stale_staging(parent)


def _discard(entry):
    """Moves an entry aside in one rename (so no reader sees it half deleted), then deletes it."""
    trash = os.path.join(os.path.dirname(entry), f".discarded-{uuid.uuid4().hex}")
    try:
        os.rename(entry, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _remove_stale_staging(parent):
    """Staging folders left by writers that were killed outright (``save_converted`` cleans up otherwise)."""
    now = time.time()
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        if name.startswith((".converting-", ".discarded-")):
            try:
                if now - os.path.getmtime(path) > STALE_STAGING_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass


# ------------------------------------------------------------------------------------------------------- Hub


def _resolve_hub(repo_id, half_precision, use_cache, revision, lazy=False):
    """Resolves the revision to a commit (fetching only the small config files), then looks in the cache;
    only on a miss are the weight files fetched and converted."""
    configs = _snapshot(repo_id, revision, HUB_PATTERNS)
    commit = os.path.basename(os.path.normpath(configs))

    def download_and_convert():
        converted = convert_source(_download_weights(repo_id, commit, configs, half_precision))
        converted.source = repo_id
        return converted

    name = _entry_name(repo_id.replace("/", "--"), hub_key(repo_id, commit, half_precision))
    converted = _cached(name, repo_id, download_and_convert, use_cache, lazy)
    _fill_image_size(converted, configs)
    return converted


def _download_weights(repo_id, commit, configs, half_precision):
    """Fetches the weight files `hub_weight_files` picks into the snapshot folder, and returns that folder."""
    files, listed_on_hub = _repo_files(repo_id, commit, configs)
    try:
        weights = hub_weight_files(files, half_precision)
    except LookupError as missing:
        where = "" if listed_on_hub else " in the local Hugging Face cache (the Hub cannot be reached)"
        raise OSError(f"{repo_id!r} has no {missing.args[0]} weights{where}: looked for {missing.args[0]}/"
                      "diffusion_pytorch_model[.fp16].safetensors and the like. Is it a diffusers Stable "
                      "Diffusion repository?") from None
    return _snapshot(repo_id, commit, HUB_PATTERNS + weights)


def hub_weight_files(files, half_precision=False):
    """The weight files to fetch, one per network (or its shards with their index), from a repository's list.

    Safetensors come before pickles. With ``half_precision`` the fp16 variant comes first, then the full
    precision files for repositories that have no fp16 variant; without it, full precision comes first and an
    fp16-only repository still loads.

    Raises:
        LookupError: with the network's name, when a network has no weight file in the list.
    """
    files = set(files)
    chosen = []
    for network in HUB_NETWORKS:
        found = _network_files(files, network, half_precision)
        if not found:
            raise LookupError(network)
        chosen += found
    return chosen


def _network_files(files, network, half_precision):
    fp16_first = [(".fp16", "safetensors"), ("", "safetensors"), (".fp16", "bin"), ("", "bin")]
    full_first = [("", "safetensors"), ("", "bin"), (".fp16", "safetensors"), (".fp16", "bin")]
    for variant, ext in fp16_first if half_precision else full_first:
        for base in WEIGHT_BASENAMES:
            single = f"{network}/{base}{variant}.{ext}"
            if single in files:
                return [single]
            shard = re.compile(rf"{network}/{base}{re.escape(variant)}-\d+-of-\d+\.{ext}")
            shards = sorted(f for f in files if shard.fullmatch(f))
            for index in (f"{network}/{base}{variant}.{ext}.index.json", f"{network}/{base}.{ext}.index{variant}.json"):
                if index in files and shards:
                    return [index, *shards]
    return []


def _repo_files(repo_id, commit, local_folder):
    """The repository's file names at ``commit``, and whether the Hub listed them; offline, what the local
    snapshot holds."""
    from huggingface_hub import HfApi

    try:
        return HfApi().list_repo_files(repo_id, revision=commit), True
    except Exception:  # noqa: BLE001 (offline or unreachable: huggingface_hub raises many kinds)
        folder = os.path.realpath(local_folder)
        return [os.path.relpath(f, folder).replace(os.sep, "/") for f in _files_under(folder)], False


def _snapshot(repo_id, revision, patterns):
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except Exception as error:  # offline, unknown repo, gated, network, bad id: many kinds, one message
        raise hub_error(repo_id, error) from error


def hub_error(repo_id, error):
    """One-line `OSError` for a failed Hub access: the source, the reason, and how to pass a local path."""
    from huggingface_hub import utils

    if isinstance(error, utils.GatedRepoError):
        reason = "the repository is gated: accept its conditions on huggingface.co, then log in (`hf auth login`)"
    elif isinstance(error, utils.RepositoryNotFoundError):
        reason = "no such repository (or it is private: log in with `hf auth login`)"
    elif isinstance(error, utils.RevisionNotFoundError):
        reason = "no such revision"
    elif isinstance(error, getattr(utils, "IncompleteSnapshotError", ())):
        reason = "the Hub cannot be reached and its local copy is incomplete"
    elif isinstance(error, utils.LocalEntryNotFoundError):
        reason = "the Hub cannot be reached (offline?) and the model is not in the local Hugging Face cache"
    else:
        reason = f"{type(error).__name__}: {_first_line(error)}"
    folder = repo_id.split("/")[0]
    path_hint = f" (nor is there a {repo_id!r} in the local folder {folder!r})" if os.path.isdir(folder) else ""
    return OSError(
        f"Could not get {repo_id!r} from the Hugging Face Hub: {reason}{path_hint}. To use weights on this "
        "machine, pass a local path instead: a diffusers folder, a converted folder or a .safetensors / .ckpt file."
    )


def _first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# ------------------------------------------------------------------------------------------- short hashes
# What AUTOMATIC1111 writes in an image's "parameters" to name the files it used, so that a shared image names
# its model, LoRAs and embeddings without the author's directories.

MODEL_HASH_LENGTH = 10  # A1111's "Model hash": the first 10 hex digits of the checkpoint file's sha256
ADAPTER_HASH_LENGTH = 12  # A1111's "Lora hashes" and "TI hashes": the first 12
HASHES_FILE = "hashes.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def model_name(source):
    """The short model name A1111's ``Model:`` field shows: a built-in model's name or a Hub id as is, a path's
    last part without suffix."""
    source = os.fspath(source)
    if is_builtin(source) or is_hub_id(source):
        return source
    name = os.path.basename(os.path.normpath(source))
    stem, extension = os.path.splitext(name)
    return stem if extension in SINGLE_FILE_SUFFIXES else name


def model_hash(source, use_cache=None):
    """The short hash of a model's weights, as AUTOMATIC1111's ``Model hash`` names a checkpoint.

    A file: the first 10 hex digits of its sha256 (A1111's own, so a checkpoint has the same hash there).
    A folder (diffusers or converted, a built-in model's included): of the sha256 of the text of lines
    ``"<relative path> <sha256>\\n"``, one per weight file (``.safetensors``, ``.bin``, ``.ckpt``, ``.pt``,
    ``.pth``), sorted by path. A Hub id: None (the id names it). Full hashes are cached by the file's cache key
    (`file_key`) while the cache is on (``use_cache`` as for `resolve`).
    """
    source = os.fspath(source)
    if is_builtin(source):
        source = builtin_folder(source)
    elif is_hub_id(source):
        return None
    if os.path.isfile(source):
        return _sha256(source, use_cache=use_cache)[:MODEL_HASH_LENGTH]
    lines = [f"{os.path.relpath(file, source).replace(os.sep, '/')} {_sha256(file, use_cache=use_cache)}\n"
             for file in _files_under(source) if file.endswith(WEIGHT_SUFFIXES)]
    return hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()[:MODEL_HASH_LENGTH]


def lora_hash(path, use_cache=None):
    """A LoRA's short hash as A1111 writes it in ``Lora hashes``: for a ``.safetensors`` file the sha256 of what
    follows its header (kohya's "addnet" hash, which metadata edits do not change), else of the whole file."""
    path = os.fspath(path)
    skip = 0
    if path.endswith(".safetensors"):
        with open(path, "rb") as f:
            skip = 8 + int.from_bytes(f.read(8), "little")
    return _sha256(path, skip, use_cache)[:ADAPTER_HASH_LENGTH]


def embedding_hash(path, use_cache=None):
    """An embedding's short hash as A1111 writes it in ``TI hashes``: the file's sha256."""
    return _sha256(os.fspath(path), use_cache=use_cache)[:ADAPTER_HASH_LENGTH]


def _sha256(path, skip=0, use_cache=None):
    """The sha256 of a file's bytes from ``skip`` on, from the hash cache when it holds the file's key."""
    key = f"{file_key(path)}:{skip}"
    cache_file = os.path.join(cache_dir(), HASHES_FILE)
    known = _read_hashes(cache_file) if cache_enabled(use_cache) else {}
    if key in known:
        return known[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(skip)
        for block in iter(lambda: f.read(EDGE_BYTES), b""):
            digest.update(block)
    if cache_enabled(use_cache):
        _write_hashes(cache_file, {**_read_hashes(cache_file), key: digest.hexdigest()})
    return digest.hexdigest()


def _read_hashes(cache_file):
    try:
        with open(cache_file, encoding="utf-8") as f:
            hashes = json.load(f)
        return hashes if isinstance(hashes, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_hashes(cache_file, hashes):
    """Writes the hash cache in one rename; a failure costs only the caching."""
    staging = f"{cache_file}.{uuid.uuid4().hex}.tmp"
    try:
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        with open(staging, "w", encoding="utf-8") as f:
            json.dump(hashes, f)
        os.replace(staging, cache_file)
    except OSError as error:
        logger.debug("Could not write the hash cache %s: %s", cache_file, error)
        with contextlib.suppress(OSError):
            os.remove(staging)
