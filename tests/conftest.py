import pytest


@pytest.fixture(autouse=True)
def _no_tracking_or_telemetry(monkeypatch):
    """Tests never talk to W&B or DVC's analytics; a test that checks tracking modes sets its own."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
