"""CPU training throughput of vitlab's ViT against timm's VisionTransformer and a seed-style reference.

    python benchmarks/bench_train_throughput.py            # about 7 minutes on 2 idle cores
    python benchmarks/bench_train_throughput.py --compile  # and each preset through torch.compile
    python benchmarks/bench_train_throughput.py --quick    # a smoke run: one timed round, two steps for RSS

One training step is forward, backward and an AdamW step on a batch of 128 random 32x32 images, on 2 threads
(``--threads``); on a machine busy with other work the threads stall each other: run it on idle cores.
Three tables:

1. For each preset, the three engines built with the identical configuration (the same parameter count; the
   seed-style reference needs two extra projections where heads do not divide the width, see ``SeedViT``)
   take turns step by step, the order rotating each round, so that load from elsewhere on the machine slows
   them alike; the figure is the median step. Beside it, each engine's rate of useful work (the FLOPs of its
   matrix products per second) against this CPU's fp32 rate on a large matrix product, and the peak memory
   (RSS) of training each engine, measured in a process of its own.
2. The ceiling: the step's matrix products replayed alone (``matrix_products_alone_s``), the time a step
   would take if everything else were free; the seed-style step over it is the most any engine built on
   torch's CPU kernels could gain on the reference.
3. vitlab's speed and peak RSS for every preset, each in a process of its own, and with ``--compile`` the
   speed of the same step through ``torch.compile``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.flop_counter import FlopCounterMode

from vitlab.compat import import_torchvision
from vitlab.device import hardware_description
from vitlab.models import PRESETS as MODEL_PRESETS
from vitlab.models import build_model, count_parameters, preset_config
from vitlab.train import uses_channels_last

BATCH = 128
PRESETS = {"tinyvit": 10, "vit-p2": 10, "vit-c100": 100}  # preset -> classes (vit-c100 is for CIFAR-100)
ENGINES = ("vitlab", "timm", "seed-style")


class SeedBlock(nn.Module):
    """A pre-norm block as educational ViT repositories write it: nn.MultiheadAttention + LayerNorm + MLP.

    ``nn.MultiheadAttention`` needs heads that divide its width, so where a config gives attention a width of
    its own (heads * head_dim != dim) the block maps into that width and back, as such a repository must.
    """

    def __init__(self, dim: int, heads: int, inner: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.into = nn.Linear(dim, inner) if inner != dim else nn.Identity()
        self.attn = nn.MultiheadAttention(inner, heads, dropout=dropout, batch_first=True)
        self.out = nn.Linear(inner, dim) if inner != dim else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mlp_dim, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.into(self.norm1(x))
        x = x + self.out(self.attn(h, h, h)[0])
        return x + self.mlp(self.norm2(x))


class SeedViT(nn.Module):
    """Conv patch embedding, CLS token, learned positions, SeedBlocks, LayerNorm + linear head on CLS."""

    def __init__(self, config: dict):
        super().__init__()
        dim, patch = config["dim"], config["patch_size"]
        inner = config["heads"] * (config.get("head_dim") or dim // config["heads"])
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (32 // patch) ** 2 + 1, dim) * 0.02)
        self.dropout = nn.Dropout(config.get("dropout", 0.0))
        self.blocks = nn.Sequential(
            *(
                SeedBlock(
                    dim,
                    config["heads"],
                    inner,
                    config["mlp_dim"],
                    config.get("dropout", 0.0),
                )
                for _ in range(config["depth"])
            )
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, config["num_classes"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        x = self.blocks(self.dropout(x))
        return self.head(self.norm(x[:, 0]))


def timm_vit(config: dict) -> nn.Module:
    """timm's VisionTransformer with the configuration of a vitlab ViT (fused qkv, SDPA, CLS token)."""
    timm = import_timm()
    head_dim = config.get("head_dim")

    # timm's VisionTransformer has no argument for the heads' width; its Attention has.
    class HeadDimAttention(timm.layers.Attention):
        def __init__(self, dim: int, **kwargs):
            super().__init__(dim, attn_head_dim=head_dim, **kwargs)

    dropout = config.get("dropout", 0.0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32,
        patch_size=config["patch_size"],
        num_classes=config["num_classes"],
        embed_dim=config["dim"],
        depth=config["depth"],
        num_heads=config["heads"],
        mlp_ratio=config["mlp_dim"] / config["dim"],
        pos_drop_rate=dropout,
        proj_drop_rate=dropout,
        attn_drop_rate=dropout,
        drop_path_rate=config.get("drop_path", 0.0),
        attn_layer=HeadDimAttention,
    )


def import_timm() -> ModuleType:
    import_torchvision()  # timm imports torchvision
    import timm

    return timm


def classes_of(preset: str) -> int:
    return PRESETS.get(preset, 10)


def build(engine: str, preset: str) -> nn.Module:
    arch, config = preset_config(preset)
    config = config | {"num_classes": classes_of(preset)}
    torch.manual_seed(0)
    if engine == "vitlab":
        return build_model(arch, config)
    return timm_vit(config) if engine == "timm" else SeedViT(config)


def trainer(model: nn.Module, classes: int) -> Callable[[], None]:
    """One training step on a fixed random batch: forward, loss, backward, AdamW step (channels_last where
    vitlab's trainer would use it)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, 32, 32, generator=generator)
    if uses_channels_last(model):
        model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, classes, (BATCH,), generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    model.train()

    def step() -> None:
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def take_turns(steps: dict[str, Callable[[], None]], rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds per step of each, the steps taking turns in an order that rotates each round, so that
    load from elsewhere on the machine slows them alike."""
    names = list(steps)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            steps[name]()
            if round_ >= warmup:
                seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def step_flops(step: Callable[[], None]) -> int:
    """Floating-point operations of one training step's matrix products (matmuls, convolutions, attention).

    Under SDPA's math backend, whose bmm the counter sees (it has no formula for the CPU flash kernel); the
    products are the same. Elementwise work (LayerNorm, GELU, softmax, AdamW) is not counted: the figure is
    the least work a step must do.
    """
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


MATRIX_PRODUCTS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
    torch.ops.aten.convolution.default,
    torch.ops.aten.convolution_backward.default,
}


@dataclass(frozen=True)
class TensorLayout:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorLayout:
        return cls(tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)

    def random(self) -> torch.Tensor:
        """A tensor of this layout (transposed, expanded, ...), filled with normal noise."""
        extent = 1 + sum((size - 1) * stride for size, stride in zip(self.shape, self.stride, strict=True))
        return torch.randn(extent, dtype=self.dtype).as_strided(self.shape, self.stride)


class MatrixProductRecorder(TorchDispatchMode):
    """Records each matrix product a step dispatches, as the op and the layouts of its arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch._ops.OpOverload, Any]] = []

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: tuple[type, ...],
        args: tuple = (),
        kwargs: dict | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in MATRIX_PRODUCTS:
            self.calls.append((func, tree_map_only(torch.Tensor, TensorLayout.of, (args, kwargs))))
        return func(*args, **kwargs)


def matrix_products_alone_s(step: Callable[[], None], repeats: int = 3) -> float:
    """Seconds one step's matrix products take alone, each replayed on fresh tensors of its arguments' layouts
    (the best of ``repeats``): what the step would take if everything else (LayerNorm, GELU, softmax,
    dropout, AdamW, Python) were free. No engine built on these kernels can step faster."""
    with sdpa_kernel(SDPBackend.MATH), MatrixProductRecorder() as recorder:
        step()
    total = 0.0
    for func, layouts in recorder.calls:
        args, kwargs = tree_map_only(TensorLayout, TensorLayout.random, layouts)
        total += best_seconds(functools.partial(func, *args, **kwargs), repeats)
    return total


def measure_matmul_peak(size: int = 2048, repeats: int = 10) -> dict:
    """This CPU's fp32 matrix-product rate on the benchmark's threads: the best of square products."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return {"gflops": 2 * size**3 / best_seconds(lambda: torch.mm(a, b), repeats) / 1e9}


def measure_speed(preset: str, rounds: int, warmup: int) -> dict:
    """Seconds per step of each engine, the engines taking turns."""
    models = {engine: build(engine, preset) for engine in ENGINES}
    steps = {engine: trainer(model, classes_of(preset)) for engine, model in models.items()}
    flops = {engine: step_flops(step) for engine, step in steps.items()}
    products_s = matrix_products_alone_s(steps["vitlab"])
    step_s = take_turns(steps, rounds, warmup)
    return {
        engine: {"params": count_parameters(models[engine]), "step_s": step_s[engine], "flops": flops[engine]}
        for engine in ENGINES
    } | {"vitlab_products_alone_s": products_s}


def measure_preset(preset: str, rounds: int, warmup: int, compiled: bool) -> dict:
    """Seconds per step of vitlab training one preset and the peak RSS of it, in a process of its own.

    ``compiled``: then also through ``torch.compile`` (after the RSS is read), the eager and the compiled
    step taking turns, and the seconds the first compiled step took (compilation)."""
    model = build("vitlab", preset)
    steps = {"eager": trainer(model, classes_of(preset))}
    result = {
        "eager_step_s": take_turns(steps, rounds, warmup)["eager"],
        "params": count_parameters(model),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if compiled:
        steps["compiled"] = trainer(torch.compile(build("vitlab", preset)), classes_of(preset))
        result["compile_s"] = best_seconds(steps["compiled"], repeats=1)
        result |= {f"{kind}_step_s": s for kind, s in take_turns(steps, rounds, warmup).items()}
    return result


def measure_memory(preset: str, engine: str | None, steps: int) -> dict:
    """Peak RSS of this process after training steps of one engine (None: the imports alone)."""
    if engine is None:
        import_timm()
    else:
        step = trainer(build(engine, preset), classes_of(preset))
        for _ in range(steps):  # from the second step on, the optimizer's state is there at the peak
            step()
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child(args: list[str], threads: int) -> dict:
    command = [sys.executable, __file__, "--threads", str(threads), "--child", *args]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def markdown(preset: str, speed: dict, memory: dict, peak_gflops: float) -> list[str]:
    rows = []
    timm, seed = speed["timm"]["step_s"], speed["seed-style"]["step_s"]
    for engine in ENGINES:
        step_s, gflops = speed[engine]["step_s"], speed[engine]["flops"] / speed[engine]["step_s"] / 1e9
        rows.append(
            f"| {preset} | {engine} | {speed[engine]['params']:,} | {BATCH / step_s:,.0f} | "
            f"{timm / step_s:.2f}x | {seed / step_s:.2f}x | {gflops:,.0f} ({gflops / peak_gflops:.0%}) | "
            f"{memory[engine]:,.0f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round after 1 warm-up round: a smoke run")
    parser.add_argument("--rounds", type=int, default=10, help="timed steps per engine and preset")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument(
        "--all-presets",
        nargs="*",
        default=list(MODEL_PRESETS),
        choices=list(MODEL_PRESETS),
        help="presets whose vitlab training speed and peak RSS make the second table (default: all)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="second table: also torch.compile each preset (15-30 s of compilation each)",
    )
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:  # a measurement in a process of its own: prints one JSON line
        kind, preset, *rest = args.child
        if kind == "speed":
            result = measure_speed(preset, int(rest[0]), int(rest[1]))
        elif kind == "preset":
            result = measure_preset(preset, int(rest[0]), int(rest[1]), rest[2] == "compiled")
        elif kind == "peak":
            result = measure_matmul_peak()
        else:
            result = measure_memory(preset, None if rest[0] == "none" else rest[0], int(rest[1]))
        print(json.dumps(result))
        return

    rounds, warmup, memory_steps = (1, 1, 2) if args.quick else (args.rounds, 2, 3)
    load_before = os.getloadavg()[0]
    lines = [
        "| preset | engine | params | img/s | vs timm | vs seed-style | GFLOP/s (of peak) | peak RSS (MiB) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    peak = child(["peak", "-"], args.threads)["gflops"]
    baseline = child(["memory", "tinyvit", "none", "0"], args.threads)["peak_rss_mib"]
    ceilings = [
        "",
        "| preset | seed-style step (ms) | vitlab step (ms) | vitlab's matrix products alone (ms) | "
        "ceiling vs seed-style |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for preset in args.presets:
        print(f"{preset}: {rounds} rounds of {', '.join(ENGINES)}", file=sys.stderr, flush=True)
        speed = child(["speed", preset, str(rounds), str(warmup)], args.threads)
        memory = {
            engine: child(["memory", preset, engine, str(memory_steps)], args.threads)["peak_rss_mib"]
            for engine in ENGINES
        }
        lines += markdown(preset, speed, memory, peak)
        seed_s, products_s = speed["seed-style"]["step_s"], speed["vitlab_products_alone_s"]
        ceilings.append(
            f"| {preset} | {seed_s * 1e3:,.0f} | {speed['vitlab']['step_s'] * 1e3:,.0f} | "
            f"{products_s * 1e3:,.0f} | {seed_s / products_s:.2f}x |"
        )
    lines += ceilings
    compiled = "compiled" if args.compile else "eager"
    lines += [
        "",
        "| preset (vitlab) | params | img/s | peak RSS (MiB) |"
        + (" compiled: img/s | vs eager | compilation (s) |" if args.compile else ""),
        "| --- | ---: | ---: | ---: |" + (" ---: | ---: | ---: |" if args.compile else ""),
    ]
    for preset in args.all_presets:
        print(f"{preset}: vitlab alone, {rounds} rounds, {compiled}", file=sys.stderr, flush=True)
        result = child(["preset", preset, str(rounds), str(warmup), compiled], args.threads)
        eager_s = result["eager_step_s"]
        line = f"| {preset} | {result['params']:,} | {BATCH / eager_s:,.0f} | {result['peak_rss_mib']:,.0f} |"
        if args.compile:
            compiled_s = result["compiled_step_s"]
            line += f" {BATCH / compiled_s:,.0f} | {eager_s / compiled_s:.2f}x | {result['compile_s']:.0f} |"
        lines.append(line)
    print("\n".join(lines))
    print(
        f"\ntorch {torch.__version__}, {args.threads} threads, batch {BATCH}, {hardware_description('cpu')}; "
        f"median of {rounds} steps after {warmup} warm-up; "
        f"peak: a 2048 x 2048 fp32 matrix product at {peak:,.0f} GFLOP/s; "
        f"peak RSS includes {baseline:,.0f} MiB of interpreter, torch and timm. Load average (1 min) "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after: other work on the {os.cpu_count()} cores "
        "stalls the threads at every synchronization and skews the figures."
    )


if __name__ == "__main__":
    main()
