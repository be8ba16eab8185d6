"""Runs workers on a Ray cluster, through Ray's Jobs REST API.

`RayExecutor` hands a launched run to an existing Ray cluster as a Ray job whose
entrypoint is the same worker command the local executor runs (`python -m engine worker
RUN_DIR`), with the run id as the job's submission id (`<run id>-resume<N>` for its N-th
resume: Ray cannot take an id again reliably, see `submission_id`). It speaks to the cluster's
dashboard over HTTP with `httpx` (`POST /api/jobs/`, `GET /api/jobs/{id}`, `POST
/api/jobs/{id}/stop`, `GET /api/jobs/{id}/logs`), so the team server needs neither the
`ray` package nor its version to match the cluster's.

The run folder stays the one source of truth: the worker writes its stages, heartbeat,
metrics and final state there, on storage the server and the cluster both see. Ray's job
state only decides what the folder cannot say by itself: a job Ray reports failed or
stopped while the folder still says `running` (the worker died without recording its
end) becomes `failed` with Ray's message; a cluster that does not answer is given the
remote heartbeat tolerance (`engine.executors.remote_heartbeat_seconds`) before the run
is failed, naming the cluster's address.

Stop is cooperative (the stop-request file the worker reads, as everywhere); kill asks
Ray to stop the job (SIGTERM, then SIGKILL after Ray's grace period).

Token authentication (`RAY_AUTH_MODE=token` on the cluster) follows Ray's own client
convention: the token is `$RAY_AUTH_TOKEN`, else the file named by `$RAY_AUTH_TOKEN_PATH`,
else `~/.ray/auth_token` when it exists, and it is sent as `Authorization: Bearer TOKEN`.

This module never imports TensorFlow, nor Ray.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import threading
import time
from pathlib import Path
from typing import Optional

import httpx

from engine import runfiles
from engine.status import IllegalTransition, RunStatus, Stage, State, now_iso, read_status, record_progress, transition

TOKEN_VARIABLE = "RAY_AUTH_TOKEN"
TOKEN_PATH_VARIABLE = "RAY_AUTH_TOKEN_PATH"
# The Python that runs the worker on the cluster's nodes (it needs requirements.txt installed).
PYTHON_VARIABLE = "TRANSFER_STUDIO_RAY_PYTHON"
# CPUs Ray reserves for each run's worker (Ray's `entrypoint_num_cpus`).
NUM_CPUS_VARIABLE = "TRANSFER_STUDIO_RAY_NUM_CPUS"
# Variables that are paths: sent as absolute paths, since the job's working folder is not the server's.
PATH_VARIABLES = ("TRANSFER_STUDIO_RUNS", "TRANSFER_STUDIO_CACHE", "TRANSFER_STUDIO_DATA", "KERAS_HOME",
                  "TFDS_DATA_DIR")
# Besides every TRANSFER_STUDIO_* variable, what the worker reads from its environment.
PASSED_VARIABLES = ("KERAS_HOME", "TFDS_DATA_DIR", "TF_CPP_MIN_LOG_LEVEL")
# Ray's job states (ray.job_submission.JobStatus).
PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED = "PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED"
TERMINAL_STATES = frozenset({STOPPED, SUCCEEDED, FAILED})
# A job that ended cleanly wrote its final state before exiting; on storage with attribute
# caching (NFS) the server may see the old file for a moment, so that much is allowed.
ENDED_JOB_GRACE_SECONDS = 10.0
# How long a status check waits for the cluster: pages poll every 1.5 s.
STATE_TIMEOUT_SECONDS = 5.0
SUBMIT_TIMEOUT_SECONDS = 30.0


class RayUnreachable(RuntimeError):
    """The Ray cluster's dashboard did not answer (refused, timed out, name unknown)."""


class RayAuthenticationError(PermissionError):
    """The Ray cluster refused a request: it requires a token, or the token sent is not its token."""


def auth_token() -> tuple[Optional[str], str]:
    """The token to send to a Ray cluster, and where it came from, by Ray's own client convention.

    Returns:
        (token, source): `$RAY_AUTH_TOKEN`, else the file `$RAY_AUTH_TOKEN_PATH` names, else
        `~/.ray/auth_token` when that file exists; (None, "") when there is none.

    Raises:
        ValueError: `$RAY_AUTH_TOKEN_PATH` names a file that cannot be read or is empty (Ray
            itself treats that as a fatal misconfiguration rather than falling back).
    """
    token = os.environ.get(TOKEN_VARIABLE, "").strip()
    if token:
        return token, f"${TOKEN_VARIABLE}"
    named = os.environ.get(TOKEN_PATH_VARIABLE, "").strip()
    if named:
        try:
            token = Path(named).expanduser().read_text(encoding="utf-8").strip()
        except OSError as error:
            raise ValueError(f"{TOKEN_PATH_VARIABLE} names {named!r}, which cannot be read ({error.strerror}); "
                             "point it to the file that holds the Ray cluster's token, or unset it.") from None
        if not token:
            raise ValueError(f"{TOKEN_PATH_VARIABLE} names {named!r}, which is empty; it must hold the Ray "
                             "cluster's token.")
        return token, f"the file {named} (${TOKEN_PATH_VARIABLE})"
    default = Path.home() / ".ray" / "auth_token"
    with contextlib.suppress(OSError):
        token = default.read_text(encoding="utf-8").strip()
        if token:
            return token, f"the file {default}"
    return None, ""


class RayJobsClient:
    """The few calls of Ray's Jobs REST API the executor makes, with errors in plain words.

    Args:
        address: The cluster's dashboard, `http://HOST:8265`.
        transport: An httpx transport (tests give a fake one); None for the network.
    """

    def __init__(self, address: str, transport: Optional[httpx.BaseTransport] = None):
        self.address = address.rstrip("/")
        self.transport = transport

    def _request(self, method: str, path: str, timeout: float, **options) -> httpx.Response:
        token, source = auth_token()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            with httpx.Client(base_url=self.address, timeout=timeout, transport=self.transport,
                              headers=headers) as client:
                response = client.request(method, path, **options)
        except httpx.TransportError as error:
            detail = " ".join(str(error).split()) or type(error).__name__
            raise RayUnreachable(f"The Ray cluster at {self.address} cannot be reached ({detail}). Check "
                                 "RAY_ADDRESS (the cluster's dashboard address, http://HOST:8265) and that the "
                                 "cluster is up.") from None
        if response.status_code == 401:
            raise RayAuthenticationError(
                f"The Ray cluster at {self.address} requires a token (it runs with RAY_AUTH_MODE=token) and "
                f"refused {method} {path}: no token was sent. Set {TOKEN_VARIABLE} to the cluster's token (or "
                f"{TOKEN_PATH_VARIABLE} to a file holding it) in the environment of the team server and of its "
                "command line; `ray get-auth-token` on the head node prints it.")
        if response.status_code == 403:
            raise RayAuthenticationError(
                f"The Ray cluster at {self.address} refused the token from {source or 'this server'} for "
                f"{method} {path}: it is not the cluster's token. Set {TOKEN_VARIABLE} (or "
                f"{TOKEN_PATH_VARIABLE}) to the token the cluster was started with.")
        return response

    def _fail(self, method: str, path: str, response: httpx.Response) -> RuntimeError:
        # Ray answers a server error with its traceback, whose last line is the error itself.
        last_line = (response.text.strip().splitlines() or [""])[-1][:300]
        return RuntimeError(f"The Ray cluster at {self.address} answered {response.status_code} to {method} "
                            f"{path}: {last_line or response.reason_phrase}")

    def _json(self, method: str, path: str, response: httpx.Response):
        try:
            return response.json()
        except ValueError:
            raise RuntimeError(f"{self.address} answered {method} {path} with something that is not JSON; is "
                               "it a Ray dashboard (http://HOST:8265)?") from None

    def job(self, submission_id: str, timeout: float = STATE_TIMEOUT_SECONDS) -> Optional[dict]:
        """The job's details (`status`, `message`, `end_time`…), or None when the cluster has no such job."""
        path = f"/api/jobs/{submission_id}"
        response = self._request("GET", path, timeout)
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self._fail("GET", path, response)
        details = self._json("GET", path, response)
        if not isinstance(details, dict) or "status" not in details:
            raise RuntimeError(f"{self.address} answered GET {path} without a job status; is it a Ray dashboard?")
        return details

    def submit(self, request: dict) -> dict:
        """Submits a job (`POST /api/jobs/`); returns Ray's answer (`job_id`, `submission_id`)."""
        response = self._request("POST", "/api/jobs/", SUBMIT_TIMEOUT_SECONDS, json=request)
        if response.status_code != 200:
            raise self._fail("POST", "/api/jobs/", response)
        return self._json("POST", "/api/jobs/", response)

    def stop(self, submission_id: str) -> bool:
        """Asks Ray to stop the job; False when there is no such job."""
        path = f"/api/jobs/{submission_id}/stop"
        response = self._request("POST", path, SUBMIT_TIMEOUT_SECONDS)
        if response.status_code == 404:
            return False
        if response.status_code != 200:
            raise self._fail("POST", path, response)
        return True

    def logs(self, submission_id: str, timeout: float = STATE_TIMEOUT_SECONDS) -> str:
        """The job's output as Ray kept it ("" when there is no such job)."""
        path = f"/api/jobs/{submission_id}/logs"
        response = self._request("GET", path, timeout)
        if response.status_code == 404:
            return ""
        if response.status_code != 200:
            raise self._fail("GET", path, response)
        details = self._json("GET", path, response)
        return str(details.get("logs", "")) if isinstance(details, dict) else ""


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _ray_message(job: dict) -> str:
    """Ray's reason for a job's end, without the log tail Ray appends (worker.log has the log)."""
    message = str(job.get("message") or "")
    message = message.split(", last available logs")[0].split("last available logs")[0]
    return _one_line(message) or f"no reason given (status {job.get('status')})"


class RayExecutor:
    """Runs workers as jobs on a Ray cluster (see the module docstring).

    Args:
        address: The cluster's dashboard, `http://HOST:8265` (Ray's `RAY_ADDRESS` convention).
        transport: An httpx transport for tests; None for the network.
    """

    name = "ray"

    def __init__(self, address: str, transport: Optional[httpx.BaseTransport] = None):
        self.address = address.rstrip("/")
        self.client = RayJobsClient(self.address, transport)

    def submit(self, run_dir: Path) -> None:
        """Submits the run's worker as a Ray job named after the run.

        Raises:
            RayUnreachable: the cluster does not answer.
            RayAuthenticationError: the cluster wants a token, or another one.
            RuntimeError: the cluster refused the job, or an earlier job of this run will not end.
        """
        from engine.executors import ENGINE_PARENT

        run_dir = Path(run_dir).resolve()
        status = read_status(run_dir)
        self._stop_earlier_job(status)
        python = os.environ.get(PYTHON_VARIABLE, "").strip() or "python"
        # The worker runs in the engine's folder, as the local supervisor runs it, so relative
        # data paths mean the same; exec makes it Ray's own child, which Ray stops and watches.
        entrypoint = (f"cd {shlex.quote(ENGINE_PARENT)} && exec {python} -m engine worker "
                      f"{shlex.quote(str(run_dir))}")
        request = {
            "entrypoint": entrypoint,
            "submission_id": submission_id(status),
            "runtime_env": {"env_vars": self.worker_environment(run_dir, status.launch_id)},
            "entrypoint_num_cpus": _number_of_cpus(),
            "metadata": {"transfer_studio_run": run_dir.name, "launch_id": status.launch_id or ""},
        }
        gpus = _requested_gpus(run_dir)
        if gpus:
            request["entrypoint_num_gpus"] = gpus
        self.client.submit(request)

    def worker_environment(self, run_dir: Path, launch_id: Optional[str]) -> dict:
        """The variables the worker needs on the cluster: the engine's, the Keras home, this launch."""
        from engine.executors import ENGINE_PARENT, LAUNCH_VARIABLE, LOCK_INHERITED_VARIABLE, RAY_JOB_VARIABLE

        environment = {name: value for name, value in os.environ.items()
                       if name.startswith("TRANSFER_STUDIO_") or name in PASSED_VARIABLES}
        for name in PATH_VARIABLES:
            if environment.get(name):
                environment[name] = str(Path(environment[name]).expanduser().resolve())
        if environment.get("TRANSFER_STUDIO_DATA_ROOTS"):
            environment["TRANSFER_STUDIO_DATA_ROOTS"] = os.pathsep.join(
                str(Path(part).expanduser().resolve()) for part in environment["TRANSFER_STUDIO_DATA_ROOTS"].split(
                    os.pathsep) if part)
        # No lock is handed over on the cluster: the worker takes the run's lock itself.
        environment.pop(LOCK_INHERITED_VARIABLE, None)
        environment.update({
            "PYTHONPATH": ENGINE_PARENT,
            "TRANSFER_STUDIO_RUNS": str(Path(run_dir).resolve().parent),
            LAUNCH_VARIABLE: launch_id or "",
            RAY_JOB_VARIABLE: self.address,
        })
        return environment

    def _stop_earlier_job(self, status: RunStatus) -> None:
        """Stops the job of the run's previous launch if Ray still runs it, before a resumed launch starts.

        A run judged dead by its heartbeat (storage trouble, say) may still have its worker on
        the cluster; the new worker could not take the run's lock while it lives.
        """
        if not status.resumed:
            return
        earlier = submission_id(status.with_changes(resumed=status.resumed - 1))
        job = self.client.job(earlier, timeout=SUBMIT_TIMEOUT_SECONDS)
        if job is None or job.get("status") in TERMINAL_STATES:
            return
        self.client.stop(earlier)
        deadline = time.time() + 30
        while (job := self.client.job(earlier)) is not None and job.get("status") not in TERMINAL_STATES:
            if time.time() > deadline:
                raise RuntimeError(f"The Ray job {earlier} of the run's previous launch is still {job.get('status')} "
                                   f"on {self.address} after being asked to stop; stop it with `ray job stop "
                                   f"{earlier}`, then resume.")
            time.sleep(0.5)

    def state(self, run_dir: Path) -> RunStatus:
        """Reconciles the run with its Ray job and returns its status.

        While Ray runs the job (PENDING, RUNNING), the folder is the truth. A job that ended
        while the folder still says running ended without the worker recording it: failed,
        with Ray's reason. An unanswering cluster is given the remote heartbeat tolerance.
        """
        from engine.executors import START_GRACE_SECONDS, mark_dead, remote_heartbeat_seconds

        run_dir = Path(run_dir)
        status = read_status(run_dir)
        if status.state is not State.RUNNING:
            return status
        try:
            job = self.client.job(submission_id(status))
        except (RayUnreachable, RayAuthenticationError, RuntimeError, ValueError) as error:
            # ValueError: an unreadable token file. Not answered is not dead: the worker may be well.
            tolerance = remote_heartbeat_seconds()
            age = time.time() - (status.heartbeat or 0.0)
            if age <= tolerance:
                return status
            return mark_dead(run_dir, status, f"The Ray cluster at {self.address} did not answer and the run wrote "
                                              f"no heartbeat for {age:.0f} s (the tolerance is {tolerance:g} s): "
                                              f"{_one_line(error)}")
        if job is None:
            if time.time() - (status.launched_at or 0.0) < START_GRACE_SECONDS:
                return status  # being submitted at this moment
            return mark_dead(run_dir, status, f"The Ray cluster at {self.address} has no job {submission_id(status)}: "
                                              "the cluster was restarted or the job was deleted.")
        ray_state = job.get("status")
        if ray_state == PENDING:
            return self._note_pending(run_dir, status, job)
        if ray_state not in TERMINAL_STATES:
            return status
        # The job ended; give a clean end a moment to show in the folder (attribute caching).
        ended = (job.get("end_time") or 0) / 1000.0
        if ray_state == SUCCEEDED and time.time() - ended < ENDED_JOB_GRACE_SECONDS:
            return status
        status = read_status(run_dir)
        if status.state is not State.RUNNING:
            return status
        if ray_state == FAILED:
            message = f"The Ray job failed: {_ray_message(job)}"
        elif ray_state == STOPPED:
            message = f"The Ray job was stopped on the cluster ({_ray_message(job)})."
        else:
            message = "The Ray job ended without the worker recording how; see worker.log."
        return mark_dead(run_dir, status, message)

    def _note_pending(self, run_dir: Path, status: RunStatus, job: dict) -> RunStatus:
        """Says in the status that Ray has not started the job yet (no free CPUs or GPUs, say)."""
        message = f"Waiting for the Ray cluster at {self.address} to start the worker (job {job.get('status')})."
        if status.stage is not Stage.STARTING or status.message == message or not status.launch_id:
            return status
        return record_progress(run_dir, status.launch_id, message=message) or read_status(run_dir)

    def stop(self, run_dir: Path) -> None:
        """Writes the stop request the worker's callback reads after each batch (cooperative)."""
        runfiles.atomic_write_text(Path(run_dir) / runfiles.STOP_REQUEST_FILE, now_iso() + "\n")

    def kill(self, run_dir: Path) -> None:
        """Asks Ray to stop the job at once (SIGTERM, then SIGKILL); the run ends failed, "Killed by the user.".

        Raises:
            RayAuthenticationError: the cluster wants a token, or another one.
            ValueError: the cluster could not be asked (it does not answer, or refused); the
                run is left as it was, and the message says so.
        """
        run_dir = Path(run_dir)
        request = run_dir / runfiles.KILL_REQUEST_FILE
        runfiles.atomic_write_text(request, now_iso() + "\n")
        try:
            self.client.stop(submission_id(read_status(run_dir)))
        except (RayUnreachable, RuntimeError) as error:
            # Nothing was killed: a later end of this worker must not read as the user's kill.
            request.unlink(missing_ok=True)
            raise ValueError(f"Run {run_dir.name} was not killed: {_one_line(error, 400)} Stop still works "
                             "(the worker reads a file), or try Kill again once the cluster answers.") from None

    def logs(self, run_dir: Path, lines: int = 40) -> str:
        """The tail of `worker.log`; Ray's output of the job when the worker wrote nothing (it could not start)."""
        tail = runfiles.log_tail(run_dir, lines)
        if tail:
            return tail
        with contextlib.suppress(RayUnreachable, RayAuthenticationError, RuntimeError, ValueError):
            return "\n".join(self.client.logs(submission_id(read_status(run_dir))).splitlines()[-lines:])
        return ""


def submission_id(status: RunStatus) -> str:
    """The Ray submission id of the run's current launch: the run id, `<run id>-resume<N>` after N resumes.

    A resumed run needs a new Ray job, and Ray cannot give an ended job's id to a new one
    reliably: deleting the old job and submitting under its id at once makes the new job
    fail ("Job supervisor actor died") while the old job's supervisor actor, which has the
    same name, is still ending (Ray 2.60.0: both of two tries).
    """
    return status.run_id if not status.resumed else f"{status.run_id}-resume{status.resumed}"


def _number_of_cpus() -> float:
    value = os.environ.get(NUM_CPUS_VARIABLE, "").strip() or "1"
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if number <= 0:
        raise ValueError(f"{NUM_CPUS_VARIABLE} must be a number of CPUs > 0 for each run's worker; received "
                         f"{value!r}.")
    return int(number) if number.is_integer() else number


def _requested_gpus(run_dir: Path) -> int:
    """The GPUs the run asks for (`training.gpus` of its config; 0 when the setting does not exist)."""
    from engine.config import RunConfig

    config = RunConfig.load(Path(run_dir) / runfiles.CONFIG_FILE)
    return int(getattr(config.training, "gpus", 0) or 0)


def watch_job_supervisor(run_dir: str | os.PathLike, launch_id: Optional[str], address: str,
                         interval_seconds: float = 1.0) -> threading.Thread:
    """Ends this worker when the Ray process that started it is gone (fate-sharing with the Ray job).

    Ray runs the worker as a child of the job's supervisor actor. When the cluster goes
    down, that actor dies but a worker in a session of its own may live on, training for
    nobody and holding CPUs Ray thinks are free. So the worker watches its parent: once it
    has been re-parented, it records its launch as failed, naming the cause, and exits.
    """
    parent = os.getppid()
    run_dir = Path(run_dir)

    def watch():
        while os.getppid() == parent:
            time.sleep(interval_seconds)
        message = (f"The Ray job running this worker is gone (its supervisor process {parent} ended): the Ray "
                   f"cluster at {address} went down or lost the job.")
        if launch_id:
            with contextlib.suppress(IllegalTransition, OSError):
                transition(run_dir, State.FAILED, stage=Stage.DONE, message=message, error=message, pid=None,
                           for_launch=launch_id, expected={State.RUNNING}, finished=now_iso())
        os._exit(1)

    thread = threading.Thread(target=watch, name="ray-job-watch", daemon=True)
    thread.start()
    return thread
