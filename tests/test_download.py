import hashlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vitlab.data import download
from vitlab.data.download import fetch, md5sum, source_name
from vitlab.errors import VitlabError

PAYLOAD = bytes(range(256)) * 1200  # 300 KiB: several reads, so a connection can drop mid-file
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()


class _FileServer(ThreadingHTTPServer):
    """Serves PAYLOAD at /file.tar.gz; logs each request's headers; can ignore Range, drop connections, or
    send slowly (``throttle`` seconds after each 16 KiB)."""

    def __init__(self, ranges: bool, drops: int, drop_after: int, throttle: float) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.ranges, self.drops, self.drop_after, self.throttle = ranges, drops, drop_after, throttle
        self.requests: list[dict[str, str]] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}/file.tar.gz"


class _Handler(BaseHTTPRequestHandler):
    server: _FileServer

    def do_GET(self) -> None:
        server = self.server
        server.requests.append(dict(self.headers))
        if self.path != "/file.tar.gz":
            self.send_error(404)
            return
        start = 0
        requested = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if requested and server.ranges:
            start = int(requested[1])
            if start >= len(PAYLOAD):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.drops:
            server.drops -= 1
            body = body[: server.drop_after]
            self.close_connection = True  # after a short body: the client sees the connection drop
        piece = 16384 if server.throttle else max(len(body), 1)
        try:
            for start in range(0, len(body), piece):
                self.wfile.write(body[start : start + piece])
                time.sleep(server.throttle)
        except (BrokenPipeError, ConnectionResetError):  # the client was killed
            pass

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def serve():
    servers = []

    def start(
        ranges: bool = True, drops: int = 0, drop_after: int = 100_000, throttle: float = 0.0
    ) -> _FileServer:
        server = _FileServer(ranges, drops, drop_after, throttle)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _ranges(server: _FileServer) -> list[str | None]:
    return [headers.get("Range") for headers in server.requests]


def test_md5sum_streams_the_whole_file(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(PAYLOAD * 5)  # larger than one read chunk
    assert md5sum(path) == hashlib.md5(PAYLOAD * 5).hexdigest()


def test_source_name_is_the_last_path_segment():
    assert source_name("https://host/a/cifar-10-python.tar.gz?x=1") == "cifar-10-python.tar.gz"
    assert source_name("file:///data/my%20mirror.tar.gz") == "my mirror.tar.gz"
    assert source_name("relative/dir/sample.tgz") == "sample.tgz"
    assert source_name("https://host/") == ""


def test_fetch_over_http_writes_the_verified_file_and_no_part(tmp_path, serve):
    server = serve()
    dest = tmp_path / "raw" / "a.tar.gz"
    assert fetch(server.url, dest, PAYLOAD_MD5, progress=False) == dest
    assert dest.read_bytes() == PAYLOAD
    assert [p.name for p in dest.parent.iterdir()] == ["a.tar.gz"]
    assert _ranges(server) == [None]


@pytest.mark.parametrize("as_url", [False, True], ids=["path", "file-url"])
def test_fetch_copies_a_local_file_without_a_progress_bar_when_not_a_tty(tmp_path, capsys, as_url):
    source = tmp_path / "mirror.tar.gz"
    source.write_bytes(PAYLOAD)
    dest = tmp_path / "raw" / "a.tar.gz"
    fetch(source.as_uri() if as_url else str(source), dest, PAYLOAD_MD5.upper())
    assert dest.read_bytes() == PAYLOAD
    assert capsys.readouterr().err == ""  # stderr is captured, not a TTY: no bar even with progress=True


def test_a_cached_file_is_not_fetched_again(tmp_path, serve):
    server = serve()
    dest = tmp_path / "a.tar.gz"
    fetch(server.url, dest, PAYLOAD_MD5, progress=False)
    mtime = dest.stat().st_mtime_ns
    fetch(server.url, dest, PAYLOAD_MD5, progress=False)
    assert len(server.requests) == 1
    assert dest.stat().st_mtime_ns == mtime


def test_a_cached_file_with_the_wrong_md5_is_fetched_again(tmp_path, serve):
    server = serve()
    dest = tmp_path / "a.tar.gz"
    dest.write_bytes(PAYLOAD[:-1] + b"X")  # same size, one byte differs
    fetch(server.url, dest, PAYLOAD_MD5, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert len(server.requests) == 1


def test_md5_mismatch_deletes_the_download_and_names_source_and_both_md5s(tmp_path, serve):
    server = serve()
    dest = tmp_path / "a.tar.gz"
    wrong = "0" * 32
    with pytest.raises(VitlabError) as caught:
        fetch(server.url, dest, wrong, progress=False)
    message = str(caught.value)
    assert server.url in message and wrong in message and PAYLOAD_MD5 in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_a_dropped_connection_is_resumed_with_a_range_request(tmp_path, serve):
    server = serve(drops=1, drop_after=100_000)
    dest = tmp_path / "a.tar.gz"
    fetch(server.url, dest, PAYLOAD_MD5, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert _ranges(server) == [None, "bytes=100000-"]


def test_an_interrupted_download_keeps_its_part_and_the_next_run_resumes_it(tmp_path, serve, monkeypatch):
    monkeypatch.setattr(download, "_ATTEMPTS", 2)
    server = serve(drops=2, drop_after=50_000)
    dest = tmp_path / "a.tar.gz"
    with pytest.raises(VitlabError, match=r"interrupted after 100000 bytes .*run again to resume"):
        fetch(server.url, dest, PAYLOAD_MD5, progress=False)
    part = tmp_path / "a.tar.gz.part"
    assert part.read_bytes() == PAYLOAD[:100_000]
    assert not dest.exists()

    fetch(server.url, dest, PAYLOAD_MD5, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert not part.exists()
    assert _ranges(server) == [None, "bytes=50000-", "bytes=100000-"]


def test_a_server_that_ignores_range_gets_a_full_download(tmp_path, serve):
    server = serve(ranges=False)
    dest = tmp_path / "a.tar.gz"
    (tmp_path / "a.tar.gz.part").write_bytes(b"stale bytes of another file")
    fetch(server.url, dest, PAYLOAD_MD5, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert _ranges(server) == ["bytes=27-"]


def test_a_part_longer_than_the_file_starts_over(tmp_path, serve):
    server = serve()
    dest = tmp_path / "a.tar.gz"
    (tmp_path / "a.tar.gz.part").write_bytes(PAYLOAD + b"extra")
    fetch(server.url, dest, PAYLOAD_MD5, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert _ranges(server) == [f"bytes={len(PAYLOAD) + 5}-", None]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{url}/missing.tar.gz", r"HTTP error 404"),
        ("http://127.0.0.1:{port}/a.tar.gz", r"cannot connect"),
        ("{tmp}/no-such.tar.gz", r"no-such.tar.gz: no such file"),
        ("file://{tmp}/no-such.tar.gz", r"no-such.tar.gz: no such file"),
        ("ftp://example.org/a.tar.gz", r"unsupported URL scheme 'ftp'"),
    ],
    ids=["404", "refused", "missing-path", "missing-file-url", "ftp"],
)
def test_unreadable_sources_raise_a_one_line_error_and_write_nothing(tmp_path, serve, source, message):
    source = source.format(url=serve().url.rsplit("/", 1)[0], port=_closed_port(), tmp=tmp_path)
    raw = tmp_path / "raw"
    with pytest.raises(VitlabError, match=message) as caught:
        fetch(source, raw / "a.tar.gz", PAYLOAD_MD5, progress=False)
    assert "\n" not in str(caught.value)
    assert not raw.exists() or list(raw.iterdir()) == []


# fetch in a process of its own, reading 16 KiB at a time so the .part grows while the server trickles.
FETCH = """
import sys
from vitlab.data import download
download._CHUNK = 16384
download.fetch(*sys.argv[1:], progress=False)
"""


def test_a_download_killed_mid_file_leaves_only_its_part_and_the_next_run_resumes_it(tmp_path, serve):
    server = serve(throttle=0.05)  # about 1 s for the whole file
    dest, part = tmp_path / "a.tar.gz", tmp_path / "a.tar.gz.part"
    child = subprocess.Popen([sys.executable, "-c", FETCH, server.url, str(dest), PAYLOAD_MD5])
    deadline = time.monotonic() + 60
    while download._size(part) < 48 * 1024:
        assert child.poll() is None and time.monotonic() < deadline, "the download ended before the kill"
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert not dest.exists()
    kept = part.read_bytes()
    assert 0 < len(kept) < len(PAYLOAD) and PAYLOAD.startswith(kept)

    server.throttle = 0.0
    assert fetch(server.url, dest, PAYLOAD_MD5, progress=False) == dest  # fetch verifies the md5
    assert dest.read_bytes() == PAYLOAD
    assert not part.exists()
    assert _ranges(server) == [None, f"bytes={len(kept)}-"]


# --- data.source relative to the project, also from an experiment's temporary copy -------------------------


def test_a_relative_source_is_the_projects_also_from_an_experiments_temporary_copy(tmp_path, monkeypatch):
    from vitlab.data.download import local_source
    from vitlab.files import project_root

    root = tmp_path / "project"
    copy = root / ".dvc" / "tmp" / "exps" / "standalone" / "tmpk2x9"  # dvc exp run --temp's copy
    copy.mkdir(parents=True)
    (root / "mirror.tar.gz").write_bytes(b"untracked: not in the copy")
    assert project_root(copy) == project_root(copy / "src") == root
    assert project_root(root) == root
    monkeypatch.chdir(copy)
    assert local_source("mirror.tar.gz") == str(root / "mirror.tar.gz")
    (copy / "mirror.tar.gz").write_bytes(b"the experiment's own")
    assert local_source("mirror.tar.gz") == "mirror.tar.gz"  # the copy's first
    for given in ("https://example.org/mirror.tar.gz", str(tmp_path / "elsewhere.tar.gz")):
        assert local_source(given) == given
    with pytest.raises(VitlabError) as error:
        local_source("data/missing.tar.gz")
    assert str(error.value) == (
        f"data.source: data/missing.tar.gz: no such file or folder (looked in {copy} and {root})"
    )
    monkeypatch.chdir(root)
    with pytest.raises(VitlabError, match=rf"no such file or folder \(looked in {re.escape(str(root))}\)$"):
        local_source("data/missing.tar.gz")


@pytest.mark.slow
def test_dvc_exp_run_temp_reads_a_repository_relative_source(tmp_path):
    """The download stage in `dvc exp run --temp`'s copy finds the untracked archive in the project (the copy
    holds only git's files) and records the source as given."""
    import json
    import os
    from pathlib import Path

    from cifar_fakes import make_cifar_archive

    import vitlab

    root = tmp_path / "repo"
    root.mkdir()
    md5 = make_cifar_archive(root / "mirror.tar.gz")
    (root / ".gitignore").write_text("/mirror.tar.gz\n")
    params = f"data:\n  dataset: cifar10\n  source: mirror.tar.gz\n  md5: '{md5}'\n"
    (root / "params.yaml").write_text(params)
    stage = f"{sys.executable} -m vitlab.cli stage download"
    dvc_yaml = f"stages:\n  download:\n    cmd: {stage}\n    params: [data]\n    outs: [data/prepared]\n"
    (root / "dvc.yaml").write_text(dvc_yaml)
    env = os.environ | {
        "DVC_NO_ANALYTICS": "1",
        "PYTHONPATH": str(Path(vitlab.__file__).parents[1]),  # this vitlab, installed or not
    }
    for args in (["init", "-q"], ["config", "user.email", "t@vitlab.invalid"], ["config", "user.name", "t"]):
        subprocess.run(["git", *args], cwd=root, check=True)
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "-q"], cwd=root, env=env, check=True)
    subprocess.run(["git", "add", "."], cwd=root, check=True)
    subprocess.run(["git", "commit", "-qm", "download a mirror"], cwd=root, check=True)
    done = subprocess.run(
        [*dvc, "exp", "run", "--temp", "-n", "mirror"], cwd=root, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    import dvc.api

    meta = json.loads(dvc.api.read("data/prepared/meta.json", repo=str(root), rev="mirror"))
    assert (meta["source"], meta["md5"], meta["official"]) == ("mirror.tar.gz", md5, False)
