"""Weights & Biases tracking that never needs an account, never hangs and never stops training.

Mode: the user's ``WANDB_MODE`` when set; otherwise ``online`` if an API key is configured (``WANDB_API_KEY``
or a ``wandb login``), else ``offline`` (runs are written under ./wandb and can be synced later with
``wandb sync``). Any W&B failure becomes one warning and training goes on untracked.

Each stage that logs (train, evaluate, attention) is its own run, told apart by ``job_type``; inside
``dvc exp run`` all of an experiment's runs share its name as their W&B group.
"""

from __future__ import annotations

import netrc
import os
import warnings
from pathlib import Path
from typing import Any


def resolve_mode() -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY") or _netrc_has_wandb_key():
        return "online"
    return "offline"


def _netrc_has_wandb_key() -> bool:
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.netrc(path).authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class Tracker:
    """A thin wrapper over one W&B run; every method is a no-op once tracking is off or has failed."""

    def __init__(self, config: dict[str, Any], job_type: str = "train"):
        self.run = None
        mode = resolve_mode()
        if mode == "disabled":
            return
        try:
            self.run = self._init(mode, config, job_type)
        except Exception as error:  # W&B must never take training down with it
            if mode == "offline":
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

        return wandb.init(
            project=os.environ.get("WANDB_PROJECT", "vitlab"),
            name=os.environ.get("DVC_EXP_NAME") or None,
            group=os.environ.get("DVC_EXP_NAME") or None,
            job_type=job_type,
            config=config,
            mode=mode,
            settings=wandb.Settings(silent=True, init_timeout=60, console="off", x_disable_stats=True),
        )

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
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
        self._call(lambda: self.run.summary.update(metrics))

    def finish(self) -> None:
        self._call(self.run.finish if self.run else lambda: None)
        self.run = None

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
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(f"W&B: {message}; {outcome}", RuntimeWarning, stacklevel=3)
