import json
import os
import re
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from serving_fixtures import (
    NORM,
    cifar_images,
    class_names,
    export_plain_onnx,
    png_header,
    random_model,
    save_pngs,
)

from vitlab import inference
from vitlab.errors import VitlabError
from vitlab.export import export_onnx
from vitlab.inference import (
    BadInput,
    Classifier,
    classify_files,
    expand_inputs,
    image_extensions,
    load_image,
    select_providers,
)


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    model = random_model("vit")
    path = export_onnx(model, tmp_path_factory.mktemp("vit") / "model.onnx", class_names(), NORM)
    return model, path


@pytest.fixture(scope="module")
def classifier(vit):
    return Classifier(vit[1], provider="cpu")


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    images, _ = cifar_images(40)
    return images, save_pngs(images, tmp_path_factory.mktemp("pngs"))


def test_classifier_agrees_with_pytorch_on_real_png_files(vit, classifier, pngs):
    model, _ = vit
    images, paths = pngs
    with torch.no_grad():
        logits = model(NORM.to_tensor(torch.as_tensor(images)))
    expected = logits.double().softmax(1).numpy()
    assert len(set(expected.argmax(1))) > 3  # the comparison below spans several classes

    results = classify_files(classifier, paths, top_k=3, batch_size=16)  # chunks of 16, 16, 8
    assert [r.path for r in results] == [str(p) for p in paths]
    names = class_names()
    for result, probs in zip(results, expected, strict=True):
        assert result.error is None
        assert result.labels[0] == names[probs.argmax()]
        assert len(result.labels) == 3 and result.probabilities == sorted(result.probabilities, reverse=True)
        np.testing.assert_allclose(result.probabilities, np.sort(probs)[::-1][:3], atol=1e-5)

    probabilities = classifier.predict(images, batch_size=7)
    assert probabilities.dtype == np.float64 and probabilities.shape == (40, 10)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert json.dumps([r.to_dict() for r in results])  # what `vitlab predict --json` prints


def test_predict_checks_its_input_and_handles_an_empty_batch(classifier):
    assert classifier.predict(np.zeros((0, 32, 32, 3), np.uint8)).shape == (0, 10)
    with pytest.raises(VitlabError, match=r"uint8 images \(N, 32, 32, 3\), got float32"):
        classifier.predict(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(VitlabError, match=r"got uint8 \(2, 3, 32, 32\)"):
        classifier.predict(np.zeros((2, 3, 32, 32), np.uint8))


def test_predict_is_thread_safe(classifier):
    images, _ = cifar_images(200)
    expected = classifier.predict(images, batch_size=64)
    results: list[np.ndarray] = [None] * 4
    errors = []

    def work(slot):
        try:
            results[slot] = np.stack([classifier.predict(images, batch_size=64) for _ in range(3)])
        except Exception as error:  # surfaced below: an exception in a thread would pass silently
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for result in results:
        assert np.array_equal(result, np.broadcast_to(expected, result.shape))


@pytest.mark.parametrize(("suffix", "options"), [(".png", {}), (".bmp", {}), (".webp", {"lossless": True})])
def test_a_32x32_rgb_image_passes_through_byte_for_byte(tmp_path, suffix, options):
    images, _ = cifar_images(1)
    path = tmp_path / f"img{suffix}"
    Image.fromarray(images[0]).save(path, **options)
    loaded = load_image(path)
    assert loaded.dtype == np.uint8 and loaded.shape == (32, 32, 3)
    assert np.array_equal(loaded, images[0])


def test_load_image_converts_any_mode_to_rgb(tmp_path):
    images, _ = cifar_images(1)
    gray = np.asarray(Image.fromarray(images[0]).convert("L"))
    Image.fromarray(gray).save(tmp_path / "gray.png")
    assert np.array_equal(load_image(tmp_path / "gray.png"), np.repeat(gray[..., None], 3, axis=2))

    palette = Image.fromarray(images[0]).quantize(16)
    palette.save(tmp_path / "palette.png")
    assert np.array_equal(load_image(tmp_path / "palette.png"), np.asarray(palette.convert("RGB")))

    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:, :16] = (200, 10, 10, 255)  # left opaque red, right fully transparent black
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    loaded = load_image(tmp_path / "rgba.png")
    assert (loaded[:, :16] == (200, 10, 10)).all() and (loaded[:, 16:] == 255).all()  # transparent -> white

    Image.fromarray(rgba[..., [0, 3]]).save(
        tmp_path / "la.png"
    )  # LA: gray 200 on the left, transparent right
    loaded = load_image(tmp_path / "la.png")
    assert (loaded[:, :16] == 200).all() and (loaded[:, 16:] == 255).all()

    sixteen = np.full((32, 32), 32768, np.uint16)
    sixteen[:, 16:] = 65535
    Image.fromarray(sixteen).save(tmp_path / "sixteen.png")  # 16-bit grayscale: scaled, not clipped to white
    loaded = load_image(tmp_path / "sixteen.png")
    assert (loaded[:, :16] == 128).all() and (loaded[:, 16:] == 255).all()

    Image.fromarray(images[0]).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    loaded = load_image(tmp_path / "cmyk.jpg")
    assert loaded.shape == (32, 32, 3) and np.abs(loaded.astype(int) - images[0]).mean() < 12


def test_load_image_downsamples_large_images_with_antialiasing_and_a_center_crop(tmp_path):
    wide = np.zeros((1500, 2000, 3), np.uint8)
    wide[:, :1000] = (255, 0, 0)
    wide[:, 1000:] = (0, 0, 255)
    wide[::2, ::2] = 0  # fine texture: antialiasing averages it, point sampling would alias
    wide[:, :250] = (0, 255, 0)  # the outer columns fall outside the center square
    Image.fromarray(wide).save(tmp_path / "wide.jpg", quality=95)
    loaded = load_image(tmp_path / "wide.jpg")
    assert loaded.shape == (32, 32, 3)
    assert loaded[:, :, 1].max() < 40  # no green: cropped to the central 1500x1500, not squashed
    left, right = loaded[8:24, 2:12].mean((0, 1)), loaded[8:24, 20:30].mean((0, 1))
    assert 160 < left[0] < 220 and left[2] < 40  # 3/4 of red's 255 survives the averaging
    assert 160 < right[2] < 220 and right[0] < 40


def test_load_image_applies_the_exif_orientation(tmp_path):
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:16] = (255, 0, 0)  # top half red as stored; the tag says to show it turned 90° clockwise
    stored[16:] = (0, 0, 255)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "rotated.png", exif=exif)
    loaded = load_image(tmp_path / "rotated.png")
    assert tuple(loaded[16, 27]) == (255, 0, 0) and tuple(loaded[16, 4]) == (0, 0, 255)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty file"),
        (b"label,confidence\ncat,0.9\n", "not an image"),
        ("truncated", "unreadable image"),
    ],
)
def test_load_image_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.png"
    if content == "truncated":
        Image.fromarray(cifar_images(1)[0][0]).save(tmp_path / "good.png")
        content = (tmp_path / "good.png").read_bytes()[:400]
    path.write_bytes(content)
    with pytest.raises(VitlabError, match=f"^{re.escape(str(path))}: {message}"):
        load_image(path)


def test_load_image_refuses_decompression_bombs(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(inference, "MAX_PIXELS", 5000)
    with pytest.raises(VitlabError, match=r"100x100 image exceeds the 5,000-pixel limit"):
        load_image(path)
    monkeypatch.undo()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's own check, should a user lower it
    with pytest.raises(VitlabError, match="decompression bomb"):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 8000)  # where Pillow only warns: refused all the same
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(VitlabError, match=r"100x100 image exceeds the 8,000-pixel limit"):
            load_image(path)
    assert caught == []


@pytest.mark.parametrize(
    ("size", "refusal"),
    [
        ((10_000, 9_000), "10000x9000 image exceeds the 64,000,000-pixel limit"),
        ((20_000, 9_000), "refused as a possible decompression bomb (Image size (180000000 pixels)"),
    ],
    ids=["past-pillows-warning", "past-pillows-error"],
)
def test_pillows_bomb_limits_are_a_clean_refusal_without_its_warning(tmp_path, size, refusal):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(*size))
    assert size[0] * size[1] > Image.MAX_IMAGE_PIXELS  # Pillow's own check fires before vitlab's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(VitlabError) as error:
            load_image(path)
    assert str(error.value).startswith(f"{path}: {refusal}") and "\n" not in str(error.value)
    assert [w.category.__name__ for w in caught] == []  # no DecompressionBombWarning


def test_vitlab_predict_refuses_a_bomb_with_one_line_and_nothing_else_on_stderr(vit, pngs, tmp_path):
    # A subprocess: under pytest a warning is collected by pytest instead of reaching stderr.
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(10_000, 9_000))
    good = pngs[1][0]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "vitlab.cli",
            "predict",
            str(vit[1]),
            str(bomb),
            str(good),
            "--provider",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    lines = dict(line.split("\t", 1) for line in done.stdout.splitlines())
    assert set(lines) == {str(bomb), str(good)}
    assert lines[str(bomb)] == "error: 10000x9000 image exceeds the 64,000,000-pixel limit"
    assert not lines[str(good)].startswith("error")
    assert done.stderr == "1 of 2 images could not be classified\n"  # no DecompressionBombWarning


def _predict(model: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """``vitlab predict MODEL ARGS --provider cpu`` in a child whose stdout is strict UTF-8, as in an
    en_US.UTF-8 terminal (Python's UTF-8 mode, under a C locale, would hide an unencodable name)."""
    env = dict(os.environ, PYTHONIOENCODING="utf-8:strict", PYTHONUTF8="0", LC_ALL="C.UTF-8")
    command = [sys.executable, "-m", "vitlab.cli", "predict", str(model), *args, "--provider", "cpu"]
    return subprocess.run(command, capture_output=True, env=env, timeout=120, **kwargs)


def test_bad_inputs_beside_good_files_are_lines_of_their_own_and_dash_reads_stdin(vit, pngs, tmp_path):
    """A missing path, an empty glob or - aborted the whole batch (exit 2, nothing classified)."""
    good = [str(p) for p in pngs[1][:2]]
    piped = pngs[1][2].read_bytes()
    done = _predict(
        vit[1], good[0], str(tmp_path / "gone.png"), str(tmp_path / "*.gif"), "-", good[1], input=piped
    )
    assert done.returncode == 1
    lines = dict(line.split("\t", 1) for line in done.stdout.decode().splitlines())
    assert lines.pop(str(tmp_path / "gone.png")) == "error: no such file or folder"
    assert lines.pop(str(tmp_path / "*.gif")) == "error: pattern matches no image files"
    assert set(lines) == {*good, "/dev/stdin"} and not any(v.startswith("error") for v in lines.values())
    # The image piped in gets the label its file gets.
    alone = _predict(vit[1], str(pngs[1][2]))
    assert lines["/dev/stdin"] == alone.stdout.decode().split("\t")[1].strip()
    assert done.stderr.decode() == "2 of 5 images could not be classified\n"


def test_a_name_that_is_not_utf8_is_printed_escaped_in_every_format_and_loses_no_result(vit, pngs, tmp_path):
    """A Latin-1 café crashed the table at its line (UnicodeEncodeError) and lost the lines after it."""
    folder = tmp_path / "photos"
    folder.mkdir()
    names = [b"a.png", b"caf\xe9.png", b"tab\there.png", b"z.png"]
    for name, source in zip(names, pngs[1], strict=False):
        Path(os.fsdecode(os.path.join(bytes(folder), name))).write_bytes(source.read_bytes())
    shown = [str(folder / n) for n in ("a.png", "caf\\xe9.png", "tab\\there.png", "z.png")]
    table = _predict(vit[1], str(folder))
    assert table.returncode == 0, table.stderr
    assert [line.split(b"\t")[0].decode() for line in table.stdout.splitlines()] == shown
    as_json = _predict(vit[1], str(folder), "--json")
    assert as_json.returncode == 0, as_json.stderr
    predictions = json.loads(as_json.stdout.decode("utf-8", "strict"))["predictions"]
    assert [p["path"] for p in predictions] == shown and all(p["labels"] for p in predictions)


def test_a_reader_that_stops_early_ends_predict_quietly_not_as_a_failure(vit, pngs):
    """`vitlab predict ... | head -n 1` exited 1, the status of a failed image."""
    command = [sys.executable, "-m", "vitlab.cli", "predict", str(vit[1]), str(pngs[1][0].parent)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # the reader has gone before the first line
    stderr = child.stderr.read()
    assert child.wait(timeout=120) == 128 + 13  # what a shell reports for `cat big | head -n 1`
    assert stderr == b""


def test_bad_files_become_error_predictions_and_the_rest_still_runs(classifier, pngs, tmp_path):
    _, paths = pngs
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(paths[0].read_bytes()[:300])
    missing = tmp_path / "gone.png"
    inputs = [paths[0], empty, text, paths[1], truncated, missing, paths[2]]

    results = classify_files(classifier, inputs, top_k=20, batch_size=2)
    assert [r.path for r in results] == [str(p) for p in inputs]
    failed = {r.path: r.error for r in results if r.error}
    assert set(failed) == {str(empty), str(text), str(truncated), str(missing)}
    assert failed[str(empty)] == "empty file" and failed[str(missing)] == "no such file"
    assert failed[str(text)] == "not an image Pillow can read"
    assert failed[str(truncated)].startswith("unreadable image")
    for result in (results[0], results[3], results[6]):
        assert len(result.labels) == 10  # top_k beyond the class count gives every class
        assert result.probabilities[0] >= result.probabilities[-1]


def test_a_model_with_another_input_is_refused(tmp_path):
    mnist = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 26 * 26, 10)
    )
    path = export_plain_onnx(mnist, (2, 1, 28, 28), tmp_path / "mnist.onnx")
    with pytest.raises(
        VitlabError, match=r"mnist\.onnx: expects input .*\[.*1, 28, 28\], not a vitlab model"
    ):
        Classifier(path, provider="cpu")


def test_a_model_without_vitlab_metadata_is_refused(tmp_path):
    path = export_plain_onnx(random_model("mlp"), (2, 3, 32, 32), tmp_path / "bare.onnx")
    with pytest.raises(VitlabError, match=r"bare\.onnx: no valid vitlab metadata .*class_names"):
        Classifier(path, provider="cpu")


def test_a_missing_or_corrupt_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(VitlabError, match=r"nowhere\.onnx: no such model file"):
        Classifier(tmp_path / "nowhere.onnx")
    (tmp_path / "corrupt.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(VitlabError, match=r"corrupt\.onnx: not a loadable ONNX model"):
        Classifier(tmp_path / "corrupt.onnx")


def test_serving_never_imports_torch(vit, pngs):
    _, model_path = vit
    _, paths = pngs
    script = (
        "import sys\n"
        "from vitlab.inference import Classifier, classify_files, expand_inputs\n"
        f"classifier = Classifier({str(model_path)!r})\n"
        f"results = classify_files(classifier, expand_inputs([{str(paths[0].parent)!r}]))\n"
        "assert all(r.error is None for r in results) and len(results) == 40, results\n"
        "print(sorted(m for m in ('torch', 'onnx', 'vitlab.checkpoint', 'matplotlib') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert "CUDA" not in done.stderr  # "auto" probed quietly (no provider-load error spam)


def test_select_providers(monkeypatch):
    assert select_providers("cpu") == ["CPUExecutionProvider"]
    assert select_providers("auto")[-1] == "CPUExecutionProvider"
    with pytest.raises(VitlabError, match="unknown provider 'tpu'"):
        select_providers("tpu")

    monkeypatch.setattr(inference, "_usable_providers", lambda: {"CPUExecutionProvider"})
    assert select_providers("auto") == ["CPUExecutionProvider"]
    for choice in ("cuda", "tensorrt"):
        with pytest.raises(VitlabError, match=f"^provider={choice} is not usable here: .*; set provider to"):
            select_providers(choice)
    # The line names the setting the user chose it with.
    with pytest.raises(
        VitlabError, match=r"^inference.provider=cuda .*; set inference.provider to auto or cpu$"
    ):
        select_providers("cuda", "inference.provider")

    monkeypatch.setattr(
        inference, "_usable_providers", lambda: {"CUDAExecutionProvider", "CPUExecutionProvider"}
    )
    assert select_providers("auto") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_usable_providers_exclude_listed_providers_without_a_device(monkeypatch):
    class Device:
        def __init__(self, ep_name):
            self.ep_name = ep_name

    installed = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(inference.ort, "get_available_providers", lambda: installed)
    monkeypatch.setattr(inference.ort, "get_ep_devices", lambda: [Device("CPUExecutionProvider")])
    assert inference._usable_providers() == {"CPUExecutionProvider"}
    monkeypatch.setattr(
        inference.ort,
        "get_ep_devices",
        lambda: [Device("CPUExecutionProvider"), Device("CUDAExecutionProvider")],
    )
    assert inference._usable_providers() == {"CUDAExecutionProvider", "CPUExecutionProvider"}


def test_expand_inputs_finds_images_in_files_folders_and_patterns(tmp_path, monkeypatch):
    for name in (
        "a/1.png",
        "a/b/2.JPG",
        "a/b/c/3.webp",
        "a/.hidden/4.png",
        "a/._5.png",
        "a/notes.txt",
        "z.bmp",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    found = expand_inputs(["z.bmp", "a", "a/b/*.JPG", "./a/1.png", "a/notes.txt", "**/3.webp"])
    assert found == [Path(p) for p in ("a/1.png", "a/b/2.JPG", "a/b/c/3.webp", "a/notes.txt", "z.bmp")]

    # A pattern searches: the folders it matches are expanded and non-images it matches are left out.
    assert expand_inputs(["a/*"]) == [Path(p) for p in ("a/1.png", "a/b/2.JPG", "a/b/c/3.webp")]
    (tmp_path / "photo[1].png").write_bytes(b"x")  # an existing path is never read as a pattern
    assert expand_inputs(["photo[1].png"]) == [Path("photo[1].png")]

    # An input that names no image is a BadInput in its place, beside the images of the others.
    (tmp_path / "empty").mkdir()
    assert expand_inputs(["a/1.png", "a/*.gif", "photos", "empty"]) == [
        BadInput("a/*.gif", "pattern matches no image files"),  # sorted by name: "*" before "1"
        Path("a/1.png"),
        BadInput("empty", "folder holds no images (no file with an image extension: .jpg, .png...)"),
        BadInput("photos", "no such file or folder"),
    ]


def test_a_folder_scan_and_a_glob_follow_symlinks_alike_and_report_what_they_cannot_read(tmp_path):
    """A folder scan skipped images in linked folders while ** followed them: one rule (follow, each real
    folder once, so a cycle ends), and a dangling image link or an unlistable folder is a line, not a gap."""
    photos, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    (photos / "own").mkdir(parents=True)
    (elsewhere / "deep").mkdir(parents=True)
    (photos / "own" / "1.png").write_bytes(b"x")
    (elsewhere / "2.png").write_bytes(b"x")
    (elsewhere / "deep" / "3.png").write_bytes(b"x")
    (photos / "linked").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "back").symlink_to(photos, target_is_directory=True)  # a cycle
    (photos / "gone.png").symlink_to(tmp_path / "nowhere.png")
    by_folder = expand_inputs([str(photos)])
    by_glob = expand_inputs([str(photos / "**")])
    images = {photos / "own" / "1.png", photos / "linked" / "2.png", photos / "linked" / "deep" / "3.png"}
    for found in (by_folder, by_glob):
        assert {p.resolve() for p in found if isinstance(p, Path)} == {p.resolve() for p in images}
        assert [b for b in found if isinstance(b, BadInput)] == [
            BadInput(str(photos / "gone.png"), "broken symbolic link")
        ]
    if os.geteuid() != 0:  # root lists any folder
        locked = photos / "locked"
        locked.mkdir()
        locked.chmod(0)
        try:
            found = expand_inputs([str(photos)])
        finally:
            locked.chmod(0o755)
        assert BadInput(str(locked), "folder cannot be listed (Permission denied)") in found


_COMMON_FORMATS = {
    ".jpe": {},
    ".jpg": {},
    ".jpeg": {},
    ".gif": {},
    ".tif": {},
    ".tiff": {"compression": "tiff_lzw"},
    ".png": {},
    ".bmp": {},
    ".webp": {"lossless": True},
}


def test_a_folder_scan_finds_every_file_pillow_reads_by_the_same_rule_as_naming_it(classifier, tmp_path):
    images, _ = cifar_images(len(_COMMON_FORMATS))
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    wanted = []
    for (suffix, options), image in zip(_COMMON_FORMATS.items(), images, strict=True):
        # Searched recursively and whatever the case of the extension.
        path = (
            folder / "sub" / "photo.gif"
            if suffix == ".gif"
            else folder / f"photo{suffix.replace('tif', 'TIF')}"
        )
        Image.fromarray(image).save(path, **options)
        wanted.append(path)
    for name in ("notes.txt", "labels.csv", "clip.mpg", "table.h5", "scan.pdf"):
        (folder / name).write_bytes(b"not an image")

    found = expand_inputs([str(folder)])
    assert found == sorted(wanted, key=str)  # every image, no other file
    results = classify_files(classifier, found)
    assert [r.error for r in results] == [None] * len(wanted)
    # Named directly, each gives the same answer; a non-image named directly is an error line, as before.
    direct = classify_files(classifier, expand_inputs([str(p) for p in found] + [str(folder / "notes.txt")]))
    labels = {r.path: r.labels for r in direct if r.path != str(folder / "notes.txt")}
    assert labels == {r.path: r.labels for r in results}
    assert [r.error for r in direct if r.path not in labels] == ["not an image Pillow can read"]
    pattern = str(folder / "*.[mp][pd]?")  # clip.mpg, scan.pdf: searched like a folder
    assert expand_inputs([pattern]) == [BadInput(pattern, "pattern matches no image files")]


def test_image_extensions_are_the_formats_pillow_decodes():
    extensions = image_extensions()
    assert set(_COMMON_FORMATS) <= extensions
    assert all(ext.startswith(".") and ext == ext.lower() for ext in extensions)
    # Save-only (PDF), header-only (MPEG) and stub formats (HDF5) are not images Pillow can decode.
    assert not {".pdf", ".mpg", ".mpeg", ".h5", ".txt", ".csv"} & extensions
    registered = Image.registered_extensions()
    assert all(registered[ext] in Image.OPEN or registered[ext] == "MPO" for ext in extensions)
