import json

import pytest

from vitlab import io


def test_write_json_replaces_the_file_whole(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    io.write_json(target, {"a": 1})
    io.write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]


def test_a_failed_write_keeps_the_previous_good_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "metrics.json"
    io.write_json(target, {"good": True})
    with pytest.raises(TypeError), io.atomic_path(target) as tmp:
        tmp.write_text('{"half": ')
        raise TypeError("crash while writing")
    assert json.loads(target.read_text()) == {"good": True}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_write_tsv_refuses_empty_tables_and_formats_floats(tmp_path):
    target = tmp_path / "history.tsv"
    io.write_tsv(target, [{"epoch": 1, "loss": 0.123456789}, {"epoch": 2, "loss": 0.1}])
    assert target.read_text() == "epoch\tloss\n1\t0.123457\n2\t0.1\n"
    with pytest.raises(ValueError, match="empty table"):
        io.write_tsv(tmp_path / "empty.tsv", [])


def test_outputs_get_ordinary_permissions(tmp_path):
    import os

    target = tmp_path / "out.json"
    io.write_json(target, {})
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
