"""Weights & Biases tracking that never needs an account, never hangs and never stops training.

Mode, decided the way W&B documents it; the first source that says something wins:

1. the environment: ``WANDB_DISABLED=true`` (or ``1``) turns tracking off; else ``WANDB_MODE`` (any case, one
   of W&B's modes);
2. ``mode`` in the settings files that ``wandb offline`` / ``wandb disabled`` / ``wandb online`` /
   ``wandb enabled`` write: the workspace file ``wandb/settings`` under the project's folder
   (``project_dir``), then the global one (``$WANDB_CONFIG_DIR/settings``, default
   ``~/.config/wandb/settings``);
3. ``online`` when logged in (``WANDB_API_KEY``, a netrc entry for the W&B server, as ``wandb login``
   writes), else ``offline``: runs are written under the project's ``wandb/`` and can be uploaded later with
   ``wandb sync``.

The project's folder is ``WANDB_DIR`` when set, else the repository (``vitlab.files.project_root``).
``dvc exp run --temp``, ``vitlab compare --run`` and ``dvc queue`` run a stage in a copy of the repository
under ``.dvc/tmp/exps/`` that DVC deletes when the experiment ends; the runs go to the repository's own
``wandb/``, so an offline run survives its experiment (and the one line the run prints says where it is).

A value W&B would not accept stops the stage with a VitlabError naming where it came from. Online, the server
must answer a TCP connection within a few seconds or the run is logged offline with one warning; any other W&B
failure is one warning too and training goes on, untracked if even offline fails. Offline and disabled runs
reach no network at all.

Each stage that logs (train, evaluate, attention) is its own run, told apart by ``job_type``; inside
``dvc exp run`` all of an experiment's runs share its name as their W&B group.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import threading
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from vitlab.errors import VitlabError, one_line
from vitlab.files import project_root

MODES = ("online", "offline", "shared", "disabled", "dryrun", "run")
"""The values W&B accepts for its mode (wandb 0.31's ``Settings.mode``); vitlab reads them in any case."""

# W&B's legacy spellings, read as the mode they stand for.
_SYNONYMS = {"dryrun": "offline", "run": "online"}
# The modes in which W&B talks to its server.
_NETWORK_MODES = ("online", "shared")
# The truth values of W&B's ``strtobool``, which it uses for its boolean environment variables.
_TRUE = ("y", "yes", "t", "true", "on", "1")
_FALSE = ("n", "no", "f", "false", "off", "0")

PROBE_TIMEOUT_S = 3.0
"""How long an online run waits for the W&B server to accept a connection before logging offline."""

INIT_TIMEOUT_S = 15
"""How long ``wandb.init`` may take once the server answered (W&B's default is 90 s)."""


def resolve_mode() -> str:
    """The W&B mode for the next run: ``online``, ``offline``, ``shared`` or ``disabled``.

    From, in this order: ``WANDB_DISABLED``, ``WANDB_MODE``, the ``mode`` of the workspace then the global W&B
    settings file, and last the login state (online when an API key is configured, else offline). Reads
    files only; never the network.

    Raises:
        VitlabError: ``WANDB_MODE``, ``WANDB_DISABLED`` or a settings file's ``mode`` holds a value W&B does
            not accept; the message names the variable or file, the value and the values allowed.
    """
    if _truth("WANDB_DISABLED"):
        return "disabled"
    if os.environ.get("WANDB_MODE", "").strip():
        return _parse_mode(os.environ["WANDB_MODE"], "WANDB_MODE")
    files = _settings_files()
    for path, values in files:
        if values.get("mode", "").strip():
            return _parse_mode(values["mode"], f"mode in {path}")
    return "online" if _logged_in(files) else "offline"


def _truth(name: str) -> bool | None:
    """The environment variable ``name`` read as W&B reads its switches; None when unset or empty."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    raise VitlabError(f"{name} is {value!r}, not true or false; use one of: {', '.join(_TRUE + _FALSE)}")


def _parse_mode(value: str, source: str) -> str:
    mode = value.strip().lower()
    if mode not in MODES:
        raise VitlabError(f"{source} is {value!r}, not a W&B mode; use one of: {', '.join(MODES)}")
    return _SYNONYMS.get(mode, mode)


def _settings_files() -> list[tuple[Path, dict[str, str]]]:
    """The settings files W&B reads, each with its values: the workspace file first, as it overrides the
    global one. Their places come from W&B's public ``wandb.Settings`` (the workspace file under ``root_dir``,
    in ./.wandb when it exists); their format is the INI file ``wandb offline`` writes, whose ``[default]``
    section W&B reads."""
    import wandb

    # What wandb takes from WANDB_DIR (here: project_dir) and WANDB_USE_DOT_WANDB to place the workspace file.
    settings = wandb.Settings(use_dot_wandb=_truth("WANDB_USE_DOT_WANDB"))
    settings.root_dir = str(project_dir())
    # The global file: $WANDB_CONFIG_DIR/settings, else ~/.config/wandb/settings (W&B's environment docs).
    config_dir = os.environ.get("WANDB_CONFIG_DIR")
    global_file = Path(config_dir or "~/.config/wandb").expanduser() / "settings"
    return [(path, _read_settings(path)) for path in (Path(settings.settings_workspace), global_file)]


def _read_settings(path: Path) -> dict[str, str]:
    """The ``[default]`` values of the settings file at ``path``; none where it is missing or unreadable (W&B
    ignores such a file too, with a warning)."""
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
    except (OSError, configparser.Error):
        return {}
    return dict(parser["default"]) if parser.has_section("default") else {}


def project_dir() -> Path:
    """The folder whose ``wandb/`` holds the runs and the workspace settings: ``WANDB_DIR`` when set, else
    ``vitlab.files.project_root()``: the repository, also when DVC runs the stage in a temporary copy that
    it deletes after the experiment."""
    return Path(os.environ["WANDB_DIR"]).absolute() if os.environ.get("WANDB_DIR") else project_root()


def _server_url(files: list[tuple[Path, dict[str, str]]] | None = None) -> str:
    import wandb

    if os.environ.get("WANDB_BASE_URL"):
        return os.environ["WANDB_BASE_URL"]
    for _, values in files if files is not None else _settings_files():
        if values.get("base_url"):
            return values["base_url"]
    return wandb.Settings().base_url  # W&B's default server


def _logged_in(files: list[tuple[Path, dict[str, str]]]) -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    if any(values.get("api_key") for _, values in files):
        return True
    # W&B's own netrc reader, the one call outside its public API: no public call tells whether a key is
    # stored without asking for one (wandb.login and wandb.Api prompt on a terminal), and only W&B knows
    # which netrc machine `wandb login` writes for its server (api.forge.coreweave.com for wandb 0.31's
    # default) and the older one it still accepts (api.wandb.ai). tests/test_tracking.py fails if it moves.
    from wandb.sdk.lib.wbauth import read_netrc_auth

    try:
        return read_netrc_auth(host=_server_url(files)) is not None
    except Exception:  # a malformed key or server address: W&B could not log in with it either
        return False


def _check_reachable(url: str, timeout: float | None = None) -> None:
    """Raise ConnectionError unless the W&B server at ``url`` (through the environment's proxy, if any)
    answers an HTTP request within ``timeout`` seconds (PROBE_TIMEOUT_S), the name lookup included. Any HTTP
    status counts as an answer; a server (or proxy) that accepts the connection and stays silent does not."""
    timeout = PROBE_TIMEOUT_S if timeout is None else timeout
    parts = urlsplit(url)
    host = parts.hostname or ""
    proxy = urllib.request.getproxies_environment().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass_environment(host):
        parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host = parts.hostname or ""
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        port = 0
    outcome: list[OSError | None] = []

    def connect() -> None:
        try:
            # A fresh opener: urlopen's global one keeps the proxies of the environment it first saw.
            opener = urllib.request.build_opener()
            opener.open(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            outcome.append(None)
        except urllib.error.HTTPError:  # the server answered, if only to refuse a bare HEAD
            outcome.append(None)
        except (OSError, ValueError) as error:  # URLError and timeouts are OSErrors
            outcome.append(error)

    # A thread, because a name lookup has no timeout of its own: the caller waits `timeout`, never longer.
    probe = threading.Thread(target=connect, name="vitlab-wandb-probe", daemon=True)
    probe.start()
    probe.join(timeout)
    if not outcome:
        raise ConnectionError(f"cannot reach the W&B server {host}:{port}: no answer within {timeout:g} s")
    if outcome[0] is not None:
        raise ConnectionError(f"cannot reach the W&B server {host}:{port} ({outcome[0]})")


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _switch_off_wandb_telemetry() -> None:
    """W&B decides its usage telemetry from its process-wide settings, not from the run's mode: an offline run
    in a process whose W&B settings say online (the default) starts OpenTelemetry exporters that post to the
    server 60 s later and at exit. Its switch is process-wide and one-way."""
    try:
        from wandb.analytics.opentelemetry import opentelemetry_proxy
    except ImportError:  # a wandb without it has no such telemetry
        return
    opentelemetry_proxy.disable()


class Tracker:
    """A thin wrapper over one W&B run; every method is a no-op once tracking is off or has failed. As a
    context manager it finishes the run on the way out, also on an error.

    Raises:
        VitlabError: from ``resolve_mode`` (a W&B setting vitlab cannot honour); W&B's own failures are
            warnings.
    """

    def __init__(self, config: dict[str, Any], job_type: str = "train"):
        self.run = None
        mode = resolve_mode()
        if mode == "disabled":
            return
        server = _server_url() if mode in _NETWORK_MODES else ""
        try:
            if server:
                _check_reachable(server)  # else W&B retries for a minute before giving up
            self.run = self._init(mode, config, job_type)
        except Exception as error:  # W&B must never take training down with it
            if mode not in _NETWORK_MODES:
                self._warn(error)
                return
            # Online but unreachable or misconfigured (bad key, no network): keep the run, locally.
            try:
                self.run = self._init("offline", config, job_type)
                self._warn(error, "logging offline instead (wandb sync uploads it later)")
            except Exception as offline_error:
                self._warn(offline_error)

    @staticmethod
    def _init(mode: str, config: dict[str, Any], job_type: str) -> Any:
        import wandb

        # W&B reads WANDB_MODE itself, and rejects what vitlab accepts (any case, WANDB_DISABLED): it is given
        # the mode decided here, for the duration of the call.
        environ = {"WANDB_MODE": mode}
        if mode not in _NETWORK_MODES:
            _switch_off_wandb_telemetry()
            # Read when W&B starts its service process (--no-observability) and its telemetry recorders.
            environ["WANDB_ERROR_REPORTING"] = "false"
        with _environ(environ):
            return wandb.init(
                project=os.environ.get("WANDB_PROJECT", "vitlab"),
                name=os.environ.get("DVC_EXP_NAME") or None,
                group=os.environ.get("DVC_EXP_NAME") or None,
                job_type=job_type,
                config=config,
                mode=mode,
                dir=str(project_dir()),
                settings=wandb.Settings(
                    silent=True, init_timeout=INIT_TIMEOUT_S, console="off", x_disable_stats=True
                ),
            )

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Log scalar metrics at ``step``; a W&B failure is one warning and turns tracking off."""
        self._call(lambda: self.run.log(metrics, step=step))

    def log_images(self, images: dict[str, str | Path], step: int | None = None) -> None:
        """Log picture files as media: a PNG as an image, a GIF as a video (an image would keep one frame)."""

        def _log() -> None:
            import wandb

            media = {
                key: wandb.Video(str(path), format="gif")
                if Path(path).suffix.lower() == ".gif"
                else wandb.Image(str(path))
                for key, path in images.items()
            }
            self.run.log(media, step=step)

        self._call(_log)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        """Log a W&B table; a cell holding an (H, W, 3) uint8 array is logged as an image."""

        def _log() -> None:
            import numpy as np
            import wandb

            def cell(value: Any) -> Any:
                is_image = isinstance(value, np.ndarray) and value.ndim == 3
                return wandb.Image(value) if is_image else value

            table = wandb.Table(columns=columns, data=[[cell(v) for v in row] for row in rows])
            self.run.log({key: table})

        self._call(_log)

    def summary(self, metrics: dict[str, Any]) -> None:
        """Set the run's final metrics; a W&B failure is one warning and turns tracking off."""
        self._call(lambda: self.run.summary.update(metrics))

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.finish()

    def finish(self) -> None:
        """End the run; no-op when tracking is off. An offline run stays under the project's ``wandb/`` for
        ``wandb sync``; one written from outside the working folder (a temporary experiment's copy) is named
        in one line, as nothing in the workspace shows it."""
        run = self.run
        # Read before finishing: W&B's run is not to be asked anything after finish().
        offline = run is not None and getattr(run, "offline", False)
        folder = Path(getattr(run, "dir", "") or ".").parent  # run.dir: wandb/offline-run-ID/files
        self._call(run.finish if run else lambda: None)
        finished, self.run = self.run is not None, None  # _call drops a run whose finish failed
        if finished and offline and not folder.absolute().is_relative_to(Path.cwd()):
            print(f"W&B: offline run saved in {folder} (upload it with: wandb sync {folder})")

    def _call(self, action) -> None:
        if self.run is None:
            return
        try:
            action()
        except Exception as error:
            self._warn(error)
            self.run = None

    @staticmethod
    def _warn(error: Exception, outcome: str = "tracking is off for this run") -> None:
        warnings.warn(f"W&B: {one_line(error)}; {outcome}", RuntimeWarning, stacklevel=3)
