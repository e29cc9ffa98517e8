"""Stage ``evaluate``: test loss and accuracy, per-class accuracy, confusion, predictions, pictures."""

from __future__ import annotations

from vitlab import files
from vitlab.checkpoint import load_checkpoint
from vitlab.data.prepared import load_prepared
from vitlab.device import select_device
from vitlab.evaluate import evaluate, prediction_rows
from vitlab.figures import plot_confusion, plot_mistakes, plot_per_class_accuracy
from vitlab.models import count_parameters, describe_model
from vitlab.params import Params
from vitlab.stages import Layout
from vitlab.tracking import Tracker


def run(params: Params, layout: Layout) -> None:
    """Evaluate ``layout.checkpoint`` on the prepared test split; writes every ``reports/eval`` output.

    Per-class figures go to per_class.tsv, not metrics.json: 100 metric columns would swamp `dvc exp show`.
    """
    device = select_device(params.train.device)
    test = load_prepared(layout.prepared_dir).test
    ckpt = load_checkpoint(layout.checkpoint, device, test.geometry)
    names = ckpt.class_names
    p = params.evaluate
    result = evaluate(ckpt.model, test, ckpt.normalization, len(names), p.batch_size, device, p.tta)
    files.write_json(layout.eval_metrics, result.metrics())
    files.write_tsv(layout.per_class, result.per_class_rows(names))
    files.write_csv(layout.confusion, ["actual", "predicted"], result.confusion_pairs(test.labels, names))
    rows = prediction_rows(result, test.labels, names)
    files.write_csv(layout.eval_predictions, list(rows[0]), [tuple(row.values()) for row in rows])
    model = describe_model(ckpt.model) | {"num_parameters": count_parameters(ckpt.model)}
    files.write_json(layout.eval_model, model)
    pictures = {
        "confusion": plot_confusion(result.confusion, names, layout.confusion_png),
        "per_class_accuracy": plot_per_class_accuracy(
            result.per_class_accuracy, result.confusion.sum(1), names, layout.per_class_png
        ),
        "most_confident_mistakes": plot_mistakes(
            test.images,
            test.labels,
            result.predictions,
            result.confidences,
            names,
            layout.mistakes_png,
            p.num_mistakes,
        ),
    }
    with Tracker(config=params.model_dump(by_alias=True), job_type="evaluate") as tracker:
        tracker.summary(result.metrics())
        tracker.log_images(pictures)
        header = ["image", *rows[0]]
        tracker.log_table(
            "test_predictions", header, [[im, *r.values()] for im, r in zip(test.images, rows, strict=True)]
        )
    views = "" if p.tta == "none" else f" (test-time augmentation: {p.tta})"
    print(f"test accuracy {result.accuracy:.4f}, loss {result.loss:.4f} on {len(test)} images{views}")
