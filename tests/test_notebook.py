"""notebooks/demo.ipynb runs top to bottom (nbclient, a real kernel) on a small model exported here."""

from __future__ import annotations

import base64
import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from serving_fixtures import NORM, cifar_images, class_names, random_model

from vitlab import files
from vitlab.attention import render_attention
from vitlab.data.prepared import PreparedDataset, Split, save_prepared
from vitlab.export import export_onnx
from vitlab.inference import Classifier

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "demo.ipynb"


def _pipeline_outputs(root: Path) -> float:
    """What `dvc repro` leaves for the notebook, from an untrained ViT; returns ONNX Runtime's accuracy."""
    model = random_model("vit")
    images, labels = cifar_images(24)
    export_onnx(model, root / "models" / "model.onnx", class_names(), NORM)
    split = Split(images, labels)
    save_prepared(PreparedDataset(split, split, class_names()), root / "data" / "prepared")
    attention = root / "reports" / "attention"
    summary = render_attention(model, images[:3], labels[:3], class_names(), NORM, attention)
    files.write_json(attention / "summary.json", summary)
    predicted = Classifier(root / "models" / "model.onnx").predict(images).argmax(1)
    return float((predicted == labels).mean())


def test_demo_notebook_classifies_real_test_images_and_shows_the_attention(tmp_path, monkeypatch):
    accuracy = _pipeline_outputs(tmp_path)
    monkeypatch.setenv("VITLAB_ROOT", str(tmp_path))
    # The kernel spec starts `python`: this interpreter's, where vitlab is installed.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails

    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert f"ONNX Runtime test accuracy: {accuracy:.1%} on 24 real test images" in text
    assert text.count("top 3: ") == 8
    pictures = [out for out in outputs if "image/png" in out.get("data", {})]
    # the 8 classified images in one figure, then the last layer's maps and the rollout
    assert len(pictures) == 3
    assert all(base64.b64decode(p["data"]["image/png"]).startswith(b"\x89PNG\r\n\x1a\n") for p in pictures)
