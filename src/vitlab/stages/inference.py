"""Stage ``inference``: the exported ONNX model classifies the test split through ONNX Runtime (no torch)."""

from __future__ import annotations

import time

from vitlab import files
from vitlab.data.prepared import load_prepared
from vitlab.inference import Classifier
from vitlab.params import Params
from vitlab.stages import Layout, write_metrics


def run(params: Params, layout: Layout) -> None:
    """Write per-image predictions and the ONNX Runtime test accuracy under ``reports/inference``."""
    classifier = Classifier(layout.onnx, provider=params.inference.provider, source="inference.provider")
    test = load_prepared(layout.prepared_dir).test
    start = time.perf_counter()
    probabilities = classifier.predict(test.images, batch_size=params.inference.batch_size)
    seconds = time.perf_counter() - start
    predictions = probabilities.argmax(1)
    names = classifier.class_names
    files.write_csv(
        layout.predictions,
        ["index", "label", "predicted", "confidence"],
        [
            (i, names[t], names[p], f"{probabilities[i, p]:.6f}")
            for i, (t, p) in enumerate(zip(test.labels, predictions, strict=True))
        ],
    )
    accuracy = float((predictions == test.labels).mean())
    write_metrics(
        layout.inference_metrics,
        layout.inference_run,
        {"onnxruntime_test_accuracy": round(accuracy, 6), "onnxruntime_provider": classifier.providers[0]},
    )
    print(
        f"ONNX Runtime ({classifier.providers[0]}): test accuracy {accuracy:.4f} on {len(test)} images, "
        f"{len(test) / seconds:.0f} img/s"
    )
