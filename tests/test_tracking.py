import warnings

import pytest

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
