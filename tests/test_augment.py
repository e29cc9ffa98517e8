import torch

from vitlab.data.augment import random_crop_flip


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


def test_crops_are_shifted_windows_of_the_zero_padded_image():
    x = torch.arange(1, 1 + 2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    pad = 2
    y = random_crop_flip(x, pad, False, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    for i in range(2):
        windows = [padded[i, :, r : r + 6, c : c + 6] for r in range(2 * pad + 1) for c in range(2 * pad + 1)]
        assert any(y[i].equal(w) for w in windows)
    assert y.shape == x.shape


def test_same_generator_seed_gives_the_same_batch():
    x = torch.randn(16, 3, 32, 32)
    a = random_crop_flip(x, 4, True, torch.Generator().manual_seed(7))
    b = random_crop_flip(x, 4, True, torch.Generator().manual_seed(7))
    assert a.equal(b)
