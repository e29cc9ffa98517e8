import resource
import subprocess
import sys

import numpy as np
import pytest
import torch

from vitlab.checkpoint import Normalization, load_checkpoint, save_checkpoint
from vitlab.errors import VitlabError
from vitlab.models import build_model

NORM = Normalization((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))


def test_round_trip_rebuilds_the_same_model(tmp_path):
    model = build_model("vit", {"dim": 32, "depth": 2, "heads": 2, "mlp_dim": 32, "num_classes": 3}).eval()
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, ["a", "b", "c"], NORM, "toy")
    # weights_only=True is enough to read it: no arbitrary unpickling.
    assert set(torch.load(path, weights_only=True)) >= {"arch", "config", "state_dict"}
    ckpt = load_checkpoint(path)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ckpt.model(x), model(x))
    assert ckpt.class_names == ["a", "b", "c"]
    assert ckpt.normalization == NORM
    assert not ckpt.model.training


def test_missing_truncated_and_foreign_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(VitlabError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "none.pt")
    path = tmp_path / "model.pt"
    save_checkpoint(path, build_model("cnn", {}), list("abcdefghij"), NORM, "toy")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(VitlabError, match="not a readable vitlab checkpoint"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(VitlabError, match="not a vitlab checkpoint"):
        load_checkpoint(foreign)


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, build_model("cnn", {}), list("abcdefghij"), NORM, "toy")
    payload = torch.load(path, weights_only=True)
    payload["config"]["channels"] = [8, 8]
    torch.save(payload, path)
    with pytest.raises(VitlabError, match="weights do not fit a cnn"):
        load_checkpoint(path)


def test_pickled_code_in_a_checkpoint_is_never_run(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"arch": Evil()}, path)
    with pytest.raises(VitlabError, match="not a readable vitlab checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def test_normalization_from_images_and_to_tensor():
    images = np.zeros((2, 4, 4, 3), np.uint8)
    images[..., 0] = 255
    norm = Normalization.from_images(images)
    assert norm.mean == (1.0, 0.0, 0.0)
    x = Normalization((0.5,) * 3, (0.5,) * 3).to_tensor(torch.as_tensor(images))
    assert x.shape == (2, 3, 4, 4)
    assert x[:, 0].eq(1.0).all() and x[:, 1].eq(-1.0).all()


def test_a_checkpoint_that_cannot_be_written_is_one_line_naming_it(tmp_path):
    # torch.save itself reports a failed write as a RuntimeError without the reason; a 64 KiB file-size
    # limit makes the write fail for real (EFBIG, as a full disk gives ENOSPC).
    save = "import sys, torch, vitlab.checkpoint as c; c.save_torch(sys.argv[1], torch.ones(50000))"
    target = tmp_path / "model.pt"
    limit = (1 << 16, resource.getrlimit(resource.RLIMIT_FSIZE)[1])
    done = subprocess.run(
        [sys.executable, "-c", save, str(target)],
        capture_output=True,
        text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, limit),
    )
    assert done.stderr.strip().endswith(f"VitlabError: cannot write {target}: File too large")
    assert list(tmp_path.iterdir()) == []
