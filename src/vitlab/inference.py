"""Serving: classify image files with a vitlab ONNX model, on ONNX Runtime alone.

This module imports numpy, Pillow, onnxruntime and the standard library only (vitlab.errors is plain Python),
so a serving environment needs no torch. Everything the model needs besides its graph (class names, input
geometry and normalization) is read from the ONNX file's metadata, written by ``vitlab.export``: any image
is converted to what the model expects (32x32 RGB for CIFAR, 28x28 grayscale for MNIST).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import io
import json
import os
import stat
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from vitlab.data.sources import DATASETS, DEFAULT_DATASET
from vitlab.errors import VitlabError, display_name, one_line

# 64 megapixels covers any camera; beyond it a small file is most likely a decompression bomb. Checked here
# rather than through Image.MAX_IMAGE_PIXELS, which is process-wide state that warns before it refuses (its
# warning, past 89 megapixels, is silenced: such an image is refused here anyway).
MAX_PIXELS = 64_000_000
# Formats Pillow opens but whose pixels it does not decode: it only reads an MPEG's header.
_IDENTIFIED_ONLY = frozenset({"MPEG"})
# Transparent pixels become white, as image viewers show them; CIFAR photos have no alpha, so any background
# is a guess, and white is the one the user saw when looking at the file.
ALPHA_BACKGROUND = (255, 255, 255)
_DEFAULT_DATA = DATASETS[DEFAULT_DATASET]
_MODES = {1: "L", 3: "RGB"}  # Pillow's mode for each channel count a model may take
# The most bytes read from a stream (standard input, a pipe): far above any photo, below a runaway producer.
MAX_STREAM_BYTES = 256 * 2**20
STDIN = Path("/dev/stdin")
"""What ``-`` among ``expand_inputs``' inputs stands for: one image read from standard input."""

_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    # TensorRT hands the operators it cannot build to CUDA, and CUDA to the CPU.
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


@functools.cache
def image_extensions() -> frozenset[str]:
    """The file extensions (lowercase, with the dot) of every format this Pillow can decode: what a folder or
    pattern is searched for. A file named directly is read whatever its extension."""
    from PIL import EpsImagePlugin

    Image.init()  # registers every plugin
    readable = {
        name
        for name, (factory, _) in Image.OPEN.items()
        # Stubs (HDF5, GRIB, BUFR, WMF) need a handler vitlab never installs; EPS needs Ghostscript.
        if not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))
        and name not in _IDENTIFIED_ONLY
        and (name != "EPS" or EpsImagePlugin.has_ghostscript())
    }
    readable.add("MPO")  # multi-picture JPEGs: registered for saving, opened by the JPEG plugin
    return frozenset(ext.lower() for ext, name in Image.registered_extensions().items() if name in readable)


def load_image(
    path: str | Path, image_size: int = _DEFAULT_DATA.image_size, channels: int = _DEFAULT_DATA.channels
) -> np.ndarray:
    """Any image Pillow decodes (PNG, JPEG, WebP, GIF, TIFF, BMP...) -> uint8 (image_size, image_size,
    channels): EXIF-rotated, alpha on white, RGB (3 channels) or grayscale by ITU-R 601 luma (1 channel),
    center-cropped square, Lanczos-resampled (antialiased). An image already of that size and mode comes back
    byte for byte. ``path`` may also be a stream (``STDIN``, a pipe), read once. An image over MAX_PIXELS (or
    Pillow's own limit) is refused before it is decoded; a channel count other than 1 or 3 is a
    VitlabError."""
    path = Path(path)
    return decode_image(_open_source(path), str(path), image_size, channels)


def decode_image(
    source: Path | BinaryIO,
    name: str,
    image_size: int = _DEFAULT_DATA.image_size,
    channels: int = _DEFAULT_DATA.channels,
) -> np.ndarray:
    """``load_image``'s decoding and conversion, of a file or of bytes in memory (``io.BytesIO``: what
    ``vitlab serve`` receives), so both give the same pixels; its VitlabErrors start with ``name``."""
    if channels not in _MODES:
        raise VitlabError(f"models take 1 (grayscale) or 3 (RGB) channels, not {channels}")
    try:
        with warnings.catch_warnings():
            # Pillow warns (on stderr) past Image.MAX_IMAGE_PIXELS and refuses past twice that: the limit
            # below refuses what it warns about, in one line, so its warning is only noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                width, height = image.size
                limit = min(MAX_PIXELS, Image.MAX_IMAGE_PIXELS or MAX_PIXELS)  # should a user lower Pillow's
                if width * height > limit:
                    raise VitlabError(f"{name}: {width}x{height} image exceeds the {limit:,}-pixel limit")
                # JPEGs decode at 1/2-1/8 scale (DCT scaling) while keeping 4x the output size: a 12 MP photo
                # loads several times faster, and the Lanczos step still antialiases what is left.
                image.draft(_MODES[channels], (4 * image_size, 4 * image_size))
                image.load()
                return _to_model_input(ImageOps.exif_transpose(image), image_size, channels)
    except UnidentifiedImageError:
        raise VitlabError(f"{name}: not an image Pillow can read") from None
    except Image.DecompressionBombError as error:
        raise VitlabError(f"{name}: refused as a possible decompression bomb ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:  # truncated or corrupt, as each plugin reports it
        raise VitlabError(f"{name}: unreadable image ({error})") from None


def _open_source(path: Path) -> Path | io.BytesIO:
    """What Pillow opens for ``path``: the path of a regular file; the bytes of a stream (standard input, a
    pipe, a process substitution), read once, at most MAX_STREAM_BYTES. VitlabError, naming ``path``, for a
    missing path, a folder, an empty file or stream, or a stream over the limit."""
    try:
        mode = path.stat().st_mode
    except OSError:  # missing, a broken link, a component that is not a folder
        raise VitlabError(f"{path}: no such file") from None
    if stat.S_ISDIR(mode):
        raise VitlabError(f"{path}: a folder, not an image")
    if stat.S_ISREG(mode):
        if path.stat().st_size == 0:
            raise VitlabError(f"{path}: empty file")
        return path
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_STREAM_BYTES + 1)
    except OSError as error:
        raise VitlabError(f"{path}: cannot read ({error.strerror or error})") from None
    if not data:
        raise VitlabError(f"{path}: empty input")
    if len(data) > MAX_STREAM_BYTES:
        raise VitlabError(f"{path}: input exceeds {MAX_STREAM_BYTES:,} bytes, more than any image")
    return io.BytesIO(data)


def _to_model_input(image: Image.Image, image_size: int, channels: int) -> np.ndarray:
    if image.mode.startswith("I"):
        # 16-bit grayscale: Pillow's convert() clips to 0-255 instead of scaling, turning the image white.
        scaled = np.clip(np.asarray(image, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8)
        image = Image.fromarray(scaled)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
        image.paste(rgba, mask=rgba.getchannel("A"))
    # Crop to a square first: squashing a wide photo distorts the object into shapes CIFAR never shows.
    # At the model's size already, Pillow's resize is a plain copy, so dataset-sized files pass unchanged.
    size = (image_size, image_size)
    image = ImageOps.fit(image.convert(_MODES[channels]), size, Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8).reshape(image_size, image_size, channels)


def select_providers(choice: str = "auto", source: str = "provider") -> list[str]:
    """ONNX Runtime execution providers for ``choice``, best first; "auto" is CUDA if usable, else the CPU.

    Raises VitlabError for an unknown ``choice`` or one with no device here, in one line that names
    ``source``, the setting to change (``--provider``, ``inference.provider``).
    """
    if choice not in ("auto", *_PROVIDERS):
        raise VitlabError(f"{source}: unknown provider {choice!r} (choose auto, {', '.join(_PROVIDERS)})")
    usable = _usable_providers()
    if choice == "auto":
        return _PROVIDERS["cuda"] if "CUDAExecutionProvider" in usable else _PROVIDERS["cpu"]
    if _PROVIDERS[choice][0] not in usable:
        raise VitlabError(
            f"{source}={choice} is not usable here: ONNX Runtime finds no device for {_PROVIDERS[choice][0]} "
            f"(installed: {', '.join(ort.get_available_providers())}); set {source} to auto or cpu"
        )
    return _PROVIDERS[choice]


def _usable_providers() -> set[str]:
    """Providers that have hardware to run on.

    onnxruntime-gpu lists CUDA and TensorRT in get_available_providers() even with no GPU or CUDA libraries,
    and a session asked for them then logs errors and quietly runs on the CPU. get_ep_devices() (ORT >= 1.22)
    pairs a provider with a device only when it found one, without trying to create anything.
    """
    available = set(ort.get_available_providers())
    if not hasattr(ort, "get_ep_devices"):
        return available
    return available & ({device.ep_name for device in ort.get_ep_devices()} | {"CPUExecutionProvider"})


class Classifier:
    """A vitlab ONNX model ready to classify uint8 images; ``predict`` may be called from many threads."""

    def __init__(
        self,
        model_path: str | Path,
        provider: str = "auto",
        threads: int | None = None,
        source: str = "provider",
        spin: bool = True,
    ):
        """Open ``model_path`` on ``provider`` (see ``select_providers``) with ``threads`` intra-op threads
        (None: ORT's default). ``spin``: ORT's idle intra-op threads busy-wait for the next call (its default,
        quickest for back-to-back calls); False for a process that has other work for the cores between
        calls, such as ``vitlab serve``. Raises VitlabError naming the file when it is missing or not
        loadable, when an explicitly chosen provider does not start (naming ``source``, the setting that
        chose it), when its class_names/mean/std metadata is missing, invalid or disagrees with the number of
        logits, or when its input is not float (N, channels, image_size, image_size) as its metadata says."""
        path = Path(model_path)
        if not path.is_file():
            raise VitlabError(f"{path}: no such model file")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: ORT's warnings about graph details are not the user's
        if threads is not None:
            options.intra_op_num_threads = threads
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = select_providers(provider, source)
        try:
            self._session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as error:  # ORT's errors (InvalidProtobuf, Fail, ...) derive from Exception directly
            raise VitlabError(f"{path}: not a loadable ONNX model ({one_line(error)})") from None
        self.providers: list[str] = self._session.get_providers()
        # An explicit accelerator must run; "auto" accepts ORT's own fallback to the CPU.
        if provider != "auto" and providers[0] not in self.providers:
            raise VitlabError(
                f"{path}: ONNX Runtime could not start {providers[0]} (running: {self.providers}); set "
                f"{source} to auto or cpu"
            )

        inputs = self._session.get_inputs()
        meta = self._session.get_modelmeta().custom_metadata_map
        self.metadata: dict[str, str] = dict(meta)  # the file's metadata_props, as export_onnx wrote them
        try:
            # Files exported before the geometry was recorded are all 32x32 RGB, as their input's shape says.
            self.image_size = int(meta.get("image_size", _DEFAULT_DATA.image_size))
            self.channels = int(meta.get("channels", _DEFAULT_DATA.channels))
        except ValueError as error:
            raise VitlabError(
                f"{path}: no valid vitlab metadata ({error!r}); export it with vitlab"
            ) from None
        shape = [self.channels, self.image_size, self.image_size]
        if len(inputs) != 1 or inputs[0].type != "tensor(float)" or list(inputs[0].shape)[1:] != shape:
            found = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
            expected = " x ".join(map(str, ["N", *shape]))
            raise VitlabError(f"{path}: expects input {found}, not a vitlab model (float {expected})")
        self._input_name = inputs[0].name
        try:
            self._class_names = [str(name) for name in json.loads(meta["class_names"])]
            self._mean = np.asarray(json.loads(meta["mean"]), dtype=np.float32).reshape(
                1, 1, 1, self.channels
            )
            self._std = np.asarray(json.loads(meta["std"]), dtype=np.float32).reshape(1, 1, 1, self.channels)
        except (KeyError, ValueError, TypeError) as error:
            raise VitlabError(
                f"{path}: no valid vitlab metadata ({error!r}); export it with vitlab"
            ) from None
        classes = self._session.get_outputs()[0].shape[-1]
        if isinstance(classes, int) and classes != len(self._class_names):
            raise VitlabError(
                f"{path}: outputs {classes} logits but its metadata names {len(self._class_names)}"
            )

    @property
    def class_names(self) -> list[str]:
        """A copy of the class names from the model's metadata, in logit order."""
        return list(self._class_names)

    def predict(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """uint8 (N, image_size, image_size, channels) -> float64 class probabilities (N, classes);
        VitlabError for other images (``load_image`` converts any file to what the model takes)."""
        hwc = (self.image_size, self.image_size, self.channels)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != hwc:
            expected = ", ".join(map(str, hwc))
            raise VitlabError(
                f"predict expects uint8 images (N, {expected}), got {images.dtype} {images.shape}"
            )
        if batch_size < 1:
            raise VitlabError(f"batch_size must be at least 1, got {batch_size}")
        probabilities = np.empty((len(images), len(self._class_names)), dtype=np.float64)
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            # The same float32 arithmetic as Normalization.to_tensor, so ORT sees what PyTorch saw.
            x = (batch.astype(np.float32) / np.float32(255.0) - self._mean) / self._std
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
            logits = self._session.run(None, {self._input_name: x})[0].astype(np.float64)
            logits -= logits.max(axis=1, keepdims=True)
            exp = np.exp(logits)
            probabilities[start : start + len(batch)] = exp / exp.sum(axis=1, keepdims=True)
        return probabilities


@dataclasses.dataclass
class Prediction:
    """One input's result from ``classify_files``: its top-k labels and float probabilities, best first, or
    ``error``, why it could not be read (without the path), with both lists empty. ``path`` is the name as
    the file system gave it (``os.fsdecode``: undecodable bytes as surrogate escapes); ``display_name``
    makes it printable."""

    path: str
    labels: list[str]  # best first
    probabilities: list[float]
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (what ``vitlab predict --json`` prints per file), the path and the
        error as ``display_name`` writes them: valid UTF-8 whatever bytes the file's name holds."""
        error = None if self.error is None else display_name(self.error)
        return dataclasses.asdict(self) | {"path": display_name(self.path), "error": error}


@dataclasses.dataclass(frozen=True)
class BadInput:
    """An input of ``expand_inputs`` that names no image to read: a missing path, a folder or pattern without
    images, an unreadable folder; ``classify_files`` reports it as a failed ``Prediction``."""

    path: str
    error: str


def classify_files(
    classifier: Classifier, paths: Iterable[str | Path | BadInput], top_k: int = 5, batch_size: int = 256
) -> list[Prediction]:
    """Top-k labels per file, in the order given; a file that cannot be read, or a ``BadInput``, gets
    ``error`` (why) instead: one bad input never stops the others."""
    if top_k < 1:
        raise VitlabError(f"top_k must be at least 1, got {top_k}")
    names = classifier.class_names
    k = min(top_k, len(names))
    items = [p if isinstance(p, BadInput) else Path(p) for p in paths]
    results: list[Prediction] = []
    # Chunks of batch_size bound the memory: a million files never sit decoded at once.
    for start in range(0, len(items), batch_size):
        chunk: list[Prediction] = []
        images: list[np.ndarray] = []
        for item in items[start : start + batch_size]:
            if isinstance(item, BadInput):
                chunk.append(Prediction(item.path, [], [], error=item.error))
                continue
            try:
                images.append(load_image(item, classifier.image_size, classifier.channels))
                chunk.append(Prediction(str(item), [], []))
            except VitlabError as error:
                # The reason alone: the Prediction already names the file.
                chunk.append(Prediction(str(item), [], [], error=str(error).removeprefix(f"{item}: ")))
        if images:
            probabilities = iter(classifier.predict(np.stack(images), batch_size=batch_size))
            for prediction in (p for p in chunk if p.error is None):
                prediction.labels, prediction.probabilities = best_classes(next(probabilities), names, k)
        results += chunk
    return results


def best_classes(probabilities: np.ndarray, class_names: list[str], k: int) -> tuple[list[str], list[float]]:
    """The k most probable of one image's (classes,) probabilities: labels and probabilities, best first
    (ties in class order)."""
    best = np.argsort(-probabilities, kind="stable")[:k]
    return [class_names[i] for i in best], [float(probabilities[i]) for i in best]


def expand_inputs(inputs: list[str]) -> list[Path | BadInput]:
    """The images that files, folders and glob patterns name, sorted by name and deduplicated, each input
    that names none as a ``BadInput`` in its place: nothing is dropped without a line saying so.

    - A file, or any other path that is not a folder (a pipe, ``/dev/stdin``), is read whatever its
      extension; ``-`` is one image from standard input (``STDIN``).
    - A folder is searched recursively for files with an image extension (``image_extensions()``), hidden
      ones (a part starting with ".") left out; a pattern (``*``, ``?``, ``[``; ``**`` recursive) searches
      the same way: the folders it matches are searched, the non-images it matches left out.
    - Both follow symbolic links to folders (as ``**`` always has), each real folder once, so a link cycle
      ends. A link with an image extension that points nowhere, and a folder that cannot be listed, are
      ``BadInput``s, as are a missing path and a folder or pattern without images.
    """
    found: dict[Path, Path | BadInput] = {}
    for item in inputs:
        path = STDIN if item == "-" else Path(item)
        # Existing paths first, so a file literally named "photo[1].png" is not read as a pattern.
        if path.is_dir():
            files = _images_under(path)
            if not any(isinstance(f, Path) for f in files):
                files.append(
                    BadInput(item, "folder holds no images (no file with an image extension: .jpg, .png...)")
                )
        elif path.exists():
            files = [path]  # named explicitly: classified whatever its extension
        elif any(c in item for c in "*?["):
            matches = [Path(m) for m in glob.glob(item, recursive=True)]
            files = [
                f for m in matches for f in (_images_under(m) if m.is_dir() else [_found(m)]) if _is_image(f)
            ]
            if not any(isinstance(f, Path) for f in files):
                files.append(BadInput(item, "pattern matches no image files"))
        else:
            files = [BadInput(item, "no such file or folder")]
        # The shortest of the names a file is reached by (through links) stands for it.
        for file in sorted(files, key=lambda f: (len(Path(_name(f)).parts), _name(f))):
            found.setdefault(Path(_name(file)).resolve(), file)
    return sorted(found.values(), key=_name)


def _name(item: Path | BadInput) -> str:
    return item.path if isinstance(item, BadInput) else str(item)


def _images_under(folder: Path) -> list[Path | BadInput]:
    """The image files below ``folder`` (``expand_inputs``' rule), with a BadInput for each folder that cannot
    be listed and each image-named link that leads nowhere."""
    found: list[Path | BadInput] = []
    seen: set[tuple[int, int]] = set()

    def unreadable(error: OSError) -> None:
        found.append(BadInput(str(error.filename), f"folder cannot be listed ({error.strerror})"))

    for root, dirs, names in os.walk(folder, onerror=unreadable, followlinks=True):
        real = os.stat(root)
        if (real.st_dev, real.st_ino) in seen:  # a link back to a folder already searched
            dirs.clear()
            continue
        seen.add((real.st_dev, real.st_ino))
        # Hidden ones are skipped: macOS litters folders with "._photo.jpg" resource forks, not images.
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [_found(Path(root, n)) for n in sorted(names) if not n.startswith(".")]
    return [f for f in found if _is_image(f)]


def _found(path: Path) -> Path | BadInput:
    """``path``, or a BadInput for an image-named link that points nowhere (a search would drop it)."""
    if path.suffix.lower() in image_extensions() and not path.exists():
        return BadInput(str(path), "broken symbolic link")
    return path


def _is_image(path: Path | BadInput) -> bool:
    if isinstance(path, BadInput):
        return True  # a problem found while searching is reported, never filtered out
    return path.suffix.lower() in image_extensions() and path.is_file()
