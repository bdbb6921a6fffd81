"""The leave-2-out experiment on a tiny phantom: outputs, report, and resume after an interruption."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from MicroCTSynthLib.dataset import Dataset
from MicroCTSynthLib.experiment import METHODS, RUN_COMPLETE, run_experiment, summarize
from MicroCTSynthLib.phantom import make_phantom
from MicroCTSynthLib.prepare import prepare
from MicroCTSynthLib.presets import load_preset

GROUP = {"T": {"train": ["S3_1"], "val": [], "test": ["S3_2"]}}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment")
    data = root / "phantom"
    make_phantom(data, preset="tiny", specimens=["S3_1", "S3_2"], progress="none")
    ds = Dataset.load(data)
    ds.data["groups"] = GROUP
    ds.save()
    prepare(data, progress="none")
    out = root / "exp"
    summary = run_experiment(data, out, preset="tiny", groups=["T"], models=["single", "multi", "segmenter"], device="cpu", progress="none")
    return data, out, summary


def test_experiment_writes_results_figures_and_report(experiment):
    _, out, summary = experiment
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 1 * len(METHODS) * 3  # one specimen x five methods x three classes
    assert {r["method"] for r in rows} == set(METHODS)
    for r in rows:
        assert 0.0 <= float(r["dice"]) <= 1.0
    assert set(summary["median_dice"]) == set(METHODS)
    assert set(summary["median_perceptual_error"]) == {"single", "multi"}
    for name in ("report.md", "report.html", "summary.json", "figures/dice_boxplot.png", "figures/validation_loss.png"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "0.95 | 0.66 | 0.88" in report, "the thesis' multitask figures stand beside ours"
    assert "phantom" in report
    assert summarize([dict(r, dice=float(r["dice"]), hd95_mm=float(r["hd95_mm"]) if r["hd95_mm"] else None,
                           perceptual_error=float(r["perceptual_error"]) if r["perceptual_error"] else None)
                      for r in rows])["median_dice"] == summary["median_dice"]


def test_interrupted_experiment_resumes_without_redoing_finished_work(experiment):
    data, out, summary = experiment
    case_dir = out / "cases" / "T" / "S3_2"
    kept = {p: p.stat().st_mtime_ns for p in [out / "runs" / "T_single" / "best.pt", case_dir / "metrics_atlas.json",
                                              case_dir / "metrics_naive.json"]}
    # As if the run had been killed while scoring the multitask model and before marking it finished.
    (case_dir / "metrics_multi.json").unlink()
    (out / "runs" / "T_multi" / RUN_COMPLETE).unlink()
    before = json.loads((out / "summary.json").read_text())["median_dice"]
    again = run_experiment(data, out, preset="tiny", groups=["T"], models=["single", "multi", "segmenter"], device="cpu", progress="none")
    for path, stamp in kept.items():
        assert path.stat().st_mtime_ns == stamp, f"{path.name} was recomputed"
    assert (case_dir / "metrics_multi.json").exists()
    assert (out / "runs" / "T_multi" / RUN_COMPLETE).exists()
    for method, dice in before.items():
        assert again["median_dice"][method] == pytest.approx(dice), method


def _benchmark(name: str):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_context_preset_is_the_quick_preset_with_larger_patches_and_more_steps():
    # The README's context measurements hold only if this file stays the demo's preset otherwise.
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "presets" / "quick-context48.json"
    context, quick = load_preset(path), load_preset("quick")
    changed = {k for k in quick if context[k] != quick[k]} - {"name", "description"}
    assert changed == {"patch_size", "max_patches_per_epoch"}  # the overlap is quick's third of a patch
    assert context["patch_size"] * context["microct_spacing_mm"] == pytest.approx(3.6, abs=0.01)
    assert context["max_patches_per_epoch"] * (context["n_epochs"] + context["n_epochs_decay"]) == 1600


def test_tissue_ceiling_benchmark_scores_a_ct_classifier_beside_the_experiment(experiment, capsys):
    data, out, _ = experiment
    bench = _benchmark("bench_tissue_ceiling")
    assert bench.main(["--data", str(data), "--group", "T", "--preset", "tiny", "--features", "intensity",
                       "--steps", "150", "--threads", "1", "--results", str(out / "results.csv")]) == 0
    lines = {line.split("  ")[1].strip(): line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert {"CT features: intensity", "Naive (CT + Otsu)", "Atlas", "Single-task cGAN", "Multitask cGAN"} <= set(lines)
    air, soft, bone = (float(v) for v in lines["CT features: intensity"].split()[-5::2])
    assert bone > 0.8  # the CT's brightest class is learnt from intensity alone
    assert all(0.0 <= v <= 1.0 for v in (air, soft))


def test_segmenter_benchmark_trains_the_tissue_head_and_scores_train_and_test(experiment, capsys):
    data, _, _ = experiment
    bench = _benchmark("bench_segmenter")
    assert bench.main(["--data", str(data), "--group", "T", "--preset", "tiny", "--steps", "3", "--batch", "2",
                       "--sampling", "balanced", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "S3_2 (test)" in text and "S3_1 (train)" in text and "median (test)" in text
    with pytest.raises(SystemExit):
        bench.main(["--data", str(data), "--loss", "focal"])


def test_scanner_benchmark_scores_the_same_specimens_from_another_scanner_set(experiment, tmp_path, capsys):
    """Clinical figures as the experiment's own, the other phantom named by its scanner set, the drop
    the difference; phantoms of different seeds are refused."""
    data, out, _ = experiment
    edge = tmp_path / "edge"
    make_phantom(edge, preset="tiny", specimens=["S3_2"], progress="none", scanners="edge")
    prepare(edge, progress="none")
    bench = _benchmark("bench_scanners")
    model = out / "runs" / "T_multi" / "best.pt"
    assert bench.main(["--clinical", str(data), "--unseen", str(edge), "--group", "T", "--model", f"multi={model}",
                       "--json", str(tmp_path / "scanners.json")]) == 0
    assert "   edge " in capsys.readouterr().out
    row = json.loads((tmp_path / "scanners.json").read_text())["models"]["multi"]
    experiment_dice = json.loads((out / "cases" / "T" / "S3_2" / "metrics_multi.json").read_text())["dice"]
    assert row["clinical"]["median"] == pytest.approx(experiment_dice)
    assert row["clinical"]["median"] != row["unseen"]["median"]
    for c, drop in row["drop"].items():
        assert drop == pytest.approx(row["clinical"]["median"][c] - row["unseen"]["median"][c])
    other_seed = tmp_path / "seed1"
    make_phantom(other_seed, preset="tiny", specimens=["S3_2"], seed=1, progress="none", scanners="edge")
    with pytest.raises(SystemExit):
        bench.main(["--clinical", str(data), "--unseen", str(other_seed), "--group", "T", "--model", f"multi={model}"])


def test_mixed_scanners_dataset_trains_on_both_renderings(tmp_path):
    """The unseen-scanner control's dataset: each training specimen twice, validation and test as they were."""
    bench = _benchmark("mixed_scanners")

    def dataset(root, names):
        cases = {}
        for name in names:
            (root / name).mkdir(parents=True)
            (root / name / "ct.nrrd").write_text(f"{root.name} {name}")
            cases[name] = {"ct": f"{name}/ct.nrrd"}
        groups = {"T": {"train": ["S3_1", "S3_11"], "val": ["S3_8"], "test": ["S3_2"]}}
        (root / "cases.json").write_text(json.dumps({"cases": cases, "groups": groups}))

    dataset(tmp_path / "clinical", ["S3_1", "S3_11", "S3_8", "S3_2"])
    dataset(tmp_path / "unseen", ["S3_1", "S3_11", "S3_8"])
    out = tmp_path / "mixed"
    assert bench.main(["--clinical", str(tmp_path / "clinical"), "--unseen", str(tmp_path / "unseen"),
                       "--out", str(out), "--group", "T"]) == 0
    data = json.loads((out / "cases.json").read_text())
    assert data["groups"]["T"] == {"train": ["S3_1", "S3_11", "S3_1u", "S3_11u"], "val": ["S3_8"], "test": ["S3_2"]}
    assert data["cases"]["S3_11u"] == {"ct": "S3_11u/ct.nrrd"}
    assert (out / "S3_11u" / "ct.nrrd").read_text() == "unseen S3_11"
    assert (out / "S3_11" / "ct.nrrd").read_text() == "clinical S3_11"
    with pytest.raises(SystemExit):
        bench.main(["--clinical", str(tmp_path / "clinical"), "--unseen", str(tmp_path / "unseen"),
                    "--out", str(out), "--group", "Z"])
