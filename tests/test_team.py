"""A shared server: runs have owners, the engine refuses cross-user control, the queue is fair,
per-user limits hold, deleted runs can be restored, and every action is in the audit log.

The queue tests record launches with a small fake executor instead of starting workers:
what is tested is who is launched when, not training.
"""

import json

import pytest

from engine import audit, jobs
from engine.runs import create_run, list_runs
from engine.status import Stage, State, read_status, transition
from engine.users import AccessSettings, Role, User, local_user
from tests.conftest import job_config, run_cli

ALICE = User("https://id.example.org|alice", "Alice", "alice@example.org")
BOB = User("https://id.example.org|bob", "Bob", "bob@example.org")
ROOT = User("https://id.example.org|root", "Root", role=Role.ADMIN)
CAROL = User("https://id.example.org|carol", "Carol", role=Role.VIEWER)


class RecordingExecutor:
    """Records the runs the queue hands over; a real worker would start them."""

    name = "recording"

    def __init__(self):
        self.submitted = []

    def submit(self, run_dir):
        self.submitted.append(run_dir.name)

    def state(self, run_dir):
        return read_status(run_dir)

    def stop(self, run_dir):
        (run_dir / "stop.request").write_text("stop\n")

    def kill(self, run_dir):
        (run_dir / "kill.request").write_text("kill\n")

    def logs(self, run_dir, lines=40):
        return ""


@pytest.fixture
def executor(monkeypatch):
    recording = RecordingExecutor()
    monkeypatch.setattr(jobs, "executor_for", lambda runs_dir=None: recording)
    return recording


def start(runs_dir, user, name, **more):
    return jobs.start(job_config(runs_dir / "data", name=name), runs_dir, user=user, **more)


def finish(runs_dir, run_id):
    """What a worker does at the end of its launch."""
    launch = read_status(runs_dir / run_id).launch_id
    transition(runs_dir / run_id, State.FINISHED, stage=Stage.DONE, message="done", for_launch=launch)
    jobs.schedule(runs_dir)


def test_a_run_records_its_owner_and_only_the_owner_or_an_admin_controls_it(tmp_path, executor):
    runs_dir = tmp_path / "runs"
    jobs.set_max_concurrent(1, runs_dir)
    first = start(runs_dir, ALICE, "first")
    queued = start(runs_dir, ALICE, "second")
    status = read_status(runs_dir / queued)
    assert (status.owner, status.owner_name, status.state) == (ALICE.id, "Alice", State.QUEUED)
    for action in (jobs.stop, jobs.kill, jobs.resume, jobs.delete):
        with pytest.raises(PermissionError, match="belongs to Alice; only its owner or an admin"):
            action(queued, runs_dir, user=BOB)
    with pytest.raises(PermissionError, match="belongs to Alice"):
        jobs.rename(queued, "mine now", runs_dir, user=BOB)
    with pytest.raises(PermissionError, match="Carol is a viewer"):
        jobs.stop(queued, runs_dir, user=CAROL)
    with pytest.raises(PermissionError, match="Carol is a viewer"):
        start(runs_dir, CAROL, "not allowed")
    assert read_status(runs_dir / queued).state is State.QUEUED  # nothing happened
    assert jobs.rename(queued, "second try", runs_dir, user=ALICE).name == "second try"
    assert jobs.stop(queued, runs_dir, user=ROOT).state is State.STOPPED  # an admin may
    assert read_status(runs_dir / queued).owner == ALICE.id  # the owner never changes
    jobs.stop(first, runs_dir, user=ALICE)
    assert (runs_dir / first / "stop.request").exists()


def test_runs_from_the_cli_and_local_mode_belong_to_the_system_user(tmp_path, executor):
    run_dir = create_run(job_config(tmp_path), tmp_path / "runs")
    assert read_status(run_dir).owner == local_user().id and local_user().role is Role.ADMIN
    jobs.rename(run_dir.name, "local", tmp_path / "runs")  # no user given: the local user, who may do anything


def test_the_queue_takes_turns_across_owners(tmp_path, executor):
    runs_dir = tmp_path / "runs"
    jobs.set_max_concurrent(1, runs_dir)
    alice = [start(runs_dir, ALICE, f"a{number}") for number in range(4)]
    bob = [start(runs_dir, BOB, f"b{number}") for number in range(2)]
    assert executor.submitted == [alice[0]]
    while len(executor.submitted) < 6:
        finish(runs_dir, executor.submitted[-1])
    # Not first-in-first-out (a1 a2 a3 b0 b1): Bob's runs alternate with Alice's.
    assert executor.submitted == [alice[0], bob[0], alice[1], bob[1], alice[2], alice[3]]


def test_an_admin_moves_a_queued_run_to_the_front(tmp_path, executor):
    runs_dir = tmp_path / "runs"
    jobs.set_max_concurrent(1, runs_dir)
    runs = [start(runs_dir, ALICE, "a0"), start(runs_dir, ALICE, "a1"), start(runs_dir, BOB, "b0"),
            start(runs_dir, ALICE, "a2")]
    with pytest.raises(PermissionError, match="Only an admin may reorder the queue"):
        jobs.move_to_front(runs[3], runs_dir, user=ALICE)
    jobs.move_to_front(runs[3], runs_dir, user=ROOT)
    finish(runs_dir, runs[0])
    assert executor.submitted == [runs[0], runs[3]]
    with pytest.raises(PermissionError, match="Only an admin"):
        jobs.set_max_concurrent(4, runs_dir, user=BOB)


def test_per_user_limits_refuse_a_run_before_creating_it_and_cap_what_runs(tmp_path, executor):
    runs_dir = tmp_path / "runs"
    jobs.set_max_concurrent(3, runs_dir)
    limits = AccessSettings(max_queued_per_user=2, max_running_per_user=1)
    started = [start(runs_dir, ALICE, f"a{number}", limits=limits) for number in range(3)]
    assert executor.submitted == [started[0]]  # one running at a time for Alice, two waiting
    with pytest.raises(jobs.QuotaExceeded, match="Alice already has 2 runs waiting in the queue.*nothing was queued"):
        start(runs_dir, ALICE, "one too many", limits=limits)
    assert len(list_runs(runs_dir)) == 3
    start(runs_dir, BOB, "b0", limits=limits)  # others are not held back by Alice's runs
    assert executor.submitted == [started[0], list_runs(runs_dir)[0].run_id]
    # A scheduler that never saw the secrets (a supervisor whose worker ended) keeps the limit.
    finish(runs_dir, started[0])
    assert executor.submitted[2:] == [started[1]]
    # Resuming counts too: a stopped run going back to the queue is one more waiting.
    stopped = start(runs_dir, BOB, "b1", limits=limits)
    jobs.stop(stopped, runs_dir, user=BOB)
    start(runs_dir, BOB, "b2", limits=limits)
    start(runs_dir, BOB, "b3", limits=limits)
    with pytest.raises(jobs.QuotaExceeded, match="Bob already has 2 runs waiting"):
        jobs.resume(stopped, runs_dir, user=BOB, limits=limits)
    assert read_status(runs_dir / stopped).state is State.STOPPED


def test_a_deleted_run_goes_to_the_trash_and_comes_back(tmp_path, executor):
    runs_dir = tmp_path / "runs"
    run_id = start(runs_dir, ALICE, "keep me")
    with pytest.raises(ValueError, match="is running; stop it before deleting it"):
        jobs.delete(run_id, runs_dir, user=ALICE)
    finish(runs_dir, run_id)
    before = sorted(path.name for path in (runs_dir / run_id).iterdir())
    jobs.delete(run_id, runs_dir, user=ALICE)
    assert list_runs(runs_dir) == [] and [run.run_id for run in jobs.trash(runs_dir)] == [run_id]
    with pytest.raises(PermissionError, match="belongs to Alice"):
        jobs.restore(run_id, runs_dir, user=BOB)
    jobs.restore(run_id, runs_dir, user=ALICE)
    assert [run.run_id for run in list_runs(runs_dir)] == [run_id] and jobs.trash(runs_dir) == []
    assert sorted(path.name for path in (runs_dir / run_id).iterdir()) == before  # nothing lost
    with pytest.raises(ValueError, match="No run 'nope' in the trash"):
        jobs.restore("nope", runs_dir, user=ROOT)


def test_every_action_is_appended_to_the_audit_log_and_never_rewritten(tmp_path, executor):
    runs_dir = tmp_path / "runs"
    run_id = start(runs_dir, ALICE, "audited", source="page")
    first = (runs_dir / audit.AUDIT_FILE).read_bytes()
    jobs.stop(run_id, runs_dir, user=ALICE, source="page")
    with pytest.raises(PermissionError):
        jobs.kill(run_id, runs_dir, user=BOB)
    finish(runs_dir, run_id)
    jobs.rename(run_id, "renamed", runs_dir, user=ROOT, source="cli")
    jobs.delete(run_id, runs_dir, user=ALICE)
    jobs.restore(run_id, runs_dir, user=ROOT)
    log = (runs_dir / audit.AUDIT_FILE).read_bytes()
    assert log.startswith(first)  # appended, never rewritten
    entries = audit.read(runs_dir)
    assert [(entry["user_name"], entry["action"], entry["source"]) for entry in entries] == [
        ("Alice", "start", "page"), ("Alice", "stop", "page"), ("Root", "rename", "cli"),
        ("Alice", "delete", "python"), ("Root", "restore", "python")]
    assert all(entry["run"] == run_id and entry["time"] for entry in entries)
    assert entries[2]["detail"] == {"name": "renamed"} and entries[0]["user"] == ALICE.id
    listed = run_cli("audit", "--runs-dir", runs_dir)
    assert listed.returncode == 0 and listed.stdout.count("\n") == 5
    assert f"Root <{ROOT.id}> (cli)  rename" in listed.stdout


def test_the_cli_refuses_cross_user_control_in_one_line(tmp_path, executor):
    runs_dir = tmp_path / "runs"
    run_id = start(runs_dir, ALICE, "hers")
    finish(runs_dir, run_id)
    # The CLI acts as the local user, an admin of its own machine: it may.
    renamed = run_cli("rename", run_id, "from the shell", "--runs-dir", runs_dir)
    assert renamed.returncode == 0, renamed.stderr
    assert json.loads((runs_dir / run_id / "status.json").read_text())["name"] == "from the shell"
    deleted = run_cli("delete", run_id, "--runs-dir", runs_dir)
    assert deleted.returncode == 0 and run_id in run_cli("trash", "--runs-dir", runs_dir).stdout
    assert run_cli("restore", run_id, "--runs-dir", runs_dir).returncode == 0
    refused = run_cli("restore", "no-such-run", "--runs-dir", runs_dir)
    assert refused.returncode == 2 and refused.stderr.startswith("error: No run 'no-such-run' in the trash")


@pytest.fixture
def signed_in_as(monkeypatch):
    """Pages see `user` as the signed-in user (the real sign-in is tested in tests/test_signin.py)."""
    import signin

    def sign_in(user):
        monkeypatch.setattr(signin, "current_user", lambda: user)

    return sign_in


def test_pages_offer_no_control_of_another_persons_run(app_environment, signed_in_as, executor):
    from tests.conftest import open_page

    runs_dir = app_environment / "runs"
    run_id = start(runs_dir, ALICE, "hers")
    finish(runs_dir, run_id)
    signed_in_as(BOB)
    home = open_page("app_pages/home.py")
    assert not home.exception, home.exception
    assert list(home.dataframe[0].value["Owner"]) == ["Alice"]
    assert home.button(key="save_details").disabled and home.button(key="delete").disabled
    assert any("belongs to Alice" in caption.value for caption in home.caption)
    assert not [expander for expander in home.expander if "Administration" in expander.label]
    signed_in_as(ALICE)
    home = open_page("app_pages/home.py")
    assert not home.button(key="save_details").disabled and not home.button(key="delete").disabled
    home.button(key="delete").click().run()
    assert jobs.trash(runs_dir)[0].run_id == run_id
    signed_in_as(ROOT)
    home = open_page("app_pages/home.py")
    assert [expander for expander in home.expander if "Administration" in expander.label]
    home.button(key=f"restore-{run_id}").click().run()
    assert [run.run_id for run in list_runs(runs_dir)] == [run_id]
    assert [entry["action"] for entry in audit.read(runs_dir)][-2:] == ["delete", "restore"]


def test_a_viewer_cannot_start_from_the_train_page(app_environment, signed_in_as):
    from tests.conftest import open_page

    signed_in_as(CAROL)
    train = open_page("app_pages/train.py")
    assert not train.exception, train.exception
    assert any("viewer" in warning.value for warning in train.warning)
    assert [button for button in train.button if button.label == "Start training"][0].disabled


def test_the_monitor_offers_controls_to_the_owner_only(app_environment, signed_in_as, executor):
    from tests.conftest import open_page

    runs_dir = app_environment / "runs"
    run_id = start(runs_dir, ALICE, "hers")
    transition(runs_dir / run_id, State.STOPPED, stage=Stage.DONE, message="stopped",
               for_launch=read_status(runs_dir / run_id).launch_id)
    signed_in_as(BOB)
    monitor = open_page("app_pages/monitor.py")
    assert not monitor.exception, monitor.exception
    assert all(monitor.button(key=key).disabled for key in ("stop", "resume", "kill"))
    assert any("Owner: Alice" in caption.value for caption in monitor.caption)
    signed_in_as(ALICE)
    monitor = open_page("app_pages/monitor.py")
    assert not monitor.button(key="resume").disabled
    monitor.button(key="resume").click().run()
    assert read_status(runs_dir / run_id).state in (State.QUEUED, State.RUNNING)
