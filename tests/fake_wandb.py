"""A stand-in W&B run that records what it is given (tests run with WANDB_MODE=disabled: nothing logs)."""

from __future__ import annotations

from typing import Any

import pytest

from vitlab import tracking


class FakeRun:
    def __init__(self):
        self.logged: list[tuple[dict[str, Any], int | None]] = []
        self.summary: dict[str, Any] = {}
        self.job_types: list[str] = []
        self.finished = 0

    def log(self, data: dict[str, Any], step: int | None = None) -> None:
        self.logged.append((data, step))

    def finish(self) -> None:
        self.finished += 1

    def media(self) -> dict[str, Any]:
        """Every key logged, merged (later calls win)."""
        merged: dict[str, Any] = {}
        for data, _ in self.logged:
            merged |= data
        return merged


def use_fake_run(monkeypatch: pytest.MonkeyPatch) -> FakeRun:
    """Make every Tracker log into one FakeRun (as if W&B ran offline)."""
    run = FakeRun()

    def init(mode: str, config: dict[str, Any], job_type: str) -> FakeRun:
        run.job_types.append(job_type)
        return run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(tracking.Tracker, "_init", staticmethod(init))
    return run
