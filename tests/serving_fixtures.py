"""Real CIFAR-10 test images and small untrained models for the export, inference and attention tests."""

from __future__ import annotations

import functools
import pickle
import struct
import tarfile
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from vitlab.checkpoint import Normalization
from vitlab.models import build_model

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "cifar-10-sample-python.tar.gz"

# Small enough to export in a second or two; the ViT keeps 2 heads and 2 layers so every code path that
# loops over heads or layers runs more than once.
MODELS = {
    "vit": {"depth": 2, "dim": 32, "heads": 2, "mlp_dim": 64},
    "cnn": {"channels": [8, 16]},
    "mlp": {"hidden": [64]},
}

NORM = Normalization(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))  # CIFAR-10's


def random_model(arch: str, seed: int = 0, **config: Any) -> nn.Module:
    """An untrained model (of ``MODELS[arch]`` with ``config``'s keys beside) whose weights are scaled up to
    give O(1), varied logits and peaked attention.

    Freshly initialized models output near-equal logits (top-2 gaps ~1e-6 on real images), so a top-1
    comparison between two runtimes would hinge on rounding noise; these gaps are >1e-4.
    """
    torch.manual_seed(seed)
    model = build_model(arch, MODELS[arch] | config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, p[0].numel() ** -0.5)
    return model


@functools.cache
def _sample_test_batch() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    with tarfile.open(SAMPLE) as archive:
        # Our own committed archive, so unpickling it is safe.
        batch = pickle.load(archive.extractfile("cifar-10-batches-py/test_batch"), encoding="latin1")
        meta = pickle.load(archive.extractfile("cifar-10-batches-py/batches.meta"), encoding="latin1")
    images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(batch["labels"]), tuple(meta["label_names"])


def cifar_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n sample test images, uint8 (n, 32, 32, 3) RGB, and their labels."""
    images, labels, _ = _sample_test_batch()
    assert len(images) >= n, f"the sample holds only {len(images)} test images"
    return images[:n].copy(), labels[:n].copy()


def class_names() -> list[str]:
    return list(_sample_test_batch()[2])


def save_pngs(images: np.ndarray, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"img_{i:03d}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def export_plain_onnx(model: nn.Module, input_shape: tuple[int, ...], path: Path) -> Path:
    """Export with torch.onnx alone (dynamic batch, no vitlab metadata): a model vitlab did not make."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation chatter
        torch.onnx.export(
            model.eval(),
            (torch.randn(2, *input_shape[1:]),),
            path,
            dynamo=True,
            external_data=False,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
    return path


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` 8-bit gray pixels but holds a few: what a bomb's opening
    looks like to Image.open, which reads no pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 100)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
