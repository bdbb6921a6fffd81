"""The thesis' pre-processing of a dataset folder (``microctsynth prepare --data DIR``).

For every case of ``cases.json``: register the CT (moving) onto the micro-CT (fixed) with
mutual information, resample the CT onto the micro-CT grid (``ct_registered.nrrd``), make the
micro-CT's tissue map (``tissue.nrrd``, the training target) and the naive baseline's map (the
same Otsu + closing on the registered CT, ``naive_tissue.nrrd``). Where the phantom's truth is
there, it measures what the thesis' question rests on: the registration error against the true
transform, and the Dice of the micro-CT's own map and of the naive map against the truth.
A case whose outputs exist is skipped unless ``--force``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from .dataset import Dataset
from .labels import TISSUE_NAMES
from .metrics import dice_per_class
from .progress import Progress, report_result, warn
from .safety import FolderLock, check_outputs
from .registration import read_transform, register, resample, target_registration_error, write_transform
from .tissue import field_of_view, tissue_map
from .volume import read_volume, write_json, write_volume

OUTPUT_ROLES = ("transform", "ct_registered", "tissue", "naive_tissue")
REPORT_FILE = "prepare.json"


def _fov_points(microct, fov: np.ndarray, step: int = 4) -> np.ndarray:
    """LPS points on every ``step``-th voxel of the field of view (where the inner ear is)."""
    zyx = np.argwhere(fov[::step, ::step, ::step]) * step
    return microct.physical_points(zyx[:, ::-1])


def prepare_case(dataset: Dataset, case: str, affine: bool = False, force: bool = False, mode: str = "bar") -> dict:
    """Register, resample and label one case; returns its measurements."""
    paths = {role: dataset.path(case, role, must_exist=False) for role in OUTPUT_ROLES}
    inputs = {f"The {r.replace('_', ' ')} of case {case}": dataset.path(case, r, must_exist=False)
              for r in ("ct", "microct", "labels_true", "true_transform")}
    check_outputs(inputs, {f"The {r.replace('_', ' ')} of case {case}": p for r, p in paths.items()})
    report = {"case": case}
    microct = read_volume(dataset.path(case, "microct"), what=f"The micro-CT of {case}")
    if force or not all(p.exists() for p in paths.values()):
        ct = read_volume(dataset.path(case, "ct"), what=f"The CT of {case}")
        start = time.monotonic()
        transform = register(microct, ct, affine=affine, progress=mode if mode == "json" else "none")
        report["registration_seconds"] = round(time.monotonic() - start, 2)
        ct_registered = resample(ct, microct, transform, interpolator="linear")
        fov = field_of_view(microct)
        tissue = tissue_map(microct, mask=fov)
        naive = tissue_map(ct_registered, mask=fov)
        write_transform(transform, paths["transform"])
        write_volume(ct_registered, paths["ct_registered"])
        write_volume(tissue, paths["tissue"])
        write_volume(naive, paths["naive_tissue"])
    else:
        transform = read_transform(paths["transform"])
        tissue, naive = read_volume(paths["tissue"]), read_volume(paths["naive_tissue"])
        fov = tissue.array > 0
        report["skipped"] = True

    true_transform = dataset.path(case, "true_transform", must_exist=False)
    if true_transform.exists():
        tre = target_registration_error(transform, read_transform(true_transform), _fov_points(microct, fov))
        report["tre_mean_mm"], report["tre_max_mm"] = float(np.mean(tre)), float(np.max(tre))
    truth_path = dataset.path(case, "labels_true", must_exist=False)
    if truth_path.exists():
        truth = read_volume(truth_path).array
        report["microct_dice"] = dice_per_class(truth, tissue.array)
        report["naive_dice"] = dice_per_class(truth, naive.array)
    return report


def format_report(reports: list[dict]) -> str:
    """The per-case table printed by ``prepare``."""
    names = list(TISSUE_NAMES.values())
    short = {"Air": "air", "Soft tissue": "soft", "Bone": "bone"}
    head = f"{'case':<7} {'TRE mean/max (mm)':>18}  " + "  ".join(f"{'naive ' + short[n]:>10}" for n in names)
    head += "  " + "  ".join(f"{'uCT ' + short[n]:>9}" for n in names)
    lines = [head]
    for r in reports:
        tre = f"{r['tre_mean_mm']:.3f} / {r['tre_max_mm']:.3f}" if "tre_mean_mm" in r else "-"
        naive = "  ".join(f"{r['naive_dice'][n]:>10.3f}" if "naive_dice" in r else f"{'-':>10}" for n in names)
        micro = "  ".join(f"{r['microct_dice'][n]:>9.3f}" if "microct_dice" in r else f"{'-':>9}" for n in names)
        lines.append(f"{r['case']:<7} {tre:>18}  {naive}  {micro}")
    return "\n".join(lines)


def prepare(data_dir, cases=None, affine: bool = False, force: bool = False, progress: str = "bar") -> list[dict]:
    """Prepare every case (or the given ones) of a dataset folder; writes ``prepare.json``."""
    dataset = Dataset.load(data_dir)
    cases = list(cases) if cases else dataset.cases
    for case in cases:
        dataset.path(case, "ct", must_exist=False)  # an unknown case: a sentence before any work
    reports = []
    lock = FolderLock(dataset.root, "dataset folder", log=lambda m: warn(m, progress))
    with lock, Progress(total=len(cases), task="prepare", mode=progress, unit="case") as bar:
        for case in cases:
            report = prepare_case(dataset, case, affine=affine, force=force, mode=progress)
            reports.append(report)
            summary = f"{case}: " + (f"TRE {report['tre_mean_mm']:.3f} mm" if "tre_mean_mm" in report else "registered")
            bar.log(summary + (" (already prepared)" if report.get("skipped") else ""))
            bar.update(case=case, **{k: v for k, v in report.items() if isinstance(v, (int, float))})
    write_json(dataset.root / REPORT_FILE, reports)
    return reports


def command_prepare(args: argparse.Namespace) -> int:
    cases = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else None
    reports = prepare(args.data, cases=cases, affine=args.affine, force=args.force, progress=args.progress)
    report_result(args.progress, format_report(reports), outputs={"report": str(Path(args.data) / REPORT_FILE)})
    return 0
