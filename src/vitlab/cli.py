"""The ``vitlab`` command line: predict with ONNX Runtime, run pipeline stages, check params.

Heavy libraries are imported inside the commands, so ``vitlab predict`` never imports torch and ``--help``
answers at once. A VitlabError (or an OSError: disk full, permissions) is printed as one line on stderr with
exit code 2; ``--debug`` (or ``VITLAB_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from vitlab import __version__
from vitlab.cpu import prepare_process
from vitlab.errors import VitlabError, display_name, exit_code

app = typer.Typer(
    help="Vision Transformers on CIFAR: a reproducible pipeline (dvc repro) and ONNX Runtime inference.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="params file to read")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vitlab {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks of errors")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version")
    ] = False,
) -> None:
    if debug:
        os.environ["VITLAB_DEBUG"] = "1"


@app.command()
def predict(
    model: Annotated[Path, typer.Argument(help="an ONNX model exported by vitlab (models/model.onnx)")],
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="image files, folders (searched recursively, following links) or globs; - reads one image "
            "from standard input"
        ),
    ],
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="labels to show per image")] = 3,
    as_json: Annotated[
        bool, typer.Option("--json", help="print one JSON document instead of a table")
    ] = False,
    provider: Annotated[str, typer.Option(help="auto | cpu | cuda | tensorrt")] = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="intra-op threads (default: ORT's)")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="images per ONNX Runtime call")] = 256,
) -> None:
    """Classify images of any size with ONNX Runtime (no torch needed). An input that cannot be classified (a
    missing path, an unreadable image, a folder or glob without images) is its own error line and the others
    are classified; exit 1 if any failed. A reader that stops early (| head) ends it quietly, as cat."""
    from vitlab.inference import Classifier, classify_files, expand_inputs

    classifier = Classifier(model, provider=provider, threads=threads, source="--provider")
    results = classify_files(classifier, expand_inputs(inputs), top_k=top_k, batch_size=batch_size)
    if as_json:
        payload = {"model": display_name(str(model)), "predictions": [r.to_dict() for r in results]}
        _echo(json.dumps(payload, indent=2))
    else:
        for r in results:
            if r.error:
                _echo(f"{display_name(r.path)}\terror: {display_name(r.error)}")
            else:
                labels = ", ".join(f"{n} {p:.3f}" for n, p in zip(r.labels, r.probabilities, strict=True))
                _echo(f"{display_name(r.path)}\t{labels}")
    failed = sum(r.error is not None for r in results)
    if failed:
        typer.echo(f"{failed} of {len(results)} images could not be classified", err=True)
        raise typer.Exit(1)


SIGPIPE_EXIT = 128 + 13
"""The exit status of a command whose reader closed its output (``| head``): a shell's for ``cat`` then."""


def _echo(text: str) -> None:
    """Print a line of a command's result and flush it; a reader that has gone (``| head -n 1``) ends the
    command quietly with SIGPIPE_EXIT: a closed pipe is neither a failed image nor an error."""
    try:
        typer.echo(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python's recipe: stdout onto /dev/null, so that the flush at exit does not fail once more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(SIGPIPE_EXIT) from None


@app.command()
def serve(
    model: Annotated[Path, typer.Argument(help="an ONNX model exported by vitlab (models/model.onnx)")],
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0: every interface)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0: any free one)")] = 8000,
    max_batch: Annotated[int, typer.Option(min=1, help="images per ONNX Runtime call, at most")] = 64,
    max_wait_ms: Annotated[
        float, typer.Option(min=0, help="how long a batch waits for more images, at most")
    ] = 5.0,
    queue: Annotated[
        int, typer.Option(min=1, help="images waiting for a batch, at most (then 503); also per request")
    ] = 1024,
    threads: Annotated[int | None, typer.Option(min=1, help="intra-op threads (default: ORT's)")] = None,
    provider: Annotated[str, typer.Option(help="auto | cpu | cuda | tensorrt")] = "auto",
    max_body_mb: Annotated[float, typer.Option(min=0, help="request body limit, MiB (then 413)")] = 32.0,
    drain_timeout: Annotated[
        float, typer.Option(min=0.001, help="seconds requests get to finish after SIGTERM")
    ] = 30.0,
) -> None:
    """Serve the model over HTTP (POST /predict, /metadata, /metrics, /docs) with dynamic batching."""
    from vitlab.serve import ServeSettings, run

    settings = ServeSettings(max_batch, max_wait_ms, queue, max_body_mb, drain_timeout)
    run(model, host, port, settings, provider, threads)


@app.command()
def stage(
    name: Annotated[
        str,
        typer.Argument(
            help="download | validate | teacher | train | evaluate | attention | export | inference"
        ),
    ],
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Run one pipeline stage here, exactly as `dvc repro` does (outputs under data/, models/, reports/)."""
    from vitlab.stages import run_stage

    run_stage(name, params)


@app.command("params")
def show_params(params: ParamsOption = Path("params.yaml")) -> None:
    """Validate a params file and print every value, defaults included."""
    from vitlab.params import load_params

    _echo(json.dumps(load_params(params).model_dump(by_alias=True, mode="json"), indent=2))


@app.command("metrics")
def show_metrics(
    paths: Annotated[
        list[Path] | None, typer.Argument(help="metrics files (default: every stage's that exists)")
    ] = None,
) -> None:
    """Print the pipeline's metrics one per line under their file: what `make repro` ends with, in 80 columns
    where `dvc metrics show` puts every file's keys side by side."""
    from vitlab.stages import Layout

    layout = Layout()
    stages = [layout.teacher_metrics, layout.train_metrics, layout.eval_metrics, layout.export_metrics]
    paths = paths or [path for path in [*stages, layout.inference_metrics] if path.is_file()]
    if not paths:
        raise VitlabError("no metrics here yet: run the pipeline first (`dvc repro`)")
    for path in paths:
        try:
            metrics = json.loads(path.read_text())
        except FileNotFoundError:
            raise VitlabError(f"{path}: no such metrics file") from None
        except json.JSONDecodeError as error:
            raise VitlabError(f"{path}: not JSON ({error})") from None
        typer.echo(str(path))
        for key, value in _flatten(metrics):
            typer.echo(f"  {key:<34} {_number(value)}")


def _flatten(metrics: dict, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) of every leaf, as `dvc metrics show` names nested keys."""
    rows: list[tuple[str, object]] = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        rows += _flatten(value, f"{name}.") if isinstance(value, dict) else [(name, value)]
    return rows


def _number(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@app.command()
def compare(
    run: Annotated[
        bool,
        typer.Option("--run", help="first run the study: a ViT per --patch-sizes and the CNN (dvc exp run)"),
    ] = False,
    exp: Annotated[
        list[str] | None, typer.Option("--exp", "-e", help="experiment to collect (repeatable; default: all)")
    ] = None,
    baseline: Annotated[
        str | None, typer.Option(help="run the others are paired with (default: the only CNN run)")
    ] = None,
    patch_sizes: Annotated[str, typer.Option(help="--run: ViT patch sizes, comma-separated")] = "2,4,8",
    seeds: Annotated[
        str | None,
        typer.Option(
            help="--run: train.seed values, comma-separated (0,1,2): each model once per seed, named "
            "NAME-sSEED, compared as one row (mean ± sd over seeds); data.seed, the validation split, stays "
            "the same for every seed"
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-S", help="--run: KEY=VALUE for every run of the study (repeatable)"),
    ] = None,
    prefix: Annotated[
        str, typer.Option(help="--run: experiment names are PREFIX-p2 ... PREFIX-cnn")
    ] = "study",
    force: Annotated[bool, typer.Option(help="--run: replace experiments of the same names")] = False,
    resamples: Annotated[int, typer.Option(min=100, help="bootstrap resamples of the test images")] = 10_000,
    seed: Annotated[int, typer.Option(help="seed of the bootstrap")] = 0,
    out: Annotated[
        Path,
        typer.Option(
            help="folder for table.md, table.csv and the plots; git ignores it (its own .gitignore), and one "
            "holding tracked files is refused"
        ),
    ] = Path("reports/comparison"),
) -> None:
    """Compare experiments on the same test images: accuracy with 95% bootstrap intervals, paired difference
    to the CNN baseline, accuracy vs patch size and validation curves (writes reports/comparison/, which git
    ignores: the workspace stays clean). Experiments named NAME-sSEED that differ only in train.seed are one
    configuration: mean ± sd over seeds."""
    from vitlab.compare import run_study, seed_variants, study_variants
    from vitlab.params import parse_params
    from vitlab.stages import Layout
    from vitlab.stages.compare import compare_experiments, refuse_tracked

    refuse_tracked(out)  # before any experiment runs
    names = list(exp or [])
    if seeds is not None and not run:
        raise VitlabError("--seeds says which seeds --run trains: add --run (collected runs group by name)")
    if run:
        sizes = _integers(patch_sizes, "--patch-sizes")
        train_seeds = _integers(seeds, "--seeds") if seeds is not None else []
        if seeds is not None and (not train_seeds or len(set(train_seeds)) != len(train_seeds)):
            raise VitlabError(f"--seeds: expected distinct comma-separated integers, got {seeds!r}")
        # Before any run starts, not when the first bad one does.
        for size in sizes:
            parse_params({"model": {"patch_size": size}}, origin="--patch-sizes")
        for train_seed in train_seeds:
            parse_params({"train": {"seed": train_seed}}, origin="--seeds")
        variants = study_variants(sizes, prefix)
        names += run_study(
            seed_variants(variants, train_seeds) if train_seeds else variants, set_ or [], force
        )
        baseline = baseline or f"{prefix}-cnn"
    compare_experiments(Layout(), names, baseline, resamples, seed, out)


def _integers(text: str, option: str) -> list[int]:
    """Comma-separated integers; a one-line VitlabError naming ``option`` otherwise."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise VitlabError(f"{option}: expected comma-separated integers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    """Entry point: sets up the CPU libraries before a command loads torch (vitlab.cpu.prepare_process), then
    runs the app; a VitlabError or OSError is one line on stderr and exit code 2."""
    # The last guard for a name the file system holds but UTF-8 cannot (undecodable bytes from the command
    # line or a folder's listing): printed as a backslash escape, never a UnicodeEncodeError that loses the
    # lines after it. vitlab prints names through display_name; this catches any it does not.
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None and sys.stdout.errors == "strict":
        reconfigure(errors="backslashreplace")

    def run() -> None:
        prepare_process()
        app(args=argv, prog_name="vitlab")  # click reports usage errors itself

    try:
        return exit_code(run)
    except SystemExit as done:  # click ends every standalone run this way, success included
        return done.code if isinstance(done.code, int) else int(done.code is not None)


if __name__ == "__main__":
    sys.exit(main())
