"""`kerasdiffusion batch` and `kerasdiffusion.jobs` on a tiny random model: records checked with FILE:LINE, a
job end to end with its manifest, a resume after SIGKILL equal to an uninterrupted run, another job's folder
refused, two TF_CONFIG workers sharing a folder, and a command line that starts quietly.

The uninterrupted run is the reference every other run is compared with, byte for byte: a rerun remakes
whole batches, and workers split the same batches, so their PNGs are the same files.
"""

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from kerasdiffusion import distribute, jobs, sources
from kerasdiffusion.cli import main
from tests import reference as R

# Three global batches of two: the first two records' 32x32 images (two batches), and the 16x32 one (a program
# of its own).
RECORDS = [
    {"prompt": "a red cube", "images": 2},
    {"prompt": "a blue ball", "seed": 7, "negative_prompt": "blurry"},
    {"prompt": "a green cone", "width": 16, "num_steps": 1, "guidance": 5},
]
SEED = 5
OPTIONS = ["--batch-size", "2", "--steps", "2", "--width", "32", "--height", "32", "--precision", "float32",
           "--no-xla", "--seed", str(SEED), "--quiet"]
TASKS = {(1, 0), (1, 1), (2, 0), (3, 0)}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch-model") / "tiny-sd"
    R.make_reference_pipeline(seed=9).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in RECORDS))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Children share one conversion cache, never reach the Hub and run on one CPU device."""
    return dict(os.environ, HF_HUB_OFFLINE="1", **{sources.CACHE_ENV: str(tmp_path_factory.mktemp("kd-cache"))})


def batch_command(model, prompts, out):
    return ["batch", str(prompts), "--out", str(out), "--model", str(model), *OPTIONS]


def run_child(args, env, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "kerasdiffusion", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def finish(child, timeout=300):
    out, err = child.communicate(timeout=timeout)
    return child.returncode, out, err


@pytest.fixture(scope="module")
def uninterrupted(model, prompts, env, tmp_path_factory, monkeypatch_module):
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch_module.setenv(sources.CACHE_ENV, env[sources.CACHE_ENV])
    assert main(batch_command(model, prompts, out)) == 0
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def files(folder):
    """Every file of an output folder but the manifests (compared as sets of entries), with its bytes."""
    return {name: (folder / name).read_bytes() for name in os.listdir(folder) if not name.startswith("manifest")}


def entries(folder):
    return {json.dumps(entry, sort_keys=True) for entry in jobs.read_manifest(folder).values()}


def read_png(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")), dict(image.text)


# ------------------------------------------------------------------------------------------- records


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_txt_file_skips_blank_lines_and_comments_and_folds_the_line_into_the_seed(tmp_path):
    path = write(tmp_path, "p.txt", "# a comment\n  a cat  \n\n   \na dog\n")
    job = jobs.read_job(path, jobs.JobSettings(seed=3, num_steps=4, width=16, images=2))
    assert [(r.line, r.prompt, r.num_steps, r.width, r.images) for r in job.records] == [
        (2, "a cat", 4, 16, 2), (5, "a dog", 4, 16, 2)]
    assert [r.seed for r in job.records] == [jobs.record_seed(3, 2), jobs.record_seed(3, 5)]
    assert len({jobs.record_seed(seed, line) for seed in range(3) for line in range(1, 4)}) == 9
    assert job.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_tasks_are_grouped_by_program_and_shared_between_workers_once(prompts):
    job = jobs.read_job(prompts, jobs.JobSettings(seed=SEED, width=32, height=32, num_steps=2, batch_size=2))
    tasks = jobs.job_tasks(job.records)
    assert {task.id for task in tasks} == TASKS
    assert tasks[1].key == (job.records[0].seed, 1) and tasks[2].key == (7, 0)
    batches = jobs.plan_batches(tasks, 2)
    assert [[task.id for task in batch.tasks] for batch in batches] == [[(1, 0), (1, 1)], [(2, 0)], [(3, 0)]]
    assert len({batch.key for batch in batches}) == 2
    unguided = dataclasses.replace(job.records[1], guidance=1.0)
    assert jobs.program_key(unguided) != jobs.program_key(job.records[1])
    shares = [jobs.worker_batches(batches, jobs.Worker(index, 2)) for index in range(2)]
    made = [task.id for share in shares for batch in share for task in batch.tasks]
    assert sorted(made) == sorted(TASKS)
    for count in range(1, 8):  # the tf.data shards: every item once, each worker's in the job's order
        for workers in range(1, 4):
            shares = [distribute.input_share(count, index, workers, replicas=2) for index in range(workers)]
            assert sorted(sum(shares, [])) == list(range(count)) and all(s == sorted(s) for s in shares)
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError, match="worker 2 of 2 does not exist"):
        jobs.worker_batches(batches, jobs.Worker(2, 2))
    assert jobs.tf_config_worker(json.dumps({"cluster": {"chief": ["h:1"], "worker": ["h:2", "h:3"]},
                                             "task": {"type": "worker", "index": 0}})) == jobs.Worker(1, 3)


BAD_RECORDS = {
    "not JSON": ('{"prompt": "a cat"}\n{"prompt": "a dog",}\n', 2, "not valid JSON"),
    "no prompt": ('{"prompt": "a cat"}\n\n{"seed": 1}\n', 3, 'no "prompt"'),
    "unknown field": ('{"prompt": "a cat", "steps": 3}\n', 1, "unknown field 'steps'"),
    "wrong type": ('{"prompt": "a cat", "num_steps": "3"}\n', 1, "num_steps must be an integer >= 1, got '3'"),
    "size": ('{"prompt": "a cat"}\n{"prompt": "a dog", "width": 30}\n', 2, "width must be a positive multiple of 8"),
    "steps": ('{"prompt": "a cat", "num_steps": 0}\n', 1, "num_steps must be an integer >= 1, got 0"),
    "images": ('{"prompt": "a cat", "images": 1.5}\n', 1, "images must be an integer >= 1"),
    "seed": ('{"prompt": "a cat", "seed": -1}\n', 1, "seed must be an integer in [0, 2**63)"),
    "guidance": ('{"prompt": "a cat", "guidance": NaN}\n', 1, "guidance must be a finite number"),
    "twice": ('{"prompt": "a cat", "prompt": "a dog"}\n', 1, "field 'prompt' given twice"),
    "not an object": ('["a cat"]\n', 1, "expected a JSON object"),
    "lora tag": ('{"prompt": "a cat <lora:ink:1>"}\n', 1, "<lora:...> tag"),
}


@pytest.mark.parametrize("case", BAD_RECORDS)
def test_a_bad_record_names_its_file_and_line(case, tmp_path):
    text, line, reason = BAD_RECORDS[case]
    path = write(tmp_path, "p.jsonl", text)
    with pytest.raises(jobs.JobFileError) as error:
        jobs.read_job(path, jobs.JobSettings(), prompt_syntax="a1111")
    assert str(error.value).startswith(f"{path}:{line}: ") and reason in str(error.value), str(error.value)


def test_a_bad_record_stops_the_command_before_any_work(model, tmp_path, capfd):
    path = write(tmp_path, "p.jsonl", '{"prompt": "a cat"}\n{"prompt": "a dog", "height": 20}\n')
    assert main(["batch", str(path), "--out", str(tmp_path / "out"), "--model", str(model), "--quiet"]) == 1
    assert capfd.readouterr().err.splitlines() == [
        f"error: {path}:2: height must be a positive multiple of 8, got 20"]
    assert not (tmp_path / "out").exists()
    empty = write(tmp_path, "empty.txt", "# nothing\n\n")
    assert main(["batch", str(empty), "--out", str(tmp_path / "out"), "--model", str(model), "--quiet"]) == 1
    assert capfd.readouterr().err.splitlines() == [f"error: {empty}: holds no prompts"]
    good = write(tmp_path, "good.txt", "a cat\n")
    assert main(["batch", str(good), "--out", str(tmp_path / "out"), "--model", str(model), "--devices", "99"]) == 1
    error = capfd.readouterr().err.splitlines()
    assert len(error) == 1 and error[0].startswith("error: 99 devices asked for, but this host has 1"), error
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------- jobs


def test_a_job_writes_a_png_per_image_and_its_manifest(uninterrupted, model):
    import kerasdiffusion as kd

    names = {f"{line:05d}-{index}.png" for line, index in TASKS}
    assert set(os.listdir(uninterrupted)) == names | {"job.json", "manifest.jsonl"}  # no temporary file left
    manifest = jobs.read_manifest(uninterrupted)
    assert set(manifest) == TASKS and len((uninterrupted / "manifest.jsonl").read_text().splitlines()) == len(TASKS)
    first = manifest[1, 1]
    assert (first["file"], first["prompt"], first["seed"]) == ("00001-1.png", "a red cube", jobs.record_seed(SEED, 1))
    assert (first["num_steps"], first["guidance"], first["width"], first["height"]) == (2, 7.5, 32, 32)
    assert (manifest[3, 0]["width"], manifest[3, 0]["num_steps"], manifest[3, 0]["guidance"]) == (16, 1, 5.0)
    pixels, text = read_png(uninterrupted / "00002-0.png")
    assert pixels.shape == (32, 32, 3) and read_png(uninterrupted / "00003-0.png")[0].shape == (32, 16, 3)
    assert (text["prompt"], text["negative_prompt"], text["seed"], text["steps"]) == ("a blue ball", "blurry", "7", "2")
    assert text["batch_size"] == "1" and "Seed: 7, Size: 32x32" in text["parameters"]
    assert read_png(uninterrupted / "00001-1.png")[1]["batch_index"] == "1"
    # Image i of a record is image i of `generate PROMPT --seed S --batch-size N`.
    sd = kd.StableDiffusion.from_pretrained(model, img_width=32, img_height=32, jit_compile=False,
                                            precision="float32", prompt_syntax="a1111", progress=False)
    expected = sd.text_to_image("a red cube", batch_size=2, num_steps=2, seed=first["seed"], verbose=False)
    assert np.abs(read_png(uninterrupted / "00001-1.png")[0].astype(int) - expected[1].astype(int)).max() <= 1
    assert np.abs(read_png(uninterrupted / "00001-0.png")[0].astype(int) - expected[0].astype(int)).max() <= 1


def test_another_job_in_the_same_folder_is_refused(uninterrupted, model, prompts, capfd):
    before = files(uninterrupted)
    command = batch_command(model, prompts, uninterrupted)
    assert main([*command, "--steps", "3"]) == 2
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {uninterrupted} holds another job (num_steps 2 -> 3)")
    assert files(uninterrupted) == before


def test_a_job_killed_midway_resumes_to_the_same_files(uninterrupted, model, prompts, env, tmp_path, capfd):
    out = tmp_path / "out"
    child = run_child(batch_command(model, prompts, out), env)
    manifest = out / "manifest.jsonl"
    deadline = time.monotonic() + 300
    while not (manifest.exists() and manifest.read_bytes()) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.communicate()
    done = set(jobs.read_manifest(out))
    assert 0 < len(done) < len(TASKS), f"the job was not killed midway: {done}"
    assert main(batch_command(model, prompts, out)[:-1]) == 0  # without --quiet: its bar and summary
    assert files(out) == files(uninterrupted) and entries(out) == entries(uninterrupted)
    stdout = capfd.readouterr().out
    assert f"{len(TASKS) - len(done)} images in" in stdout and f"{len(done)} already done" in stdout


def test_two_tf_config_workers_share_one_job(uninterrupted, model, prompts, env, tmp_path, monkeypatch, capfd):
    """Worker 0 in a child process, worker 1 in this one, at the same time, into one folder."""
    out = tmp_path / "out"
    cluster = {"worker": ["127.0.0.1:23456", "127.0.0.1:23457"]}
    tf_config = [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}) for i in range(2)]
    child = run_child(batch_command(model, prompts, out)[:-1], dict(env, TF_CONFIG=tf_config[0]))  # not --quiet
    monkeypatch.setenv("TF_CONFIG", tf_config[1])
    assert main(batch_command(model, prompts, out)) == 0
    code, stdout, stderr = finish(child)
    assert code == 0, stderr
    assert "worker 1 of 2" in stdout and "images in" in stdout
    # A quiet start-up: no TensorFlow / XLA line on the terminal, only the progress bar.
    assert [line for line in stderr.replace("\r", "\n").splitlines() if line.strip() and "image" not in line] == []
    shards = [[json.loads(line) for line in (out / f"manifest.worker-{i}.jsonl").read_text().splitlines()]
              for i in range(2)]
    made = [(entry["line"], entry["index"]) for shard in shards for entry in shard]
    assert sorted(made) == sorted(TASKS) and all(shards), "each image made exactly once, by one of the workers"
    assert files(out) == files(uninterrupted)
    assert {line for line in (out / "manifest.jsonl").read_text().splitlines()} == {
        json.dumps(entry, sort_keys=True, ensure_ascii=False) for entry in jobs.read_manifest(uninterrupted).values()}


def test_an_unusable_model_is_one_error_line_without_tensorflow_noise(tmp_path):
    """Before weights are looked for (no TensorFlow imported), and after TensorFlow started (the Hub's default
    model, offline): one line either way."""
    for model in ("/nonexistent", sources.DEFAULT_MODEL):
        result = subprocess.run([sys.executable, "-m", "kerasdiffusion", "generate", "a cat", "--model", model],
                                capture_output=True, text=True, timeout=120, check=False,
                                env=dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf")))
        assert result.returncode != 0
        assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: "), result.stderr
    assert "/nonexistent" not in result.stderr and "Hugging Face Hub" in result.stderr
