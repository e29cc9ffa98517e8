import math
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cifar_fakes import make_dataset

from vitlab.checkpoint import Normalization, load_checkpoint, save_checkpoint
from vitlab.cli import main
from vitlab.data.prepared import save_prepared
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
    with pytest.raises(VitlabError, match="weights do not fit a cnn") as error:
        load_checkpoint(path)
    # torch's own message has the detail past its first line: the misshapen keys are named.
    assert str(error.value).endswith(
        ": shapes (file vs model) differ for features.0.weight (16, 3, 3, 3) vs (8, 3, 3, 3), "
        "features.0.bias (16,) vs (8,), features.3.weight (32, 16, 3, 3) vs (8, 8, 3, 3) and 2 more"
    )


TINY_VIT = {"dim": 16, "depth": 1, "heads": 2, "mlp_dim": 16, "num_classes": 3}


@pytest.mark.parametrize(
    ("wrap", "prefix", "wrapper"),
    [
        (torch.nn.DataParallel, "module.", "DataParallel or DistributedDataParallel"),
        (torch.compile, "_orig_mod.", "torch.compile"),
    ],
    ids=["data-parallel", "compile"],
)
def test_a_wrapped_models_weights_name_the_keys_and_the_prefix_to_strip(tmp_path, wrap, prefix, wrapper):
    model = build_model("vit", TINY_VIT)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, ["a", "b", "c"], NORM, "toy")
    payload = torch.load(path, weights_only=True)
    payload["state_dict"] = wrap(model).state_dict()  # what saving the wrapper instead of the model gives
    torch.save(payload, path)
    with pytest.raises(VitlabError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: weights do not fit a vit with config ")
    n = len(model.state_dict())
    assert message.endswith(
        f": missing cls_token, pos_embed, patch_embed.weight and {n - 3} more; "
        f"unexpected {prefix}cls_token, {prefix}pos_embed, {prefix}patch_embed.weight and {n - 3} more "
        f"(every unexpected key starts with '{prefix}': saved from a model wrapped in {wrapper}; "
        f"strip the prefix, {{k.removeprefix('{prefix}'): w for k, w in state_dict.items()}}, and it fits)"
    )
    # The advice works.
    payload["state_dict"] = {k.removeprefix(prefix): w for k, w in payload["state_dict"].items()}
    torch.save(payload, path)
    assert load_checkpoint(path).class_names == ["a", "b", "c"]


def test_prefixed_weights_of_another_model_are_not_said_to_fit_once_stripped(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, build_model("vit", TINY_VIT), ["a", "b", "c"], NORM, "toy")
    payload = torch.load(path, weights_only=True)
    other = build_model("vit", TINY_VIT | {"dim": 32})
    payload["state_dict"] = {f"module.{k}": w for k, w in other.state_dict().items()}
    torch.save(payload, path)
    stripped_does_not_fit = r"starts with 'module\.': .*; even without the prefix the weights do not fit"
    with pytest.raises(VitlabError, match=stripped_does_not_fit):
        load_checkpoint(path)


def _diverged_checkpoint(path) -> list[str]:
    """A checkpoint with NaN attention weights and an infinite head, as a diverged run leaves: their names."""
    model = build_model("vit", TINY_VIT)
    poisoned = []
    with torch.no_grad():
        for name, weight in model.state_dict().items():
            if ".attn." in name or name.startswith("head."):
                weight.fill_(math.inf if name.startswith("head.") else math.nan)
                poisoned.append(name)
    save_checkpoint(path, model, ["a", "b", "c"], NORM, "toy")
    return poisoned


def test_a_diverged_checkpoint_is_refused_naming_its_non_finite_weights(tmp_path):
    path = tmp_path / "model.pt"
    poisoned = _diverged_checkpoint(path)
    total = len(torch.load(path, weights_only=True)["state_dict"])
    with pytest.raises(VitlabError) as error:
        load_checkpoint(path)
    assert str(error.value) == (
        f"{path}: {len(poisoned)} of {total} weight tensors hold NaN or infinite values "
        f"({', '.join(poisoned[:3])} and {len(poisoned) - 3} more): the training run diverged; "
        "retrain with a lower train.learning_rate"
    )


def test_the_evaluate_stage_refuses_a_diverged_model_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    save_prepared(make_dataset(n_train=20, n_test=10, num_classes=3), "data/prepared")
    _diverged_checkpoint(Path("models/model.pt"))
    Path("params.yaml").write_text("train:\n  device: cpu\n")
    assert main(["stage", "evaluate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: models/model.pt: 6 of 20 weight tensors hold NaN") and err.count("\n") == 1
    assert "the training run diverged" in err
    assert not Path("reports").exists()


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
