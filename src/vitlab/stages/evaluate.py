"""Stage ``evaluate``: test loss and accuracy, per-class accuracy, confusion, predictions, pictures."""

from __future__ import annotations

from vitlab import files
from vitlab.checkpoint import load_checkpoint
from vitlab.data.prepared import load_prepared
from vitlab.device import select_device
from vitlab.evaluate import evaluate, prediction_rows
from vitlab.figures import plot_confusion, plot_mistakes, plot_per_class_accuracy
from vitlab.models import count_parameters, model_spec
from vitlab.params import Params
from vitlab.stages import Layout
from vitlab.tracking import Tracker


def run(params: Params, layout: Layout) -> None:
    """Evaluate ``layout.checkpoint`` on the prepared test split; writes every ``reports/eval`` output."""
    device = select_device(params.train.device)
    ckpt = load_checkpoint(layout.checkpoint, device)
    test = load_prepared(layout.prepared_dir).test
    result = evaluate(
        ckpt.model, test, ckpt.normalization, len(ckpt.class_names), params.evaluate.batch_size, device
    )
    names = ckpt.class_names
    metrics = {
        "test_loss": round(result.loss, 6),
        "test_accuracy": round(result.accuracy, 6),
        "test_images": len(test),
    }
    # per-class figures go to per_class.tsv: 100 metric columns would swamp `dvc exp show`
    files.write_json(layout.eval_metrics, metrics)
    support = result.confusion.sum(1)
    files.write_tsv(
        layout.per_class,
        [
            {"class": n, "accuracy": a, "support": int(s)}
            for n, a, s in zip(names, result.per_class_accuracy, support, strict=True)
        ],
    )
    files.write_csv(
        layout.confusion,
        ["actual", "predicted"],
        [(names[a], names[p]) for a, p in zip(test.labels, result.predictions, strict=True)],
    )
    rows = prediction_rows(result, test.labels, names)
    files.write_csv(layout.eval_predictions, list(rows[0]), [tuple(row.values()) for row in rows])
    files.write_json(
        layout.eval_model, model_spec(ckpt.model) | {"num_parameters": count_parameters(ckpt.model)}
    )
    pictures = {
        "confusion": plot_confusion(result.confusion, names, layout.confusion_png),
        "per_class_accuracy": plot_per_class_accuracy(
            result.per_class_accuracy, support, names, layout.per_class_png
        ),
        "most_confident_mistakes": plot_mistakes(
            test.images,
            test.labels,
            result.predictions,
            result.confidences,
            names,
            layout.mistakes_png,
            params.evaluate.num_mistakes,
        ),
    }
    tracker = Tracker(config=params.model_dump(by_alias=True), job_type="evaluate")
    try:
        tracker.summary(metrics)
        tracker.log_images(pictures)
        tracker.log_table(
            "test_predictions",
            ["image", *rows[0]],
            [[image, *row.values()] for image, row in zip(test.images, rows, strict=True)],
        )
    finally:
        tracker.finish()
    print(f"test accuracy {result.accuracy:.4f}, loss {result.loss:.4f} on {len(test)} images")
