"""How much of the tissue map the CT itself tells, voxel by voxel: a yardstick for the cGANs.

For one group of a prepared dataset, a small voxel-wise classifier (an MLP, 2 hidden layers of
64) is trained with cross-entropy on the group's training cases and scored on its test cases,
the same split the experiment uses. Its only input is the registered CT on the micro-CT grid,
described per voxel by features of growing reach:

* ``intensity``: the CT value (HU) alone, i.e. the best thresholds of the CT;
* ``texture``: plus the Gaussian mean and standard deviation of the CT within 0.075 and 0.15 mm;
* ``context``: plus the same at 0.3, 0.6, 1.2 and 2.4 mm.

No anatomy, position or atlas enters. The printed Dice per class (air, soft tissue, bone) says
what a learner can get from the CT's appearance at each reach, next to the naive baseline (the
CT's Otsu thresholds), the atlas and the cGANs on the same specimens when ``--results`` gives an
experiment's ``results.csv``.

    python benchmarks/bench_tissue_ceiling.py --data DIR [--group A] [--preset quick]
        [--features intensity,texture,context] [--steps 3000] [--seed 0] [--results E/results.csv]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from MicroCTSynthLib.data import load_case  # noqa: E402
from MicroCTSynthLib.dataset import Dataset  # noqa: E402
from MicroCTSynthLib.labels import TISSUE_NAMES  # noqa: E402
from MicroCTSynthLib.metrics import dice_per_class  # noqa: E402
from MicroCTSynthLib.presets import load_preset  # noqa: E402

#: Feature sets: the Gaussian scales (mm) whose local mean and standard deviation describe a voxel.
SCALES_MM = {"intensity": (), "texture": (0.075, 0.15), "context": (0.075, 0.15, 0.3, 0.6, 1.2, 2.4)}


def features(ct_hu: np.ndarray, spacing_mm: float, scales_mm) -> np.ndarray:
    """(D, H, W, F) float32: the CT scaled to about [0, 1] (-1000 to 2000 HU), then for each scale
    its Gaussian-weighted local mean and standard deviation."""
    x = np.clip((np.asarray(ct_hu, np.float32) + 1000.0) / 3000.0, -0.5, 1.5)
    out = [x]
    for s in scales_mm:
        sigma = s / spacing_mm
        mean = ndimage.gaussian_filter(x, sigma)
        var = ndimage.gaussian_filter(x * x, sigma) - mean * mean
        out += [mean, np.sqrt(np.maximum(var, 0.0))]
    return np.stack(out, -1).astype(np.float32)


def _case_features(dataset: Dataset, case: str, downsample: int, scales_mm):
    pair = load_case(dataset, case, downsample)
    inside = pair.tissue > 0
    return pair, features(pair.ct, pair.spacing[0], scales_mm)[inside], inside


def train_classifier(x: np.ndarray, y: np.ndarray, steps: int, batch: int = 4096, seed: int = 0) -> torch.nn.Module:
    """An MLP (F → 64 → 64 → 3) fitted by Adam with cross-entropy on random voxels, the learning
    rate falling linearly from 3e-3 to 0 over ``steps`` so that the result settles."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                              torch.nn.ReLU(), torch.nn.Linear(64, 3))
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        i = torch.randint(0, len(xt), (batch,), generator=generator)
        loss = torch.nn.functional.cross_entropy(net(xt[i]), yt[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return net.eval()


def _experiment_dice(results_csv: Path, group: str, cases) -> dict:
    """method -> class name -> median Dice over ``cases`` from an experiment's results.csv."""
    values: dict = {}
    with open(results_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("group") == group and row.get("specimen") in cases and row.get("dice") not in (None, ""):
                values.setdefault(row["method"], {}).setdefault(row["class"], []).append(float(row["dice"]))
    return {m: {c: statistics.median(v) for c, v in per.items()} for m, per in values.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a prepared dataset (microctsynth prepare)")
    parser.add_argument("--group", default="A")
    parser.add_argument("--preset", default="quick", help="the preset whose downsampling to use")
    parser.add_argument("--features", default="intensity,texture,context")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, help="an experiment's results.csv, to print beside")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.features.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCALES_MM]
    if unknown:
        parser.error(f"unknown feature set(s) {', '.join(unknown)}; choose from {', '.join(SCALES_MM)}")
    dataset = Dataset.load(Path(args.data))
    split = dataset.group(args.group)
    downsample = int(load_preset(args.preset).get("downsample") or 1)
    classes = list(TISSUE_NAMES.values())

    rows = {}
    for name in names:
        start = time.perf_counter()
        xs, ys = [], []
        for case in split["train"]:
            pair, x, inside = _case_features(dataset, case, downsample, SCALES_MM[name])
            xs.append(x)
            ys.append(pair.tissue[inside].astype(np.int64) - 1)
        net = train_classifier(np.concatenate(xs), np.concatenate(ys), args.steps, seed=args.seed)
        per_case = {}
        for case in split["test"]:
            pair, x, inside = _case_features(dataset, case, downsample, SCALES_MM[name])
            with torch.no_grad():
                predicted = net(torch.from_numpy(x)).argmax(1).numpy().astype(np.uint8) + 1
            labels = np.zeros_like(pair.tissue, dtype=np.uint8)
            labels[inside] = predicted
            per_case[case] = dice_per_class(pair.tissue, labels)
        rows[f"CT features: {name}"] = {c: statistics.median(per_case[s][c] for s in per_case) for c in classes}
        detail = "; ".join(f"{s} " + " / ".join(f"{per_case[s][c]:.3f}" for c in classes) for s in per_case)
        print(f"{name:>9}: {detail}  ({time.perf_counter() - start:.0f} s)", flush=True)

    if args.results:
        methods = {"naive": "Naive (CT + Otsu)", "atlas": "Atlas", "single": "Single-task cGAN", "multi": "Multitask cGAN"}
        for method, per in _experiment_dice(args.results, args.group, split["test"]).items():
            if method in methods:
                rows[methods[method]] = {c: per.get(c, float("nan")) for c in classes}

    print(f"\nMedian Dice on group {args.group}'s test cases ({', '.join(split['test'])}), " + " / ".join(classes))
    for label, values in rows.items():
        print(f"  {label:<26} " + " / ".join(f"{values[c]:.2f}" for c in classes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
