"""`vitlab metrics`: what `make repro` prints at the end, one metric per line, in a terminal's width."""

from __future__ import annotations

import json

import pytest

from vitlab import stages
from vitlab.cli import main


def test_every_stages_metrics_one_per_line_in_stage_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    layout = stages.Layout()
    int8 = {"int8_accuracy": 0.424, "max_probability_batch_diff": 0.0, "int8_bytes": 352654}
    written = {
        layout.export_metrics: {"max_abs_diff": 1.5497207641601562e-06, "top1_agreement": 1.0, "int8": int8},
        layout.eval_metrics: {"test_loss": 1.553156, "test_accuracy": 0.422, "test_images": 500},
        layout.teacher_metrics: {"trained": False},
    }
    for path, metrics in written.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics))
    assert main(["metrics"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "reports/teacher/metrics.json",
        "  trained                            false",
        "reports/eval/metrics.json",
        "  test_loss                          1.553",
        "  test_accuracy                      0.422",
        "  test_images                        500",
        "reports/export/metrics.json",
        "  max_abs_diff                       1.55e-06",
        "  top1_agreement                     1",
        "  int8.int8_accuracy                 0.424",
        "  int8.max_probability_batch_diff    0",
        "  int8.int8_bytes                    352654",
    ]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "error: no metrics here yet: run the pipeline first (`dvc repro`)\n"),
        (["nowhere.json"], "error: nowhere.json: no such metrics file\n"),
    ],
)
def test_no_metrics_is_a_one_line_error(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    assert main(["metrics", *args]) == 2
    assert capsys.readouterr().err == expected
