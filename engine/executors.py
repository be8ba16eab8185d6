"""Where a run's worker executes: one small interface, and the local implementation.

An executor takes a run the queue has launched (its status `running`, stage `starting`,
with a fresh `launch_id`) and runs `python -m engine worker RUN_DIR` for it somewhere.
`engine.jobs` (the queue, and the calls users make) talks only to this interface, so the
Ray executor (`engine.ray_executor`), per-user permissions and the pages can change without
touching each other or `engine/train.py`.

Which executor runs a run is chosen when the run is created (`TRANSFER_STUDIO_EXECUTOR`,
`RAY_ADDRESS`, or the command line's `--executor`) and recorded in its folder
(`executor.json`), so that every later call on that run (state, stop, kill, logs) goes to
the executor that runs it, whatever the server's default has become since.

The local executor starts a small supervisor, `python -m engine supervise RUN_DIR`, in
a session of its own, so closing a tab, reloading a page or restarting the Streamlit
server neither stops nor hides the run. The supervisor holds an exclusive lock on
`RUN_DIR/worker.lock` (shared with the worker it spawns) for as long as either lives:
anyone can tell whether a run's processes are alive by trying that lock, and the kernel
releases it when they die, even by `kill -9`. When the worker ends, the supervisor
records what happened (a crash or a kill becomes `failed` with a message).

This module never imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

from engine import runfiles
from engine.status import IllegalTransition, RunStatus, Stage, State, now_iso, read_status, transition

LOCK_FILE = "worker.lock"
# Set by the supervisor for the worker it spawns: the worker lock is already held (inherited)
# and this is the launch the worker must adopt.
LOCK_INHERITED_VARIABLE = "TRANSFER_STUDIO_LOCK_INHERITED"
LAUNCH_VARIABLE = "TRANSFER_STUDIO_LAUNCH_ID"
# Set by the Ray executor for the worker it submits (the cluster's address): the worker then
# fate-shares with its Ray job and moves the queue on when it ends (engine.cli, command_worker).
RAY_JOB_VARIABLE = "TRANSFER_STUDIO_RAY_JOB"


class WorkerBusy(ValueError):
    """Another live process already trains this run."""


@contextlib.contextmanager
def worker_lock(run_dir: str | os.PathLike):
    """Holds the run's worker lock while this process trains it (the supervisor's, when inherited).

    Every way of training a run holds it (the supervisor's worker, `python -m engine worker`,
    `python -m engine train`, `engine.train_run`), so liveness can be judged by the lock alone.

    Raises:
        WorkerBusy: another live process holds the lock.
    """
    if os.environ.get(LOCK_INHERITED_VARIABLE) == "1":
        yield
        return
    with open(Path(run_dir) / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkerBusy(f"Another worker is already training {run_dir}.") from None
        yield
# A launched supervisor takes well under a second to take its lock; this is the grace
# period before a launched run whose lock is free is judged dead.
START_GRACE_SECONDS = 20.0
# Runs on another machine (a shared runs folder, a Ray cluster) are judged by their heartbeat
# when nothing else answers. NFS caches file attributes for up to 60 s by default (`acregmax`),
# so a heartbeat seen from another machine may be that old while the worker is well: the
# tolerance is $TRANSFER_STUDIO_REMOTE_HEARTBEAT_SECONDS, 90 s unless set.
REMOTE_HEARTBEAT_VARIABLE = "TRANSFER_STUDIO_REMOTE_HEARTBEAT_SECONDS"
REMOTE_HEARTBEAT_TIMEOUT_SECONDS = 90.0
ENGINE_PARENT = str(Path(__file__).resolve().parents[1])


class Executor(Protocol):
    """What the queue needs from a place that runs workers."""

    name: str

    def submit(self, run_dir: Path) -> None:
        """Starts the worker of a launched run (state running, stage starting) and returns."""

    def state(self, run_dir: Path) -> RunStatus:
        """The run's status after reconciling it with its processes (a dead worker's run becomes failed)."""

    def stop(self, run_dir: Path) -> None:
        """Asks the worker to stop cooperatively: finish the batch, save, evaluate."""

    def kill(self, run_dir: Path) -> None:
        """Ends the worker at once (the fallback when stop does not respond)."""

    def logs(self, run_dir: Path, lines: int = 40) -> str:
        """The last lines of the worker's log."""


def remote_heartbeat_seconds() -> float:
    """How long a run on another machine may go without a visible heartbeat before it is judged dead.

    `$TRANSFER_STUDIO_REMOTE_HEARTBEAT_SECONDS`, else REMOTE_HEARTBEAT_TIMEOUT_SECONDS (90 s).

    Raises:
        ValueError: the variable is set to something that is not a number of seconds > 0.
    """
    value = os.environ.get(REMOTE_HEARTBEAT_VARIABLE, "").strip()
    if not value:
        return REMOTE_HEARTBEAT_TIMEOUT_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{REMOTE_HEARTBEAT_VARIABLE} must be a number of seconds > 0 (90 or more on NFS); "
                         f"received {value!r}.")
    return seconds


def child_environment() -> dict:
    """This process's environment, with the engine importable whatever the child's working folder."""
    environment = dict(os.environ)
    # A local run launched by a Ray job's worker (the queue moving on) is not itself a Ray job.
    environment.pop(RAY_JOB_VARIABLE, None)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [ENGINE_PARENT, environment.get("PYTHONPATH")]))
    return environment


class LocalExecutor:
    """Runs workers as detached processes on this machine (supervisor + worker, see the module docstring)."""

    name = "local"

    def submit(self, run_dir: Path) -> None:
        """Launches the run's supervisor, detached from this process."""
        # The launcher exits at once after spawning the supervisor in a new session, so the
        # supervisor is adopted by init and never lingers as a zombie of this process.
        subprocess.run(
            [sys.executable, "-m", "engine", "supervise", str(run_dir), "--detach"],
            env=child_environment(), cwd=ENGINE_PARENT, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=60,
        )

    def state(self, run_dir: Path) -> RunStatus:
        """Reconciles and returns the run's status: a running run whose processes are gone becomes failed."""
        status = read_status(run_dir)
        if status.state is not State.RUNNING:
            return status
        if status.host not in (None, socket.gethostname()):
            age = time.time() - (status.heartbeat or 0.0)
            if age <= remote_heartbeat_seconds():
                return status
            return mark_dead(run_dir, status, f"No heartbeat from host {status.host} for {age:.0f} s.")
        if lock_is_held(run_dir):
            return status
        if status.stage is Stage.STARTING and status.pid is None \
                and time.time() - (status.launched_at or 0.0) < START_GRACE_SECONDS:
            return status
        return mark_dead(run_dir, status, "The worker process ended without finishing (killed, out of memory or crashed).")

    def stop(self, run_dir: Path) -> None:
        """Writes the stop request the worker's callback reads after each batch."""
        runfiles.atomic_write_text(Path(run_dir) / runfiles.STOP_REQUEST_FILE, _now_line())

    def kill(self, run_dir: Path) -> None:
        """SIGKILLs the worker; its supervisor records the run as failed, "Killed by the user."."""
        runfiles.atomic_write_text(Path(run_dir) / runfiles.KILL_REQUEST_FILE, _now_line())
        status = read_status(run_dir)
        # A pid is only meaningful on its own host (a runs root on shared storage).
        if status.pid and status.host in (None, socket.gethostname()):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(status.pid), signal.SIGKILL)

    def logs(self, run_dir: Path, lines: int = 40) -> str:
        """The last lines of `worker.log`, without TensorFlow's start-up noise."""
        return runfiles.log_tail(run_dir, lines)


def _now_line() -> str:
    return now_iso() + "\n"


def lock_is_held(run_dir: str | os.PathLike) -> bool:
    """True while the run's supervisor or worker process is alive on this machine."""
    path = Path(run_dir) / LOCK_FILE
    if not path.exists():
        return False
    try:
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False
    except OSError:
        return False


def mark_dead(run_dir: str | os.PathLike, seen: RunStatus, message: str) -> RunStatus:
    """Records a launch whose processes are gone as failed, unless it moved on meanwhile."""
    run_dir = Path(run_dir)
    # Take the worker lock so a worker finishing at this very moment cannot be overwritten.
    with open(run_dir / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_status(run_dir)
        try:
            if (run_dir / runfiles.KILL_REQUEST_FILE).exists():
                message = "Killed by the user."
            return transition(run_dir, State.FAILED, stage=Stage.DONE, message=message, error=message,
                              for_launch=seen.launch_id, expected={State.RUNNING}, finished=now_iso(),
                              pid=None)
        except IllegalTransition:
            return read_status(run_dir)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def supervise(run_dir: str | os.PathLike) -> int:
    """Runs the worker of `run_dir`'s current launch and records how it ended.

    Returns:
        0 when this supervisor ran the worker, 1 when another supervisor holds the run.
    """
    run_dir = Path(run_dir)
    lock_handle = open(run_dir / LOCK_FILE, "a+")
    # The previous supervisor of this run may still be writing its last status; wait for it.
    if not _acquire_within(lock_handle, START_GRACE_SECONDS / 2):
        lock_handle.close()
        return 1
    status = read_status(run_dir)
    if status.state is not State.RUNNING or not status.launch_id:
        # Started too late: the launch was judged dead or stopped meanwhile. Nothing to run.
        fcntl.flock(lock_handle, fcntl.LOCK_UN)
        lock_handle.close()
        return 1
    launch_id = status.launch_id
    environment = child_environment()
    environment[LOCK_INHERITED_VARIABLE] = "1"
    environment[LAUNCH_VARIABLE] = launch_id
    with open(run_dir / runfiles.LOG_FILE, "a", encoding="utf-8") as log:
        # The worker inherits the locked file, so the lock lives as long as either process.
        worker = subprocess.Popen(
            [sys.executable, "-m", "engine", "worker", str(run_dir)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=environment, cwd=ENGINE_PARENT,
            pass_fds=(lock_handle.fileno(),),
        )
        return_code = worker.wait()
    if (run_dir / runfiles.KILL_REQUEST_FILE).exists():
        message = "Killed by the user."
    elif return_code < 0:
        message = f"The worker process was killed by signal {-return_code} ({_signal_name(-return_code)})."
    else:
        message = f"The worker process exited with code {return_code} before finishing; see worker.log."
    # Only this launch is judged: a run the worker ended itself, or that was resumed since, is left alone.
    with contextlib.suppress(IllegalTransition):
        transition(run_dir, State.FAILED, stage=Stage.DONE, message=message, error=message, for_launch=launch_id,
                   expected={State.RUNNING}, finished=now_iso(), pid=None)
    fcntl.flock(lock_handle, fcntl.LOCK_UN)
    lock_handle.close()
    return 0


def _acquire_within(handle, seconds: float) -> bool:
    """Takes an exclusive lock on an open file, waiting at most `seconds`."""
    deadline = time.time() + seconds
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.time() >= deadline:
                return False
            time.sleep(0.1)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown signal"


def launch_detached_supervisor(run_dir: str | os.PathLike) -> None:
    """Spawns `python -m engine supervise RUN_DIR` in a new session and returns at once."""
    subprocess.Popen(
        [sys.executable, "-m", "engine", "supervise", str(run_dir)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, cwd=ENGINE_PARENT, env=child_environment(),
    )


EXECUTOR_FILE = "executor.json"
EXECUTOR_VARIABLE = "TRANSFER_STUDIO_EXECUTOR"
# Ray's own convention for where its cluster is; for the Jobs API it is the dashboard's address.
RAY_ADDRESS_VARIABLE = "RAY_ADDRESS"
EXECUTOR_NAMES = ("local", "ray")


@dataclass(frozen=True)
class ExecutorChoice:
    """Which executor runs a run: `local`, or `ray` with the cluster's dashboard address."""

    name: str = "local"
    address: Optional[str] = None

    def describe(self) -> str:
        """Where runs go, in words (the Train page and the command line show it)."""
        if self.name == "ray":
            return f"on the Ray cluster at {self.address} (Ray executor)"
        return f"on this machine, {socket.gethostname()} (local executor)"


def _ray_address() -> str:
    """`$RAY_ADDRESS` as the Jobs API needs it: the dashboard's http(s) address."""
    address = os.environ.get(RAY_ADDRESS_VARIABLE, "").strip().rstrip("/")
    if not address.startswith(("http://", "https://")):
        received = f"received {RAY_ADDRESS_VARIABLE}={address!r}" if address else f"{RAY_ADDRESS_VARIABLE} is not set"
        raise ValueError(f"The Ray executor needs {RAY_ADDRESS_VARIABLE} set to the Ray cluster's dashboard "
                         f"address, e.g. {RAY_ADDRESS_VARIABLE}=http://HOST:8265 (Ray's Jobs API, not the "
                         f"ray:// client address nor the GCS port 6379); {received}.")
    return address


def executor_choice(name: Optional[str] = None) -> ExecutorChoice:
    """The executor that new runs go to: `name` if given, else the server's default.

    The default is `$TRANSFER_STUDIO_EXECUTOR` (`local` or `ray`), else `local`. The Ray
    executor takes the cluster's address from `$RAY_ADDRESS` (`http://HOST:8265`). The
    environment, not the dashboard's secrets file, decides, because the command line, the
    supervisors and the workers that move the queue on read it too.

    Raises:
        ValueError: an unknown name, or `ray` without a usable `$RAY_ADDRESS`.
    """
    source = "--executor" if name is not None else EXECUTOR_VARIABLE
    chosen = (name if name is not None else os.environ.get(EXECUTOR_VARIABLE, "")).strip().lower() or "local"
    if chosen not in EXECUTOR_NAMES:
        raise ValueError(f"{source} must be one of {', '.join(EXECUTOR_NAMES)}; received {chosen!r}.")
    if chosen == "ray":
        return ExecutorChoice("ray", _ray_address())
    return ExecutorChoice("local")


def record_executor(run_dir: str | os.PathLike, choice: ExecutorChoice) -> None:
    """Writes which executor runs this run into its folder (`executor.json`); the only writer of that file."""
    data = {"executor": choice.name}
    if choice.address:
        data["address"] = choice.address
    runfiles.atomic_write_json(Path(run_dir) / EXECUTOR_FILE, data)


def recorded_executor(run_dir: str | os.PathLike) -> ExecutorChoice:
    """The executor recorded for a run; `local` for runs without a record (made before it existed)."""
    data = runfiles.read_json(Path(run_dir) / EXECUTOR_FILE)
    if isinstance(data, dict) and data.get("executor") == "ray" and isinstance(data.get("address"), str):
        return ExecutorChoice("ray", data["address"])
    return ExecutorChoice("local")


def build_executor(choice: ExecutorChoice) -> Executor:
    """The executor object for a choice (the Ray one is imported only when a run uses it)."""
    if choice.name == "ray":
        from engine.ray_executor import RayExecutor

        return RayExecutor(choice.address)
    return LocalExecutor()


def where_runs_execute() -> str:
    """Where a run started now would execute, in one sentence (the Train page shows it).

    Raises:
        ValueError: the server's executor settings are wrong (the message says how to fix them).
    """
    return f"Runs started here execute {executor_choice().describe()}."


def executor_for(path: Optional[str | os.PathLike] = None) -> Executor:
    """The executor of a run folder (as recorded in it), or for a runs root the server's default."""
    if path is not None and (Path(path) / runfiles.CONFIG_FILE).is_file():
        return build_executor(recorded_executor(path))
    return build_executor(executor_choice())
