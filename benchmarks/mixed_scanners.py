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
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from MicroCTSynthLib.dataset import THESIS_GROUPS  # noqa: E402

SUFFIX = "u"


def mixed_dataset(clinical: Path, unseen: Path, out: Path, group: str = "A") -> dict:
    """Copy both datasets' specimens into ``out`` and write its cases.json; returns it."""
    clinical_data = json.loads((clinical / "cases.json").read_text())
    cases_clinical = clinical_data["cases"]
    cases_unseen = json.loads((unseen / "cases.json").read_text())["cases"]
    split = clinical_data.get("groups", THESIS_GROUPS).get(group)
    if split is None:
        raise SystemExit(f"{clinical} has no group {group}.")
    doubled = [name for name in split["train"] if name in cases_unseen]
    if not doubled:
        raise SystemExit(f"{unseen} holds none of group {group}'s training specimens {split['train']}.")
    out.mkdir(parents=True, exist_ok=True)
    cases = {}
    for name in split["train"] + split["val"] + split["test"]:
        shutil.copytree(clinical / name, out / name, dirs_exist_ok=True)
        cases[name] = cases_clinical[name]
    for name in doubled:
        shutil.copytree(unseen / name, out / (name + SUFFIX), dirs_exist_ok=True)
        cases[name + SUFFIX] = {key: path.replace(f"{name}/", f"{name}{SUFFIX}/", 1)
                                for key, path in cases_unseen[name].items()}
    data = {"cases": cases, "groups": {group: {"train": split["train"] + [n + SUFFIX for n in doubled],
                                               "val": split["val"], "test": split["test"]}}}
    (out / "cases.json").write_text(json.dumps(data, indent=1))
    return data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clinical", type=Path, required=True, help="prepared phantom, clinical scanners")
    parser.add_argument("--unseen", type=Path, required=True, help="prepared phantom of the same seed, --scanners unseen")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--group", default="A")
    args = parser.parse_args(argv)
    data = mixed_dataset(args.clinical, args.unseen, args.out, args.group)
    print(f"{args.out}: group {args.group} trains on {', '.join(data['groups'][args.group]['train'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
