"""Batch jobs: a file of prompts -> a folder of PNGs and a manifest; resumable, on every device and host.

A job goes through four steps, each a function of its own:

1. `read_job`: a ``.txt`` file (a prompt per line; blank lines and ``#`` comments skipped) or a ``.jsonl``
   file (an object per line: ``prompt`` and optionally ``negative_prompt``, ``seed``, ``num_steps``,
   ``guidance``, ``width``, ``height``, ``images``) -> frozen `Record`s. Every record is checked before any
   work; the first bad one raises `JobFileError` naming ``FILE:LINE``. A record without a seed of its own
   gets `record_seed` of the job's seed and its line.
2. `job_tasks`: one `Task` per image. Image ``i`` of a record with seed ``s`` has the seed key ``(s, i)``, so
   it is image ``i`` of ``kerasdiffusion generate PROMPT --seed s --batch-size N``.
3. `plan_batches`: tasks grouped by what needs a program of its own (`program_key`: size, steps, guidance,
   prompt length), each group cut into global batches, so each shape compiles once; `worker_batches` is a
   worker's share: the batches its input pipeline reads (on TensorFlow, ``tf.data`` sharded by the worker's
   `tf.distribute.InputContext`).
4. `run_job`: claims the folder (``job.json``: a job's model, settings and prompts file hash; another job
   is refused with `JobConflictError`), reads what the manifest says is finished (`read_manifest`), and
   makes the rest: each PNG written durably, then its manifest line appended and synced. A rerun after a
   crash remakes only the unfinished batches, whole, so its files equal an uninterrupted run's.

Example:

>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "prompts.txt")
>>> _ = open(path, "w").write("# cats\\na cat\\n\\na dog\\n")
>>> job = read_job(path, JobSettings(seed=1, images=2, batch_size=3))
>>> [(r.line, r.prompt) for r in job.records]
[(2, 'a cat'), (4, 'a dog')]
>>> [[task.name for task in batch.tasks] for batch in plan_batches(job_tasks(job.records), 3)]
[['00002-0.png', '00002-1.png', '00004-0.png'], ['00004-1.png']]
"""

import dataclasses
import hashlib
import json
import math
import os
import time
import typing

import numpy as np

from kerasdiffusion import images as I
from kerasdiffusion import prompts, seeds, sources

JOB_FILE = "job.json"
MANIFEST = "manifest.jsonl"
MANIFEST_SHARD = "manifest.worker-{index}.jsonl"
SUFFIXES = (".txt", ".jsonl")
JOB_FORMAT = 1  # the version of job.json's and the manifest's layout


class JobFileError(ValueError):
    """A prompts file that cannot be run; the message starts with ``FILE:LINE:``."""


class JobConflictError(ValueError):
    """An output folder that holds another job (another model, parameter or prompts file)."""


# ---------------------------------------------------------------------------------------------- records


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_text(value):
    return isinstance(value, str)


def _is_seed(value):
    return _is_int(value) and 0 <= value < seeds.MAX_SEED


def _is_count(value):
    return _is_int(value) and value >= 1


def _is_size(value):
    return _is_int(value) and value >= 8 and value % 8 == 0


def _is_finite_number(value):
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


# Each field of a record (and the job-wide default it falls back on): what it must be, and the check.
FIELDS = {
    "prompt": ("a string", _is_text),
    "negative_prompt": ("a string", _is_text),
    "seed": ("an integer in [0, 2**63)", _is_seed),
    "num_steps": ("an integer >= 1", _is_count),
    "guidance": ("a finite number", _is_finite_number),
    "width": ("a positive multiple of 8", _is_size),
    "height": ("a positive multiple of 8", _is_size),
    "images": ("an integer >= 1", _is_count),
}


def check_field(name, value, rule=None):
    """The reason ``value`` cannot be the field ``name`` (checked as the field ``rule``, default ``name``), or
    None when it can."""
    expected, check = FIELDS[rule or name]
    if not check(value):
        return f"{name} must be {expected}, got {value!r}"
    return None


@dataclasses.dataclass(frozen=True)
class JobSettings:
    """A job's settings: what a record leaves out takes these values (the command line's options).

    Args:
        seed: the job's seed; a record without ``seed`` gets `record_seed` of it and its line.
        negative_prompt, num_steps, guidance, width, height: a record's defaults; a width or height of `None`
            is the model's own size (`Components.image_size`), filled in when the job runs (`with_image_size`).
        images: images per record (``--images-per-prompt``), unless the record says ``images``.
        batch_size: the global batch, over all devices of a worker together.
    """

    seed: int = 0
    negative_prompt: str = ""
    num_steps: int = 50
    guidance: float = 7.5
    width: int | None = None
    height: int | None = None
    images: int = 1
    batch_size: int = 1

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if field.name in ("width", "height") and getattr(self, field.name) is None:
                continue
            rule = "images" if field.name == "batch_size" else None  # a count >= 1, as images is
            problem = check_field(field.name, getattr(self, field.name), rule)
            if problem:
                raise ValueError(problem)


@dataclasses.dataclass(frozen=True)
class Record:
    """One line of a prompts file, every field filled in (width and height: once the job knows its model's size,
    `with_image_size`)."""

    file: str
    line: int
    prompt: str
    negative_prompt: str
    seed: int
    num_steps: int
    guidance: float
    width: int
    height: int
    images: int

    @property
    def where(self):
        return f"{self.file}:{self.line}"


@dataclasses.dataclass(frozen=True)
class Job:
    """A prompts file read and checked: its records, the settings they fell back on, and its sha256."""

    file: str
    records: tuple
    settings: JobSettings
    sha256: str


def record_seed(job_seed, line):
    """The seed of a record that gives none: the first 32-bit word of ``numpy.random.SeedSequence([job_seed,
    line])``, a fixed function of the job's seed and the record's line number (1-based) alone.

    Example:

    >>> record_seed(0, 3) == record_seed(0, 3) != record_seed(0, 4)
    True
    """
    return int(np.random.SeedSequence([int(job_seed), int(line)]).generate_state(1, np.uint32)[0])


def read_job(path, settings, prompt_syntax="plain"):
    """Reads and checks a whole prompts file; raises `JobFileError` (``FILE:LINE: reason``) at the first bad record.

    Args:
        path: a ``.txt`` or ``.jsonl`` file.
        settings: a `JobSettings`: what records leave out.
        prompt_syntax: the pipeline's; with ``"a1111"``, ``<lora:...>`` tags are refused (a job loads no LoRAs).

    Returns:
        A `Job`.
    """
    path = os.fspath(path)
    if not path.endswith(SUFFIXES):
        raise JobFileError(f"{path}: a prompts file must be a .txt (a prompt per line) or a .jsonl file")
    with open(path, "rb") as f:
        data = f.read()
    read_line = _txt_record if path.endswith(".txt") else _jsonl_record
    records = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path}:{number}"
        try:
            text = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            raise JobFileError(f"{where}: not UTF-8 text") from None
        fields = read_line(text, where)
        if fields is not None:
            records.append(_record(fields, settings, path, number, prompt_syntax))
    if not records:
        raise JobFileError(f"{path}: holds no prompts")
    return Job(path, tuple(records), settings, hashlib.sha256(data).hexdigest())


def with_image_size(job, width, height):
    """``job`` with ``width`` x ``height`` (the model's own size) wherever neither a record nor the job's settings
    give one.

    Example:

    >>> job = Job("p.txt", (), JobSettings(height=32), "")
    >>> with_image_size(job, 64, 64).settings.width, with_image_size(job, 64, 64).settings.height
    (64, 32)
    """
    def sized(value):
        return dataclasses.replace(value, width=value.width or width, height=value.height or height)

    return dataclasses.replace(job, records=tuple(map(sized, job.records)), settings=sized(job.settings))


def _txt_record(text, where):
    prompt = text.strip()
    if not prompt or prompt.startswith("#"):
        return None
    return {"prompt": prompt}


def _jsonl_record(text, where):
    if not text.strip():
        return None
    try:
        fields = json.loads(text, object_pairs_hook=lambda pairs: _unique_pairs(pairs, where))
    except json.JSONDecodeError as error:
        raise JobFileError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(fields, dict):
        raise JobFileError(f"{where}: expected a JSON object with a \"prompt\", got {type(fields).__name__}")
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise JobFileError(f"{where}: unknown field {unknown[0]!r} (a record has: {', '.join(FIELDS)})")
    if "prompt" not in fields:
        raise JobFileError(f"{where}: no \"prompt\"")
    return fields


def _unique_pairs(pairs, where):
    names = [name for name, _ in pairs]
    for name in names:
        if names.count(name) > 1:
            raise JobFileError(f"{where}: field {name!r} given twice")
    return dict(pairs)


def _record(fields, settings, path, line, prompt_syntax):
    where = f"{path}:{line}"
    for name, value in fields.items():
        problem = check_field(name, value)
        if problem:
            raise JobFileError(f"{where}: {problem}")
    if prompt_syntax == "a1111":
        for name in ("prompt", "negative_prompt"):
            if prompts.extract_loras(fields.get(name, ""))[1]:
                raise JobFileError(f"{where}: the {name} has a <lora:...> tag; a batch job loads no LoRAs")
    values = {name: fields.get(name, getattr(settings, name, None)) for name in FIELDS}
    if "seed" not in fields:
        values["seed"] = record_seed(settings.seed, line)
    values["guidance"] = float(values["guidance"])
    return Record(file=path, line=line, **values)


# ------------------------------------------------------------------------------------------ tasks, batches


@dataclasses.dataclass(frozen=True)
class Task:
    """Image ``index`` of a record."""

    record: Record
    index: int

    @property
    def key(self):
        """The image's seed key: the same as image ``index`` of a batch generated with the record's seed."""
        return (self.record.seed, self.index)

    @property
    def id(self):
        """``(line, index)``: names the image within its job."""
        return (self.record.line, self.index)

    @property
    def name(self):
        """The PNG's file name: the record's line (5 digits or more) and the image's index."""
        return f"{self.record.line:05d}-{self.index}.png"


class Batch(typing.NamedTuple):
    """Tasks that run as one global batch of one compiled program."""

    key: tuple
    tasks: tuple


class Worker(typing.NamedTuple):
    """This process's share of a job: the input pipeline ``index`` of ``count``."""

    index: int = 0
    count: int = 1

    @property
    def manifest(self):
        """The manifest file this worker appends to (one per worker, so no two write the same file)."""
        return MANIFEST if self.count == 1 else MANIFEST_SHARD.format(index=self.index)


def job_tasks(records):
    """One `Task` per image, in file order."""
    return [Task(record, index) for record in records for index in range(record.images)]


def program_key(record, chunks=1):
    """What decides a record's compiled program and its batch: the image size, the step count, the guidance
    scale (on or off selects the program; its value is the program's argument, but a batch shares one), and
    ``chunks``, its prompt's length in 77-token windows (prompts of one batch are padded to the longest)."""
    return (record.width, record.height, record.num_steps, record.guidance, chunks)


def plan_batches(tasks, batch_size, chunks=None):
    """Tasks grouped by `program_key` (groups in order of first appearance, tasks in file order), each group
    cut into batches of ``batch_size`` (its last batch may be shorter).

    Args:
        tasks: `job_tasks`' list.
        batch_size: the global batch.
        chunks: a function of a record -> its prompt's length in 77-token windows (`prompt_chunks`); None: 1.
    """
    groups = {}
    for task in tasks:
        key = program_key(task.record, chunks(task.record) if chunks else 1)
        groups.setdefault(key, []).append(task)
    return [Batch(key, tuple(group[start:start + batch_size]))
            for key, group in groups.items() for start in range(0, len(group), batch_size)]


def worker_batches(batches, worker, replicas=1):
    """A worker's share of the batches: those its input pipeline reads (`distribute.input_share`: on
    TensorFlow a ``tf.data`` pipeline sharded by the worker's `tf.distribute.InputContext`, on JAX the same
    rule by process). Together the workers cover each batch exactly once. ``replicas``: the worker's devices."""
    from kerasdiffusion import distribute  # Keras, so not at import: the command line checks a job before it loads

    return [batches[number] for number in distribute.input_share(len(batches), *worker, replicas)]


def prompt_chunks(sd):
    """A record -> how many 77-token windows its prompt and negative prompt take in ``sd``'s prompt syntax."""
    if sd.prompt_syntax == "plain":
        return lambda record: 1
    tokenizer = sd.tokenizer

    def chunks(record):
        ids, _ = prompts.chunk_prompts(tokenizer, [record.prompt, record.negative_prompt],
                                       expansions=tokenizer.expansions)
        return ids.shape[1]

    return chunks


# ------------------------------------------------------------------------------------ folder and manifest


def job_description(sd, job, model_hash):
    """What makes two runs the same job (``job.json``): the model (its source and `sources.model_hash`), the
    pipeline's settings, the job's settings and the prompts file's sha256. The device count and the worker
    are not part of it: a job may resume on another machine."""
    named = sources.is_builtin(sd.source) or sources.is_hub_id(sd.source)
    source = sd.source if named else os.path.abspath(sd.source)
    return {
        "format": JOB_FORMAT,
        "model": source,
        "model_hash": model_hash,
        "scheduler": sd.scheduler.name,
        "precision": sd.precision,
        "prompt_syntax": sd.prompt_syntax,
        "clip_skip": sd.clip_skip,
        "jit_compile": bool(sd.jit_compile),
        **dataclasses.asdict(job.settings),
        "prompts_sha256": job.sha256,
    }


def read_description(folder):
    """The ``job.json`` of ``folder``, or None when it holds none."""
    path = os.path.join(folder, JOB_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError:
            raise JobConflictError(f"{path} is not a job description (not valid JSON)") from None


def claim_folder(folder, description):
    """Makes ``folder`` this job's: writes ``job.json``, or checks that the one there is the same job.

    Raises:
        JobConflictError: the folder holds another job; the message names what differs.
    """
    os.makedirs(folder, exist_ok=True)
    existing = read_description(folder)
    if existing is None:
        I.write_durably(json.dumps(description, indent=1, sort_keys=True).encode() + b"\n",
                        os.path.join(folder, JOB_FILE), shared=True)
        return
    changed = [f"{name} {existing.get(name)!r} -> {description.get(name)!r}"
               for name in sorted(set(existing) | set(description)) if existing.get(name) != description.get(name)]
    if changed:
        raise JobConflictError(f"{folder} holds another job ({'; '.join(changed)}): resume it with its own "
                               "settings, or pass another --out")


def manifest_files(folder):
    """The manifest and every worker's shard in ``folder``."""
    names = sorted(name for name in os.listdir(folder)
                   if name == MANIFEST or (name.startswith("manifest.worker-") and name.endswith(".jsonl")))
    return [os.path.join(folder, name) for name in names]


def read_manifest(folder, verify=True):
    """The finished images of ``folder``: ``{(line, index): entry}``, over the manifest and all shards.

    A last line without its newline is a write cut short by a crash, and is ignored. With ``verify``, an
    entry counts only if its PNG is there with the sha256 the entry gives (else the image is made again).
    """
    finished = {}
    for path in manifest_files(folder):
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")[:-1]  # what follows the last newline is torn or empty
        for number, line in enumerate(lines, start=1):
            try:
                entry = json.loads(line)
                key = (int(entry["line"]), int(entry["index"]))
            except (ValueError, KeyError, TypeError):
                raise JobConflictError(f"{path}:{number}: not a manifest line") from None
            if not verify or _png_matches(os.path.join(folder, entry["file"]), entry.get("sha256")):
                finished[key] = entry
    return finished


def _png_matches(path, sha256):
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest() == sha256
    except OSError:
        return False


class ManifestWriter:
    """Appends manifest lines to one file, each flushed and synced before the next image counts as done."""

    def __init__(self, path):
        self.path = path
        _drop_torn_line(path)
        self.file = open(path, "ab")
        I.sync_folder(os.path.dirname(os.path.abspath(path)))

    def append(self, entry):
        self.file.write(json.dumps(entry, sort_keys=True, ensure_ascii=False).encode() + b"\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self):
        self.file.close()


def _drop_torn_line(path):
    """Cuts a last line without its newline (a crash mid-append), so that appending starts a fresh line."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def write_merged_manifest(folder, tasks):
    """Several workers: once the shards together list every task, writes them as one ``manifest.jsonl``
    (sorted by line and index; each worker may do it, the content is the same). Returns whether it did."""
    finished = read_manifest(folder, verify=False)
    if any(task.id not in finished for task in tasks):
        return False
    lines = [json.dumps(finished[key], sort_keys=True, ensure_ascii=False) + "\n" for key in sorted(finished)]
    I.write_durably("".join(lines).encode(), os.path.join(folder, MANIFEST), shared=True)
    return True


# ------------------------------------------------------------------------------------------------- running


class JobSummary(typing.NamedTuple):
    """What a run did: images made, images already finished, seconds, and devices per worker."""

    made: int
    skipped: int
    seconds: float
    devices: int

    @property
    def images_per_second(self):
        return self.made / self.seconds if self.seconds > 0 else 0.0

    def __str__(self):
        rate = self.images_per_second
        return (f"{self.made} images in {self.seconds:.1f} s: {rate:.2f} images/s, "
                f"{rate / self.devices:.2f} images/s per device ({self.devices} device"
                f"{'s' if self.devices != 1 else ''}); {self.skipped} already done")


def png_text(sd, task, model_hash):
    """The text chunks of a task's PNG: those of ``generate`` for the record's prompt, seed and batch."""
    record = task.record
    return I.png_parameters(record.prompt, record.negative_prompt, record.num_steps, record.guidance, record.seed,
                            sd.scheduler.name, sources.model_name(sd.source), record.width, record.height,
                            record.images, task.index, model_hash=model_hash, clip_skip=sd.clip_skip,
                            prompt_syntax=sd.prompt_syntax)


def manifest_entry(sd, task, sha256):
    """The manifest line of a finished image: its file, prompt, parameters, seed, line, index and sha256."""
    record = task.record
    return {
        "file": task.name, "prompt": record.prompt, "negative_prompt": record.negative_prompt,
        "seed": record.seed, "line": record.line, "index": task.index, "images": record.images,
        "num_steps": record.num_steps, "guidance": record.guidance, "width": record.width, "height": record.height,
        "scheduler": sd.scheduler.name, "model": sources.model_name(sd.source), "sha256": sha256,
    }


def generate_batch(pipeline, batch, batch_size):
    """A batch's images; a short batch is padded to ``batch_size`` with copies of its last task (dropped from
    the result), so that a group's batches share one compiled program."""
    tasks = list(batch.tasks) + [batch.tasks[-1]] * (batch_size - len(batch.tasks))
    record = batch.tasks[0].record
    images = pipeline.text_to_image([task.record.prompt for task in tasks],
                                    negative_prompt=[task.record.negative_prompt for task in tasks],
                                    batch_size=len(tasks), num_steps=record.num_steps,
                                    unconditional_guidance_scale=record.guidance,
                                    seed=[task.key for task in tasks], verbose=False)
    return images[:len(batch.tasks)]


def sized_pipeline(sd, width, height, pipelines):
    """``sd`` for its own size; for another, a pipeline over the same components (kept in ``pipelines``)."""
    if (width, height) == (sd.img_width, sd.img_height):
        return sd
    if (width, height) not in pipelines:
        pipelines[width, height] = type(sd).from_components(
            sd.components, width, height, jit_compile=sd.jit_compile, scheduler=sd.scheduler,
            prompt_syntax=sd.prompt_syntax, clip_skip=sd.clip_skip, loop=sd.loop, distribution=sd.distribution)
    return pipelines[width, height]


def run_job(sd, job, folder, worker=None, progress=True):
    """Runs (or resumes) a job into ``folder``: a PNG per image and ``manifest.jsonl``.

    Args:
        sd: the `StableDiffusion` to run; its scheduler, precision, prompt syntax and distribution are the job's.
            Records of another size run on a pipeline over the same components.
        job: `read_job`'s `Job`; where neither a record nor its settings give a size, ``sd``'s (by default the
            model's own) is used.
        folder: the output folder (made if missing). One that holds another job raises `JobConflictError`.
        worker: this process's `Worker` share; None: `current_worker()` (``TF_CONFIG``, JAX processes).
        progress: show a progress bar over images.

    Returns:
        A `JobSummary`.

    Example:

    >>> import os, tempfile
    >>> import kerasdiffusion as kd
    >>> sd = kd.StableDiffusion.from_pretrained("kerasdiffusion/shapes")
    >>> folder = tempfile.mkdtemp()
    >>> prompts = os.path.join(folder, "prompts.txt")
    >>> with open(prompts, "w") as file:
    ...     _ = file.write("a red circle on a blue background\\na green square on a white background\\n")
    >>> job = read_job(prompts, JobSettings(seed=1, num_steps=2, batch_size=2))
    >>> summary = run_job(sd, job, os.path.join(folder, "out"), progress=False)
    >>> summary.made, summary.skipped
    (2, 0)
    >>> sorted(name for name in os.listdir(os.path.join(folder, "out")) if name.endswith(".png"))
    [...png', ...png']
    >>> run_job(sd, job, os.path.join(folder, "out"), progress=False).skipped  # resumed: nothing left to do
    2
    """
    from tqdm.auto import tqdm

    from kerasdiffusion import distribute  # Keras, so not at import: the command line checks a job before it loads

    worker = worker or current_worker()
    job = with_image_size(job, sd.img_width, sd.img_height)
    model_hash = sources.model_hash(sd.source)
    claim_folder(folder, job_description(sd, job, model_hash))
    finished = read_manifest(folder)
    tasks = job_tasks(job.records)
    devices = distribute.replica_count(sd.distribution)
    batches = worker_batches(plan_batches(tasks, job.settings.batch_size, prompt_chunks(sd)), worker, devices)
    todo = [batch for batch in batches if any(task.id not in finished for task in batch.tasks)]
    count = sum(task.id not in finished for batch in todo for task in batch.tasks)
    pipelines = {}
    writer = ManifestWriter(os.path.join(folder, worker.manifest))
    start = time.perf_counter()
    try:
        with tqdm(total=count, unit="image", desc="batch", disable=not progress) as bar:
            for batch in todo:
                record = batch.tasks[0].record
                pipeline = sized_pipeline(sd, record.width, record.height, pipelines)
                made = generate_batch(pipeline, batch, job.settings.batch_size)
                for task, image in zip(batch.tasks, made):
                    if task.id not in finished:
                        data = I.png_bytes(image, png_text(sd, task, model_hash))
                        I.write_durably(data, os.path.join(folder, task.name))
                        writer.append(manifest_entry(sd, task, hashlib.sha256(data).hexdigest()))
                        bar.update(1)
    finally:
        writer.close()
    seconds = time.perf_counter() - start
    if worker.count > 1:
        write_merged_manifest(folder, tasks)
    skipped = sum(task.id in finished for batch in batches for task in batch.tasks)
    return JobSummary(count, skipped, seconds, devices)


def current_worker():
    """This process's `Worker`: from ``TF_CONFIG`` (`tf_config_worker`), else JAX's process index and count
    where `jax.distributed` is initialised, else the only worker."""
    if os.environ.get("TF_CONFIG"):
        return tf_config_worker(os.environ["TF_CONFIG"])
    from kerasdiffusion import backend

    return Worker(*backend.process_index_and_count())


def tf_config_worker(text):
    """The `Worker` a ``TF_CONFIG`` describes: its ``chief`` (if any) then its ``worker`` tasks, in order, are
    the input pipelines, as `tf.distribute.MultiWorkerMirroredStrategy` numbers them.

    Example:

    >>> tf_config_worker('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}')
    Worker(index=1, count=2)
    """
    try:
        config = json.loads(text)
        cluster, task = config.get("cluster", {}), config.get("task", {})
        members = [("chief", i) for i in range(len(cluster.get("chief", [])))]
        members += [("worker", i) for i in range(len(cluster.get("worker", [])))]
        me = (task.get("type"), int(task.get("index", 0)))
    except (ValueError, TypeError, AttributeError) as error:
        raise ValueError(f"TF_CONFIG is not a cluster description: {error}") from None
    if me not in members:
        raise ValueError(f"TF_CONFIG: the task {me[0]} {me[1]} is not a chief or worker of its cluster")
    return Worker(members.index(me), len(members))
