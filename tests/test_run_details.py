"""Runs people can find: default names, descriptions and tags (owner only, enforced in the engine), filters and orders."""

import datetime
import json

import pytest

from engine import audit
from engine.config import RunConfig
from engine.run_details import clean_tags, default_name, describe, filter_runs, sort_runs
from engine.runs import create_run, list_runs
from engine.status import read_status, status_path
from engine.users import Role, User

ALICE = User("https://id.example.org|alice", "Alice", "alice@example.org")
BOB = User("https://id.example.org|bob", "Bob", "bob@example.org")
VERA = User("https://id.example.org|vera", "Vera", role=Role.VIEWER)
ADMIN = User("https://id.example.org|ada", "Ada", role=Role.ADMIN)


def new_run(runs_dir, owner=ALICE, **settings):
    config = RunConfig().replace(**{"data.path": "/data/cats_vs_dogs", **settings})
    return create_run(config, runs_dir, owner=owner)


def test_an_unnamed_run_is_named_after_its_data_backbone_and_time(tmp_path):
    when = datetime.datetime(2026, 11, 30, 15, 4)
    assert default_name("/data/cats_vs_dogs/", "MobileNet", when) == "cats_vs_dogs · MobileNet · 11-30 15:04"
    assert default_name("tfds:beans", "EfficientNetB0", when) == "beans · EfficientNetB0 · 11-30 15:04"
    run = read_status(new_run(tmp_path, **{"model.backbone": "MobileNetV2"}))
    assert run.name.startswith("cats_vs_dogs · MobileNetV2 · ")
    assert read_status(new_run(tmp_path, name="my first try")).name == "my first try"


def test_the_owner_describes_and_tags_a_run_and_it_is_kept_in_the_run_folder(tmp_path):
    run_dir = new_run(tmp_path)
    status = describe(run_dir.name, tmp_path, user=ALICE, description="  Baseline, frozen base. ",
                      tags=["Baseline", "cats ", "baseline", "  long   tag"])
    assert status.description == "Baseline, frozen base." and status.tags == ("baseline", "cats", "long tag")
    on_disk = json.loads(status_path(run_dir).read_text())
    assert on_disk["tags"] == ["baseline", "cats", "long tag"] and on_disk["description"] == "Baseline, frozen base."
    assert read_status(run_dir).tags == ("baseline", "cats", "long tag")
    renamed = describe(run_dir.name, tmp_path, user=ADMIN, name="  the   baseline ")
    assert renamed.name == "the baseline" and renamed.tags == ("baseline", "cats", "long tag")  # others unchanged
    entries = [entry for entry in audit.read(tmp_path) if entry["action"] == "describe"]
    assert [entry["user"] for entry in entries] == [ALICE.id, ADMIN.id]


@pytest.mark.parametrize("intruder, reason", [(BOB, "belongs to Alice"), (VERA, "viewer")])
def test_another_member_or_a_viewer_is_refused_by_the_engine_and_nothing_changes(tmp_path, intruder, reason):
    run_dir = new_run(tmp_path, name="Alice's run")
    before = status_path(run_dir).read_bytes()
    with pytest.raises(PermissionError, match=reason):
        describe(run_dir.name, tmp_path, user=intruder, tags=["mine now"], name="taken")
    assert status_path(run_dir).read_bytes() == before


def test_bad_descriptions_and_tags_are_refused_with_what_to_do(tmp_path):
    run_dir = new_run(tmp_path)
    with pytest.raises(ValueError, match="at most 40 characters"):
        describe(run_dir.name, tmp_path, user=ALICE, tags=["x" * 41])
    with pytest.raises(ValueError, match="cannot contain a comma"):
        clean_tags(["a,b"])
    with pytest.raises(ValueError, match="at most 20 tags"):
        clean_tags([f"t{number}" for number in range(21)])
    with pytest.raises(ValueError, match="at most 2000 characters"):
        describe(run_dir.name, tmp_path, user=ALICE, description="x" * 2001)
    with pytest.raises(ValueError, match="1 to 120 characters"):
        describe(run_dir.name, tmp_path, user=ALICE, name="   ")
    assert read_status(run_dir).tags == () and read_status(run_dir).description == ""


def test_a_status_with_malformed_tags_is_unreadable_rather_than_half_believed(tmp_path):
    run_dir = new_run(tmp_path)
    raw = json.loads(status_path(run_dir).read_text())
    raw["tags"] = "baseline"  # a string, not a list
    status_path(run_dir).write_text(json.dumps(raw))
    assert read_status(run_dir).state.value == "unknown"
    raw.pop("tags")  # a status from before tags: no tags
    status_path(run_dir).write_text(json.dumps(raw))
    assert read_status(run_dir).tags == ()


def test_filters_combine_and_orders_sort(tmp_path):
    first = new_run(tmp_path, name="cats baseline", **{"model.backbone": "MobileNet"})
    second = new_run(tmp_path, owner=BOB, name="dogs", **{"model.backbone": "EfficientNetB0",
                                                          "data.path": "/data/beans"})
    third = new_run(tmp_path, name="lr sweep", **{"model.backbone": "EfficientNetB0"})
    describe(first.name, tmp_path, user=ALICE, tags=["baseline"], description="frozen MobileNet")
    describe(third.name, tmp_path, user=ALICE, tags=["sweep", "baseline"])
    runs = list_runs(tmp_path)

    def ids(found):
        return {run.run_id for run in found}

    assert ids(filter_runs(runs, owner="Alice")) == {first.name, third.name}
    assert ids(filter_runs(runs, owner=BOB.id)) == {second.name}
    assert ids(filter_runs(runs, backbone="EfficientNetB0", tag="BASELINE")) == {third.name}
    assert ids(filter_runs(runs, dataset="/data/beans")) == {second.name}
    assert ids(filter_runs(runs, state="queued")) == ids(runs)
    assert ids(filter_runs(runs, text="frozen mobilenet")) == {first.name}  # words from description and backbone
    assert ids(filter_runs(runs, text="sweep lr")) == {third.name}
    assert filter_runs(runs, text="nothing like this") == []

    by_accuracy = sort_runs([run.with_changes(best_val_accuracy=accuracy) for run, accuracy
                             in zip(sort_runs(runs, "name"), (0.7, None, 0.9))], "best accuracy")
    assert [run.best_val_accuracy for run in by_accuracy] == [0.9, 0.7, None]
    assert [run.name for run in sort_runs(runs, "name")] == ["cats baseline", "dogs", "lr sweep"]
    with pytest.raises(ValueError, match="newest, oldest, best accuracy, name"):
        sort_runs(runs, "random")


def test_home_finds_runs_by_words_and_tag_and_saves_a_description(app_environment, tmp_path):
    from tests.conftest import open_page

    runs_dir = app_environment / "runs"
    first = new_run(runs_dir, owner=local_owner(), name="cats baseline")
    new_run(runs_dir, owner=local_owner(), name="dogs with augmentation")
    home = open_page("app_pages/home.py")
    assert not home.exception, home.exception
    assert len(home.dataframe[0].value) == 2
    home.text_input(key="runs_search").set_value("baseline").run()
    assert list(home.dataframe[0].value["Name"]) == ["cats baseline"]

    home.selectbox(key="manage_run").set_value(first.name).run()
    home.text_area(key=f"manage_description_{first.name}").set_value("frozen base, 5 epochs")
    home.text_input(key=f"manage_tags_{first.name}").set_value("Baseline, cats").run()
    home.button(key="save_details").click().run()
    assert not home.exception, home.exception
    assert read_status(first).tags == ("baseline", "cats")
    assert read_status(first).description == "frozen base, 5 epochs"
    home = open_page("app_pages/home.py")
    home.selectbox(key="runs_tag").set_value("cats").run()
    assert list(home.dataframe[0].value["Name"]) == ["cats baseline"]
    assert list(home.dataframe[0].value["Tags"]) == ["baseline, cats"]


def local_owner():
    from engine.users import local_user

    return local_user()
