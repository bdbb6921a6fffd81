"""A prepared dataset whose group A trains on each specimen twice: as its clinical scanner and as an unseen one.

The control for the unseen-scanner drop (README, "Another scanner"): a model trained with the
unseen scanners' CTs of its training specimens, scored on test specimens rendered by unseen
scanners, shows how much of the drop is left when the scanner is no longer unseen, i.e. how much
is what such a CT does not hold rather than what training did not show.

    microctsynth phantom --out clinical --preset quick --seed 0 && microctsynth prepare --data clinical
    microctsynth phantom --out unseen --preset quick --seed 0 --scanners unseen --specimens S3_1,S3_11,S3_12,S3_8
    microctsynth prepare --data unseen
    python benchmarks/mixed_scanners.py --clinical clinical --unseen unseen --out mixed
    microctsynth train --data mixed --group A --model multi \
        --preset MicroCTSynthLib/Resources/presets/pretrained-robust40.json --out runs/mixed

The unseen renderings are copied in as ``<name>u`` (S3_1u, ...); group A trains on both renderings
of its training specimens and keeps the clinical S3_8 for validation and S3_2, S3_7 for testing.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from MicroCTSynthLib.dataset import Dataset  # noqa: E402
from MicroCTSynthLib.errors import MicroCTSynthError  # noqa: E402

SUFFIX = "u"


def mixed_dataset(clinical: Path, unseen: Path, out: Path, group: str = "A") -> Dataset:
    """Copy both datasets' specimens into ``out`` and write its cases.json; returns the new dataset."""
    source, other = Dataset.load(clinical), Dataset.load(unseen, complete=False)
    split = source.group(group)
    doubled = [name for name in split["train"] if name in other.cases]
    if not doubled:
        raise MicroCTSynthError(f"{unseen} holds none of group {group}'s training specimens {split['train']}.")
    mixed = Dataset.create(out, groups={group: {**split, "train": split["train"] + [n + SUFFIX for n in doubled]}})
    for name in split["train"] + split["val"] + split["test"]:
        shutil.copytree(clinical / name, out / name, dirs_exist_ok=True)
        mixed.data["cases"][name] = source.data["cases"][name]
    for name in doubled:
        shutil.copytree(unseen / name, out / (name + SUFFIX), dirs_exist_ok=True)
        mixed.data["cases"][name + SUFFIX] = {key: path.replace(f"{name}/", f"{name}{SUFFIX}/", 1)
                                              for key, path in other.data["cases"][name].items()}
    mixed.save()
    return mixed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clinical", type=Path, required=True, help="prepared phantom, clinical scanners")
    parser.add_argument("--unseen", type=Path, required=True, help="prepared phantom of the same seed, --scanners unseen")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--group", default="A")
    args = parser.parse_args(argv)
    try:
        mixed = mixed_dataset(args.clinical, args.unseen, args.out, args.group)
    except MicroCTSynthError as exc:
        raise SystemExit(str(exc)) from None
    print(f"{args.out}: group {args.group} trains on {', '.join(mixed.groups[args.group]['train'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
