"""The thesis' leave-2-out experiment (chapter IV) and the demo.

``microctsynth experiment`` runs, for each group of ``cases.json``: train (or reuse) the
single-task and multitask cGANs (and, asked for, the direct segmenter), pick the epoch of lowest
validation loss (``best.pt``) -- or, with ``--pretrained``, take the shipped models of
``Resources/models/`` --,
synthesize the group's two test specimens on their micro-CT grids, run the atlas and naive
baselines on them, and score every method against the micro-CT's tissue map (the thesis'
reference): Dice per class (Eq. 7), HD95, and the perceptual error (Eq. 8) of the synthetic
micro-CTs. Everything lands in the experiment folder::

    E/runs/<group>_<model>/            training runs (checkpoints, TensorBoard, pictures)
    E/cases/<group>/<specimen>/        synthetic micro-CTs, tissue maps, metrics_<method>.json
    E/results.csv                      one row per group x specimen x method x class
    E/summary.json, E/report.md, E/report.html, E/figures/*.png

An interrupted experiment continues where it stopped: finished runs and scored methods are
reused, an unfinished run resumes from its last checkpoint.

``microctsynth demo`` makes the quick phantom, prepares it and runs the experiment on group A
with the shipped models (``--train``: trains all three itself with the quick preset).
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import math
import time
from pathlib import Path

import numpy as np

from .choices import MODEL_KINDS, MODEL_TITLES, check_model_kind
from .dataset import Dataset
from .labels import TISSUE_NAMES
from .metrics import evaluate
from .presets import load_preset
from .progress import Progress, log, report_result, warn
from .volume import atomic_path, json_safe, read_volume, write_json, write_volume

CLASSES = tuple(TISSUE_NAMES.values())
METHODS = ("atlas", "naive", *MODEL_KINDS)
METHOD_TITLES = {"atlas": "Atlas", "naive": "Naive (CT + Otsu)", "single": "Single-task cGAN", "multi": "Multitask cGAN",
                 "segmenter": "Segmenter (DynUNet)"}

#: Median Dice (air / soft tissue / bone) the thesis reports on its private specimens (chapter IV).
THESIS_MEDIAN_DICE = {
    "atlas": {"Air": 0.83, "Soft tissue": 0.43, "Bone": 0.68},
    "single": {"Air": 0.92, "Soft tissue": 0.57, "Bone": 0.85},
    "multi": {"Air": 0.95, "Soft tissue": 0.66, "Bone": 0.88},
}

RUN_COMPLETE = "complete.json"




# -- training -------------------------------------------------------------------------------
def train_or_reuse(data_dir, run_dir: Path, group: str, model: str, preset: str, device: str, progress: str) -> Path:
    """``best.pt`` of a finished run; resumes an interrupted one, starts a missing one."""
    from .train import train

    if (run_dir / RUN_COMPLETE).exists() and (run_dir / "best.pt").exists():
        log(f"Reusing the finished run {run_dir}", progress)
        return run_dir / "best.pt"
    resume = "last" if (run_dir / "last.pt").exists() else None
    start = time.monotonic()
    # The experiment owns its run folders: without last.pt, what a killed run left is started afresh.
    best = Path(train(data_dir, group=group, model=model, preset=preset, out=run_dir, device=device, resume=resume,
                      progress=progress, overwrite=resume is None))
    write_json(run_dir / RUN_COMPLETE, {"seconds": round(time.monotonic() - start, 1), "best": best.name})
    return best


def shipped_or_fail(groups, models) -> dict:
    """``{(group, model): checkpoint}`` of the shipped models, checked against their cards; one
    sentence naming every group and model asked for that ``Resources/models/`` lacks."""
    from .errors import MicroCTSynthError
    from .package_data import find_shipped, verify_shipped

    found, missing = {}, []
    for g in groups:
        for m in models:
            card = find_shipped(g, m)
            if card is None:
                missing.append(f"group {g} {MODEL_TITLES[m]}")
            else:
                found[(g, m)] = verify_shipped(card)
    if missing:
        raise MicroCTSynthError(f"No shipped model for {', '.join(missing)}: choose groups and models that "
                                "Resources/models/ holds (microctsynth models), or leave out --pretrained to train them.")
    return found


def run_summary(checkpoint: Path) -> dict:
    """Best epoch, its validation loss and the validation curve of a run's best.pt (Table 2, Fig. 6)."""
    from .checkpoint import load_checkpoint

    best = load_checkpoint(checkpoint)
    history = best.get("history") or []
    curve = [(h["epoch"], h["val_loss"]) for h in history if h.get("val_loss") is not None]
    return {"best_epoch": best.get("epoch"), "val_loss": best.get("val_loss"), "curve": curve}


# -- one test specimen --------------------------------------------------------------------------
def score_specimen(dataset: Dataset, group: str, specimen: str, runs: dict, out_dir: Path, device: str,
                   progress: str) -> dict:
    """Every method's tissue map of ``specimen`` and its metrics (cached in ``metrics_<method>.json``); each
    model synthesizes with its own preset's window overlap."""
    case_dir = out_dir / "cases" / group / specimen
    reference = read_volume(dataset.path(specimen, "tissue"))
    microct = read_volume(dataset.path(specimen, "microct"))
    results = {}
    for method in ("naive", "atlas", *runs):
        cached = case_dir / f"metrics_{method}.json"
        if cached.exists():
            results[method] = json.loads(cached.read_text())
            continue
        synthetic = None
        if method == "naive":
            prediction = read_volume(dataset.path(specimen, "naive_tissue"))
        elif method == "atlas":
            from .atlas import atlas_segment, load_atlases
            from .registration import read_transform

            atlases = load_atlases(dataset, dataset.group(group)["train"])
            prediction = atlas_segment(
                read_volume(dataset.path(specimen, "ct")), atlases, reference,
                target_transform=read_transform(dataset.path(specimen, "transform")), progress="none",
            )
            write_volume(prediction, case_dir / "atlas_tissue.nrrd")
        else:
            from .synthesize import synthesize

            # The thesis synthesizes from the CT registered onto the micro-CT grid.
            ct_registered = read_volume(dataset.path(specimen, "ct_registered"))
            result = synthesize(ct_registered, runs[method], reference=ct_registered, device=device, progress="none")
            synthetic, prediction = result.microct, result.tissue
            if synthetic is not None:  # the segmenter makes none
                write_volume(synthetic, case_dir / f"{method}_microct.nrrd")
            write_volume(prediction, case_dir / f"{method}_tissue.nrrd")
        metrics = evaluate(reference, prediction, microct if synthetic is not None else None, synthetic)
        write_json(cached, metrics)
        results[method] = json_safe(metrics)
        log(f"{group} {specimen} {method}: Dice " + " / ".join(f"{metrics['dice'][c]:.3f}" for c in CLASSES), progress)
    return results


def score_checkpoint(checkpoint, dataset: Dataset, specimens, device: str = "auto") -> dict:
    """``{specimen: {class: Dice}}`` of a model's tissue map of each specimen, synthesized from its
    registered CT onto its micro-CT grid with the model's own window overlap (the experiment's way)."""
    from .metrics import dice_per_class
    from .synthesize import synthesize

    scores = {}
    for s in specimens:
        ct = read_volume(dataset.path(s, "ct_registered"))
        result = synthesize(ct, checkpoint, reference=ct, device=device, progress="none")
        dice = dice_per_class(read_volume(dataset.path(s, "tissue")).array, result.tissue.array)
        scores[s] = {c: float(dice[c]) for c in CLASSES}
    return scores


# -- tables -------------------------------------------------------------------------------------
def result_rows(scores: dict) -> list[dict]:
    """Flatten ``scores[group][specimen][method]`` into one row per specimen x method x class."""
    rows = []
    for group, specimens in scores.items():
        for specimen, methods in specimens.items():
            for method, m in methods.items():
                for c in CLASSES:
                    rows.append({
                        "group": group, "specimen": specimen, "method": method, "class": c,
                        "dice": m["dice"].get(c), "hd95_mm": m["hd95_mm"].get(c),
                        "perceptual_error": m.get("perceptual_error"),
                    })
    return rows


def _median(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.median(values)) if values else None


def summarize(rows: list[dict]) -> dict:
    """Medians per method and class (Dice, HD95) and per method (perceptual error)."""
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    summary = {"median_dice": {}, "median_hd95_mm": {}, "median_perceptual_error": {}}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        summary["median_dice"][m] = {c: _median(r["dice"] for r in mine if r["class"] == c) for c in CLASSES}
        summary["median_hd95_mm"][m] = {c: _median(r["hd95_mm"] for r in mine if r["class"] == c) for c in CLASSES}
        pe = _median(r["perceptual_error"] for r in mine if r["class"] == CLASSES[0])
        if pe is not None:
            summary["median_perceptual_error"][m] = pe
    return summary


def _fmt(v, digits=3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def summary_table(summary: dict) -> str:
    """Median Dice per class in the layout of the thesis' text, our phantom beside the thesis."""
    lines = ["Median Dice (air / soft tissue / bone), ours on the phantom | the thesis on its specimens"]
    for m in METHODS:
        if m not in summary["median_dice"]:
            continue
        ours = " / ".join(_fmt(summary["median_dice"][m][c], 2) for c in CLASSES)
        theirs = " / ".join(f"{THESIS_MEDIAN_DICE[m][c]:.2f}" for c in CLASSES) if m in THESIS_MEDIAN_DICE else "-"
        lines.append(f"  {METHOD_TITLES[m]:<20} {ours:<20} | {theirs}")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["group", "specimen", "method", "class", "dice", "hd95_mm", "perceptual_error"])
            writer.writeheader()
            writer.writerows(rows)


# -- figures ------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_dice_boxes(rows: list[dict], path: Path) -> Path:
    """Fig. 7: Dice per class, one box per method."""
    plt = _plt()
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(CLASSES), figsize=(4 * len(CLASSES), 3.6), sharey=True)
    for ax, c in zip(axes, CLASSES):
        data = [[r["dice"] for r in rows if r["method"] == m and r["class"] == c and r["dice"] is not None] for m in methods]
        ax.boxplot(data)
        for i, values in enumerate(data, start=1):
            ax.scatter(np.full(len(values), i) + np.linspace(-0.08, 0.08, len(values)), values, s=12, alpha=0.7)
        ax.set_xticks(range(1, len(methods) + 1), [METHOD_TITLES[m].replace(" cGAN", "\ncGAN").replace(" (", "\n(") for m in methods], fontsize=8)
        ax.set_title(c)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("Dice")
    fig.suptitle("Dice per class on the test specimens (phantom)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_validation_curves(runs: dict, path: Path) -> Path:
    """Fig. 6: validation loss per epoch of every run, its best epoch marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, info in runs.items():
        if info["curve"]:
            epochs, losses = zip(*info["curve"])
            (line,) = ax.plot(epochs, losses, marker="o", ms=3, label=name)
            if info["best_epoch"] is not None and info["val_loss"] is not None:
                ax.scatter([info["best_epoch"]], [info["val_loss"]], s=60, facecolors="none", edgecolors=line.get_color())
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation loss")
    ax.set_title("Validation loss (circles: best epoch)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no validation cases", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_visual_comparison(dataset: Dataset, out_dir: Path, group: str, specimen: str, methods, path: Path) -> Path:
    """Fig. 8: CT, synthetic micro-CTs, micro-CT, and every method's tissue map on the same slice."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from .labels import TISSUE_COLORS, TISSUE_NAMES

    plt = _plt()
    case_dir = out_dir / "cases" / group / specimen
    ct = read_volume(dataset.path(specimen, "ct_registered")).array
    microct = read_volume(dataset.path(specimen, "microct")).array
    k = ct.shape[0] // 2
    images = [("CT (registered)", ct[k], "gray")]
    images += [(f"{METHOD_TITLES[m]}", read_volume(case_dir / f"{m}_microct.nrrd").array[k], "gray")
               for m in methods if (case_dir / f"{m}_microct.nrrd").exists()]
    images.append(("micro-CT", microct[k], "gray"))
    reference = read_volume(dataset.path(specimen, "tissue")).array[k]
    maps = [("micro-CT tissue map (reference)", reference)]
    sources = {"naive": dataset.path(specimen, "naive_tissue"), "atlas": case_dir / "atlas_tissue.nrrd"}
    for m in ("atlas", "naive", *methods):
        p = sources.get(m, case_dir / f"{m}_tissue.nrrd")
        if p.exists():
            # Shown where it is scored: inside the micro-CT's field of view.
            maps.append((METHOD_TITLES[m], np.where(reference > 0, read_volume(p).array[k], 0)))
    cmap = ListedColormap([(0, 0, 0)] + [TISSUE_COLORS[i] for i in sorted(TISSUE_COLORS)])
    n = max(len(images), len(maps))
    fig, axes = plt.subplots(2, n, figsize=(2.6 * n, 5.6))
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (title, img, c) in zip(axes[0], images):
        lo, hi = np.percentile(img, [1, 99])
        ax.imshow(img, cmap=c, vmin=lo, vmax=hi)
        ax.set_title(title, fontsize=8)
    for ax, (title, lab) in zip(axes[1], maps):
        ax.imshow(lab, cmap=cmap, vmin=0, vmax=3, interpolation="nearest")
        ax.set_title(title, fontsize=8)
    fig.suptitle(f"{specimen} (group {group}), axial slice {k}; tissue maps within the micro-CT's field of view",
                 fontsize=10)
    fig.legend(handles=[Patch(color=TISSUE_COLORS[i], label=TISSUE_NAMES[i]) for i in sorted(TISSUE_NAMES)],
               loc="lower right", fontsize=8, frameon=False, ncol=3)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- report -------------------------------------------------------------------------------------
def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def report_markdown(summary: dict, runs: dict, figures: dict, preset: str) -> str:
    dice_rows = []
    for m in METHODS:
        if m in summary["median_dice"]:
            ours = [_fmt(summary["median_dice"][m][c], 3) for c in CLASSES]
            theirs = [f"{THESIS_MEDIAN_DICE[m][c]:.2f}" if m in THESIS_MEDIAN_DICE else "-" for c in CLASSES]
            dice_rows.append([METHOD_TITLES[m], *ours, *theirs])
    hd_rows = [[METHOD_TITLES[m], *[_fmt(summary["median_hd95_mm"][m][c], 2) for c in CLASSES]]
               for m in METHODS if m in summary["median_hd95_mm"]]
    pe_rows = [[METHOD_TITLES[m], _fmt(v, 4)] for m, v in summary["median_perceptual_error"].items()]
    epoch_rows = [[name, str(info["best_epoch"]), _fmt(info["val_loss"], 4)] for name, info in runs.items()]
    parts = [
        "# MicroCTSynth experiment report",
        f"Leave-2-out experiment of the thesis (chapter IV), preset `{preset}`, on the project's inner-ear "
        "phantom. **Our figures come from the phantom**; the thesis' figures come from its own private "
        "temporal-bone specimens and are shown for orientation only. Reference: the micro-CT's tissue map.",
        "## Median Dice per class",
        _markdown_table(["method", "air", "soft tissue", "bone", "thesis air", "thesis soft tissue", "thesis bone"], dice_rows),
        "## Median HD95 (mm)",
        _markdown_table(["method", "air", "soft tissue", "bone"], hd_rows),
        "## Perceptual error of the synthetic micro-CT (Table 3, Eq. 8)",
        _markdown_table(["method", "median perceptual error"], pe_rows),
        "## Best epoch on validation (Table 2)",
        _markdown_table(["run", "best epoch", "validation loss"], epoch_rows),
    ]
    for title, rel in figures.items():
        parts += [f"## {title}", f"![{title}]({rel})"]
    return "\n\n".join(parts) + "\n"


def report_html(markdown: str) -> str:
    """A self-contained HTML page of the Markdown report (tables, headings, images)."""
    body, table = [], []
    for block in markdown.split("\n\n"):
        block = block.strip()
        if block.startswith("# "):
            body.append(f"<h1>{html.escape(block[2:])}</h1>")
        elif block.startswith("## "):
            body.append(f"<h2>{html.escape(block[3:])}</h2>")
        elif block.startswith("!["):
            alt, src = block[2:].split("](")
            body.append(f'<img src="{html.escape(src.rstrip(")"))}" alt="{html.escape(alt)}" style="max-width:100%">')
        elif block.startswith("|"):
            table = [ln.strip("|").split("|") for ln in block.splitlines() if not ln.startswith("|---")]
            head = "".join(f"<th>{html.escape(c.strip())}</th>" for c in table[0])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>" for r in table[1:])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        else:
            text = html.escape(block).replace("**", "")
            body.append(f"<p>{text}</p>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 10px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}")
    return f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>MicroCTSynth report</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"


# -- the experiment -----------------------------------------------------------------------------
def run_experiment(data_dir, out_dir, preset: str = "quick", groups=("A", "B", "C"), models=("single", "multi"),
                   device: str = "auto", progress: str = "bar", pretrained: bool = False) -> dict:
    """The thesis' chapter IV on a prepared dataset; returns the summary (also written to disk).

    ``pretrained``: score the shipped models (``Resources/models/``) instead of training; every
    group and model asked for must be shipped."""
    from .safety import FolderLock

    dataset = Dataset.load(data_dir)
    out_dir = Path(out_dir)
    load_preset(preset)  # a bad preset: a sentence before any folder is made
    for g in groups:
        dataset.group(g)  # fail early, with a sentence, on an unknown group or case
    for m in models:
        check_model_kind(m)
    shipped = shipped_or_fail(groups, models) if pretrained else None
    with FolderLock(out_dir, "experiment folder", log=lambda m: warn(m, progress)):
        return _run_experiment(dataset, out_dir, preset, groups, models, device, progress, shipped)


def _run_experiment(dataset: Dataset, out_dir: Path, preset: str, groups, models, device: str, progress: str,
                    shipped: dict | None = None) -> dict:
    scores, runs = {}, {}
    steps = len(groups) * (len(models) + 1)
    with Progress(total=steps, task="experiment", mode=progress, unit="stage") as bar:
        for g in groups:
            checkpoints = {}
            for m in models:
                if shipped is not None:
                    checkpoints[m] = shipped[(g, m)]
                    bar.log(f"Group {g}: shipped {MODEL_TITLES[m]} {checkpoints[m].parent.name}")
                else:
                    run_dir = out_dir / "runs" / f"{g}_{m}"
                    bar.log(f"Group {g}: {MODEL_TITLES[m]} in {run_dir}")
                    checkpoints[m] = train_or_reuse(dataset.root, run_dir, g, m, preset, device, progress)
                runs[f"{g}_{m}"] = run_summary(checkpoints[m])
                bar.update(group=g, stage=f"{'load' if shipped is not None else 'train'} {m}")
            scores[g] = {}
            for s in dataset.group(g)["test"]:
                scores[g][s] = score_specimen(dataset, g, s, checkpoints, out_dir, device, progress)
            bar.update(group=g, stage="evaluate")

    rows = result_rows(scores)
    write_csv(rows, out_dir / "results.csv")
    summary = summarize(rows)
    summary["runs"] = runs
    write_json(out_dir / "summary.json", summary)
    figures_dir = out_dir / "figures"
    figures = {"Dice per class (Fig. 7)": plot_dice_boxes(rows, figures_dir / "dice_boxplot.png"),
               "Validation loss (Fig. 6)": plot_validation_curves(runs, figures_dir / "validation_loss.png")}
    for g in groups:
        s = dataset.group(g)["test"][0]
        figures[f"Visual comparison, {s} (Fig. 8)"] = plot_visual_comparison(
            dataset, out_dir, g, s, models, figures_dir / f"comparison_{g}_{s}.png")
    rel = {t: p.relative_to(out_dir).as_posix() for t, p in figures.items()}
    markdown = report_markdown(summary, runs, rel, "shipped models" if shipped is not None else preset)
    for name, text in (("report.md", markdown), ("report.html", report_html(markdown))):
        with atomic_path(out_dir / name) as tmp:
            tmp.write_text(text)
    return summary


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def command_experiment(args: argparse.Namespace) -> int:
    summary = run_experiment(args.data, args.out, args.preset, _split(args.groups), _split(args.models), args.device,
                             args.progress, pretrained=args.pretrained)
    out = Path(args.out)
    report_result(args.progress, f"{summary_table(summary)}\nReport: {out / 'report.html'}",
                  outputs={"report": str(out / "report.html"), "results": str(out / "results.csv")},
                  summary=summary["median_dice"])
    return 0


def command_demo(args: argparse.Namespace) -> int:
    """Phantom (quick) -> prepare -> experiment on group A with the shipped models (or, with
    ``--train``, models trained here) -> report."""
    from .phantom import make_phantom
    from .prepare import format_report, prepare

    out = Path(args.out)
    data = out / "phantom"
    train = args.train
    load_preset(args.preset)  # a bad preset: a sentence before anything else
    if not train:
        shipped_or_fail(["A"], MODEL_KINDS)  # before minutes of phantom and registration
    start = time.monotonic()
    if not (data / "cases.json").exists():
        log(f"Making the inner-ear phantom ({args.preset}, seed {args.seed}) in {data}", args.progress)
        make_phantom(data, preset=args.preset, seed=args.seed, progress=args.progress, workers=None)
    log("Registering and labelling every specimen (prepare)", args.progress)
    reports = prepare(data, progress=args.progress)
    log(format_report(reports), args.progress)
    folder = "experiment_trained" if train else "experiment"
    summary = run_experiment(data, out / folder, args.preset, ["A"], list(MODEL_KINDS), args.device, args.progress,
                             pretrained=not train)
    minutes = (time.monotonic() - start) / 60
    report = out / folder / "report.html"
    report_result(args.progress, f"{summary_table(summary)}\nReport: {report}  ({minutes:.1f} min)",
                  outputs={"report": str(report)}, summary=summary["median_dice"], minutes=minutes)
    return 0


def command_models(args) -> int:
    """``microctsynth models``: one line per shipped model, its card's summary and checkpoint."""
    from .package_data import shipped_checkpoint, shipped_models

    models = shipped_models()
    lines = [f"{name}: group {card.get('group')}, {card.get('model')}: {card.get('summary')}\n    {shipped_checkpoint(card)}"
             for name, card in models.items()]
    report_result(args.progress, "\n".join(lines) or "No shipped model is installed (MicroCTSynthLib/Resources/models/ is empty).",
                  models={name: {k: v for k, v in card.items() if k != "folder"} for name, card in models.items()})
    return 0
