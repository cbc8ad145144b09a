"""The vitlens-patch command line: help, argument errors, the study command and the demo."""

import shutil
from pathlib import Path

import pytest

from vitlens_patch import cli, demo
from vitlens_patch.data.sample import SAMPLE_DIR
from vitlens_patch.recipes import GrayscaleStudyResult
from vitlens_patch.report import Section

SAMPLE_STUDY = ["study", "grayscale", "--data", str(SAMPLE_DIR)]


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``main(argv)``."""
    try:
        cli.main(argv)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("command", [[], ["demo"], ["study"], ["study", "grayscale"], ["evaluate"]])
def test_every_command_has_help(command, capsys):
    code, out, _ = run_cli([*command, "--help"], capsys)
    assert code == 0
    assert out.startswith(f"usage: vitlens-patch {' '.join(command)}".rstrip())
    assert "%%" not in out


def test_help_says_95_percent_once(capsys):
    _, out, _ = run_cli(["evaluate", "--help"], capsys)
    assert "means with 95% CIs" in " ".join(out.split())


def test_resuming_into_another_study_is_refused_in_one_line(tmp_path, capsys):
    out = str(tmp_path / "gray.parquet")
    argv = [*SAMPLE_STUDY, "--n", "10", "--out", out]
    code, _, err = run_cli([*argv, "--window", "3"], capsys)
    assert code == 0
    # the same command again resumes: the bar shows the stored images as done / total
    code, _, err = run_cli([*argv, "--window", "3"], capsys)
    assert code == 0
    bar = err.strip().split("\r")[-1]
    assert bar.startswith("grayscale study (attn, window 3): 100%") and "10/10" in bar
    code, stdout, err = run_cli([*argv, "--window", "1", "--no-progress"], capsys)
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(
        f"vitlens-patch study grayscale: error: out '{out}.parts' holds another study (differing: "
        "window: 3 -> 1); use a new out directory for a new study"
    )
    evaluation = ["evaluate", "--n", "10", "--methods", "random", "--out", str(tmp_path / "evaluation"),
                  "--report", str(tmp_path / "evaluation.html"), "--no-progress"]
    assert run_cli([*evaluation, "--metrics", "aupr"], capsys)[0] == 0
    code, _, err = run_cli([*evaluation, "--metrics", "pointing_game"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("vitlens-patch evaluate: error: out ") and "holds another study" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["study"], "the following arguments are required: STUDY"),
        (["study", "grayscale"], "the following arguments are required: --data"),
        (["study", "grayscale", "--data", "x", "--n", "0"], "argument --n/--n-images: must be an integer >= 1, got 0"),
        (["study", "grayscale", "--data", "x", "--kind", "heads"], "argument --kind: invalid choice: 'heads'"),
        (["demo", "--n-per-class", "-1"], "argument --n-per-class: must be an integer >= 1, got -1"),
        (["demo", "--n-per-class", "two"], "argument --n-per-class: must be an integer >= 1, got 'two'"),
        (["study", "grayscale", "--data", "no/such/dir"], "path must be an image folder or a .tar.gz archive"),
        ([*SAMPLE_STUDY, "--window", "3", "13"], "--window must be in [1, 12], got [13]"),
        ([*SAMPLE_STUDY, "--n", "15"], "--n must be a multiple of the number of classes (10), got 15"),
        ([*SAMPLE_STUDY, "--n", "200"], "--n: n must be <= 10"),
    ],
)
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert message in err


def test_study_data_must_hold_the_model_classes(tmp_path, capsys):
    for name in ("cat", "dog"):
        shutil.copytree(SAMPLE_DIR / name, tmp_path / name)
    code, _, err = run_cli([*SAMPLE_STUDY[:3], str(tmp_path)], capsys)
    assert code == 2
    assert "--data must hold the model's classes ('airplane'," in err and "got ('cat', 'dog')" in err


def test_grayscale_study_command_writes_results_and_report(tmp_path, capsys):
    out = tmp_path / "gray.parquet"
    argv = [*SAMPLE_STUDY, "--n", "10", "--window", "3", "1", "--out", str(out), "--no-progress"]
    code, stdout, _ = run_cli(argv, capsys)
    assert code == 0
    paths = [tmp_path / "gray_window3.parquet", tmp_path / "gray_window1.parquet"]
    results = [GrayscaleStudyResult.load(path) for path in paths]
    assert [result.settings["window"] for result in results] == [3, 1]
    assert results[0].labels.tolist() == list(range(10))  # one image per class
    assert f"accuracy colour {results[0].colour_accuracy:.4f}" in stdout
    assert stdout.count("mean indirect effect") == 2 and str(tmp_path / "gray.html") in stdout
    assert "plotly-graph-div" in (tmp_path / "gray.html").read_text()
    assert (tmp_path / "gray_window3.parquet.parts" / "results.parquet").is_file()


def test_demo_report_has_every_section_and_the_extra_ones(tmp_path, browser_page):
    def extra(model, sample):
        return [Section("Extra section", f"{len(sample)} images")]

    path = demo.run_demo(tmp_path / "demo.html", n_per_class=1, extra_sections=[extra], progress=False)
    page = path.read_text()
    for title in ("The embedded model", "Causal trace of one image", "Explore the trace interactively",
                  "Grayscale study on the embedded images", "CAAP and the baselines", "Extra section"):
        assert title in page
    assert "10 images" in page
    assert page.count("plotly.js v") == 1
    assert page.count('class="plotly-graph-div"') == 10
    assert (tmp_path / "demo_explorer.html").is_file() and 'href="demo_explorer.html"' in page
    # the report and the explorer page it links render in a real browser, offline (one demo run for both)
    browser_page.open_file(path, timeout=60)
    assert browser_page.wait_for_figures(10, timeout=120) == 10
    browser_page.screenshot("demo-report")
    browser_page.page.click('a[href="demo_explorer.html"]')
    browser_page.page.wait_for_selector(".vitlens-explorer", timeout=60_000)
    assert browser_page.wait_for_figures(3, selector=".vitlens-explorer .js-plotly-plot", timeout=120) == 3
    browser_page.screenshot("demo-explorer")
    browser_page.assert_clean()


def test_demo_command_passes_its_options_and_prints_the_path(tmp_path, capsys, monkeypatch):
    calls = []

    def fake_run_demo(out, *, n_per_class, progress):
        calls.append((out, n_per_class, progress))
        return Path(out).resolve()

    monkeypatch.setattr(cli, "run_demo", fake_run_demo)
    out = tmp_path / "demo.html"
    code, stdout, _ = run_cli(["demo", "--out", str(out), "--n-per-class", "2", "--no-progress"], capsys)
    assert code == 0 and calls == [(str(out), 2, False)]
    assert Path(stdout.strip()) == out.resolve()


def test_evaluate_command_prints_table_and_writes_report(tmp_path, capsys):
    report = tmp_path / "evaluation.html"
    argv = ["evaluate", "--n", "10", "--methods", "caap", "random", "--metrics", "deletion", "aupr",
            "--report", str(report), "--result", str(tmp_path / "result"), "--no-progress"]
    code, stdout, _ = run_cli(argv, capsys)
    assert code == 0
    assert "| caap |" in stdout and "| random |" in stdout
    assert "plotly-graph-div" in report.read_text()
    assert (tmp_path / "result" / "scores.parquet").is_file()


def test_evaluate_command_rejects_bad_arguments(capsys):
    code, _, err = run_cli(["evaluate", "--n", "15", "--no-progress"], capsys)
    assert code == 2 and "n must be a positive multiple of the 10 classes, got 15" in err
    code, _, err = run_cli(["evaluate", "--n", "10", "--methods", "lime", "--no-progress"], capsys)
    assert code == 2 and "lime" in err
