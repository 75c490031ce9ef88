"""Multi-host start-up, device meshes and a local launcher for rehearsals.

A job calls :func:`initialize` first (before any JAX computation), then
:func:`make_mesh`, and logs on :func:`is_main_process`::

    from jaxcombine import distributed

    distributed.initialize()                    # no-op on a laptop or Colab
    mesh = distributed.make_mesh(expert=4)      # ("data", "expert", "model"): (N/4, 4, 1)
    if distributed.is_main_process():
        print("devices:", mesh.shape)

Where :func:`initialize` takes its settings from, first match wins:

1. its keyword arguments;
2. the environment: ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0),
   ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (0 ... N-1); all three or none
   (JAX itself also reads ``JAX_LOCAL_DEVICE_IDS``);
3. a cluster that JAX detects by itself (Cloud TPU pods and multislice, SLURM,
   Open MPI, Kubernetes with the ``kubernetes`` package): then
   ``jax.distributed.initialize()`` is called without arguments;
4. nothing: a single-process run, and ``jax.distributed`` is left alone.

Rehearse a multi-host job on one machine with N local CPU processes of D fake
devices each, joined over gloo (:func:`launch`)::

    python -m jaxcombine.distributed -n 2 --devices-per-process 4 -- \\
        python -m train.lm --config configs/train/lm_tiny.yml --workdir runs/lm ...

Every process then sees ``jax.device_count() == 8`` and ``make_mesh()`` is
``data=8`` with process 0's devices first. The same numbers come out as on one
process with 8 devices: that is how TPU pods and GPU clusters are rehearsed here
(``tests/test_distributed.py`` checks a psum and a jitted mean of 2 processes x 4
devices against numpy). :func:`initialize` has no doctest: it changes the
process's global state (and on a TPU VM it would join the pod).

>>> from jaxcombine import distributed
>>> mesh = distributed.make_mesh(expert=4)      # 8 devices in one process here
>>> dict(mesh.shape), distributed.process_info(), distributed.is_main_process()
({'data': 2, 'expert': 4, 'model': 1}, (0, 1), True)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from jaxcombine.errors import ConfigError, JaxcombineError

logger = logging.getLogger(__name__)

AXES = ("data", "expert", "model")
ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"

# How this process was started by initialize(): None (not yet), "single" or "distributed".
_started: str | None = None


class LaunchError(JaxcombineError):
    """A process started by :func:`launch` failed or timed out.

    ``process_id`` is the failing process (None on a time-out), ``returncode``
    its exit code (negative: killed by that signal) and ``stderr_tail`` the last
    lines it wrote to stderr.

    >>> import sys
    >>> fail = "import os, sys; sys.exit(3 * int(os.environ['JAX_PROCESS_ID']))"
    >>> try:
    ...     launch([sys.executable, "-c", fail], num_processes=2, devices_per_process=1)
    ... except LaunchError as e:
    ...     print(e.process_id, e.returncode)
    1 3
    """

    def __init__(self, message, *, process_id=None, returncode=None, stderr_tail="", **kw):
        self.process_id = process_id
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        super().__init__(message, **kw)


# ---- start-up ----------------------------------------------------------------------------


def initialize(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
    timeout_s: int = 300,
) -> None:
    """Join the other processes of a multi-host job, or do nothing on one host.

    Idempotent: the first call decides, later calls return at once (also when
    ``jax.distributed.initialize`` was called directly before). A later call
    whose explicit ``num_processes`` or ``process_id`` contradicts the running
    set-up is an error.

    Settings come from the arguments, else ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, else from a cluster JAX
    detects (TPU pods, SLURM, Open MPI, Kubernetes); with none of these it is a
    single-process run and ``jax.distributed.initialize`` is not called. With
    more than one process, CPU collectives use gloo (unless ``mpi`` was chosen
    with ``jax_cpu_collectives_implementation``).

    Must run before any JAX computation (or ``jax.devices()``) in a multi-process
    run; ``timeout_s`` bounds the wait for the other processes.

    On a pod (not run here: it joins the other processes)::

        initialize()            # TPU pod, SLURM, Open MPI, the launcher: settings found
        initialize(coordinator_address="10.0.0.2:8476", num_processes=4,
                   process_id=int(os.environ["RANK"]))    # or given explicitly

    Half a set-up is refused before anything starts (no address or id here):

    >>> try:
    ...     initialize(num_processes=2)
    ... except ConfigError as error:
    ...     print(type(error).__name__, "raised;", jax.distributed.is_initialized())
    ConfigError raised; False

    Raises:
        ConfigError: some of address, count and id are set but not all (and no
            cluster is detected), a value is malformed, or JAX's backend is
            already initialised.
    """
    global _started
    explicit = {"num_processes": num_processes, "process_id": process_id}
    if _started is not None or jax.distributed.is_initialized():
        _started = _started or "distributed"
        _check_consistent(explicit)
        return

    address = coordinator_address or os.environ.get(ENV_ADDRESS) or None
    count = _int_setting(num_processes, ENV_NUM_PROCESSES, "num_processes", minimum=1)
    index = _int_setting(process_id, ENV_PROCESS_ID, "process_id", minimum=0)
    given = {ENV_ADDRESS: address, ENV_NUM_PROCESSES: count, ENV_PROCESS_ID: index}
    missing = [name for name, value in given.items() if value is None]

    if not missing:
        if index >= count:
            raise ConfigError(
                f"process id {index} is not below the number of processes {count}",
                where=f"{ENV_PROCESS_ID} / process_id",
                fix=f"process ids run from 0 to {count - 1}",
            )
        if count > 1:
            _prepare_multiprocess()
        _jax_initialize(
            coordinator_address=address,
            num_processes=count,
            process_id=index,
            local_device_ids=local_device_ids,
            cluster_detection_method="deactivate",  # everything is given: no guessing
            initialization_timeout=int(timeout_s),
        )
        _started = "distributed"
        logger.info("process %d of %d joined %s", index, count, address)
        return

    cluster = _detect_cluster()
    if cluster is not None:
        _prepare_multiprocess()
        logger.info("cluster detected (%s): jax.distributed.initialize()", cluster)
        _jax_initialize(
            coordinator_address=address,
            num_processes=count,
            process_id=index,
            local_device_ids=local_device_ids,
            initialization_timeout=int(timeout_s),
        )
        _started = "distributed"
        return

    if len(missing) < len(given):
        have = ", ".join(name for name, value in given.items() if value is not None)
        raise ConfigError(
            f"a multi-process run needs the coordinator address, the number of processes and "
            f"this process's id; {have} given but {', '.join(missing)} missing",
            where="jaxcombine.distributed.initialize (environment or arguments)",
            fix=f"set {', '.join(missing)} as well (or unset {have} for a single-process run)",
        )
    _started = "single"


def _int_setting(value, env_name: str, arg_name: str, *, minimum: int) -> int | None:
    """An integer from the argument or, if None, the environment variable."""
    where = arg_name
    if value is None:
        raw = os.environ.get(env_name, "").strip()
        if not raw:
            return None
        where = env_name
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(
                f"{raw!r} is not an integer", where=env_name, fix=f"set {env_name} to a number"
            ) from None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ConfigError(
            f"{value!r} is not an integer >= {minimum}",
            where=where,
            fix=f"give an integer >= {minimum}",
        )
    return int(value)


def _check_consistent(explicit: dict) -> None:
    """A repeated initialize() must not ask for a different set-up than the running one."""
    from jax._src import distributed as jax_distributed

    state = jax_distributed.global_state
    running = {"num_processes": state.num_processes, "process_id": state.process_id}
    if _started == "single":
        running = {"num_processes": 1, "process_id": 0}
    for name, value in explicit.items():
        if value is not None and value != running[name]:
            raise ConfigError(
                f"initialize() already ran with {name}={running[name]}; asked now for {value}",
                where=f"jaxcombine.distributed.initialize({name}=...)",
                fix="call initialize() once, at the start of the job, with the final settings",
            )


def _backends_initialized() -> bool:
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def _prepare_multiprocess() -> None:
    """Refuse a started backend; pick gloo for CPU collectives (harmless on GPU/TPU)."""
    if _backends_initialized():
        raise ConfigError(
            "JAX's backend is already initialised, so this process can no longer join "
            "the other processes",
            where="jaxcombine.distributed.initialize",
            fix="call initialize() at the start of the job, before any JAX computation "
            "(including jax.devices(), jax.device_put and model construction)",
        )
    if jax.config.jax_cpu_collectives_implementation != "mpi":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _jax_initialize(**kwargs) -> None:
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError, TypeError) as e:
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if v is not None)
        raise ConfigError(
            f"jax.distributed.initialize failed: {e}",
            where=f"jax.distributed.initialize({shown})",
            fix="check that every process uses the same coordinator address and process "
            "count, that process 0 is running and that its port is reachable",
        ) from e


def _detect_cluster() -> str | None:
    """The name of the cluster environment JAX would auto-detect, or None.

    Mirrors ``jax._src.clusters.ClusterEnv.auto_detect_unset_distributed_params``:
    the first registered environment that is not opt-in only (mpi4py is) and
    reports itself present.
    """
    try:
        from jax._src import clusters
    except ImportError:  # pragma: no cover - a JAX without cluster detection
        return None
    for env in clusters.ClusterEnv._cluster_types:
        if getattr(env, "opt_in_only_method", False):
            continue
        try:
            present = env.is_env_present()
        except Exception as e:  # a broken probe (metadata server, k8s API) is not a cluster
            logger.warning("cluster probe %s failed: %s", env.__name__, e)
            present = False
        if present:
            return env.__name__
    return None


def is_main_process() -> bool:
    """True on process 0 (the one that logs, writes files and prints).

    >>> is_main_process()                    # a single-process run
    True
    """
    return jax.process_index() == 0


def process_info() -> tuple[int, int]:
    """``(process_index, process_count)`` of this process.

    >>> process_info()                       # a single-process run
    (0, 1)
    """
    return jax.process_index(), jax.process_count()


# ---- meshes ------------------------------------------------------------------------------


def make_mesh(data: int = -1, expert: int = 1, model: int = 1, *, devices=None) -> Mesh:
    """A ``("data", "expert", "model")`` mesh over every device of every host.

    ``data=-1`` takes the devices left over by ``expert * model``. The sizes
    must multiply to the device count.

    Device order: by default ``jax.devices()`` (all processes) sorted by
    ``(process_index, id)`` and reshaped, so each process's devices form a
    contiguous block along ``data`` (the outermost axis): with 2 processes of 4
    devices, ``make_mesh()`` puts process 0 on ``data`` 0-3, and
    ``make_mesh(2, 2, 2)`` puts process 0 on ``data`` 0 — expert and model stay
    within a host, data crosses hosts. If ``data`` is smaller than the process
    count, ``expert`` (then ``model``) spans hosts too. On TPU the order follows
    the physical topology (``mesh_utils.create_device_mesh``; multislice jobs
    split ``data`` over slices with ``create_hybrid_device_mesh``). Explicit
    ``devices`` (a sequence or array) are reshaped in the order given.

    Uses ``jax.sharding.Mesh`` (not ``jax.make_mesh``), whose axes are usable
    both by ``jax.jit`` shardings and ``jax.shard_map``.

    >>> mesh = make_mesh(expert=4)              # on 8 devices
    >>> dict(mesh.shape)
    {'data': 2, 'expert': 4, 'model': 1}
    >>> [d.id for d in make_mesh(2, 2, 2).devices[0].flat]    # data row 0: devices 0-3
    [0, 1, 2, 3]
    >>> make_mesh(expert=3)
    Traceback (most recent call last):
    ...
    jaxcombine.errors.ConfigError: make_mesh(data=-1, expert=3, model=1): expert * model = 3 * 1
    = 3 does not divide the 8 devices, so data=-1 has no size
      How to fix: choose expert * model among the divisors of 8: 1, 2, 4, 8

    Raises:
        ConfigError: an axis size is not a positive integer (``data`` may be
            -1), ``expert * model`` does not divide the device count, or the
            sizes do not multiply to the device count.
    """
    sizes = {"data": data, "expert": expert, "model": model}
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int | np.integer):
            raise ConfigError(
                f"mesh axis size must be an integer, got {size!r}",
                where=f"make_mesh({name}=...)",
                fix=f"give {name} as a positive integer" + (" or -1" if name == "data" else ""),
            )
        if size <= 0 and not (name == "data" and size == -1):
            raise ConfigError(
                f"mesh axis {name!r} has size {size}; sizes must be positive"
                + (" (or -1: the rest)" if name == "data" else ""),
                where=f"make_mesh({name}={size})",
                fix=f"give {name} >= 1" + (", or -1 to use the rest" if name == "data" else ""),
            )
    if devices is None:
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
        default_order = True
    else:
        devices = list(np.asarray(devices, dtype=object).flat)
        default_order = False
    n = len(devices)
    if n == 0:
        raise ConfigError("no devices to build a mesh over", where="make_mesh(devices=...)")
    rest = expert * model
    if data == -1:
        if n % rest:
            raise ConfigError(
                f"expert * model = {expert} * {model} = {rest} does not divide the "
                f"{n} devices, so data=-1 has no size",
                where=f"make_mesh(data=-1, expert={expert}, model={model})",
                fix=f"choose expert * model among the divisors of {n}: {_divisors(n)}",
            )
        data = n // rest
    shape = (int(data), int(expert), int(model))
    if math.prod(shape) != n:
        raise ConfigError(
            f"mesh axes data * expert * model = {shape[0]} * {shape[1]} * {shape[2]} = "
            f"{math.prod(shape)}, but there are {n} devices "
            f"({jax.process_count()} process(es))",
            where=f"make_mesh(data={shape[0]}, expert={shape[1]}, model={shape[2]})",
            fix=f"choose sizes whose product is {n}, or pass data=-1 to use the rest",
        )
    if default_order and devices[0].platform == "tpu":
        grid = _tpu_grid(shape, devices)
    else:
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, AXES)


def _tpu_grid(shape: tuple[int, int, int], devices: list) -> np.ndarray:
    """Topology-aware device order on TPU; a plain reshape if mesh_utils refuses."""
    from jax.experimental import mesh_utils

    slices = len({getattr(d, "slice_index", 0) for d in devices})
    try:
        if slices > 1 and shape[0] % slices == 0:
            per_slice = (shape[0] // slices, shape[1], shape[2])
            return mesh_utils.create_hybrid_device_mesh(per_slice, (slices, 1, 1), devices)
        return mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError) as e:
        logger.warning(
            "mesh_utils could not lay out %s over the TPU topology (%s); reshaping instead",
            shape,
            e,
        )
        return np.asarray(devices, dtype=object).reshape(shape)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


# ---- launcher ----------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port that is free on localhost right now (the OS picks it; another
    program may take it before it is used).

    >>> 0 < free_port() < 65536
    True
    """
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def child_env(
    base: Mapping[str, str],
    *,
    process_id: int,
    num_processes: int,
    devices_per_process: int,
    port: int,
) -> dict[str, str]:
    """The environment of local process ``process_id``: ``base`` plus the
    coordinator settings read by :func:`initialize`, ``JAX_PLATFORMS=cpu`` and
    ``XLA_FLAGS`` with ``--xla_force_host_platform_device_count`` replaced.

    >>> base = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/x"}
    >>> env = child_env(base, process_id=1, num_processes=2, devices_per_process=4, port=1234)
    >>> for name in sorted(env):
    ...     print(f"{name}={env[name]}")
    JAX_COORDINATOR_ADDRESS=localhost:1234
    JAX_NUM_PROCESSES=2
    JAX_PLATFORMS=cpu
    JAX_PROCESS_ID=1
    XLA_FLAGS=--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=4
    """
    env = dict(base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT_FLAG)]
    flags.append(f"{_DEVICE_COUNT_FLAG}={devices_per_process}")
    env.update(
        {
            ENV_ADDRESS: f"localhost:{port}",
            ENV_NUM_PROCESSES: str(num_processes),
            ENV_PROCESS_ID: str(process_id),
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": " ".join(flags),
        }
    )
    return env


def launch(
    argv: Sequence[str],
    *,
    num_processes: int,
    devices_per_process: int,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
) -> list[int]:
    """Run ``argv`` as ``num_processes`` local CPU processes of one distributed job.

    Process ``i`` gets ``JAX_COORDINATOR_ADDRESS=localhost:PORT`` (a free port
    if ``port`` is None), ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID=i``,
    ``JAX_PLATFORMS=cpu`` and ``devices_per_process`` fake CPU devices, on top
    of ``os.environ`` updated with ``env``; a program that calls
    :func:`initialize` joins the others over gloo. Stdout is shared with this
    process; stderr is forwarded line by line with a ``[i]`` prefix.

    Waits for every process. When one fails, the others are stopped and a
    :class:`LaunchError` names it with its exit code and the tail of its
    stderr; after ``timeout_s`` seconds all are stopped and LaunchError is
    raised. Ctrl-C or SIGTERM to this process stops them too (each child runs
    in its own process group, which is stopped whole). Returns the exit codes
    (all 0).

    A real job: ``launch([sys.executable, "-m", "train.lm", "--config", "c.yml"],
    num_processes=2, devices_per_process=4)``. A trivial one (and a failing one
    in :class:`LaunchError`):

    >>> import sys
    >>> launch([sys.executable, "-c", "pass"], num_processes=2, devices_per_process=4)
    [0, 0]
    """
    argv = [str(a) for a in argv]
    if not argv:
        raise ConfigError(
            "nothing to run: argv is empty",
            where="launch(argv=...)",
            fix="give the command, e.g. [sys.executable, '-m', 'train.lm']",
        )
    counts = {"num_processes": num_processes, "devices_per_process": devices_per_process}
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(
                f"{name} must be a positive integer, got {value!r}",
                where=f"launch({name}=...)",
                fix=f"give {name} >= 1",
            )
    port = free_port() if port is None else int(port)
    base = dict(os.environ)
    base.update(env or {})
    children: list[subprocess.Popen] = []
    tails: list[collections.deque] = []
    readers: list[threading.Thread] = []
    previous_handler = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM to the launcher (a scheduler, `kill`) stops the children too
        previous_handler = signal.signal(signal.SIGTERM, _terminated)
    try:
        for i in range(num_processes):
            child_vars = child_env(
                base,
                process_id=i,
                num_processes=num_processes,
                devices_per_process=devices_per_process,
                port=port,
            )
            child = subprocess.Popen(
                argv,
                env=child_vars,
                stderr=subprocess.PIPE,
                start_new_session=True,  # its own process group: stopped with its children
            )
            tail: collections.deque = collections.deque(maxlen=40)
            reader = threading.Thread(target=_forward, args=(child.stderr, i, tail), daemon=True)
            reader.start()
            children.append(child)
            tails.append(tail)
            readers.append(reader)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            codes = [child.poll() for child in children]
            failed = [i for i, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                i = failed[0]
                _stop(children)
                _join(readers)
                tail = "".join(tails[i])
                raise LaunchError(
                    f"process {i} of {num_processes} exited with code {codes[i]}; the others "
                    f"were stopped. Its stderr ended with:\n{_indent(tail)}",
                    where=" ".join(argv),
                    fix="read the error above; the same command in one process "
                    "(without the launcher) may be easier to debug",
                    process_id=i,
                    returncode=codes[i],
                    stderr_tail=tail,
                )
            if all(code == 0 for code in codes):
                _join(readers)
                return [0] * num_processes
            if deadline is not None and time.monotonic() > deadline:
                running = [i for i, code in enumerate(codes) if code is None]
                _stop(children)
                _join(readers)
                raise LaunchError(
                    f"processes {running} of {num_processes} still running after {timeout_s} s; "
                    "all were stopped",
                    where=" ".join(argv),
                    fix="raise timeout_s, or look for a process that waits for a peer that "
                    "exited (every process must reach the same collectives)",
                    stderr_tail="".join(tails[running[0]]) if running else "",
                )
            time.sleep(0.05)
    finally:
        _stop(children)  # also on KeyboardInterrupt and SIGTERM: no orphans, no zombies
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


def _forward(stream, index: int, tail: collections.deque) -> None:
    """Copy a child's stderr to ours line by line with a ``[index]`` prefix, keeping a tail."""
    with contextlib.suppress(ValueError, OSError):
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace")
            tail.append(line)
            with contextlib.suppress(ValueError, OSError):
                sys.stderr.write(f"[{index}] {line}")
    with contextlib.suppress(OSError):
        stream.close()


def _stop(children: list[subprocess.Popen], grace_s: float = 3.0) -> None:
    """SIGTERM each running child's process group, SIGKILL after ``grace_s``; reap all."""
    running = [c for c in children if c.poll() is None]
    for child in running:
        _signal_group(child, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in running:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(child, signal.SIGKILL)
            child.wait()
    for child in children:
        child.wait()  # reap: no zombies


def _signal_group(child: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, sig)  # the child leads its own group (start_new_session)


def _join(readers: list[threading.Thread]) -> None:
    for reader in readers:
        reader.join(timeout=5.0)


def _indent(text: str) -> str:
    return "".join(f"    {line}" for line in text.splitlines(keepends=True)) or "    (nothing)\n"


# ---- command line ------------------------------------------------------------------------


def main(args: Sequence[str] | None = None) -> int:
    """``python -m jaxcombine.distributed -n N --devices-per-process D -- COMMAND ...``

    Returns the exit status: 0, the failing process's exit code, 1 on another
    error, 130 on Ctrl-C.

    >>> import sys
    >>> main(["-n", "2", "--devices-per-process", "4", "--", sys.executable, "-c", "pass"])
    0
    """
    args = list(sys.argv[1:] if args is None else args)
    if "--" in args:
        split = args.index("--")
        args, command = args[:split], args[split + 1 :]
    else:
        command = []
    parser = argparse.ArgumentParser(
        prog="python -m jaxcombine.distributed",
        description="Run COMMAND as N local CPU processes of one multi-process JAX job "
        "(a rehearsal of a multi-host run). COMMAND calls "
        "jaxcombine.distributed.initialize().",
        usage="%(prog)s -n N [--devices-per-process D] [--port P] [--timeout S] -- COMMAND ...",
    )
    parser.add_argument("-n", "--num-processes", type=int, required=True)
    parser.add_argument("--devices-per-process", type=int, default=1)
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before stopping all")
    opts = parser.parse_args(args)
    if not command:
        parser.error("give the command after '--', e.g. -- python -m train.lm --config c.yml")
    try:
        launch(
            command,
            num_processes=opts.num_processes,
            devices_per_process=opts.devices_per_process,
            port=opts.port,
            timeout_s=opts.timeout,
        )
    except KeyboardInterrupt:
        print("interrupted: every process was stopped", file=sys.stderr)
        return 130
    except JaxcombineError as e:
        print(f"error: {e}", file=sys.stderr)
        code = getattr(e, "returncode", None)
        return code if isinstance(code, int) and code > 0 else 1
    return 0


__all__ = [
    "AXES",
    "LaunchError",
    "child_env",
    "free_port",
    "initialize",
    "is_main_process",
    "launch",
    "make_mesh",
    "process_info",
]


if __name__ == "__main__":
    sys.exit(main())
