import itertools

import numpy as np
import pytest
from PIL import Image, ImageSequence
from png_checks import assert_picture, inches_to_pixels
from serving_fixtures import cifar_images, class_names

from vitlab import figures


def _history(epochs: int, with_val: bool = True) -> list[dict[str, float]]:
    rows = []
    for e in range(1, epochs + 1):
        row = {
            "epoch": e,
            "lr": 1e-3 * (1 - e / (epochs + 1)),
            "train_loss": 2.3 / e,
            "train_accuracy": 0.1 * e,
        }
        if with_val:
            row |= {"val_loss": 2.4 / e, "val_accuracy": 0.09 * e}
        rows.append(row)
    return rows


@pytest.mark.parametrize("with_val", [True, False])
def test_training_curves_png(tmp_path, with_val):
    path = figures.plot_training_curves(_history(5, with_val), tmp_path / "curves.png")
    assert_picture(path, inches_to_pixels(figures.CURVES_INCHES))
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # no temp file left


def test_training_gif_grows_the_curves_one_epoch_per_frame(tmp_path):
    path = figures.animate_training(_history(6), tmp_path / "curves.gif")
    size = inches_to_pixels(figures.CURVES_INCHES, figures.GIF_DPI)
    assert_picture(path, size, kind="GIF")
    with Image.open(path) as gif:
        frames = [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(gif)]
        assert gif.info["loop"] == 0
        durations = [frame.info["duration"] for frame in ImageSequence.Iterator(gif)]
    assert len(frames) == 6
    assert durations == [figures.GIF_FRAME_MS] * 5 + [figures.GIF_HOLD_MS]
    # Each frame draws one more epoch of the curves (and its number in the heading).
    assert all((a != b).any() for a, b in itertools.pairwise(frames))


def test_training_gif_of_a_long_run_keeps_at_most_the_frame_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(figures, "GIF_MAX_FRAMES", 4)
    path = figures.animate_training(_history(30), tmp_path / "curves.gif")
    with Image.open(path) as gif:
        assert gif.n_frames == 4


def test_confusion_png_is_row_normalized_with_a_colorbar(tmp_path):
    confusion = np.array([[8, 2, 0], [1, 1, 0], [0, 0, 5]])
    path = figures.plot_confusion(confusion, ["a", "b", "c"], tmp_path / "confusion.png")
    assert_picture(path, inches_to_pixels(figures.confusion_inches(3)))
    assert inches_to_pixels(figures.confusion_inches(10)) == (800, 700)
    assert inches_to_pixels(figures.confusion_inches(100)) == (1700, 1600)  # CIFAR-100: bigger, unlabelled


def test_confusion_png_of_100_classes(tmp_path):
    rng = np.random.default_rng(0)
    confusion = rng.integers(0, 5, (100, 100)) + np.diag(rng.integers(5, 20, 100))
    names = [f"class_{i}" for i in range(100)]
    path = figures.plot_confusion(confusion, names, tmp_path / "confusion.png")
    assert_picture(path, (1700, 1600))


def test_per_class_accuracy_bars(tmp_path):
    path = figures.plot_per_class_accuracy(
        [0.5, 0.9, 0.1], [10, 20, 10], ["a", "b", "c"], tmp_path / "pc.png"
    )
    assert_picture(path, inches_to_pixels(figures.per_class_inches(3)))
    assert inches_to_pixels(figures.per_class_inches(10)) == (700, 400)


def test_mistakes_are_the_most_confident_wrong_predictions_first():
    labels = np.array([0, 1, 2, 0, 1, 2])
    predicted = np.array([0, 2, 1, 1, 1, 0])  # wrong: 1, 2, 3, 5
    confidence = np.array([0.99, 0.6, 0.9, 0.7, 0.95, 0.6])
    assert figures.most_confident_mistakes(labels, predicted, confidence, 3).tolist() == [2, 3, 1]
    assert figures.most_confident_mistakes(labels, labels, confidence, 3).tolist() == []


@pytest.mark.parametrize(
    ("count", "shape"), [(0, (1, 1)), (3, (1, 3)), (8, (1, 8)), (16, (2, 8)), (17, (3, 8))]
)
def test_mistakes_grid_shape(count, shape):
    assert figures.mistakes_shape(count) == shape


@pytest.mark.parametrize(("wrong", "size"), [(12, (1280, 370)), (0, (160, 210))])
def test_mistakes_png(tmp_path, wrong, size):
    images, labels = cifar_images(20)
    predicted = labels.copy()
    predicted[:wrong] = (labels[:wrong] + 1) % 10
    confidence = np.linspace(0.3, 0.9, 20)
    path = figures.plot_mistakes(images, labels, predicted, confidence, class_names(), tmp_path / "m.png", 16)
    assert inches_to_pixels(figures.mistakes_inches(wrong)) == size
    assert_picture(path, size)


@pytest.mark.parametrize("smooth", [False, True])
def test_overlays_png(tmp_path, smooth):
    images, _ = cifar_images(3)
    heat = np.random.default_rng(0).random((3, 4, 4))
    path = figures.plot_overlays(
        "heading",
        images,
        ["a", "b", "c"],
        [True, False, True],
        [("one", heat), ("two", heat)],
        "relative",
        tmp_path / "overlay.png",
        smooth=smooth,
    )
    pixels = assert_picture(path, inches_to_pixels(figures.overlay_inches(3, 2)))
    assert inches_to_pixels(figures.overlay_inches(3, 2)) == (680, 650)
    # The turbo colormap puts saturated colors on the maps: the overlaid panels are far from gray.
    saturation = pixels.max(axis=2).astype(int) - pixels.min(axis=2)
    assert (saturation > 100).mean() > 0.1


@pytest.mark.parametrize(("maps", "smooth"), [(4, False), (1, False), (1, True)])
def test_overlay_png_of_the_attention_stage_stays_small(tmp_path, maps, smooth):
    # The attention stage's figures: 6 test images, then a ViT layer's 4 heads (8x8 patch maps), or the
    # rollout, or Grad-CAM's smoothed 8x8 feature map.
    rows, grid = 6, 8
    images, _ = cifar_images(rows)
    rng = np.random.default_rng(0)
    heat = [(f"head {h}", rng.random((rows, grid, grid)) ** 3) for h in range(maps)]
    titles = ["frog 37%\n(true cat)"] * rows
    path = figures.plot_overlays(
        "layer 0: [CLS] attention per head",
        images,
        titles,
        [True, False] * (rows // 2),
        heat,
        "attention relative to the map's maximum",
        tmp_path / "overlay.png",
        smooth=smooth,
    )
    width, height = inches_to_pixels(figures.overlay_inches(rows, maps))
    side = images.shape[1]
    # Each panel shows a 32x32 RGB picture as squares of flat color: PNG's Up filter zeroes the repeated
    # rows and deflate's back-references take the repeats within a row, so a panel costs about the
    # picture's raw 3 bytes per pixel (1.8-3.9 measured over four layouts); allow 6. The rest (white,
    # text, colorbar) is flat: allow half a bit per figure pixel (0.2-0.5 measured). A smoothing filter's
    # gradients cost over 5 bits per figure pixel, above 3x this bound (870 KB at 4 heads, bound 269 KB).
    bound = rows * (1 + maps) * side * side * 6 + width * height / 16
    assert path.stat().st_size <= bound
