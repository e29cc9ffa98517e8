"""Stage ``attention``: attention maps and rollout of a ViT (Grad-CAM for a CNN) on the first test images."""

from __future__ import annotations

from pathlib import Path

from vitlab import files
from vitlab.attention import render_attention
from vitlab.checkpoint import load_checkpoint
from vitlab.data.prepared import load_prepared
from vitlab.params import Params
from vitlab.stages import Layout
from vitlab.tracking import Tracker


def run(params: Params, layout: Layout) -> None:
    """Draw ``attention.num_images`` test images' maps into ``layout.attention_dir`` with a summary.json; the
    folder is emptied first, so it holds this run's pictures only."""
    test = load_prepared(layout.prepared_dir).test
    ckpt = load_checkpoint(layout.checkpoint, geometry=test.geometry)
    n = min(params.attention.num_images, len(test))
    files.fresh_folder(layout.attention_dir)
    summary = render_attention(
        ckpt.model,
        test.images[:n],
        test.labels[:n],
        ckpt.class_names,
        ckpt.normalization,
        layout.attention_dir,
    )
    files.write_json(layout.attention_dir / "summary.json", summary)
    if not summary.get("supported"):
        print(f"no attention maps: {summary.get('reason')} (the stage completes without pictures)")
        return
    with Tracker(config=params.model_dump(by_alias=True), job_type="attention") as tracker:
        tracker.log_images({Path(name).stem: layout.attention_dir / name for name in summary["files"]})
    print(f"{summary['method']} maps of {n} test images -> {layout.attention_dir}")
