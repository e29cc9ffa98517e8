import itertools

import pytest
import torch

from vitlab.checkpoint import Normalization
from vitlab.data.augment import (
    POLICY_GROUP,
    BatchAugment,
    alternating_flips,
    random_crop_flip,
    random_erasing,
)
from vitlab.errors import VitlabError


def test_no_padding_no_flip_is_identity():
    x = torch.randn(3, 3, 8, 8)
    assert random_crop_flip(x, 0, False).equal(x)


def test_flip_only_mirrors_some_images_exactly():
    x = torch.randn(64, 3, 8, 8)
    y = random_crop_flip(x, 0, True, torch.Generator().manual_seed(0))
    flipped = torch.tensor([y[i].equal(x[i].flip(-1)) for i in range(64)])
    kept = torch.tensor([y[i].equal(x[i]) for i in range(64)])
    assert (flipped | kept).all()
    assert 10 < flipped.sum() < 54


def _mirrored(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Which images of ``after`` are exactly the mirror images of ``before``'s (asserting the rest are as
    they were)."""
    mirrored = torch.tensor([a.equal(b.flip(-1)) for a, b in zip(after, before, strict=True)])
    kept = torch.tensor([a.equal(b) for a, b in zip(after, before, strict=True)])
    assert (mirrored ^ kept).all()
    return mirrored


def test_alternating_flip_mirrors_each_image_exactly_once_in_any_two_consecutive_epochs():
    # Images of random pixels: no image is its own mirror image.
    images = torch.randint(0, 256, (500, 3, 8, 8), dtype=torch.uint8)
    augment = BatchAugment(Normalization((0.0,) * 3, (1.0,) * 3), 0, crop_padding=0, flip="alternate")
    order = torch.randperm(500)  # batches in a shuffled order, as training draws them

    def mirrored_in(epoch: int) -> torch.Tensor:
        flags = torch.zeros(500, dtype=torch.bool)
        generator = torch.Generator().manual_seed(epoch)  # the batch draws play no part
        for idx in order.split(64):
            x, _ = augment(images[idx], torch.zeros(len(idx)), generator, indices=idx, epoch=epoch)
            flags[idx] = _mirrored(augment.norm.normalize(images[idx]), x)
        return flags

    epochs = [mirrored_in(epoch) for epoch in range(1, 6)]
    for first, second in itertools.pairwise(epochs):
        assert (first ^ second).all()  # once as it is, once mirrored
    assert epochs[0].equal(epochs[2]) and epochs[0].equal(epochs[4])
    assert 200 < int(epochs[0].sum()) < 300  # half the images start mirrored
    # A function of index and epoch alone: the same in any batch, order or process.
    assert alternating_flips(torch.tensor([7, 3]), 3).tolist() == [bool(epochs[2][7]), bool(epochs[2][3])]


def test_random_flips_leave_some_images_the_same_way_over_two_epochs():
    # The contrast the alternating flip is for: drawn per epoch, a quarter of the images miss a side.
    x = torch.randn(400, 3, 4, 4)
    first, second = (
        _mirrored(x, random_crop_flip(x, 0, True, torch.Generator().manual_seed(s))) for s in (1, 2)
    )
    assert 40 < int((first == second).sum()) < 360


def test_the_alternating_flip_needs_indices_and_the_epoch():
    augment = BatchAugment(Normalization((0.0,) * 3, (1.0,) * 3), 0, flip="alternate")
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="indices and the epoch"):
        augment(images, torch.zeros(2), torch.Generator())
    with pytest.raises(VitlabError, match="unknown flip 'sometimes'"):
        BatchAugment(Normalization((0.0,) * 3, (1.0,) * 3), 0, flip="sometimes")


def test_crops_are_shifted_windows_of_the_zero_padded_image():
    x = torch.arange(1, 1 + 2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    pad = 2
    y = random_crop_flip(x, pad, False, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    for i in range(2):
        windows = [padded[i, :, r : r + 6, c : c + 6] for r in range(2 * pad + 1) for c in range(2 * pad + 1)]
        assert any(y[i].equal(w) for w in windows)
    assert y.shape == x.shape


def test_the_padding_takes_a_fill_per_channel():
    x = torch.zeros(64, 3, 8, 8, dtype=torch.uint8)
    y = random_crop_flip(x, 2, False, torch.Generator().manual_seed(0), fill=(7, 8, 9))
    assert set(y.unique().tolist()) == {0, 7, 8, 9}
    for channel, value in enumerate((7, 8, 9)):
        assert set(y[:, channel].unique().tolist()) <= {0, value}


def test_same_generator_seed_gives_the_same_batch():
    x = torch.randn(16, 3, 32, 32)
    a = random_crop_flip(x, 4, True, torch.Generator().manual_seed(7))
    b = random_crop_flip(x, 4, True, torch.Generator().manual_seed(7))
    assert a.equal(b)


def test_random_erasing_zeroes_one_rectangle_per_chosen_image():
    x = torch.ones(64, 3, 16, 16)
    y = random_erasing(x, 1.0, torch.Generator().manual_seed(0))
    erased = y[:, 0] == 0  # (N, H, W); every channel alike
    assert torch.equal(erased[:, None].expand_as(y), y == 0)
    for mask in erased:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        height, width = len(rows), len(cols)
        assert height * width == mask.sum()  # one solid rectangle
        assert rows[-1] - rows[0] + 1 == height and cols[-1] - cols[0] + 1 == width
        assert 0.02 * 256 * 0.5 <= mask.sum() <= 0.33 * 256 * 1.5  # area drawn in the scale range, rounded
    assert len({tuple(m.nonzero()[0].tolist()) for m in erased}) > 10  # each image its own rectangle
    assert random_erasing(x, 0.0, torch.Generator().manual_seed(0)).equal(x)
    some = random_erasing(x, 0.5, torch.Generator().manual_seed(0))
    assert 10 < (some == 0).flatten(1).any(1).sum() < 54


NORM = Normalization((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


def _uint8_batch(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def test_default_pipeline_is_crop_and_flip_padded_with_the_mean_pixel_then_normalize():
    images, labels = _uint8_batch(16), torch.arange(16)
    x, targets = BatchAugment(NORM, 10)(images, labels, torch.Generator().manual_seed(3))
    mean_pixel = [128, 102, 76]  # NORM.mean * 255, rounded
    expected = random_crop_flip(images, 4, True, torch.Generator().manual_seed(3), mean_pixel)
    assert x.equal(NORM.normalize(expected))
    assert targets is labels


def test_a_policy_draws_its_ops_per_group_of_images():
    images = _uint8_batch(1).expand(64, -1, -1, -1).contiguous()  # one image, 64 times
    x, _ = BatchAugment(NORM, 10, "randaugment", 0, False)(images, torch.zeros(64), torch.Generator())
    groups = x.split(POLICY_GROUP)
    assert all(g.equal(g[:1].expand_as(g)) for g in groups)  # one draw within a group...
    assert len({g[0].numpy().tobytes() for g in groups}) > 4  # ... and its own draw in each group
    x_auto, _ = BatchAugment(NORM, 10, "autoaugment", 0, False)(images, torch.zeros(64), torch.Generator())
    assert x_auto.shape == (64, 3, 32, 32) and x_auto.dtype == torch.float32


def test_mixup_blends_each_image_and_its_label_with_the_next_in_the_batch():
    images, labels = _uint8_batch(8), torch.arange(8) % 5
    x, targets = BatchAugment(NORM, 5, crop_padding=0, flip=False, mixup_alpha=1.0)(
        images, labels, torch.Generator().manual_seed(0)
    )
    one_hot = torch.nn.functional.one_hot(labels, 5).float()
    lam = targets[0, labels[0]].item()  # image 0's partner, image 7, has another label
    assert 0 < lam < 1
    torch.testing.assert_close(targets, lam * one_hot + (1 - lam) * one_hot.roll(1, 0))
    clean = NORM.normalize(images)
    torch.testing.assert_close(x, lam * clean + (1 - lam) * clean.roll(1, 0))


def test_cutmix_pastes_a_patch_and_weighs_the_labels_by_its_area():
    images, labels = _uint8_batch(8), torch.arange(8) % 5
    x, targets = BatchAugment(NORM, 5, crop_padding=0, flip=False, cutmix_alpha=1.0)(
        images, labels, torch.Generator().manual_seed(1)
    )
    clean = NORM.normalize(images)
    pasted = (x != clean).any(1)  # (N, H, W): where the neighbour's pixels show
    share = pasted[0].float().mean().item()
    assert 0 < share < 1
    assert targets.sum(1).allclose(torch.ones(8))
    assert targets[0, labels[0]].item() == pytest.approx(1 - share, abs=0.02)


def test_every_option_is_reproducible_and_leaves_the_global_rng_alone():
    augment = BatchAugment(NORM, 10, "randaugment", 4, True, 0.5, 0.2, 1.0)
    images, labels = _uint8_batch(32), torch.arange(32) % 10
    torch.manual_seed(0)
    before, threads = torch.get_rng_state(), torch.get_num_threads()
    a = augment(images, labels, torch.Generator().manual_seed(9))
    assert torch.equal(torch.get_rng_state(), before)  # dropout and init draw the same numbers as without
    assert torch.get_num_threads() == threads  # the batch ran on one thread; the model's threads are back
    b = augment(images, labels, torch.Generator().manual_seed(9))
    c = augment(images, labels, torch.Generator().manual_seed(10))
    assert a[0].equal(b[0]) and a[1].equal(b[1])
    assert not a[0].equal(c[0])
    assert a[1].shape == (32, 10)


def test_an_unknown_policy_is_a_clear_error():
    with pytest.raises(VitlabError, match="unknown augmentation policy 'trivial'"):
        BatchAugment(NORM, 10, "trivial")


@pytest.mark.parametrize("policy", ["randaugment", "autoaugment"])
def test_policies_work_on_grayscale_batches(policy):
    gray = Normalization((0.13,), (0.31,))  # MNIST's measured pixel mean and std, one channel
    images = torch.randint(
        0, 256, (64, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    augment = BatchAugment(gray, 10, policy, crop_padding=2, flip=False)
    generator = torch.Generator().manual_seed(1)
    for _ in range(10):  # 80 groups of ops drawn: every op of either policy, many times over
        x, _ = augment(images, torch.zeros(64), generator)
        assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32 and x.isfinite().all()
