"""End to end: the real pipeline (`dvc repro`, `dvc exp run`) in a temporary clone of this repository.

The clone runs its own code (PYTHONPATH=clone/src) on the embedded CIFAR-10 sample with the committed
params.yaml, then variants through `dvc exp run -S`, then the real CIFAR-100 subset from ../shared/data
through the mirror parameters. These tests take minutes; everything else in the suite takes seconds.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image
from pipeline_fixtures import run as _run
from serving_fixtures import save_pngs
from test_serve import Server, check_concurrent_clients, predict_cli  # the serve tests' client

from vitlab.distill import NO_TEACHER
from vitlab.params import load_params

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CIFAR100_SUBSET = SHARED_DATA / "cifar-100-subset-python.tar.gz"
CIFAR100_SUBSET_MD5 = "6915434a66f48efbf1b9174138f9965c"

pytestmark = pytest.mark.slow


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_repro_writes_every_output(pipeline_run):
    root, env = pipeline_run
    prepared = root / "data" / "prepared"
    with np.load(prepared / "train.npz") as train, np.load(prepared / "test.npz") as test:
        assert train["images"].shape == (2250, 32, 32, 3) and train["images"].dtype == np.uint8
        assert test["images"].shape == (500, 32, 32, 3) and test["labels"].max() == 9
    assert len(_json(prepared / "meta.json")["class_names"]) == 10
    assert _json(root / "reports" / "validation.json")["success"] is True

    # model.distillation is off: nothing learns from a teacher, so none is trained (the variant trains one)
    assert _json(root / "reports" / "teacher" / "metrics.json") == {"trained": False}
    assert (root / "models" / "teacher.pt").read_bytes() == NO_TEACHER
    assert not (root / "models" / "teacher_state.pt").exists()

    params_epochs = 40
    train_metrics = _json(root / "reports" / "train" / "metrics.json")
    assert train_metrics["num_parameters"] > 100_000 and train_metrics["train_images"] == 2025
    history = (root / "reports" / "train" / "history.tsv").read_text().splitlines()
    assert history[0].split("\t")[:4] == ["epoch", "lr", "train_loss", "train_accuracy"]
    assert len(history) == 1 + params_epochs

    evaluation = _json(root / "reports" / "eval" / "metrics.json")
    assert 0.3 < evaluation["test_accuracy"] <= 1.0  # chance is 0.1
    per_class = (root / "reports" / "eval" / "per_class.tsv").read_text().splitlines()
    assert per_class[0] == "class\taccuracy\tsupport" and len(per_class) == 11
    with open(root / "reports" / "eval" / "confusion.csv") as handle:
        assert sum(1 for _ in csv.DictReader(handle)) == 500

    attention = root / "reports" / "attention"
    assert _json(attention / "summary.json")["supported"] is True
    for png in [attention / "rollout.png", *attention.glob("layer_*.png"), root / "reports/train/curves.png"]:
        with Image.open(png) as image:
            assert image.format == "PNG" and min(image.size) >= 200

    export = _json(root / "reports" / "export" / "metrics.json")
    assert export["max_abs_diff"] <= 1e-4 and export["top1_agreement"] == 1.0
    assert export["attention"]["max_abs_diff"] <= 1e-4 and export["attention"]["top1_agreement"] == 1.0
    assert abs(export["int8"]["accuracy_delta_points"]) <= 1.0
    # int8 MatMul weights; the rest stays fp32 (cct-2-3x2: its conv tokenizer, 7% of the weights)
    assert export["int8"]["int8_bytes"] < export["onnx_bytes"] / 1.9
    session = ort.InferenceSession(
        str(root / "models/attention/model.onnx"), providers=["CPUExecutionProvider"]
    )
    assert [o.name for o in session.get_outputs()] == ["logits", "attention"]
    shipped = onnx.load(root / "models" / "model.onnx")
    depth = load_params(root / "params.yaml").model.depth
    assert [node.op_type for node in shipped.graph.node].count("MultiHeadAttention") == depth  # one per block
    inference = _json(root / "reports" / "inference" / "metrics.json")
    assert inference["onnxruntime_test_accuracy"] == pytest.approx(evaluation["test_accuracy"], abs=1e-6)

    status = _run(["dvc", "status", "--json"], root, env)
    assert json.loads(status.stdout) == {}, "dvc repro left stages out of date"


def _same_kind(committed: dict, ours: dict) -> bool:
    """Whether two runs' ``cpu`` records (reports/train/run.json, vitlab.device.cpu_record) promise the same
    bits: both in the bit-identical mode with the same ATen instruction set and threads, on the same vendor's
    CPUs, and off Intel on the same model (name and numbers). On Intel, benchmarks/results/cpu_repro.json
    measured that mode's bits on an AVX-512 Xeon under every instruction set and core count it played: all
    equal to an AVX2-only Xeon's. MKL keeps to its AVX2 branch on Intel CPUs only; elsewhere it runs code of
    its own choosing, which nothing measured across models."""
    keys = ("mode", "vendor", "isa", "threads") + (
        () if committed.get("vendor") == "GenuineIntel" else ("model", "family_model")
    )
    return committed.get("mode") == "bit-identical" and all(committed.get(k) == ours.get(k) for k in keys)


def test_repro_gives_the_committed_runs_bits_on_its_kind_of_cpu_and_its_curves_elsewhere(pipeline_run):
    """The committed run, made in the bit-identical mode (vitlab.cpu), reproduces digit for digit on a CPU of
    the kind recorded in its metrics; on any other, within run-to-run noise (pipeline_run runs that mode too
    where the CPU has AVX2 and FMA)."""
    root, env = pipeline_run
    committed_run = json.loads(_run(["git", "show", "HEAD:reports/train/run.json"], root, env).stdout)
    committed_eval = json.loads(_run(["git", "show", "HEAD:reports/eval/metrics.json"], root, env).stdout)
    ours_run = _json(root / "reports" / "train" / "run.json")
    ours_eval = _json(root / "reports" / "eval" / "metrics.json")

    def rows(text: str) -> list[dict[str, str]]:  # without the speed, which no run repeats
        table = list(csv.DictReader(text.splitlines(), delimiter="\t"))
        return [{k: v for k, v in row.items() if k != "images_per_s"} for row in table]

    committed = rows(_run(["git", "show", "HEAD:reports/train/history.tsv"], root, env).stdout)
    ours = rows((root / "reports" / "train" / "history.tsv").read_text())
    if _same_kind(committed_run["cpu"], ours_run["cpu"]):
        assert ours == committed
        assert (ours_eval["test_accuracy"], ours_eval["test_loss"]) == (
            committed_eval["test_accuracy"],
            committed_eval["test_loss"],
        )
        return
    assert len(ours) == len(committed)
    # Another CPU rounds differently from the first step on, by about an ulp per operation: float32's
    # relative 1.2e-7. The differences grow, but slowly at first: benchmarks/results/cpu_repro.json's runs on
    # other instruction sets agreed to 1.1e-7 in their validation losses after 3 epochs, and a run on
    # another CPU parted from the committed one at epoch 7 (issue 12). After one epoch, 1e-3 is far above
    # rounding and far below what a bug (another seed, recipe or data order: percent-level) changes.
    for key in ("train_loss", "val_loss"):
        assert float(ours[0][key]) == pytest.approx(float(committed[0][key]), rel=1e-3), key
    # Once parted, two runs differ as two seeds do. A test accuracy is a proportion over n images: were two
    # models right or wrong on each image independently, their accuracies' difference would have a standard
    # deviation of sqrt(2 p (1 - p) / n), 3.1 points at p = 0.42, n = 500; models of one recipe fail on many
    # of the same images, which lowers it. Three of them are exceeded by chance in 0.3% of pairs. (Runs on an
    # AVX-512 Xeon and an AMD EPYC reached 43.4% and 44.2% where the committed Intel run reached 42.2%:
    # README, "Across CPUs".)
    p, n = committed_eval["test_accuracy"], committed_eval["test_images"]
    assert abs(ours_eval["test_accuracy"] - p) <= 3 * math.sqrt(2 * p * (1 - p) / n)


def test_editing_a_stages_code_puts_that_stage_alone_out_of_date(pipeline_run):
    root, env = pipeline_run
    code = root / "src" / "vitlab" / "stages" / "evaluate.py"
    original = code.read_text()
    rounding = 'print(f"test accuracy {result.accuracy:.4f}'
    assert rounding in original
    try:
        code.write_text(original.replace(rounding, 'print(f"test accuracy {result.accuracy:.3f}'))
        status = json.loads(_run(["dvc", "status", "--json"], root, env).stdout)
        # What follows evaluate re-runs with `dvc repro` only if evaluate's outputs change; download never.
        assert list(status) == ["evaluate"]
    finally:
        code.write_text(original)
    assert json.loads(_run(["dvc", "status", "--json"], root, env).stdout) == {}


def test_predict_cli_agrees_with_pytorch_on_real_test_images(pipeline_run, tmp_path):
    root, env = pipeline_run
    import torch

    from vitlab.checkpoint import load_checkpoint

    with np.load(root / "data" / "prepared" / "test.npz") as test:
        images = test["images"][:24]
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"test_{i:02d}.png")
    done = _run(
        [
            sys.executable,
            "-m",
            "vitlab.cli",
            "predict",
            "models/model.onnx",
            str(tmp_path),
            "--json",
            "--top-k",
            "2",
        ],
        root,
        env,
    )
    predictions = json.loads(done.stdout)["predictions"]
    assert [Path(p["path"]).name for p in predictions] == [f"test_{i:02d}.png" for i in range(24)]

    ckpt = load_checkpoint(root / "models" / "model.pt")
    with torch.no_grad():
        logits = ckpt.model(ckpt.normalization.to_tensor(torch.as_tensor(images)))
    expected = [ckpt.class_names[i] for i in logits.argmax(1).tolist()]
    assert [p["labels"][0] for p in predictions] == expected
    assert all(len(p["labels"]) == 2 and p["probabilities"][0] >= p["probabilities"][1] for p in predictions)


def _exp_run(root: Path, env: dict[str, str], name: str, overrides: dict[str, object]) -> dict[str, str]:
    """`dvc exp run -n NAME -S key=value ...`, then that experiment's row of `dvc exp show --csv`."""
    settings = [arg for key, value in overrides.items() for arg in ("-S", f"{key}={value}")]
    _run(["dvc", "exp", "run", "-n", name, *settings], root, env)
    shown = _run(["dvc", "exp", "show", "--no-pager", "--csv"], root, env).stdout
    return next(row for row in csv.DictReader(shown.splitlines()) if row["Experiment"] == name)


def _variant_overrides() -> dict[str, object]:
    """One `dvc exp run` checks several things at once (each `dvc exp run` costs minutes): patch size 2,
    DeiT distillation from the teacher stage (which needs a CLS token), and, where the real CIFAR-100 subset
    is at hand, a new data set through the mirror parameters."""
    overrides: dict[str, object] = {
        "model.patch_size": 2,
        "model.pool": "cls",
        "model.distillation": "true",
        "train.epochs": 2,
        "train.warmup_epochs": 1,
        "teacher.epochs": 2,
        "teacher.warmup_epochs": 1,
    }
    if CIFAR100_SUBSET.exists():
        # 1,117 training images over 100 classes hold 5-22 per class: a random subset is not balanced, so the
        # balance tolerance is widened for it; every other expectation holds as for the full data set.
        overrides |= {
            "data.dataset": "cifar100",
            "data.source": CIFAR100_SUBSET,
            "data.md5": CIFAR100_SUBSET_MD5,
            "data.expected_train": 1117,
            "data.expected_test": 916,
            "validate.class_balance_tolerance": 1.0,
        }
    return overrides


@pytest.fixture(scope="module")
def variant(pipeline_run) -> dict[str, str]:
    """The variant's row of `dvc exp show --csv`."""
    root, env = pipeline_run
    return _exp_run(root, env, "variant", _variant_overrides())


def test_exp_run_variant_is_listed_with_its_params_and_metrics(variant):
    assert variant["model.patch_size"] == "2" and variant["model.distillation"] == "True"
    assert 0.0 < float(variant["test_accuracy"]) <= 1.0


def test_exp_run_distilled_variant_exports_what_was_evaluated(variant):
    # The exported model is the mean of the two heads, as evaluated: ONNX Runtime agrees with PyTorch.
    assert float(variant["onnxruntime_test_accuracy"]) == pytest.approx(
        float(variant["test_accuracy"]), abs=1e-6
    )


@pytest.mark.skipif(
    not CIFAR100_SUBSET.exists(), reason=f"real CIFAR-100 subset not found at {CIFAR100_SUBSET}"
)
def test_exp_run_reads_the_cifar100_subset_through_the_mirror_parameters(variant):
    assert variant["data.dataset"] == "cifar100"
    assert int(float(variant["test_images"])) == 916


def test_32_clients_get_vitlab_predicts_answers_from_the_pipelines_model(pipeline_run, tmp_path):
    root, env = pipeline_run
    with np.load(root / "data" / "prepared" / "test.npz") as test:
        paths = save_pngs(test["images"][:200], tmp_path / "test")
    model = root / "models" / "model.onnx"
    served = Server(model, tmp_path / "server.log", env=env)
    try:
        check_concurrent_clients(served, paths, predict_cli(model, paths, env), clients=32, requests=20)
    finally:
        assert served.stop() == 0
