"""Figures people look at, rendered headless to PNG (and one GIF), each written atomically.

Every figure is a ``matplotlib.figure.Figure`` of a fixed size in inches at a fixed DPI (no tight bounding
box), so each file's pixel size is known in advance and tested. The object-oriented API keeps no global
figure registry: nothing to close, nothing leaks between stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from PIL import Image

from vitlab import files

DPI = 100
CURVES_INCHES = (13.0, 3.6)
GIF_DPI = 60  # the animation is for a glance: 780x216 frames keep a 40-epoch GIF well under 1 MB
GIF_MAX_FRAMES = 60
GIF_FRAME_MS = 120
GIF_HOLD_MS = 2000  # the finished curves stay up before the loop restarts
CELL_INCHES = 2.0  # one image panel: a 32x32 image upscaled ~6x, a 28x28 one ~7x
COLORBAR_INCHES = 0.8
HEADING_INCHES = 0.5  # room for a two-line heading
MISTAKE_INCHES = 1.6
OVERLAY_CMAP = "turbo"
OVERLAY_ALPHA = 0.5
RIGHT, WRONG = "tab:green", "tab:red"


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` as a PNG at the figure's own size and DPI, atomically; returns the path.

    Raises:
        VitlabError: the file cannot be written (``files.atomic_path``).
    """
    path = Path(path)
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _training_figure(history: list[dict[str, float]], dpi: int) -> tuple[Figure, list[Line2D]]:
    """Loss, accuracy and learning rate per epoch, train beside validation; returns the figure and its lines.

    Axis limits are frozen at the full history's, so the animation can grow the lines into a still frame.
    """
    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=CURVES_INCHES, dpi=dpi, layout="constrained")
    axes = fig.subplots(1, 3)
    lines: list[Line2D] = []
    for ax, metric in zip(axes[:2], ("loss", "accuracy"), strict=True):
        for split, label in (("train", "train"), ("val", "validation")):
            if f"{split}_{metric}" in history[0]:
                values = [row[f"{split}_{metric}"] for row in history]
                lines += ax.plot(epochs, values, label=label, marker=".")
        ax.set(title=metric, xlabel="epoch")
        ax.legend(loc="center right")
    lines += axes[2].plot(epochs, [row["lr"] for row in history], color="tab:green")
    axes[2].set(title="learning rate (end of epoch)", xlabel="epoch")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(ax.get_xlim())
        ax.set_ylim(ax.get_ylim())
    return fig, lines


def plot_training_curves(history: list[dict[str, float]], path: str | Path) -> Path:
    """Loss, accuracy and learning rate per epoch, train beside validation, in one row of three panels."""
    return save_png(_training_figure(history, DPI)[0], path)


def animate_training(history: list[dict[str, float]], path: str | Path) -> Path:
    """An animated GIF of the training curves growing epoch by epoch (at most GIF_MAX_FRAMES frames)."""
    fig, lines = _training_figure(history, GIF_DPI)
    full = [line.get_data() for line in lines]
    canvas = FigureCanvasAgg(fig)
    # Long runs skip epochs evenly; the last epoch is always the last frame.
    shown = np.unique(np.linspace(1, len(history), min(len(history), GIF_MAX_FRAMES)).round().astype(int))
    frames = []
    for count in shown:
        for line, (x, y) in zip(lines, full, strict=True):
            line.set_data(x[:count], y[:count])
        fig.suptitle(f"epoch {history[count - 1]['epoch']}/{history[-1]['epoch']}", fontsize=10)
        canvas.draw()
        fig.set_layout_engine("none")  # laid out once on the first frame: the panels stay put, 2x faster
        frames.append(
            Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).convert("RGB")
        )
    durations = [GIF_FRAME_MS] * (len(frames) - 1) + [GIF_HOLD_MS]
    path = Path(path)
    with files.atomic_path(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return path


def confusion_inches(num_classes: int) -> tuple[float, float]:
    """(width, height) in inches of the confusion matrix figure for ``num_classes`` classes."""
    side = 7.0 if num_classes <= 20 else 16.0
    return side + 1.0, side  # the extra inch holds the colorbar


def plot_confusion(confusion: np.ndarray, class_names: Sequence[str], path: str | Path) -> Path:
    """The confusion matrix with each row (true class) normalized to 1: the diagonal is per-class recall."""
    k = len(class_names)
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=confusion_inches(k), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    shown = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(shown, ax=ax, label="share of the true class", shrink=0.8)
    fontsize = 8 if k <= 20 else 4
    ax.set_xticks(range(k), class_names, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(k), class_names, fontsize=fontsize)
    ax.set(xlabel="predicted class", ylabel="true class")
    ax.set_title(f"confusion matrix, rows normalized ({int(confusion.sum())} test images)", fontsize=10)
    if k <= 20:  # beyond that the numbers are unreadable: the colors carry it
        for (i, j), rate in np.ndenumerate(rates):
            if rate >= 0.005:
                color = "white" if rate > 0.5 else "black"
                ax.text(j, i, f"{rate:.2f}", ha="center", va="center", fontsize=7, color=color)
    return save_png(fig, path)


def per_class_inches(num_classes: int) -> tuple[float, float]:
    """(width, height) in inches of the per-class accuracy bars: 0.3 inch per class."""
    return 7.0, 1.0 + 0.3 * num_classes


def plot_per_class_accuracy(
    accuracy: Sequence[float], support: Sequence[int], class_names: Sequence[str], path: str | Path
) -> Path:
    """Horizontal bars of each class's test accuracy, best at the top, with the overall accuracy marked."""
    accuracy, support = np.asarray(accuracy, dtype=float), np.asarray(support)
    order = np.argsort(accuracy, kind="stable")  # barh draws the first bar at the bottom
    fig = Figure(figsize=per_class_inches(len(class_names)), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.barh(range(len(order)), accuracy[order], color=[_rate_color(a) for a in accuracy[order]])
    ax.set_yticks(range(len(order)), [f"{class_names[i]} (n={support[i]})" for i in order], fontsize=8)
    overall = float((accuracy * support).sum() / max(support.sum(), 1))
    ax.axvline(overall, color="black", linestyle="--", linewidth=1, label=f"overall {overall:.1%}")
    ax.set(xlim=(0, 1), xlabel="test accuracy", ylim=(-0.6, len(order) - 0.4))
    ax.set_title("test accuracy per class", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return save_png(fig, path)


def _rate_color(rate: float) -> tuple[float, float, float, float]:
    return ScalarMappable(Normalize(0.0, 1.0), "RdYlGn").to_rgba(rate)


def mistakes_shape(count: int, columns: int = 8) -> tuple[int, int]:
    """Rows and columns of the mistakes grid (one cell even when there is no mistake to show)."""
    cols = max(1, min(count, columns))
    return -(-max(count, 1) // cols), cols


def mistakes_inches(count: int) -> tuple[float, float]:
    """(width, height) in inches of the grid of ``count`` mistakes (``mistakes_shape``) and its heading."""
    rows, cols = mistakes_shape(count)
    return MISTAKE_INCHES * cols, MISTAKE_INCHES * rows + HEADING_INCHES


def most_confident_mistakes(
    labels: np.ndarray, predicted: np.ndarray, confidence: Sequence[float], count: int
) -> np.ndarray:
    """Indices of up to ``count`` wrong predictions, the most confident first (ties: lower index first)."""
    wrong = np.flatnonzero(np.asarray(labels) != np.asarray(predicted))
    return wrong[np.argsort(-np.asarray(confidence, dtype=float)[wrong], kind="stable")][:count]


def plot_mistakes(
    images: np.ndarray,
    labels: Sequence[int],
    predicted: Sequence[int],
    confidence: Sequence[float],
    class_names: Sequence[str],
    path: str | Path,
    count: int = 16,
) -> Path:
    """A grid of the ``count`` wrong predictions made with the highest confidence, most confident first."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    picked = most_confident_mistakes(labels, predicted, confidence, count)
    wrong = int((labels != predicted).sum())
    rows, cols = mistakes_shape(len(picked))
    fig = Figure(figsize=mistakes_inches(len(picked)), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, i in zip(axes.flat, picked, strict=False):
        title = prediction_title(class_names[predicted[i]], confidence[i], class_names[labels[i]])
        show_image(ax, images[i], f"#{i} {title}")
        ax.title.set_color(WRONG)
    if len(picked) == 0:
        axes[0, 0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    fig.suptitle(f"most confident mistakes ({wrong} of {len(labels)} test images wrong)", fontsize=10)
    return save_png(fig, path)


def prediction_title(predicted: str, confidence: float, true: str) -> str:
    """Two lines naming the predicted class with its ``confidence`` in [0, 1] as a percentage, then the
    true class."""
    return f"{predicted} {confidence:.0%}\n(true {true})"


def show_image(ax: Axes, image: np.ndarray, title: str, interpolation: str = "lanczos") -> None:
    """Draw ``image``, uint8 (H, W, 3) RGB or (H, W, 1) grayscale (drawn in gray, 0 black and 255 white), on
    ``ax``, without axes, titled ``title`` (8 pt).

    The default smoothing filter makes 32x32 pixels read as a picture; ``"nearest"`` draws each pixel as a
    square (any matplotlib ``imshow`` interpolation is accepted).
    """
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255, interpolation=interpolation)
    else:
        ax.imshow(image, interpolation=interpolation)
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def overlay_inches(rows: int, maps: int) -> tuple[float, float]:
    """(width, height) in inches of ``plot_overlays``' figure: ``rows`` images, each beside ``maps`` maps."""
    return CELL_INCHES * (1 + maps) + COLORBAR_INCHES, CELL_INCHES * rows + HEADING_INCHES


def plot_overlays(
    heading: str,
    images: np.ndarray,
    titles: Sequence[str],
    correct: Sequence[bool],
    maps: Sequence[tuple[str, np.ndarray]],
    colorbar_label: str,
    path: str | Path,
    smooth: bool = False,
) -> Path:
    """One row per image: the image titled with its prediction, then each map overlaid on it, all on one
    color scale with its colorbar; written to ``path`` as a PNG of ``overlay_inches(rows, len(maps))``.

    Args:
        heading: the figure's title.
        images: (N, H, W, 3) uint8 RGB or (N, H, W, 1) grayscale.
        titles, correct: per image, its title and whether the prediction is right (green, else red).
        maps: (name, (N, h, w) float array in [0, 1]) per map column; h, w need not divide H, W.
        colorbar_label: what the color scale measures.
        path: the PNG to write (atomically).
        smooth: upsample the maps bilinearly (feature maps); otherwise each cell stays a square (patches).

    Images and maps are drawn with square pixels at the image's own resolution (a smoothed map is
    upsampled to H x W first): the image's pixels line up with the patches, and flat squares compress
    well, where a smoothing filter's gradients made a 6-row, 4-head figure 6x larger (870 KB, not 140 KB).
    """
    rows = len(images)
    fig = Figure(figsize=overlay_inches(rows, len(maps)), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, 1 + len(maps), squeeze=False)
    norm = Normalize(0.0, 1.0)
    for i, image in enumerate(images):
        show_image(axes[i, 0], image, titles[i], "nearest")
        axes[i, 0].title.set_color(RIGHT if correct[i] else WRONG)
        height, width = image.shape[:2]
        for j, (name, heat) in enumerate(maps, start=1):
            show_image(axes[i, j], image, name if i == 0 else "", "nearest")
            cells = heat[i]
            if smooth:
                cells = Image.fromarray(np.float32(cells)).resize((width, height), Image.Resampling.BILINEAR)
                cells = np.asarray(cells)
            axes[i, j].imshow(
                cells,
                cmap=OVERLAY_CMAP,
                norm=norm,
                alpha=OVERLAY_ALPHA,
                extent=(-0.5, width - 0.5, height - 0.5, -0.5),
                interpolation="nearest",
            )
    fig.colorbar(ScalarMappable(norm, OVERLAY_CMAP), ax=axes[:, 1:], label=colorbar_label, shrink=0.9)
    fig.suptitle(heading, fontsize=10)
    return save_png(fig, path)
