"""The default pipeline reaches no network: the embedded sample is read from the repository, nothing else.

The ``network_attempts`` fixture (conftest.py) guards every test this way; this test checks the stages a new
user runs first, and that the guard does see a connection attempt.
"""

import socket
import urllib.request
from pathlib import Path

import pytest

from vitlab.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_the_default_download_and_validate_stages_reach_no_network(tmp_path, monkeypatch, network_attempts):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    assert main(["stage", "download"]) == 0
    assert main(["stage", "validate"]) == 0
    assert network_attempts == []

    # The guard sees both ways out: a connection, and a name lookup before one.
    with pytest.raises(OSError, match="tests run offline"), socket.socket() as sock:
        sock.connect(("192.0.2.1", 80))  # TEST-NET-1: documentation only, never routed
    with pytest.raises(OSError, match="tests run offline"):
        urllib.request.urlopen("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", timeout=1)
    assert network_attempts == [("192.0.2.1", 80), "www.cs.toronto.edu"]
    network_attempts.clear()
