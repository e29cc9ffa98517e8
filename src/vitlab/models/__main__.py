"""``python -m vitlab.models``: every preset and its parameter count, for 10 and 100 classes (Markdown)."""

from __future__ import annotations

from vitlab.models import PRESETS, build_model, count_parameters, preset_config


def preset_table() -> str:
    """A Markdown table: each preset, its architecture and description, its parameters for 10 and 100
    classes."""
    lines = [
        "| preset | architecture | params (10 classes) | params (100 classes) |",
        "| --- | --- | ---: | ---: |",
    ]
    for name, preset in PRESETS.items():
        arch, config = preset_config(name)
        ten, hundred = (count_parameters(build_model(arch, config | {"num_classes": n})) for n in (10, 100))
        lines.append(f"| {name} | {arch}: {preset.description} | {ten:,} | {hundred:,} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(preset_table())
