"""The Ray executor: runs handed to a real single-node Ray cluster through its Jobs REST API.

The cluster tests start `ray start --head --block` in a process group of their own, submit
real runs on small generated data, and stop the cluster by that group (and any process it
left, by pid), never by name. The state mapping is also checked against a fake Jobs API
(httpx's MockTransport) on real run folders, for the answers a live cluster gives rarely.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from engine import executors, jobs, runfiles
from engine.config import RunConfig
from engine.executors import ExecutorChoice, executor_for, record_executor, recorded_executor
from engine.ray_executor import RayAuthenticationError, RayExecutor, RayJobsClient, auth_token
from engine.runs import create_run
from engine.status import Stage, State, new_launch_id, read_status, transition
from tests.conftest import epoch_events, free_port, job_config, open_page, run_cli, wait_until

RAY = Path(sys.executable).parent / "ray"
TOKEN = "transfer-studio-test-token-0123456789"


# ---------------------------------------------------------------------------------------------
# A real Ray head on localhost, in its own process group.


def _process_start(pid: int):
    """The process's start time in clock ticks (field 22 of /proc/PID/stat), or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _descendants(root_pid: int) -> dict[int, int]:
    """Every live descendant of `root_pid` with its start time, from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = {}, [root_pid]
    while todo:
        for child in children.get(todo.pop(), []):
            start = _process_start(child)
            if start is not None and child not in found:
                found[child] = start
                todo.append(child)
    return found


class RayHead:
    """`ray start --head --block` on free localhost ports, with a short temporary folder."""

    def __init__(self, token: str | None = None):
        self.token = token
        self.temp_dir = tempfile.mkdtemp(prefix="tsray", dir="/tmp")  # Ray's socket paths must stay short
        self.port = free_port()
        self.address = f"http://127.0.0.1:{self.port}"
        environment = dict(os.environ, RAY_USAGE_STATS_ENABLED="0",
                           # The cluster's `python` is this virtualenv's, as a cluster has the app's requirements.
                           PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                           RAY_AUTH_MODE="token" if token else "disabled")
        environment.pop("RAY_ADDRESS", None)
        environment.pop("RAY_AUTH_TOKEN_PATH", None)
        if token:
            environment["RAY_AUTH_TOKEN"] = token
        else:
            environment.pop("RAY_AUTH_TOKEN", None)
        ports = {"--port": free_port(), "--dashboard-port": self.port, "--ray-client-server-port": free_port(),
                 "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
                 "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port(),
                 "--node-manager-port": free_port(), "--object-manager-port": free_port()}
        command = [str(RAY), "start", "--head", "--block", "--num-cpus", "2", "--temp-dir", self.temp_dir,
                   "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--disable-usage-stats",
                   "--object-store-memory", str(100 * 1024 * 1024)]
        for flag, port in ports.items():
            command += [flag, str(port)]
        self.log_path = Path(self.temp_dir) / "head.log"
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(command, env=environment, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        self.group = self.process.pid  # start_new_session: the head leads its own group
        self._wait_until_jobs_api_answers()

    def _wait_until_jobs_api_answers(self, timeout: float = 120.0) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                self.stop()
                pytest.fail(f"ray start --head exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            try:
                if httpx.get(f"{self.address}/api/jobs/", headers=headers, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        log = self.log_path.read_text()
        self.stop()
        pytest.fail(f"the Ray dashboard at {self.address} did not answer within {timeout:.0f} s:\n{log}")

    def job(self, submission_id: str) -> dict:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return httpx.get(f"{self.address}/api/jobs/{submission_id}", headers=headers, timeout=10).json()

    def kill(self) -> None:
        """Kills the whole cluster at once (its process group), as a crashed head node would go."""
        if self.process.poll() is None:
            os.killpg(self.group, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        """Ends the head's process group and every process it started, and checks none is left."""
        left = _descendants(self.process.pid) if self.process.poll() is None else {}
        self.kill()
        # Ray's workers and job supervisors live in groups of their own and end when their raylet
        # is gone; give them a moment, then end any that did not, by pid (checked by start time).
        deadline = time.time() + 20
        while time.time() < deadline and any(_process_start(pid) == start for pid, start in left.items()):
            time.sleep(0.2)
        for pid, start in left.items():
            if _process_start(pid) == start:
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        survivors = [pid for pid, start in left.items() if _process_start(pid) == start]
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        assert not survivors, f"Ray processes left after the cluster was stopped: {survivors}"


def _ray_head(token: str | None = None):
    if not RAY.is_file():
        pytest.skip(f"ray[default] is not installed in this virtualenv ({RAY} is missing): "
                    "pip install -r requirements-dev.txt")
    head = RayHead(token)
    yield head
    head.stop()


@pytest.fixture(scope="module")
def ray_cluster():
    """A single-node Ray cluster with 2 CPUs and no authentication, for the module."""
    yield from _ray_head()


@pytest.fixture(scope="module")
def token_cluster():
    """A single-node Ray cluster started with RAY_AUTH_MODE=token, for the module."""
    yield from _ray_head(TOKEN)


@pytest.fixture
def on_ray(monkeypatch, tmp_path):
    """The server's default executor is Ray (no token of this machine's user is picked up)."""
    monkeypatch.setenv("TRANSFER_STUDIO_EXECUTOR", "ray")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # ~/.ray/auth_token is one of Ray's token sources
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "TRANSFER_STUDIO_REMOTE_HEARTBEAT_SECONDS"):
        monkeypatch.delenv(name, raising=False)


def _wait_for_epochs(run_dir: Path, count: int, timeout: float = 180.0) -> list:
    try:
        return wait_until(lambda: (events := epoch_events(run_dir)) and len(events) >= count and events,
                          timeout=timeout, what=f"{count} epochs in {run_dir.name}'s metrics.jsonl")
    except AssertionError as error:
        raise AssertionError(f"{error}; the run reads {read_status(run_dir)}; its log ends:\n"
                             f"{runfiles.log_tail(run_dir, 30)}") from None


# ---------------------------------------------------------------------------------------------
# Real runs on a real cluster.


@pytest.mark.training
@pytest.mark.usefixtures("slower_epochs")
def test_a_run_on_ray_trains_stops_resumes_and_is_killed(ray_cluster, on_ray, monkeypatch, data, runs_dir):
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster.address)
    run_id = jobs.start(job_config(data), runs_dir)
    run_dir = runs_dir / run_id
    assert recorded_executor(run_dir) == ExecutorChoice("ray", ray_cluster.address)
    # The worker on the cluster writes the run folder: metrics arrive there.
    _wait_for_epochs(run_dir, 2)
    job = ray_cluster.job(run_id)
    assert job["status"] == "RUNNING" and job["entrypoint"].endswith(f"-m engine worker {run_dir.resolve()}")
    assert job["runtime_env"]["env_vars"]["TRANSFER_STUDIO_LAUNCH_ID"] == read_status(run_dir).launch_id
    assert jobs.reconcile(run_dir).state is State.RUNNING

    # Stop is cooperative: the stop-request file, read by the worker after a batch.
    jobs.stop(run_id, runs_dir)
    stopped = jobs.wait_for(run_id, timeout=60, runs_dir=runs_dir)
    assert stopped.state is State.STOPPED, stopped
    assert (run_dir / "model.keras").is_file()
    wait_until(lambda: ray_cluster.job(run_id)["status"] == "SUCCEEDED", timeout=30, what="the Ray job to end")
    epochs_before = len(epoch_events(run_dir))

    # Resume submits a new Ray job, named after the run and its resume.
    resumed = jobs.resume(run_id, runs_dir)
    assert resumed.state is State.RUNNING
    _wait_for_epochs(run_dir, epochs_before + 1)
    events = runfiles.read_jsonl(run_dir / "metrics.jsonl")
    assert any(event.get("type") == "resume" for event in events)
    assert [event["epoch"] for event in epoch_events(run_dir)][epochs_before] == epochs_before + 1

    assert ray_cluster.job(f"{run_id}-resume1")["status"] == "RUNNING"

    # Kill goes through Ray's stop_job.
    killed = jobs.kill(run_id, runs_dir)
    killed = killed if killed.state is not State.RUNNING else jobs.wait_for(run_id, timeout=30, runs_dir=runs_dir)
    assert killed.state is State.FAILED and killed.message == "Killed by the user.", killed
    assert ray_cluster.job(f"{run_id}-resume1")["status"] == "STOPPED"
    assert ray_cluster.job(run_id)["status"] == "SUCCEEDED"  # the first launch's job, as it ended
    assert "Resuming on the same split" in jobs.logs(run_id, runs_dir, lines=400)  # worker.log, on shared storage


@pytest.mark.training
@pytest.mark.usefixtures("slower_epochs")
def test_a_token_cluster_refuses_a_run_without_its_token_and_a_lost_cluster_fails_the_run(
        token_cluster, on_ray, monkeypatch, data, runs_dir):
    monkeypatch.setenv("RAY_ADDRESS", token_cluster.address)
    refused = read_status(runs_dir / jobs.start(job_config(data), runs_dir))
    assert refused.state is State.FAILED
    assert "requires a token" in refused.message and "RAY_AUTH_TOKEN" in refused.message, refused.message

    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    with pytest.raises(RayAuthenticationError, match="refused the token from \\$RAY_AUTH_TOKEN"):
        RayJobsClient(token_cluster.address).job("anything")

    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("TRANSFER_STUDIO_REMOTE_HEARTBEAT_SECONDS", "5")
    run_id = jobs.start(job_config(data), runs_dir)
    run_dir = runs_dir / run_id
    _wait_for_epochs(run_dir, 1)
    worker_pid = read_status(run_dir).pid
    assert token_cluster.job(run_id)["status"] == "RUNNING"

    token_cluster.kill()
    failed = jobs.wait_for(run_id, timeout=60, runs_dir=runs_dir)
    assert failed.state is State.FAILED, failed
    assert token_cluster.address in failed.message and "Ray" in failed.message, failed.message
    # The worker fate-shares with its Ray job: nothing trains on for a cluster that is gone.
    wait_until(lambda: _process_start(worker_pid) is None, timeout=30, what="the orphaned worker to end")


def test_a_worker_whose_ray_job_supervisor_dies_records_why_and_ends(tmp_path, data):
    """The backstop for a worker that outlives its Ray job (its own session escapes Ray's group kill)."""
    run_dir = launched_run(tmp_path / "runs", data)
    pid_file = tmp_path / "worker.pid"
    # A stand-in for Ray's job supervisor: it starts the "worker" (which only watches) and is then killed.
    worker_code = ("import os, sys, time; from engine.ray_executor import watch_job_supervisor; "
                   f"watch_job_supervisor(sys.argv[1], sys.argv[2], 'http://head:8265', 0.1); "
                   f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)")
    supervisor_code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', sys.argv[1], "
                       "sys.argv[2], sys.argv[3]], start_new_session=True); time.sleep(120)")
    supervisor = subprocess.Popen([sys.executable, "-c", supervisor_code, worker_code, str(run_dir),
                                   read_status(run_dir).launch_id], cwd=executors.ENGINE_PARENT,
                                  start_new_session=True)
    try:
        worker_pid = int(wait_until(lambda: pid_file.is_file() and pid_file.read_text(), timeout=60,
                                    what="the watching worker to start"))
    finally:
        os.killpg(supervisor.pid, signal.SIGKILL)
        supervisor.wait()
    try:
        status = wait_until(lambda: (status := read_status(run_dir)).state is State.FAILED and status, timeout=30,
                            what="the worker to record that its Ray job is gone")
        assert status.message.startswith(f"The Ray job running this worker is gone (its supervisor process "
                                         f"{supervisor.pid} ended): the Ray cluster at http://head:8265 went down")
        wait_until(lambda: not _alive(worker_pid), timeout=30, what="the worker to end")
    finally:
        if _alive(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Choosing the executor, without a cluster.


def test_the_executor_is_chosen_by_environment_and_recorded_per_run(monkeypatch, tmp_path, data):
    monkeypatch.delenv("TRANSFER_STUDIO_EXECUTOR", raising=False)
    assert executors.executor_choice() == ExecutorChoice("local")
    monkeypatch.setenv("TRANSFER_STUDIO_EXECUTOR", "ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ValueError, match="RAY_ADDRESS set to the Ray cluster's dashboard address"):
        executors.executor_choice()
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    with pytest.raises(ValueError, match="received RAY_ADDRESS='ray://head:10001'"):
        executors.executor_choice()
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265/")
    assert executors.executor_choice() == ExecutorChoice("ray", "http://head:8265")
    assert "Ray cluster at http://head:8265" in executors.where_runs_execute()
    with pytest.raises(ValueError, match="--executor must be one of local, ray; received 'slurm'"):
        executors.executor_choice("slurm")

    # A run keeps the executor it was created with, whatever the server's default becomes.
    runs_root = tmp_path / "runs"
    local_run = create_run(job_config(data), runs_root)
    record_executor(local_run, ExecutorChoice("local"))
    ray_run = create_run(job_config(data), runs_root)
    record_executor(ray_run, ExecutorChoice("ray", "http://head:8265"))
    older_run = create_run(job_config(data), runs_root)  # made before executor.json existed
    assert executor_for(local_run).name == "local" and executor_for(older_run).name == "local"
    monkeypatch.setenv("TRANSFER_STUDIO_EXECUTOR", "local")
    assert executor_for(ray_run).name == "ray" and executor_for(ray_run).address == "http://head:8265"


def test_remote_heartbeat_tolerance_is_ninety_seconds_unless_set(monkeypatch):
    monkeypatch.delenv("TRANSFER_STUDIO_REMOTE_HEARTBEAT_SECONDS", raising=False)
    assert executors.remote_heartbeat_seconds() >= 90
    monkeypatch.setenv("TRANSFER_STUDIO_REMOTE_HEARTBEAT_SECONDS", "240")
    assert executors.remote_heartbeat_seconds() == 240
    monkeypatch.setenv("TRANSFER_STUDIO_REMOTE_HEARTBEAT_SECONDS", "soon")
    with pytest.raises(ValueError, match="TRANSFER_STUDIO_REMOTE_HEARTBEAT_SECONDS must be a number of seconds"):
        executors.remote_heartbeat_seconds()


def test_an_unreachable_cluster_at_submission_is_a_clear_error_and_leaves_no_run_running(
        on_ray, monkeypatch, data, runs_dir):
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("RAY_ADDRESS", address)
    status = read_status(runs_dir / jobs.start(job_config(data), runs_dir))
    assert status.state is State.FAILED
    assert status.message.startswith(f"The run could not be started: The Ray cluster at {address} cannot be reached")
    # The command line says so on one line and exits with status 2.
    result = run_cli("train", "--detach", "--executor", "ray", "--data", data, "--weights", "none",
                     "--runs-dir", runs_dir, env={"RAY_ADDRESS": address, "HOME": os.environ["HOME"]})
    assert result.returncode == 2, result.stderr
    assert "error: Run " in result.stderr and "cannot be reached" in result.stderr
    assert not any(run.state is State.RUNNING for run in map(read_status, runs_dir.glob("*/")))
    without_detach = run_cli("train", "--executor", "ray", "--data", data, "--runs-dir", runs_dir)
    assert without_detach.returncode == 2 and "add --detach" in without_detach.stderr
    # `resume --executor ray` moves a stopped local run to the cluster (here: one that does not answer).
    local_run = create_run(job_config(data), runs_dir)
    record_executor(local_run, ExecutorChoice("local"))
    transition(local_run, State.STOPPED, stage=Stage.DONE, message="Stopped before it started.")
    moved = run_cli("resume", local_run.name, "--executor", "ray", "--runs-dir", runs_dir,
                    env={"RAY_ADDRESS": address, "HOME": os.environ["HOME"]})
    assert moved.returncode == 2 and "cannot be reached" in moved.stderr, moved.stderr
    assert recorded_executor(local_run) == ExecutorChoice("ray", address)
    assert read_status(local_run).state is State.FAILED


def test_the_train_page_says_where_runs_execute(app_environment, monkeypatch):
    monkeypatch.setenv("TRANSFER_STUDIO_EXECUTOR", "ray")
    monkeypatch.setenv("RAY_ADDRESS", "http://ray-head.example:8265")
    app = open_page("app_pages/train.py")
    assert any("Ray cluster at http://ray-head.example:8265" in caption.value for caption in app.caption)
    monkeypatch.delenv("RAY_ADDRESS")
    app = open_page("app_pages/train.py")
    assert any("RAY_ADDRESS" in error.value for error in app.error)


# ---------------------------------------------------------------------------------------------
# Ray's answers mapped onto the run's states: a fake Jobs API over real run folders.


class FakeJobsApi:
    """Answers like a Ray dashboard's Jobs API with whatever the test sets; records the requests."""

    def __init__(self):
        self.jobs: dict[str, dict] = {}
        self.requests: list[httpx.Request] = []
        self.unreachable = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.unreachable:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        parts = request.url.path.strip("/").split("/")  # api, jobs, [id, [stop|logs]]
        if request.method == "POST" and len(parts) == 2:
            body = json.loads(request.content)
            self.jobs[body["submission_id"]] = {"status": "PENDING", "request": body}
            return httpx.Response(200, json={"job_id": None, "submission_id": body["submission_id"]})
        job = self.jobs.get(parts[2]) if len(parts) > 2 else None
        if job is None:
            return httpx.Response(404, text=f"Job {parts[-1]} does not exist")
        if request.method == "POST" and parts[-1] == "stop":
            job["status"] = "STOPPED"
            return httpx.Response(200, json={"stopped": True})
        if parts[-1] == "logs":
            return httpx.Response(200, json={"logs": "python: can't open file\n"})
        return httpx.Response(200, json={key: value for key, value in job.items() if key != "request"})


@pytest.fixture
def fake_api():
    return FakeJobsApi()


def launched_run(runs_root: Path, data, **overrides) -> Path:
    """A run folder in the state the queue hands to an executor: running, stage starting, a launch id."""
    run_dir = create_run(job_config(data, **overrides), runs_root)
    record_executor(run_dir, ExecutorChoice("ray", "http://head:8265"))
    transition(run_dir, State.RUNNING, stage=Stage.STARTING, message="Starting the worker process.",
               launch_id=new_launch_id(), launched_at=time.time(), host="server")
    return run_dir


def test_submit_sends_the_worker_command_with_its_environment_and_resources(fake_api, monkeypatch, tmp_path, data):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setenv(executors.LOCK_INHERITED_VARIABLE, "1")  # this process's, never handed to the cluster
    gpus = {"training.gpus": 2} if hasattr(RunConfig().training, "gpus") else {}
    run_dir = launched_run(tmp_path / "runs", data, **gpus)
    RayExecutor("http://head:8265", httpx.MockTransport(fake_api)).submit(run_dir)
    request = fake_api.jobs[run_dir.name]["request"]
    assert request["submission_id"] == run_dir.name
    assert request["entrypoint"].endswith(f"exec python -m engine worker {run_dir.resolve()}")
    assert request["entrypoint_num_cpus"] == 1
    assert request.get("entrypoint_num_gpus", 0) == gpus.get("training.gpus", 0)
    environment = request["runtime_env"]["env_vars"]
    assert environment["TRANSFER_STUDIO_LAUNCH_ID"] == read_status(run_dir).launch_id
    assert environment["KERAS_HOME"] == str(tmp_path / "keras")
    assert environment["TRANSFER_STUDIO_RUNS"] == str(run_dir.resolve().parent)
    assert environment["TRANSFER_STUDIO_RAY_JOB"] == "http://head:8265"
    assert environment["PYTHONPATH"] == executors.ENGINE_PARENT
    assert executors.LOCK_INHERITED_VARIABLE not in environment


def test_ray_job_states_map_onto_the_run(fake_api, tmp_path, data):
    executor = RayExecutor("http://head:8265", httpx.MockTransport(fake_api))
    runs_root = tmp_path / "runs"

    pending = launched_run(runs_root, data)
    executor.submit(pending)
    status = executor.state(pending)
    assert status.state is State.RUNNING and "Waiting for the Ray cluster at http://head:8265" in status.message

    running = launched_run(runs_root, data)
    executor.submit(running)
    fake_api.jobs[running.name]["status"] = "RUNNING"
    assert executor.state(running).state is State.RUNNING

    failed = launched_run(runs_root, data)
    executor.submit(failed)
    fake_api.jobs[failed.name].update(status="FAILED", end_time=time.time() * 1000, message=(
        "Job entrypoint command failed with exit code 137, last available logs (truncated to 20,000 chars):\nKilled"))
    status = executor.state(failed)
    assert status.state is State.FAILED
    assert status.message == "The Ray job failed: Job entrypoint command failed with exit code 137"
    assert executor.logs(failed) == "python: can't open file"  # no worker.log: Ray's output instead

    stopped = launched_run(runs_root, data)
    executor.submit(stopped)
    fake_api.jobs[stopped.name].update(status="STOPPED", message="Job was intentionally stopped.")
    assert executor.state(stopped).message == "The Ray job was stopped on the cluster (Job was intentionally stopped.)."

    killed = launched_run(runs_root, data)
    executor.submit(killed)
    executor.kill(killed)
    assert fake_api.jobs[killed.name]["status"] == "STOPPED"
    assert executor.state(killed).message == "Killed by the user."

    # A job that succeeded: the worker recorded its own end, which stands.
    finished = launched_run(runs_root, data)
    executor.submit(finished)
    transition(finished, State.FINISHED, stage=Stage.DONE, message="Finished.",
               for_launch=read_status(finished).launch_id)
    fake_api.jobs[finished.name].update(status="SUCCEEDED", end_time=time.time() * 1000)
    assert executor.state(finished).state is State.FINISHED

    # No such job, past the start grace: the cluster was restarted and forgot it.
    forgotten = launched_run(runs_root, data)
    runfiles.atomic_write_json(forgotten / runfiles.STATUS_FILE, {
        **read_status(forgotten).to_dict(), "launched_at": time.time() - executors.START_GRACE_SECONDS - 1})
    status = executor.state(forgotten)
    assert status.state is State.FAILED and "has no job" in status.message

    # Stop stays cooperative: a file the worker reads, nothing sent to Ray.
    sent = len(fake_api.requests)
    executor.stop(running)
    assert (running / runfiles.STOP_REQUEST_FILE).is_file() and len(fake_api.requests) == sent


def test_a_resumed_run_is_a_new_ray_job_and_an_earlier_job_still_running_is_stopped(fake_api, tmp_path, data):
    executor = RayExecutor("http://head:8265", httpx.MockTransport(fake_api))
    run_dir = launched_run(tmp_path / "runs", data)
    executor.submit(run_dir)
    fake_api.jobs[run_dir.name]["status"] = "RUNNING"
    # Judged dead on the server (no heartbeat through a storage hiccup) while Ray still runs it, then resumed.
    transition(run_dir, State.FAILED, stage=Stage.DONE, message="No heartbeat.")
    transition(run_dir, State.QUEUED, stage=Stage.QUEUED, message="Waiting to resume.", resumed=1, launch_id=None)
    transition(run_dir, State.RUNNING, stage=Stage.STARTING, message="Starting the worker process.",
               launch_id=new_launch_id(), launched_at=time.time())
    executor.submit(run_dir)
    assert fake_api.jobs[run_dir.name]["status"] == "STOPPED"
    assert fake_api.jobs[f"{run_dir.name}-resume1"]["request"]["runtime_env"]["env_vars"][
        "TRANSFER_STUDIO_LAUNCH_ID"] == read_status(run_dir).launch_id
    fake_api.jobs[f"{run_dir.name}-resume1"]["status"] = "RUNNING"
    assert executor.state(run_dir).state is State.RUNNING  # the resumed launch's job is the one asked


def test_an_unreachable_cluster_fails_a_run_only_after_the_heartbeat_tolerance(fake_api, monkeypatch, tmp_path, data):
    executor = RayExecutor("http://head:8265", httpx.MockTransport(fake_api))
    run_dir = launched_run(tmp_path / "runs", data)
    executor.submit(run_dir)
    fake_api.unreachable = True
    monkeypatch.setenv("TRANSFER_STUDIO_REMOTE_HEARTBEAT_SECONDS", "30")
    assert executor.state(run_dir).state is State.RUNNING  # a fresh heartbeat: not failed at the first error
    # Kill needs the cluster: it says so, and leaves no kill request that would mislabel a later end.
    with pytest.raises(ValueError, match="was not killed: The Ray cluster at http://head:8265 cannot be reached"):
        executor.kill(run_dir)
    assert not (run_dir / runfiles.KILL_REQUEST_FILE).exists()
    runfiles.atomic_write_json(run_dir / runfiles.STATUS_FILE, {
        **read_status(run_dir).to_dict(), "heartbeat": time.time() - 31})
    status = executor.state(run_dir)
    assert status.state is State.FAILED
    assert status.message.startswith("The Ray cluster at http://head:8265 did not answer and the run wrote no "
                                     "heartbeat for 31 s (the tolerance is 30 s)")


def test_the_token_is_sent_as_ray_expects_and_a_refusal_names_the_variable(fake_api, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert auth_token() == (None, "")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-the-file\n")
    assert auth_token() == ("from-the-file", f"the file {tmp_path / '.ray' / 'auth_token'}")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="RAY_AUTH_TOKEN_PATH names .*missing.*cannot be read"):
        auth_token()
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-the-variable")
    RayJobsClient("http://head:8265", httpx.MockTransport(fake_api)).job("some-run")
    assert fake_api.requests[-1].headers["Authorization"] == "Bearer from-the-variable"

    def refuse(request):
        return httpx.Response(401, text="Unauthorized: Missing authentication token")

    with pytest.raises(RayAuthenticationError, match="requires a token .* Set RAY_AUTH_TOKEN"):
        RayJobsClient("http://head:8265", httpx.MockTransport(refuse)).submit({})
