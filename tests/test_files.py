import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from vitlab import files
from vitlab.errors import VitlabError


def test_write_json_replaces_the_file_whole(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    files.write_json(target, {"a": 1})
    files.write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]


def test_a_failed_write_keeps_the_previous_good_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "metrics.json"
    files.write_json(target, {"good": True})
    with pytest.raises(TypeError), files.atomic_path(target) as tmp:
        tmp.write_text('{"half": ')
        raise TypeError("crash while writing")
    assert json.loads(target.read_text()) == {"good": True}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_write_tsv_refuses_empty_tables_and_formats_floats(tmp_path):
    target = tmp_path / "history.tsv"
    files.write_tsv(target, [{"epoch": 1, "loss": 0.123456789}, {"epoch": 2, "loss": 0.1}])
    assert target.read_text() == "epoch\tloss\n1\t0.123457\n2\t0.1\n"
    with pytest.raises(ValueError, match="empty table"):
        files.write_tsv(tmp_path / "empty.tsv", [])


def test_outputs_get_ordinary_permissions(tmp_path):
    target = tmp_path / "out.json"
    files.write_json(target, {})
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask


# Writes versions 1, 2, ... of an 8 MiB file forever; version i is the 8-byte header f"{i:08d}" repeated.
WRITER = """
import sys
from vitlab import files
target, version = sys.argv[1], int(sys.argv[2])
print("writing", flush=True)
while True:
    version += 1
    files.write_bytes(target, b"%08d" % version * (1 << 20))
"""


def _version(content: bytes) -> int:
    """The version a file holds; fails unless it is one complete version."""
    assert len(content) == 8 << 20
    assert content == content[:8] * (1 << 20)
    return int(content[:8])


def test_sigkill_at_random_moments_never_leaves_a_broken_or_missing_output(tmp_path):
    target = tmp_path / "out.bin"
    files.write_bytes(target, b"%08d" % 0 * (1 << 20))
    rng = random.Random(0)
    versions = [0]
    for _ in range(5):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(target), str(versions[-1])], stdout=subprocess.PIPE, text=True
        )
        assert writer.stdout.readline() == "writing\n"
        time.sleep(rng.uniform(0.0, 0.3))
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
        versions.append(_version(target.read_bytes()))
    assert versions == sorted(versions) and versions[-1] > 0  # each kill kept the newest complete version
    # Only the files the kills interrupted are left beside it, hidden and named as temporaries.
    leftovers = [p.name for p in tmp_path.iterdir() if p != target]
    assert leftovers, "no kill landed mid-write: the test did not test anything"
    assert all(re.fullmatch(r"\.out\.bin\.\w+\.tmp", name) for name in leftovers), leftovers


@pytest.mark.parametrize(
    ("step", "code"),
    [("mkstemp", errno.EROFS), ("fsync", errno.ENOSPC), ("replace", errno.EACCES)],
    ids=["read-only", "disk-full", "no-permission"],
)
def test_an_os_error_while_writing_is_one_line_naming_the_file_and_keeps_the_previous_one(
    tmp_path, monkeypatch, step, code
):
    target = tmp_path / "metrics.json"
    files.write_json(target, {"good": True})

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files.tempfile if step == "mkstemp" else files.os, step, fail)
    with pytest.raises(VitlabError) as caught:
        files.write_json(target, {"new": True})
    monkeypatch.undo()
    assert str(caught.value) == f"cannot write {target}: {os.strerror(code)}"
    assert json.loads(target.read_text()) == {"good": True}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_folder_that_cannot_exist_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "reports").write_text("a file where a folder should be")
    with pytest.raises(VitlabError, match=r"cannot write .*reports/eval/metrics\.json: Not a directory$"):
        files.write_json(tmp_path / "reports" / "eval" / "metrics.json", {})
