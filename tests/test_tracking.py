import warnings

import pytest
from fake_wandb import FakeRun, use_fake_run

from vitlab import tracking


@pytest.mark.parametrize(
    ("env", "netrc_text", "expected"),
    [
        ({"WANDB_MODE": "disabled"}, None, "disabled"),
        ({"WANDB_MODE": "online"}, None, "online"),
        ({}, None, "offline"),
        ({"WANDB_API_KEY": "x" * 40}, None, "online"),
        ({}, "machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n", "online"),
    ],
)
def test_mode_is_offline_unless_the_user_logged_in_or_chose(monkeypatch, tmp_path, env, netrc_text, expected):
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    netrc = tmp_path / "netrc"
    if netrc_text:
        netrc.write_text(netrc_text)
        netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert tracking.resolve_mode() == expected


def test_disabled_tracker_is_a_no_op(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracker = tracking.Tracker({"a": 1})
    assert tracker.run is None
    tracker.log({"loss": 1.0}, step=1)
    tracker.finish()


def test_an_unreachable_wandb_falls_back_to_offline_with_one_warning(monkeypatch):
    import wandb

    modes = []

    def init(**kwargs):
        modes.append(kwargs["mode"])
        if kwargs["mode"] == "online":
            raise RuntimeError("api key not configured (no-tty)\nmore details")
        return "offline-run"

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr(wandb, "init", init)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = tracking.Tracker({"a": 1})
    assert modes == ["online", "offline"]
    assert tracker.run == "offline-run"
    assert [str(w.message) for w in caught] == [
        "W&B: api key not configured (no-tty); logging offline instead (wandb sync uploads it later)"
    ]


def test_a_broken_wandb_gives_one_warning_and_training_goes_on(monkeypatch):
    import wandb

    def broken_init(**kwargs):
        raise RuntimeError("cannot write ./wandb: read-only file system")

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr(wandb, "init", broken_init)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = tracking.Tracker({"a": 1})
    assert [str(w.message) for w in caught] == [
        "W&B: cannot write ./wandb: read-only file system; tracking is off for this run"
    ]
    assert tracker.run is None
    tracker.log({"loss": 1.0})


def test_offline_run_writes_locally_without_network(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("DVC_EXP_NAME", "exp-test")
    tracker = tracking.Tracker({"lr": 0.1})
    assert tracker.run is not None
    assert tracker.run.name == "exp-test"
    tracker.log({"loss": 0.5}, step=1)
    tracker.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


@pytest.fixture
def fake_run(monkeypatch) -> FakeRun:
    return use_fake_run(monkeypatch)


def test_pictures_are_logged_as_images_and_the_gif_as_a_video(fake_run, tmp_path):
    import numpy as np
    import wandb
    from PIL import Image

    frames = [Image.new("RGB", (8, 8), (60 * i, 0, 0)) for i in range(3)]
    frames[0].save(tmp_path / "curves.gif", save_all=True, append_images=frames[1:], duration=100)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "curves.png")
    tracker = tracking.Tracker({"a": 1})
    tracker.log_images({"still": tmp_path / "curves.png", "progress": tmp_path / "curves.gif"}, step=3)
    [(media, step)] = fake_run.logged
    assert step == 3
    assert type(media["still"]) is wandb.Image
    assert type(media["progress"]) is wandb.Video


def test_a_table_logs_array_cells_as_images(fake_run):
    import numpy as np
    import wandb

    tracker = tracking.Tracker({"a": 1})
    image = np.full((32, 32, 3), 200, np.uint8)
    tracker.log_table("predictions", ["image", "label", "correct"], [[image, "cat", 1], [image, "dog", 0]])
    [(logged, _)] = fake_run.logged
    table = logged["predictions"]
    assert isinstance(table, wandb.Table)
    assert table.columns == ["image", "label", "correct"]
    assert [row[1:] for row in table.data] == [["cat", 1], ["dog", 0]]
    assert all(isinstance(row[0], wandb.Image) for row in table.data)


def test_a_failing_media_call_warns_once_and_stops_tracking(fake_run, tmp_path):
    tracker = tracking.Tracker({"a": 1})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker.log_images({"missing": tmp_path / "nope.png"})
    assert len(caught) == 1 and str(caught[0].message).startswith("W&B: ")
    assert tracker.run is None and fake_run.logged == []


def test_stage_runs_of_an_experiment_share_its_name_as_their_group(monkeypatch):
    import wandb

    calls = []
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("DVC_EXP_NAME", "study-p4")
    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.append(kwargs) or "run")
    tracking.Tracker({"a": 1}, job_type="evaluate")
    [kwargs] = calls
    assert (kwargs["name"], kwargs["group"], kwargs["job_type"]) == ("study-p4", "study-p4", "evaluate")
