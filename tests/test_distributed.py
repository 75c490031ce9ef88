"""Multi-host start-up, meshes and the local launcher.

Oracle for the multi-process run: numpy on the whole array, against a psum
under ``shard_map`` and a jitted mean computed by 2 processes x 4 CPU devices
(gloo) that each hold half of the rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxcombine import distributed
from jaxcombine.errors import ConfigError, JaxcombineError
from tests._distributed_worker import global_data

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(Path(__file__).with_name("_distributed_worker.py"))
ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _child_env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {"PYTHONPATH": path}


@pytest.fixture
def fresh(monkeypatch):
    """A not-yet-started module, no coordinator variables and no cluster in sight."""
    monkeypatch.setattr(distributed, "_started", None)
    monkeypatch.setattr(distributed, "_detect_cluster", lambda: None)
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# ---- meshes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sizes, shape",
    [
        ({}, (8, 1, 1)),
        ({"data": 8}, (8, 1, 1)),
        ({"data": 2, "expert": 2, "model": 2}, (2, 2, 2)),
        ({"expert": 4}, (2, 4, 1)),
        ({"expert": 2, "model": 2}, (2, 2, 2)),
        ({"data": 1, "model": 8}, (1, 1, 8)),
    ],
)
def test_make_mesh_shapes(sizes, shape):
    mesh = distributed.make_mesh(**sizes)
    assert mesh.axis_names == ("data", "expert", "model")
    assert mesh.devices.shape == shape
    assert dict(mesh.shape) == dict(zip(("data", "expert", "model"), shape, strict=True))
    # process-major, then id order: a plain reshape of the sorted devices
    assert [d.id for d in mesh.devices.flat] == sorted(d.id for d in jax.devices())


def test_make_mesh_explicit_devices_and_jit():
    devices = jax.devices()[::-1][:4]
    mesh = distributed.make_mesh(expert=2, devices=devices)
    assert mesh.devices.shape == (2, 2, 1)
    assert list(mesh.devices.flat) == devices
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "expert"))
    x = jax.device_put(np.arange(8.0).reshape(2, 4), sharding)
    assert float(jax.jit(lambda a: a.sum())(x)) == 28.0


@pytest.mark.parametrize(
    "sizes, match",
    [
        ({"data": 4}, r"4 \* 1 \* 1 = 4, but there are 8 devices"),
        ({"data": 2, "expert": 2, "model": 3}, r"= 12, but there are 8 devices"),
        ({"expert": 3}, r"expert \* model = 3 \* 1 = 3 does not divide the 8 devices"),
        ({"data": 0}, r"'data' has size 0"),
        ({"data": -2}, r"'data' has size -2"),
        ({"expert": -1}, r"'expert' has size -1"),
        ({"model": 0}, r"'model' has size 0"),
        ({"expert": 2.0}, r"must be an integer, got 2.0"),
        ({"data": True}, r"must be an integer, got True"),
    ],
)
def test_make_mesh_errors(sizes, match):
    with pytest.raises(ConfigError, match=match) as info:
        distributed.make_mesh(**sizes)
    assert info.value.where.startswith("make_mesh(")
    assert info.value.fix


def test_make_mesh_error_names_fix():
    with pytest.raises(ConfigError) as info:
        distributed.make_mesh(data=3, expert=2)
    assert "data=3, expert=2, model=1" in info.value.where
    assert "product is 8" in info.value.fix and "data=-1" in info.value.fix
    with pytest.raises(ConfigError) as info:
        distributed.make_mesh(expert=5)
    assert "1, 2, 4, 8" in info.value.fix


# ---- initialize --------------------------------------------------------------------------


def test_initialize_single_process_is_noop(fresh):
    distributed.initialize()
    distributed.initialize()  # idempotent
    assert not jax.distributed.is_initialized()
    assert distributed.process_info() == (0, 1)
    assert distributed.is_main_process()
    assert distributed.make_mesh().devices.shape == (8, 1, 1)
    distributed.initialize(num_processes=1, process_id=0)  # agrees with the running set-up
    with pytest.raises(ConfigError, match="already ran with num_processes=1; asked now for 2"):
        distributed.initialize(num_processes=2)


@pytest.mark.parametrize(
    "env, missing",
    [
        ({"JAX_COORDINATOR_ADDRESS": "localhost:1234"}, "JAX_NUM_PROCESSES, JAX_PROCESS_ID"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID"),
        ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, "JAX_COORDINATOR_ADDRESS"),
    ],
)
def test_initialize_partial_environment(fresh, env, missing):
    for name, value in env.items():
        fresh.setenv(name, value)
    with pytest.raises(ConfigError, match=f"{missing} missing") as info:
        distributed.initialize()
    assert f"set {missing} as well" in info.value.fix
    assert distributed._started is None and not jax.distributed.is_initialized()


def test_initialize_partial_arguments(fresh):
    with pytest.raises(ConfigError, match="JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID missing"):
        distributed.initialize(num_processes=2)


@pytest.mark.parametrize(
    "env, match",
    [
        ({"JAX_NUM_PROCESSES": "two"}, r"'two' is not an integer"),
        ({"JAX_NUM_PROCESSES": "0"}, r"0 is not an integer >= 1"),
        ({"JAX_PROCESS_ID": "-1"}, r"-1 is not an integer >= 0"),
        ({"JAX_PROCESS_ID": "2"}, r"process id 2 is not below the number of processes 2"),
    ],
)
def test_initialize_bad_values(fresh, env, match):
    fresh.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    fresh.setenv("JAX_NUM_PROCESSES", "2")
    fresh.setenv("JAX_PROCESS_ID", "0")
    for name, value in env.items():
        fresh.setenv(name, value)
    with pytest.raises(ConfigError, match=match):
        distributed.initialize()


def test_initialize_after_computation_is_refused(fresh):
    jax.numpy.zeros(1).block_until_ready()  # the backend is up in this test process
    fresh.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    fresh.setenv("JAX_NUM_PROCESSES", "2")
    fresh.setenv("JAX_PROCESS_ID", "1")
    with pytest.raises(ConfigError, match="backend is already initialised") as info:
        distributed.initialize()
    assert "before any JAX computation" in info.value.fix
    assert not jax.distributed.is_initialized()


def test_initialize_detected_cluster_calls_jax_without_arguments(fresh):
    calls = []
    fresh.setattr(distributed, "_detect_cluster", lambda: "SlurmCluster")
    fresh.setattr(distributed, "_backends_initialized", lambda: False)
    fresh.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    fresh.setattr(jax.config, "update", lambda *a: calls.append(a))
    distributed.initialize(timeout_s=60)
    distributed.initialize()
    assert calls == [
        ("jax_cpu_collectives_implementation", "gloo"),
        {
            "coordinator_address": None,
            "num_processes": None,
            "process_id": None,
            "local_device_ids": None,
            "initialization_timeout": 60,
        },
    ]


def test_detect_cluster_finds_slurm(monkeypatch):
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "2",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}  # fmt: skip
    for name in ("OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(name, raising=False)
    for name in slurm:
        monkeypatch.delenv(name, raising=False)
    assert distributed._detect_cluster() is None
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    assert distributed._detect_cluster() == "SlurmCluster"


# ---- launcher ----------------------------------------------------------------------------


def test_child_env_replaces_device_count_flag():
    base = {"XLA_FLAGS": "--a=1 --xla_force_host_platform_device_count=8 --b", "KEEP": "x"}
    env = distributed.child_env(
        base, process_id=1, num_processes=3, devices_per_process=4, port=4321
    )
    assert env["XLA_FLAGS"] == "--a=1 --b --xla_force_host_platform_device_count=4"
    assert env["JAX_COORDINATOR_ADDRESS"] == "localhost:4321"
    assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == ("3", "1")
    assert env["JAX_PLATFORMS"] == "cpu" and env["KEEP"] == "x"
    assert base["XLA_FLAGS"].endswith("--b")  # not modified


def test_launch_two_processes_global_sum(tmp_path):
    """2 processes x 4 CPU devices run the worker; both agree with numpy."""
    codes = distributed.launch(
        [sys.executable, WORKER, str(tmp_path)],
        num_processes=2,
        devices_per_process=4,
        env=_child_env(),
        timeout_s=120,
    )
    assert codes == [0, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["process_0.json", "process_1.json"]
    data = global_data()
    for index in range(2):
        got = json.loads((tmp_path / f"process_{index}.json").read_text())
        assert got["process_info"] == [index, 2] and got["is_main"] == (index == 0)
        assert got["device_count"] == 8 and got["local_device_count"] == 4
        assert got["collectives"] == "gloo"
        assert got["mesh_shape"] == {"data": 8, "expert": 1, "model": 1}
        assert got["mesh_axes"] == ["data", "expert", "model"]
        assert got["mesh_processes"] == [0, 0, 0, 0, 1, 1, 1, 1]
        assert got["global_shape"] == [8, 3] and not got["fully_addressable"]
        np.testing.assert_allclose(got["psum"], data.sum(axis=0), rtol=1e-6)
        np.testing.assert_allclose(got["mean"], data.mean(axis=0), rtol=1e-6)


_FAIL_ON_1 = """
import os, sys, time
if os.environ["JAX_PROCESS_ID"] == "1":
    print("worker 1: something broke", file=sys.stderr)
    sys.exit(3)
time.sleep(60)
"""


def test_launch_failing_child_stops_the_others():
    start = time.monotonic()
    with pytest.raises(distributed.LaunchError) as info:
        distributed.launch(
            [sys.executable, "-c", _FAIL_ON_1], num_processes=2, devices_per_process=1
        )
    assert time.monotonic() - start < 20  # process 0 was stopped, not waited for
    error = info.value
    assert isinstance(error, JaxcombineError)
    assert (error.process_id, error.returncode) == (1, 3)
    assert "worker 1: something broke" in error.stderr_tail
    assert "process 1 of 2 exited with code 3" in str(error)
    assert "worker 1: something broke" in str(error)


def test_launch_timeout():
    with pytest.raises(distributed.LaunchError, match=r"processes \[0\] of 1 still running"):
        distributed.launch(
            [sys.executable, "-c", "import time; time.sleep(60)"],
            num_processes=1,
            devices_per_process=1,
            timeout_s=0.5,
        )


@pytest.mark.parametrize(
    "argv, kw, match",
    [
        ([], {}, "argv is empty"),
        (["true"], {"num_processes": 0}, "num_processes must be a positive integer"),
        (["true"], {"devices_per_process": 0}, "devices_per_process must be a positive"),
    ],
)
def test_launch_bad_arguments(argv, kw, match):
    kw = {"num_processes": 2, "devices_per_process": 1, **kw}
    with pytest.raises(ConfigError, match=match):
        distributed.launch(argv, **kw)


_REPORT_ENV = """
import os, sys
keys = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "XLA_FLAGS")
with open(os.path.join(sys.argv[1], os.environ["JAX_PROCESS_ID"]), "w") as f:
    f.write("|".join(os.environ.get(k, "") for k in keys))
"""


def test_command_line(tmp_path):
    """python -m jaxcombine.distributed -n 3 --devices-per-process 2 -- COMMAND; a failing
    command's exit code is passed on."""
    cmd = [sys.executable, "-m", "jaxcombine.distributed"]
    env = {**os.environ, **_child_env()}
    run = subprocess.run(
        [*cmd, "-n", "3", "--devices-per-process", "2", "--port", "4567", "--",
         sys.executable, "-c", _REPORT_ENV, str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    for i in range(3):
        address, count, index, flags = (tmp_path / str(i)).read_text().split("|")
        assert (address, count, index) == ("localhost:4567", "3", str(i))
        assert flags.split().count("--xla_force_host_platform_device_count=2") == 1
        assert "device_count=8" not in flags
    failed = subprocess.run(
        [*cmd, "-n", "2", "--", sys.executable, "-c", _FAIL_ON_1],
        env=env, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert failed.returncode == 3
    assert "error: " in failed.stderr and "worker 1: something broke" in failed.stderr
    missing = subprocess.run([*cmd, "-n", "2"], env=env, capture_output=True, text=True,
                             timeout=60, cwd=ROOT)  # fmt: skip
    assert missing.returncode == 2 and "give the command after '--'" in missing.stderr


_WRITE_PID_AND_SLEEP = """
import os, sys, time
path = os.path.join(sys.argv[1], os.environ["JAX_PROCESS_ID"])
with open(path + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(path + ".tmp", path)
time.sleep(60)
"""


def test_terminated_launcher_stops_its_children(tmp_path):
    """SIGTERM to the launcher stops every child (no orphans left running)."""
    launcher = subprocess.Popen(
        [sys.executable, "-m", "jaxcombine.distributed", "-n", "2", "--",
         sys.executable, "-c", _WRITE_PID_AND_SLEEP, str(tmp_path)],
        env={**os.environ, **_child_env()}, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not all((tmp_path / str(i)).exists() for i in range(2)):
            assert time.monotonic() < deadline, "children did not start"
            time.sleep(0.05)
        pids = [int((tmp_path / str(i)).read_text()) for i in range(2)]
        launcher.terminate()
        assert launcher.wait(timeout=30) == 128 + 15
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # reaped by the launcher: gone, not a zombie
