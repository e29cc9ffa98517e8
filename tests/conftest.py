import errno
import ipaddress
import socket
import subprocess
from pathlib import Path

import pytest
from pipeline_fixtures import REPO, clone_and_repro

from vitlab.cpu import prepare_process

prepare_process()  # before any test imports torch, as every vitlab entry point: OpenMP's wait policy


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` skip on a machine without a CUDA device (CI's, the developers')."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (benchmarks/gpu_check.sh runs it on a GPU machine)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_tracking_or_telemetry(monkeypatch):
    """Tests never talk to W&B or DVC's analytics; a test that checks tracking modes sets its own."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")


def _is_loopback(host: str | None) -> bool:
    if host in (None, "", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:  # a host name: resolving it is already network traffic
        return False


@pytest.fixture(autouse=True)
def network_attempts(monkeypatch):
    """Tests run offline: reaching beyond loopback fails at once, and fails the test even when the code under
    test swallows the error (a background thread, a retry loop). In-process only: subprocesses are unguarded.
    """
    attempts: list[object] = []

    def refuse(target: object) -> OSError:
        attempts.append(target)
        return OSError(errno.ENETUNREACH, f"tests run offline: refused to reach {target}")

    def guard(connect):
        def guarded(sock: socket.socket, address):
            is_ip = sock.family in (socket.AF_INET, socket.AF_INET6)
            if is_ip and not _is_loopback(address[0]):
                raise refuse(address)
            return connect(sock, address)

        return guarded

    getaddrinfo = socket.getaddrinfo

    def guarded_getaddrinfo(host, *args, **kwargs):
        if not _is_loopback(host if isinstance(host, str | None) else host.decode()):
            raise refuse(host)
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guard(socket.socket.connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guard(socket.socket.connect_ex))
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    yield attempts
    assert not attempts, f"the test tried to reach the network: {attempts}"


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """(root, env): one `dvc repro` of the committed pipeline in a temporary clone, shared by every end-to-end
    test of the session (tests/pipeline_fixtures.py); ``env`` runs the clone's own code. Its tests are all in
    tests/test_pipeline.py: pytest-xdist (--dist loadscope) runs a module on one worker, so one repro."""
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True).returncode:
        pytest.skip("the repository has no commit to clone")
    return clone_and_repro(tmp_path_factory.mktemp("e2e"))
