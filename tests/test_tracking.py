import http.server
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import typing
import warnings
from pathlib import Path

import pytest
from fake_wandb import FakeRun, use_fake_run

from vitlab import tracking
from vitlab.errors import VitlabError, exit_code

KEY = "k" * 40
FORGE = "https://api.forge.coreweave.com"  # wandb 0.31's default server


@pytest.fixture
def wandb_env(monkeypatch, tmp_path) -> Path:
    """No W&B variable, no proxy, HOME (global settings, ~/.netrc) and the working folder in tmp_path: the
    settings of whoever runs the tests play no part. Returns HOME."""
    for var in [name for name in os.environ if name.startswith("WANDB_")]:
        monkeypatch.delenv(var)
    for var in ("NETRC", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.lower(), raising=False)
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    return home


def _login(url: str = FORGE) -> None:
    """Store a key in ~/.netrc the way `wandb login` does once the server accepted it."""
    from wandb.sdk.lib import wbauth

    wbauth.write_netrc_auth(host=wbauth.HostUrl(url).url, api_key=KEY)


def _write_settings(path: Path, **values: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[default]\n" + "".join(f"{key} = {value}\n" for key, value in values.items()))


@pytest.mark.parametrize(
    ("env", "netrc_url", "expected"),
    [
        ({"WANDB_MODE": "disabled"}, None, "disabled"),
        ({"WANDB_MODE": "online"}, None, "online"),
        ({}, None, "offline"),
        ({"WANDB_API_KEY": KEY}, None, "online"),
        ({}, "https://api.wandb.ai", "online"),
        ({}, FORGE, "online"),  # the machine `wandb login` writes for wandb 0.31's default server
        ({"WANDB_BASE_URL": "https://wandb.example.org"}, "https://wandb.example.org", "online"),
        ({"WANDB_BASE_URL": "https://wandb.example.org"}, FORGE, "offline"),
        ({"WANDB_MODE": "", "WANDB_API_KEY": KEY}, None, "online"),
        ({"WANDB_MODE": "Offline", "WANDB_API_KEY": KEY}, None, "offline"),
        ({"WANDB_MODE": " DISABLED "}, None, "disabled"),
        ({"WANDB_MODE": "dryrun"}, None, "offline"),
        ({"WANDB_MODE": "run"}, None, "online"),
        ({"WANDB_MODE": "shared"}, None, "shared"),
        ({"WANDB_DISABLED": "true", "WANDB_API_KEY": KEY}, None, "disabled"),
        ({"WANDB_DISABLED": "1"}, FORGE, "disabled"),
        ({"WANDB_DISABLED": "TRUE", "WANDB_MODE": "online"}, None, "disabled"),
        ({"WANDB_DISABLED": "false", "WANDB_API_KEY": KEY}, None, "online"),
    ],
)
def test_the_environment_and_the_login_decide_the_mode(monkeypatch, wandb_env, env, netrc_url, expected):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if netrc_url:
        _login(netrc_url)
    assert tracking.resolve_mode() == expected


def test_the_modes_accepted_are_wandbs():
    import wandb

    assert set(tracking.MODES) == set(typing.get_args(wandb.Settings.model_fields["mode"].annotation))


def _run_guarded(code: str, timeout: float = 60) -> dict:
    """Run ``code`` in a fresh interpreter with the environment and working folder of the test, every host
    lookup and connection beyond loopback refused and recorded for the whole life of the process, its exit
    included (a real W&B leaves threads and exit handlers behind). Returns what the code printed as JSON on
    its last line, with ``attempts`` added."""
    done = subprocess.run(
        [sys.executable, "-c", _GUARD + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ),
        cwd=Path.cwd(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    [attempts] = [json.loads(line.split(" ", 1)[1]) for line in lines if line.startswith("NETWORK-ATTEMPTS ")]
    results = [json.loads(line) for line in lines if line.startswith("{")]
    return (results[-1] if results else {}) | {"attempts": attempts}


_GUARD = """\
import atexit, ipaddress, json, socket

_attempts = []


def _loopback(host):
    if host in (None, "", "localhost"):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def _refuse(target):
    _attempts.append(repr(target))
    return OSError(101, f"refused to reach {target}")


def _guard_connect(connect):
    def guarded(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
            raise _refuse(address)
        return connect(sock, address)

    return guarded


def _guard_getaddrinfo(getaddrinfo):
    def guarded(host, *args, **kwargs):
        if not _loopback(host.decode() if isinstance(host, bytes) else host):
            raise _refuse(host)
        return getaddrinfo(host, *args, **kwargs)

    return guarded


socket.getaddrinfo = _guard_getaddrinfo(socket.getaddrinfo)
socket.socket.connect = _guard_connect(socket.socket.connect)
socket.socket.connect_ex = _guard_connect(socket.socket.connect_ex)
# Registered first, so run last: after the exit handlers W&B registers, which flush its telemetry.
atexit.register(lambda: print("NETWORK-ATTEMPTS " + json.dumps(_attempts), flush=True))
"""


@pytest.mark.parametrize(
    ("commands", "expected"),
    [(["offline"], "offline"), (["disabled"], "disabled"), (["offline", "online"], "online")],
)
def test_what_wandb_offline_and_disabled_write_is_honoured_over_a_login(
    monkeypatch, wandb_env, commands, expected
):
    _login()
    monkeypatch.setenv("WANDB_API_KEY", KEY)  # logged in both ways: a setting must still win
    for command in commands:  # the real W&B command line writes its settings file
        result = _run_guarded(
            f"from wandb.cli.cli import cli\ncli.main([{command!r}], standalone_mode=False)"
        )
        assert result["attempts"] == []
    assert tracking.resolve_mode() == expected


def test_wandb_offline_under_wandb_dir_is_honoured_there_only(monkeypatch, wandb_env, tmp_path):
    _login()
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    _write_settings(tmp_path / "elsewhere" / "wandb" / "settings", mode="offline")
    assert tracking.resolve_mode() == "offline"
    monkeypatch.delenv("WANDB_DIR")
    assert tracking.resolve_mode() == "online"


def test_the_workspace_settings_win_over_the_global_ones_and_the_environment_over_both(
    monkeypatch, wandb_env
):
    global_file = wandb_env / ".config" / "wandb" / "settings"
    _write_settings(global_file, mode="disabled")
    assert tracking.resolve_mode() == "disabled"
    _write_settings(Path("wandb") / "settings", mode="offline")
    assert tracking.resolve_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert tracking.resolve_mode() == "online"


def test_a_dot_wandb_folder_and_wandb_config_dir_are_where_wandb_looks(monkeypatch, wandb_env, tmp_path):
    _login()
    _write_settings(Path(".wandb") / "settings", mode="disabled")  # W&B uses ./.wandb when it exists
    assert tracking.resolve_mode() == "disabled"
    (Path(".wandb") / "settings").unlink()
    _write_settings(tmp_path / "config" / "settings", mode="offline")
    _write_settings(wandb_env / ".config" / "wandb" / "settings", mode="disabled")  # not read: overridden
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    assert tracking.resolve_mode() == "offline"


def test_a_login_to_the_server_named_in_the_global_settings_counts(wandb_env):
    _write_settings(wandb_env / ".config" / "wandb" / "settings", base_url="https://wandb.example.org")
    _login()  # to the default server: not this one
    assert tracking.resolve_mode() == "offline"
    _login("https://wandb.example.org")
    assert tracking.resolve_mode() == "online"


ALLOWED_MODES = ["online", "offline", "shared", "disabled", "dryrun", "run"]


@pytest.mark.parametrize(
    ("var", "value", "allowed"),
    [
        ("WANDB_MODE", "off", ALLOWED_MODES),
        ("WANDB_MODE", "sync", ALLOWED_MODES),
        ("WANDB_DISABLED", "maybe", ["true", "false", "1", "0"]),
    ],
)
def test_a_bad_value_is_an_error_naming_the_variable_the_value_and_the_allowed_ones(
    monkeypatch, wandb_env, var, value, allowed
):
    monkeypatch.setenv(var, value)
    with pytest.raises(VitlabError) as caught:
        tracking.resolve_mode()
    message = str(caught.value)
    assert f"{var} is {value!r}" in message and "\n" not in message
    assert all(f" {word}," in message or message.endswith(f" {word}") for word in allowed), message


def test_a_bad_mode_in_a_settings_file_names_the_file(wandb_env):
    _write_settings(Path("wandb") / "settings", mode="off")
    with pytest.raises(VitlabError) as caught:
        tracking.resolve_mode()
    path = Path.cwd() / "wandb" / "settings"
    assert str(caught.value).startswith(
        f"mode in {path} is 'off', not a W&B mode; use one of: online, offline"
    )


def test_a_bad_value_stops_the_stage_with_one_line(monkeypatch, wandb_env, capsys):
    monkeypatch.setenv("WANDB_MODE", "off")
    monkeypatch.delenv("VITLAB_DEBUG", raising=False)
    assert exit_code(lambda: tracking.Tracker({"a": 1})) == 2
    assert capsys.readouterr().err == (
        "error: WANDB_MODE is 'off', not a W&B mode; "
        "use one of: online, offline, shared, disabled, dryrun, run\n"
    )


def test_disabled_tracker_is_a_no_op(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracker = tracking.Tracker({"a": 1})
    assert tracker.run is None
    tracker.log({"loss": 1.0}, step=1)
    tracker.finish()


@pytest.fixture
def listening_port():
    """A loopback HTTP server that answers every request: a reachable W&B server (or proxy)."""

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def silent_port():
    """A loopback port that accepts connections and never answers: a server (or proxy) that hangs."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fake_init(monkeypatch, online_error: str | None = None, offline_error: str | None = None) -> list[str]:
    """Replace wandb.init; returns the modes it is called with."""
    import wandb

    modes = []

    def init(**kwargs):
        modes.append(kwargs["mode"])
        error = online_error if kwargs["mode"] == "online" else offline_error
        if error:
            raise RuntimeError(error)
        return f"{kwargs['mode']}-run"

    monkeypatch.setattr(wandb, "init", init)
    return modes


def _online(monkeypatch, server: str) -> None:
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    monkeypatch.setenv("WANDB_BASE_URL", server)


def test_an_unreachable_wandb_falls_back_to_offline_with_one_warning(monkeypatch, wandb_env, listening_port):
    _online(monkeypatch, f"http://127.0.0.1:{listening_port}")
    modes = _fake_init(monkeypatch, online_error="api key not configured (no-tty)\nmore details")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = tracking.Tracker({"a": 1})
    assert modes == ["online", "offline"]
    assert tracker.run == "offline-run"
    assert [str(w.message) for w in caught] == [
        "W&B: api key not configured (no-tty); logging offline instead (wandb sync uploads it later)"
    ]


def test_a_broken_wandb_gives_one_warning_and_training_goes_on(monkeypatch, wandb_env, listening_port):
    _online(monkeypatch, f"http://127.0.0.1:{listening_port}")
    broken = "cannot write ./wandb: read-only file system"
    _fake_init(monkeypatch, online_error=broken, offline_error=broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = tracking.Tracker({"a": 1})
    assert [str(w.message) for w in caught] == [
        "W&B: cannot write ./wandb: read-only file system; tracking is off for this run"
    ]
    assert tracker.run is None
    tracker.log({"loss": 1.0})


def test_a_reachable_server_is_used_online(monkeypatch, wandb_env, listening_port):
    _online(monkeypatch, f"http://127.0.0.1:{listening_port}")
    modes = _fake_init(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tracking.Tracker({"a": 1}).run == "online-run"
    assert modes == ["online"]


def test_a_closed_server_port_means_offline_at_once_without_trying_wandb_online(monkeypatch, wandb_env):
    port = _closed_port()
    _online(monkeypatch, f"http://127.0.0.1:{port}")
    modes = _fake_init(monkeypatch)
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = tracking.Tracker({"a": 1})
    assert time.monotonic() - start < 3
    assert modes == ["offline"] and tracker.run == "offline-run"
    [warning] = [str(w.message) for w in caught]
    assert warning.startswith(f"W&B: cannot reach the W&B server 127.0.0.1:{port} (")
    assert warning.endswith("; logging offline instead (wandb sync uploads it later)")


def test_a_server_that_never_answers_costs_the_probe_timeout_only(monkeypatch, wandb_env):
    """A lookup or a connection that hangs (no DNS answer, packets dropped) is given up after the timeout."""
    release = threading.Event()

    def hanging_connection(address, timeout=None, *args, **kwargs):
        release.wait(30)
        raise OSError("timed out")

    _online(monkeypatch, "https://wandb.example.org")
    monkeypatch.setattr(socket, "create_connection", hanging_connection)
    monkeypatch.setattr(tracking, "PROBE_TIMEOUT_S", 0.5)
    modes = _fake_init(monkeypatch)
    start = time.monotonic()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tracking.Tracker({"a": 1})
        assert time.monotonic() - start < 2
    finally:
        release.set()
    assert modes == ["offline"]
    assert [str(w.message) for w in caught] == [
        "W&B: cannot reach the W&B server wandb.example.org:443: no answer within 0.5 s; "
        "logging offline instead (wandb sync uploads it later)"
    ]


def test_a_server_that_accepts_but_never_answers_costs_the_probe_timeout_only(
    monkeypatch, wandb_env, silent_port
):
    _online(monkeypatch, f"http://127.0.0.1:{silent_port}")
    monkeypatch.setattr(tracking, "PROBE_TIMEOUT_S", 0.5)
    modes = _fake_init(monkeypatch)
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracking.Tracker({"a": 1})
    assert time.monotonic() - start < 2
    assert modes == ["offline"]  # wandb.init never waited out its own timeout against it
    [warning] = [str(w.message) for w in caught]
    assert warning.startswith(f"W&B: cannot reach the W&B server 127.0.0.1:{silent_port}")


def test_behind_a_proxy_the_probe_asks_the_proxy(monkeypatch, wandb_env, listening_port, network_attempts):
    _online(monkeypatch, "http://wandb.example.org")
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{listening_port}")
    modes = _fake_init(monkeypatch)
    assert tracking.Tracker({"a": 1}).run == "online-run"
    assert modes == ["online"] and network_attempts == []  # the server's name was never looked up


_REAL_RUN = """
import json, time, warnings
from vitlab import tracking

start = time.monotonic()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    tracker = tracking.Tracker({"lr": 0.1})
    seconds = time.monotonic() - start
    run = tracker.run is not None
    name = tracker.run.name if run else None
    tracker.log({"loss": 0.5}, step=1)
    tracker.finish()
messages = [str(w.message) for w in caught if str(w.message).startswith("W&B")]
print(json.dumps({"seconds": seconds, "run": run, "name": name, "warnings": messages}))
"""


@pytest.mark.parametrize("env", [{}, {"WANDB_MODE": "Offline"}, {"WANDB_API_KEY": KEY}])
def test_an_offline_run_is_written_locally_and_nothing_resolves_a_host(monkeypatch, wandb_env, env):
    """The real W&B, in a child process guarded for its whole life: W&B's telemetry exporters, started by a
    run that is offline in a process whose W&B settings say online, looked up its server 60 s later (in
    whatever test ran then) and at exit."""
    monkeypatch.setenv("DVC_EXP_NAME", "exp-test")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if "WANDB_API_KEY" in env:  # logged in, but `wandb offline` said so
        _write_settings(Path("wandb") / "settings", mode="offline")
    result = _run_guarded(_REAL_RUN)
    assert result["attempts"] == []
    assert result["name"] == "exp-test" and result["warnings"] == []
    assert list(Path("wandb").glob("offline-run-*"))


def test_an_unreachable_server_costs_seconds_not_a_minute(monkeypatch, wandb_env):
    """The real W&B retried a closed port for a minute (init_timeout=60) before vitlab fell back."""
    port = _closed_port()
    _online(monkeypatch, f"http://127.0.0.1:{port}")
    result = _run_guarded(_REAL_RUN, timeout=45)
    assert result["seconds"] < 2 + tracking.PROBE_TIMEOUT_S
    assert result["run"] and list(Path("wandb").glob("offline-run-*"))
    [warning] = result["warnings"]
    assert f"cannot reach the W&B server 127.0.0.1:{port}" in warning and "logging offline instead" in warning
    assert result["attempts"] == []


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


def test_a_temporary_experiments_runs_go_to_the_projects_wandb_folder(monkeypatch, wandb_env):
    """`dvc exp run --temp` and `dvc queue` run stages in .dvc/tmp/exps/... copies that DVC deletes: the
    offline runs were written there and lost: the repository's wandb/ holds them, settings included."""
    import wandb

    root = Path.cwd()
    _write_settings(root / "wandb" / "settings", mode="offline")  # `wandb offline`, run in the project
    copy = root / ".dvc" / "tmp" / "exps" / "tmpabc123"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("WANDB_API_KEY", KEY)  # logged in: only the project's settings say offline
    calls = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.append(kwargs) or "run")
    assert tracking.resolve_mode() == "offline"
    tracking.Tracker({"a": 1})
    assert [Path(kwargs["dir"]) for kwargs in calls] == [root]
    monkeypatch.setenv("WANDB_DIR", str(wandb_env))  # the user's own choice wins
    assert tracking.project_dir() == wandb_env


_EXPERIMENT_STAGE = """
from vitlab.tracking import Tracker
with Tracker({"lr": 0.1}) as tracker:
    tracker.log({"loss": 1.0}, step=1)
open("out.txt", "w").write("done")
"""


@pytest.mark.slow
def test_an_offline_run_of_a_temporary_dvc_experiment_survives_it(wandb_env, tmp_path):
    """The real DVC and W&B: `dvc exp run --temp` deletes its copy, the run stays in the project's wandb/."""
    root = tmp_path / "repo"
    root.mkdir()
    (root / "stage.py").write_text(_EXPERIMENT_STAGE)
    (root / "params.yaml").write_text("lr: 0.1\n")
    (root / "dvc.yaml").write_text(
        "stages:\n  s:\n    cmd: python stage.py\n    deps: [stage.py]\n    params: [lr]\n"
        "    outs: [{out.txt: {cache: false}}]\n"
    )
    (root / ".gitignore").write_text("wandb/\n")
    env = dict(os.environ, WANDB_MODE="offline", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    for command in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "tests@vitlab.invalid"],  # dvc exp run commits the experiment
        ["git", "config", "user.name", "vitlab tests"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        ["git", "add", "."],
        ["git", "commit", "-q", "-m", "a pipeline with one tracked stage"],
    ):
        subprocess.run(command, cwd=root, env=env, check=True, capture_output=True)
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", "e1", "-S", "lr=0.2"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    [run] = (root / "wandb").glob("offline-run-*")
    assert f"W&B: offline run saved in {run} (upload it with: wandb sync {run})" in done.stdout
    assert not list((root / ".dvc" / "tmp" / "exps").glob("*/wandb"))  # nothing left in a copy
