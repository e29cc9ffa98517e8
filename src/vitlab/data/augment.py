"""Batched augmentation on the training device: no per-image PIL work in the training loop.

``BatchAugment`` turns a batch of uint8 (N, C, H, W) images (RGB or grayscale) into the network's input in a
few tensor ops on the device the batch lives on, in this order:

1. an optional policy on the uint8 pixels: RandAugment or AutoAugment's CIFAR-10 policy (torchvision v2, whose
   ops also take 1-channel images: its color ops leave grayscale as it is);
2. random crop after padding with the mean pixel, and horizontal flip (on uint8: a quarter of the memory
   traffic of float, 3x faster on a CPU): drawn per image, or airbench's alternating flip (Jordan, 2024),
   each image mirrored in every other epoch (``alternating_flips``);
3. normalization;
4. random erasing, drawn per image, which paints the mean pixel (zero once normalized);
5. MixUp or CutMix (torchvision v2), which turn the labels into class probabilities.

Every random draw comes from the ``generator`` passed in, so a seeded run is reproducible and resumable.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch

from vitlab.checkpoint import Normalization
from vitlab.compat import import_torchvision
from vitlab.data.sources import DATASETS, DEFAULT_DATASET
from vitlab.errors import VitlabError

POLICIES = ("none", "randaugment", "autoaugment")
# A v2 policy applied to a batch tensor draws one set of ops for the whole batch, and a call per image costs
# about a millisecond of Python and dispatch. Groups of 8 images (random groups: the batch order is random)
# each draw their own ops: 16 different op draws in a batch of 128, at an eighth of the per-image cost.
POLICY_GROUP = 8
Transform = Callable[..., torch.Tensor]


# A 32-bit multiplier near 2**32 / golden ratio (Knuth's multiplicative hashing): image i's key, i * _GOLDEN
# mod 2**32, falls in the upper half for half of any run of consecutive indices, spread evenly.
_GOLDEN = 2654435769


def alternating_flips(indices: torch.Tensor, epoch: int) -> torch.Tensor:
    """Which images to mirror in ``epoch`` under airbench's alternating flip (Jordan, 2024, "94% on CIFAR-10
    in 3.29 seconds on a single GPU", arXiv 2404.00498): bool (N,) for the images' ``indices`` (int, (N,),
    their places in the training split). Half the images, a fixed pseudo-random half, are mirrored in odd
    epochs and the others in even ones, so any two consecutive epochs show every image once as it is and
    once mirrored, where random flips leave a quarter of the images unmirrored (or always mirrored) over
    two epochs. The same for every process and seed: a function of the index and the epoch's parity alone.
    """
    mirrored_first = (indices.to(torch.int64) * _GOLDEN) % 2**32 >= 2**31
    return mirrored_first ^ bool(epoch % 2 == 0)


def random_crop_flip(
    images: torch.Tensor,
    padding: int,
    flip: bool | torch.Tensor,
    generator: torch.Generator | None = None,
    fill: float | Sequence[float] = 0,
) -> torch.Tensor:
    """Random crop after padding, and horizontal flip, of a (N, C, H, W) batch, in one gather.

    ``flip``: True mirrors a random half (each image drawn on its own), or bool (N,) names the images to
    mirror. The padding is ``fill``: one value, or one per channel. Every image gets its own offsets: each
    output pixel's position in the flattened padded image is computed per image (row offset, column offset,
    mirrored columns), and one ``gather`` reads them all, so the whole batch costs a few tensor ops whatever
    N is.
    """
    n, c, h, w = images.shape
    device = images.device
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    if padding:
        border = torch.as_tensor(fill, dtype=images.dtype, device=device).reshape(1, -1, 1, 1)
        padded = border.expand(n, c, h + 2 * padding, w + 2 * padding).clone()
        padded[:, :, padding : padding + h, padding : padding + w] = images
        images = padded
        offsets = torch.randint(0, 2 * padding + 1, (2, n, 1, 1), generator=generator).to(device)
        rows, cols = rows + offsets[0], cols + offsets[1]
    if isinstance(flip, torch.Tensor):
        cols = torch.where(flip.view(n, 1, 1).to(device), cols.flip(2), cols)
    elif flip:
        mirrored = torch.rand(n, 1, 1, generator=generator).to(device) < 0.5
        cols = torch.where(mirrored, cols.flip(2), cols)
    index = (rows * images.shape[-1] + cols).reshape(-1, 1, h * w).expand(n, c, h * w)  # (N, C, H*W)
    return images.flatten(2).gather(2, index).view(n, c, h, w)


def random_erasing(
    images: torch.Tensor,
    p: float,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = (0.02, 0.33),
    ratio: tuple[float, float] = (0.3, 3.3),
) -> torch.Tensor:
    """Zero a random rectangle in each image of a (N, C, H, W) batch with probability ``p``, in one mask.

    The rectangle's area (a fraction ``scale`` of the image) and log aspect ratio are drawn as in Zhong et
    al. (2017) and torchvision's RandomErasing, which draws once per call and so erases the same rectangle
    in a whole batch; a rectangle that does not fit is clipped to the image rather than drawn again.
    """
    n, _, h, w = images.shape
    u = torch.rand(5, n, generator=generator)
    area = h * w * (scale[0] + (scale[1] - scale[0]) * u[0])
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1])
    eh = (area * aspect).sqrt().round().clamp(1, h)
    ew = (area / aspect).sqrt().round().clamp(1, w)
    top = (u[2] * (h - eh + 1)).floor()
    left = (u[3] * (w - ew + 1)).floor()
    rows, cols = torch.arange(h), torch.arange(w)
    inside_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])  # (N, H)
    inside_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])  # (N, W)
    mask = (u[4] < p)[:, None, None] & inside_rows[:, :, None] & inside_cols[:, None, :]  # (N, H, W)
    return images.masked_fill(mask[:, None].to(images.device), 0)


class BatchAugment:
    """The training-time input pipeline of one batch: see the module docstring for the steps and their order.

    Returns the normalized float batch and the targets: the labels as they are, or (N, num_classes) class
    probabilities when MixUp or CutMix is on (both on: one of the two per batch, at random).

    ``flip``: True (random flips), False, or "alternate" (``alternating_flips``), which needs each call to
    name the batch's images (their indices in the training split) and the epoch.
    """

    def __init__(
        self,
        norm: Normalization,
        num_classes: int,
        policy: str = "none",
        crop_padding: int = DATASETS[DEFAULT_DATASET].crop_padding,  # train.crop_padding's default
        flip: bool | str = DATASETS[DEFAULT_DATASET].flip,
        random_erasing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
    ):
        if policy not in POLICIES:
            raise VitlabError(f"unknown augmentation policy {policy!r} (known: {', '.join(POLICIES)})")
        if not isinstance(flip, bool) and flip != "alternate":
            raise VitlabError(f"unknown flip {flip!r} (true, false or alternate)")
        self.norm = norm
        self.mean_pixel = [round(255 * m) for m in norm.mean]
        self.crop_padding = crop_padding
        self.flip = flip
        self.erasing = random_erasing
        self.policy = _policy(policy)
        self.mix = _mix(mixup_alpha, cutmix_alpha, num_classes)

    def __call__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator,
        indices: torch.Tensor | None = None,
        epoch: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (N, C, H, W) images, (N,) labels -> float (N, C, H, W) input, (N,) or (N, K) targets.

        ``indices`` (N,), the images' places in the training split, and ``epoch`` (counted from 1) are
        read by the alternating flip alone; without them it raises ValueError.
        """
        flip = self.flip
        if flip == "alternate":
            if indices is None or epoch is None:
                raise ValueError("the alternating flip needs the batch's image indices and the epoch")
            flip = alternating_flips(indices, epoch)
        needs_torch_rng = self.policy is not None or self.mix is not None
        with _one_thread_on_cpu(images.device), _torch_rng_from(generator, needs_torch_rng):
            if self.policy is not None:
                images = torch.cat([self.policy(group) for group in images.split(POLICY_GROUP)])
            images = random_crop_flip(images, self.crop_padding, flip, generator, self.mean_pixel)
            x = self.norm.normalize(images)
            if self.erasing:
                x = random_erasing(x, self.erasing, generator)
            if self.mix is not None:
                return self.mix(x, labels)
            return x, labels


def _policy(name: str) -> Transform | None:
    if name == "none":
        return None
    import_torchvision()
    from torchvision.transforms import v2

    if name == "randaugment":
        return v2.RandAugment()  # 2 ops of magnitude 9 out of 31, as in Cubuk et al. (2020)
    return v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)


def _mix(mixup_alpha: float, cutmix_alpha: float, num_classes: int) -> Transform | None:
    if not (mixup_alpha or cutmix_alpha):
        return None
    import_torchvision()
    from torchvision.transforms import v2

    # One mixing coefficient per batch, as timm and torchvision do: the batch is paired with its own reverse.
    mixes = [
        cls(alpha=alpha, num_classes=num_classes)
        for cls, alpha in ((v2.MixUp, mixup_alpha), (v2.CutMix, cutmix_alpha))
        if alpha
    ]
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


@contextlib.contextmanager
def _one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """Run the batch's ops on one CPU thread: they are too small to gain from more, and an op split over
    threads waits for its slowest one, which on a busy shared machine made the whole pipeline 10x slower or
    worse (2 cores under load from other processes). Results do not depend on the thread count."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _torch_rng_from(generator: torch.Generator, needed: bool) -> Iterator[None]:
    """torchvision's random transforms draw from torch's global CPU generator: run them on a fork of it,
    seeded from ``generator``, so that they follow the run's seed and leave the global stream (dropout,
    initialization) exactly as it was."""
    if not needed:
        yield
        return
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield
