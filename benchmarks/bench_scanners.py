"""Does a model's tissue map follow the anatomy or the scanner? Dice on clinical vs unseen scanners.

The same specimens (same anatomy, pose and misalignment) are rendered twice by the phantom:
once with the clinical scanners the training data came from (``phantom --scanners clinical``)
and once with scanners outside every clinical range (``--scanners unseen``: coarser, blurrier,
noisier, calibrated further off). Each model synthesizes the test specimens of a group in both,
and the median Dice per class is compared; the drop is clinical minus unseen. ``--unseen`` may
also be rendered with ``--scanners far`` (well outside the ranges) or ``--scanners edge`` (the
coarsest corner inside them: what a scanner the training saw loses); the output names it.

    python benchmarks/bench_scanners.py --clinical DIR --unseen DIR [--group A] [--split test|val]
        --model NAME=CHECKPOINT [--model ...] [--json out.json]

``--split val`` scores the group's validation specimens instead, for choosing between recipes
without looking at the test specimens.

Both folders must be prepared phantoms of the same seed (``microctsynth prepare``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from MicroCTSynthLib.dataset import Dataset  # noqa: E402
from MicroCTSynthLib.experiment import CLASSES, score_checkpoint  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clinical", required=True, help="prepared phantom, clinical scanners")
    parser.add_argument("--unseen", required=True, help="prepared phantom of the same seed, unseen scanners")
    parser.add_argument("--group", default="A")
    parser.add_argument("--split", choices=("test", "val"), default="test", help="the group's specimens to score")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=CHECKPOINT")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)

    clinical, unseen = Dataset.load(args.clinical), Dataset.load(args.unseen)
    seeds = [(d.data.get("phantom") or {}).get("seed") for d in (clinical, unseen)]
    if seeds[0] != seeds[1]:
        parser.error(f"the two phantoms must share a seed (clinical {seeds[0]}, unseen {seeds[1]})")
    # Only the scored specimens need to be there (not the group's training ones).
    groups = clinical.data.get("groups") or {}
    if args.group not in groups:
        parser.error(f"the phantom has no group {args.group} (it has {', '.join(groups) or 'none'})")
    specimens = groups[args.group][args.split]
    scanners = {name: {s: (d.data["phantom"]["specimens"][s]["ct_scanner"]) for s in specimens}
                for name, d in (("clinical", clinical), ("unseen", unseen))}
    other = (unseen.data.get("phantom") or {}).get("scanners") or "unseen"
    rows = {}
    print(f"Group {args.group} {args.split} specimens {', '.join(specimens)} (seed {seeds[0]}); median Dice air / soft tissue / bone")
    for item in args.model:
        name, _, checkpoint = item.partition("=")
        row = {}
        for kind, data in (("clinical", clinical), ("unseen", unseen)):
            per = score_checkpoint(checkpoint, data, specimens, args.device)
            row[kind] = {"specimens": per, "median": {c: statistics.median(per[s][c] for s in specimens) for c in CLASSES}}
        row["drop"] = {c: row["clinical"]["median"][c] - row["unseen"]["median"][c] for c in CLASSES}
        rows[name] = row
        fmt = lambda d: " / ".join(f"{d[c]:.3f}" for c in CLASSES)  # noqa: E731
        print(f"  {name:<28} clinical {fmt(row['clinical']['median'])}   {other} {fmt(row['unseen']['median'])}   "
              f"drop {fmt(row['drop'])}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"group": args.group, "split": args.split, "seed": seeds[0], "scanners": scanners,
                                               "models": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
