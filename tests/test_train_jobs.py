"""The training jobs ``train.lm`` and ``train.moe`` end to end.

Oracles: an uninterrupted run for a run killed with SIGKILL and resumed
(bitwise); one process with 8 CPU devices for 2 processes x 4 devices over
gloo (1e-5), also for the expert-parallel MoE job; the 2-process run's exported
model for a 1-process run resuming its checkpoint. Bad configurations must fail
with a :class:`JaxcombineError` naming the key or file before any checkpoint is
written. Jobs run as subprocesses from the repo root (``python -m train.lm``),
except the error cases, which call ``main`` in this process (8 fake devices).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file

import train.lm
import train.moe
from jaxcombine import distributed
from jaxcombine.checkpoint import JobMismatchError
from jaxcombine.errors import ConfigError, InputError, JaxcombineError
from jaxcombine.training import read_metrics
from tests.train_fixtures import (
    REPO_ROOT,
    TINY_MOE,
    job_env,
    lm_sections,
    make_corpus,
    moe_sections,
    write_config,
)

JOB_TIMEOUT_S = 300
NOT_COMPARED = ("tokens_per_s",)  # wall-clock, differs between runs


# ---- helpers -----------------------------------------------------------------------------


def job_argv(kind: str, config: Path, workdir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable, "-m", f"train.{kind}",
        "--config", str(config), "--workdir", str(workdir), *overrides,
    ]  # fmt: skip


def run_job(kind: str, config: Path, workdir: Path, *overrides: str, devices: int = 2):
    """Run a job to completion in one process with ``devices`` CPU devices."""
    done = subprocess.run(
        job_argv(kind, config, workdir, *overrides),
        cwd=REPO_ROOT,
        env=job_env(devices),
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )
    assert done.returncode == 0, f"train.{kind} failed ({done.returncode}):\n{done.stderr[-3000:]}"
    return done


def launch_job(kind: str, config: Path, workdir: Path, *overrides: str) -> None:
    """Run a job as 2 local processes x 4 CPU devices (gloo), from the repo root."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO_ROOT)  # launch() has no cwd: the children inherit ours
        distributed.launch(
            job_argv(kind, config, workdir, *overrides),
            num_processes=2,
            devices_per_process=4,
            env=job_env(4),
            timeout_s=JOB_TIMEOUT_S,
        )


def exported(workdir: Path) -> dict[str, np.ndarray]:
    return load_file(workdir / "model" / "model.safetensors")


def last_logged_step(workdir: Path) -> int:
    """The last complete record's step in a running job's metrics.jsonl (0 if none)."""
    path = workdir / "metrics.jsonl"
    step = 0
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError, KeyError):  # a line being written
                step = json.loads(line)["step"]
    return step


def checkpoint_steps(workdir: Path) -> list[int]:
    root = workdir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())


def checkpoint_arrays(workdir: Path, step: int | None = None) -> dict[str, np.ndarray]:
    """Every array of a checkpoint (params and optimiser state) as numpy, by path."""
    step = checkpoint_steps(workdir)[-1] if step is None else step
    path = workdir / "checkpoints" / str(step) / "default"
    with ocp.PyTreeCheckpointer() as checkpointer:
        meta = checkpointer.metadata(path)
        tree = getattr(meta, "item_metadata", meta)
        args = jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
            tree,
            is_leaf=lambda x: hasattr(x, "shape"),
        )
        state = checkpointer.restore(path, restore_args=args)
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree.leaves_with_path(state)}


def assert_arrays(a: dict, b: dict, *, atol: float | None = None, what: str = "") -> None:
    """Same names; bitwise equal (``atol=None``) or within ``atol``."""
    assert sorted(a) == sorted(b), f"{what}: different tensor names"
    for name in a:
        assert a[name].shape == b[name].shape and a[name].dtype == b[name].dtype, (what, name)
        if atol is None:
            assert np.array_equal(a[name], b[name]), (
                f"{what}: {name} differs, max |diff| {np.max(np.abs(a[name] - b[name]))}"
            )
        else:
            np.testing.assert_allclose(
                a[name], b[name], rtol=0, atol=atol, err_msg=f"{what}: {name}"
            )


def assert_trajectories(a: list[dict], b: list[dict], *, rtol: float | None = None) -> None:
    """Same steps and metric names; values equal (``rtol=None``) or within ``rtol``."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert set(ra) == set(rb), (ra, rb)
        for key in ra:
            if key in NOT_COMPARED:
                continue
            if rtol is None:
                assert ra[key] == rb[key], f"step {ra['step']} {key}: {ra[key]} != {rb[key]}"
            else:
                np.testing.assert_allclose(
                    ra[key], rb[key], rtol=rtol, atol=1e-6, err_msg=f"step {ra['step']} {key}"
                )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("train_data"))


# ---- 1. exact resume after SIGKILL -------------------------------------------------------


def test_resume_after_sigkill_is_bitwise_exact(corpus, tmp_path):
    steps = 18
    kill_after = random.Random(1234).randint(4, 10)
    config = write_config(
        tmp_path / "lm.yml", **lm_sections(*corpus, steps=steps, checkpoint_every=3)
    )
    killed, reference = tmp_path / "killed", tmp_path / "reference"

    # start, and SIGKILL once step `kill_after` is logged and a checkpoint is complete
    proc = subprocess.Popen(
        job_argv("lm", config, killed),
        cwd=REPO_ROOT,
        env=job_env(2),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            if last_logged_step(killed) >= kill_after and checkpoint_steps(killed):
                break
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (
        f"the job was not killed mid-run (exit {proc.returncode}; kill after step {kill_after})"
    )
    lines_at_kill = (killed / "metrics.jsonl").read_text().splitlines()
    assert last_logged_step(killed) < steps, "the job finished before the kill"
    assert not (killed / "model").exists()
    restored_from = checkpoint_steps(killed)[-1]

    run_job("lm", config, killed)  # resumes
    run_job("lm", config, reference)

    assert_arrays(exported(killed), exported(reference), what="exported model")
    assert checkpoint_steps(killed)[-1] == checkpoint_steps(reference)[-1] == steps
    assert_arrays(checkpoint_arrays(killed), checkpoint_arrays(reference), what="last checkpoint")
    # every step logged once, with the uninterrupted run's numbers
    resumed_log, reference_log = read_metrics(killed), read_metrics(reference)
    assert [r["step"] for r in resumed_log] == list(range(1, steps + 1))
    assert_trajectories(resumed_log, reference_log)
    # the steps up to the restored checkpoint were not run again (their lines untouched)
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    assert lines[:restored_from] == lines_at_kill[:restored_from], (kill_after, restored_from)
    # no half-written checkpoint left behind
    leftovers = [p.name for p in (killed / "checkpoints").iterdir() if not p.name.isdigit()]
    assert not leftovers, leftovers


# ---- 2./3. two processes x 4 devices == one process x 8 devices ---------------------------


@pytest.fixture(scope="module")
def lm_runs(corpus, tmp_path_factory):
    """(config, 2-process workdir, 1-process workdir) of a 12-step LM job on data=8."""
    root = tmp_path_factory.mktemp("lm_runs")
    config = write_config(
        root / "lm.yml", **lm_sections(*corpus, steps=12, checkpoint_every=6, mesh={"data": 8})
    )
    launch_job("lm", config, root / "two")
    run_job("lm", config, root / "one", devices=8)
    return config, root / "two", root / "one"


@pytest.fixture(scope="module")
def moe_runs(corpus, tmp_path_factory):
    """(config, 2-process workdir, 1-process workdir) of a 20-step expert-parallel MoE
    job (data=2, expert=4, capacity factor 1.5: not HF Mixtral, so no export)."""
    root = tmp_path_factory.mktemp("moe_runs")
    sections = moe_sections(
        *corpus, steps=20, checkpoint_every=10, mesh={"data": 2, "expert": 4}, export=False
    )
    config = write_config(root / "moe.yml", **sections)
    launch_job("moe", config, root / "two")
    run_job("moe", config, root / "one", devices=8)
    return config, root / "two", root / "one"


def test_lm_two_processes_match_one(lm_runs):
    _, two, one = lm_runs
    assert len(read_metrics(two)) == 12
    assert_trajectories(read_metrics(two), read_metrics(one), rtol=1e-5)
    assert_arrays(exported(two), exported(one), atol=1e-5, what="exported model")
    assert_arrays(checkpoint_arrays(two), checkpoint_arrays(one), atol=1e-5, what="checkpoint")


def test_moe_expert_parallel_two_processes_match_one(moe_runs):
    _, two, one = moe_runs
    assert len(read_metrics(two)) == 20
    assert_trajectories(read_metrics(two), read_metrics(one), rtol=1e-5)
    assert_arrays(checkpoint_arrays(two), checkpoint_arrays(one), atol=1e-5, what="checkpoint")
    assert not (two / "model").exists() and not (one / "model").exists()  # export: false


def test_checkpoint_of_two_processes_restores_in_one(lm_runs, tmp_path):
    config, two, _ = lm_runs
    workdir = tmp_path / "copy"
    shutil.copytree(two, workdir)
    model_of_two = exported(two)
    log_before = (workdir / "metrics.jsonl").read_text()
    shutil.rmtree(workdir / "model")

    run_job("lm", config, workdir, devices=8)

    assert (workdir / "metrics.jsonl").read_text() == log_before  # no step run again
    assert checkpoint_steps(workdir) == checkpoint_steps(two)
    assert_arrays(exported(workdir), model_of_two, what="model re-exported by 1 process")


# ---- 5. the MoE job's router statistics --------------------------------------------------


def test_moe_logs_router_stats_and_learns(moe_runs):
    _, _, one = moe_runs
    log = read_metrics(one)
    assert [r["step"] for r in log] == list(range(1, 21))
    experts = TINY_MOE["num_experts"]
    for record in log:
        for key in ("load_balancing_loss", "router_z_loss", "max_load", "dropped", "cross_entropy"):
            assert key in record and np.isfinite(record[key]), (key, record)
        assert record["load_balancing_loss"] > 0 and record["router_z_loss"] > 0
        assert 1.0 <= record["max_load"] <= experts, record
        assert 0.0 <= record["dropped"] < 1.0, record
        assert record["cross_entropy"] <= record["loss"]  # the aux terms are added
    assert any(r["dropped"] > 0 for r in log)  # capacity factor 1.5 drops some choices
    losses = [r["loss"] for r in log]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3]), losses


# ---- 4. clear errors before training -----------------------------------------------------


@pytest.fixture(scope="module")
def lm_config(corpus, tmp_path_factory):
    """A 4-step LM job (8 devices in this process), checkpointed at the end."""
    root = tmp_path_factory.mktemp("lm_config")
    return write_config(root / "lm.yml", **lm_sections(*corpus, steps=4))


@pytest.fixture(scope="module")
def trained_workdir(lm_config, tmp_path_factory):
    """A workdir where the 4-step LM job ran to the end (in this process)."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    train.lm.main(["--config", str(lm_config), "--workdir", str(workdir)])
    assert checkpoint_steps(workdir) == [4]
    return workdir


def assert_nothing_written(workdir: Path) -> None:
    assert not (workdir / "checkpoints").exists(), sorted((workdir / "checkpoints").iterdir())
    assert not (workdir / "metrics.jsonl").exists()
    assert not (workdir / "model").exists()


@pytest.mark.parametrize(
    "overrides, error, names",
    [
        (["train.global_batch=12"], ConfigError, ["train.global_batch", "12", "8"]),
        (["mesh.data=3"], ConfigError, ["data * expert * model", "3", "8 devices"]),
        (["mesh.expert=3"], ConfigError, ["expert", "3", "8 devices"]),
        (["train.stepz=3"], ConfigError, ["train.stepz"]),
        (["optimizer.lr=3"], ConfigError, ["optimizer"]),
        (["model.hidden=3"], ConfigError, ["model", "hidden"]),
        (["data.files=[/nonexistent/corpus.txt]"], InputError, ["/nonexistent/corpus.txt"]),
    ],
    ids=[
        "global-batch",
        "mesh-product",
        "mesh-divisor",
        "unknown-key",
        "unknown-section",
        "unknown-model-field",
        "missing-data-file",
    ],  # fmt: skip
)
def test_bad_config_fails_before_training(lm_config, tmp_path, overrides, error, names):
    workdir = tmp_path / "run"
    with pytest.raises(error) as info:
        train.lm.main(["--config", str(lm_config), "--workdir", str(workdir), *overrides])
    for name in names:
        assert name in str(info.value), (name, str(info.value))
    assert_nothing_written(workdir)


def test_unknown_key_in_config_file(corpus, tmp_path):
    config = write_config(tmp_path / "lm.yml", **lm_sections(*corpus, steps=4), chekpoint_every=3)
    with pytest.raises(ConfigError, match="chekpoint_every") as info:
        train.lm.main(["--config", str(config), "--workdir", str(tmp_path / "run")])
    assert str(config) in str(info.value)
    assert_nothing_written(tmp_path / "run")


def test_data_file_without_text_column(corpus, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"content": f"document {i}"}) + "\n" for i in range(50)))
    config = write_config(tmp_path / "lm.yml", **lm_sections(data, corpus[1], steps=4))
    with pytest.raises(InputError) as info:
        train.lm.main(["--config", str(config), "--workdir", str(tmp_path / "run")])
    message = str(info.value)
    assert "'text'" in message and "content" in message and str(data) in message, message
    assert_nothing_written(tmp_path / "run")


def test_workdir_of_another_job(corpus, trained_workdir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained_workdir, workdir)
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    job_before = (workdir / "job.json").read_text()
    config = write_config(tmp_path / "moe.yml", **moe_sections(*corpus, steps=4, export=False))
    with pytest.raises(JobMismatchError) as info:
        train.moe.main(["--config", str(config), "--workdir", str(workdir)])
    message = str(info.value)
    assert "kind: 'lm' in the workdir, 'moe' now" in message, message
    assert "model.moe" in message and "job.json" in message, message
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before
    assert (workdir / "job.json").read_text() == job_before


def test_changed_model_shape_on_resume(lm_config, trained_workdir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained_workdir, workdir)
    log_before = (workdir / "metrics.jsonl").read_text()
    with pytest.raises(JobMismatchError) as info:
        train.lm.main(
            ["--config", str(lm_config), "--workdir", str(workdir), "model.hidden_size=64"]
        )
    assert "model.hidden_size: 32 in the workdir, 64 now" in str(info.value), str(info.value)
    assert checkpoint_steps(workdir) == [4]
    assert (workdir / "metrics.jsonl").read_text() == log_before


@pytest.mark.parametrize(
    "model_type, capacity_factor",
    [("mixtral", 1.5), ("llama", None)],
    ids=["mixtral-with-capacity", "llama-with-moe"],
)
def test_unexportable_moe_fails_before_training(corpus, tmp_path, model_type, capacity_factor):
    """export: true (the default) with a model no HF architecture computes must fail
    before training, not after it."""
    sections = moe_sections(*corpus, steps=4)
    sections["model"]["model_type"] = model_type
    sections["model"]["moe"]["capacity_factor"] = capacity_factor
    config = write_config(tmp_path / "moe.yml", **sections)
    workdir = tmp_path / "run"
    with pytest.raises(JaxcombineError, match="DecoderConfig.moe"):
        train.moe.main(["--config", str(config), "--workdir", str(workdir)])
    assert not (workdir / "checkpoints").exists(), (
        "BUG train/common.py: the export check (jaxcombine.hf config_to_hf) runs only after "
        f"training; the failing run wrote checkpoints {checkpoint_steps(workdir)} and "
        f"{len(read_metrics(workdir))} metrics records first"
    )
