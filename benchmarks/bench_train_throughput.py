"""CPU training throughput of vitlab's ViT against timm's VisionTransformer and a seed-style reference.

    python benchmarks/bench_train_throughput.py            # about 2 minutes on 2 idle cores
    python benchmarks/bench_train_throughput.py --quick    # a smoke run: one timed round, two steps for RSS

One training step is forward, backward and an AdamW step on a batch of 128 random 32x32 images, on 2 threads
(``--threads``); on a machine busy with other work the threads stall each other: run it on idle cores.
For each preset the three engines are built with the identical configuration (the same parameter count; the
seed-style reference needs two extra projections where heads do not divide the width, see ``SeedViT``) and
take turns step by step, the order rotating each round, so that load from elsewhere on the machine slows
them alike; the figure is the median step. Each preset runs in its own process, and the peak memory (RSS) of
training each engine is measured in a process of its own, so that neither contaminates another. Prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.compat import import_torchvision
from vitlab.models import build_model, count_parameters, preset_spec
from vitlab.stages import hardware_description

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

    def __init__(self, cfg: dict):
        super().__init__()
        dim, patch = cfg["dim"], cfg["patch_size"]
        inner = cfg["heads"] * (cfg.get("head_dim") or dim // cfg["heads"])
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (32 // patch) ** 2 + 1, dim) * 0.02)
        self.dropout = nn.Dropout(cfg.get("dropout", 0.0))
        self.blocks = nn.Sequential(
            *(
                SeedBlock(dim, cfg["heads"], inner, cfg["mlp_dim"], cfg.get("dropout", 0.0))
                for _ in range(cfg["depth"])
            )
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, cfg["num_classes"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        x = self.blocks(self.dropout(x))
        return self.head(self.norm(x[:, 0]))


def timm_vit(cfg: dict) -> nn.Module:
    """timm's VisionTransformer with the configuration of a vitlab ViT (fused qkv, SDPA, CLS token)."""
    timm = import_timm()
    head_dim = cfg.get("head_dim")

    # timm's VisionTransformer has no argument for the heads' width; its Attention has.
    class HeadDimAttention(timm.layers.Attention):
        def __init__(self, dim: int, **kwargs):
            super().__init__(dim, attn_head_dim=head_dim, **kwargs)

    dropout = cfg.get("dropout", 0.0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32,
        patch_size=cfg["patch_size"],
        num_classes=cfg["num_classes"],
        embed_dim=cfg["dim"],
        depth=cfg["depth"],
        num_heads=cfg["heads"],
        mlp_ratio=cfg["mlp_dim"] / cfg["dim"],
        pos_drop_rate=dropout,
        proj_drop_rate=dropout,
        attn_drop_rate=dropout,
        drop_path_rate=cfg.get("drop_path", 0.0),
        attn_layer=HeadDimAttention,
    )


def import_timm() -> ModuleType:
    import_torchvision()  # timm imports torchvision
    import timm

    return timm


def build(engine: str, preset: str) -> nn.Module:
    arch, config = preset_spec(preset)
    config = config | {"num_classes": PRESETS[preset]}
    torch.manual_seed(0)
    if engine == "vitlab":
        return build_model(arch, config)
    return timm_vit(config) if engine == "timm" else SeedViT(config)


def trainer(model: nn.Module, classes: int) -> Callable[[], None]:
    """One training step on a fixed random batch: forward, loss, backward, AdamW step."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, 32, 32, generator=generator)
    labels = torch.randint(0, classes, (BATCH,), generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    model.train()

    def step() -> None:
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def measure_speed(preset: str, rounds: int, warmup: int) -> dict:
    """Seconds per step of each engine, the engines taking turns in an order that rotates each round."""
    models = {engine: build(engine, preset) for engine in ENGINES}
    steps = {engine: trainer(model, PRESETS[preset]) for engine, model in models.items()}
    seconds: dict[str, list[float]] = {engine: [] for engine in ENGINES}
    for round_ in range(warmup + rounds):
        for engine in ENGINES[round_ % 3 :] + ENGINES[: round_ % 3]:
            start = time.perf_counter()
            steps[engine]()
            if round_ >= warmup:
                seconds[engine].append(time.perf_counter() - start)
    return {
        engine: {"params": count_parameters(models[engine]), "step_s": statistics.median(seconds[engine])}
        for engine in ENGINES
    }


def measure_memory(preset: str, engine: str | None, steps: int) -> dict:
    """Peak RSS of this process after training steps of one engine (None: the imports alone)."""
    if engine is None:
        import_timm()
    else:
        step = trainer(build(engine, preset), PRESETS[preset])
        for _ in range(steps):  # from the second step on, the optimizer's state is there at the peak
            step()
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child(args: list[str], threads: int) -> dict:
    command = [sys.executable, __file__, "--threads", str(threads), "--child", *args]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def markdown(preset: str, speed: dict, memory: dict) -> list[str]:
    rows = []
    timm, seed = speed["timm"]["step_s"], speed["seed-style"]["step_s"]
    for engine in ENGINES:
        step_s = speed[engine]["step_s"]
        rows.append(
            f"| {preset} | {engine} | {speed[engine]['params']:,} | {BATCH / step_s:,.0f} | "
            f"{timm / step_s:.2f}x | {seed / step_s:.2f}x | {memory[engine]:,.0f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round after 1 warm-up round: a smoke run")
    parser.add_argument("--rounds", type=int, default=10, help="timed steps per engine and preset")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:  # a measurement in a process of its own: prints one JSON line
        kind, preset, *rest = args.child
        if kind == "speed":
            result = measure_speed(preset, int(rest[0]), int(rest[1]))
        else:
            result = measure_memory(preset, None if rest[0] == "none" else rest[0], int(rest[1]))
        print(json.dumps(result))
        return

    rounds, warmup, memory_steps = (1, 1, 2) if args.quick else (args.rounds, 2, 3)
    load_before = os.getloadavg()[0]
    lines = [
        "| preset | engine | params | img/s | vs timm | vs seed-style | peak RSS (MiB) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    baseline = child(["memory", "tinyvit", "none", "0"], args.threads)["peak_rss_mib"]
    for preset in args.presets:
        print(f"{preset}: {rounds} rounds of {', '.join(ENGINES)}", file=sys.stderr, flush=True)
        speed = child(["speed", preset, str(rounds), str(warmup)], args.threads)
        memory = {
            engine: child(["memory", preset, engine, str(memory_steps)], args.threads)["peak_rss_mib"]
            for engine in ENGINES
        }
        lines += markdown(preset, speed, memory)
    print("\n".join(lines))
    print(
        f"\ntorch {torch.__version__}, {args.threads} threads, batch {BATCH}, {hardware_description('cpu')}; "
        f"median of {rounds} steps after {warmup} warm-up; "
        f"peak RSS includes {baseline:,.0f} MiB of interpreter, torch and timm. Load average (1 min) "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after: other work on the {os.cpu_count()} cores "
        "stalls the threads at every synchronization and skews the figures."
    )


if __name__ == "__main__":
    main()
