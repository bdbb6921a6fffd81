"""Ship a trained model: its checkpoint, slimmed, and its card in MicroCTSynthLib/Resources/models/<name>/.

    python scripts/ship_model.py --checkpoint RUN/last.pt --data PHANTOM --name multitask_A --summary "..."
    python scripts/ship_model.py --checkpoint RUN --data PHANTOM ...   # the epoch best on validation

Given the run's folder, every ``epoch_NNN.pt`` is scored on the group's validation specimens and the
one with the highest mean Dice over air, soft tissue and bone is shipped; the card lists them all.

The checkpoint keeps what synthesis needs (network, normalisation, preset, history) and drops the
optimisers, the discriminator and the generators' states, so it loads with ``weights_only=True``
and stays small. The card (``model.json``) says what the README's model table says: the preset,
the exact command that trained it, the phantom (version, seed, preset) and its specimens per role,
the steps, wall time and machine, the Dice per class of every held-out (test) specimen of its
group and their median, and the checkpoint's sha256. Held-out Dice is measured here, by
synthesizing each test specimen's registered CT onto its micro-CT grid with the shipped file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from MicroCTSynthLib.checkpoint import STATE_KEYS, load_checkpoint, save_checkpoint  # noqa: E402
from MicroCTSynthLib.dataset import Dataset  # noqa: E402
from MicroCTSynthLib.labels import TISSUE_NAMES  # noqa: E402
from MicroCTSynthLib.experiment import score_checkpoint  # noqa: E402
from MicroCTSynthLib.package_data import resource, sha256  # noqa: E402
from MicroCTSynthLib.volume import write_json  # noqa: E402

CLASSES = tuple(TISSUE_NAMES.values())


def score(checkpoint, dataset: Dataset, specimens, device="cpu") -> dict:
    return {s: {c: round(v, 4) for c, v in d.items()} for s, d in score_checkpoint(checkpoint, dataset, specimens, device).items()}


def medians(per_specimen: dict) -> dict:
    return {c: round(statistics.median(d[c] for d in per_specimen.values()), 4) for c in CLASSES}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads here; "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def _first_command(run: Path) -> str:
    """The command that started the run in ``run`` (the first line of its ``command.txt``)."""
    path = run / "command.txt"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: give the command that trained the model with --command.")
    return path.read_text().splitlines()[0]


def select_by_validation(run: Path, dataset: Dataset) -> tuple:
    """The checkpoint of ``run`` (every ``epoch_NNN.pt``) whose tissue maps score best on the
    group's validation specimens: the highest mean over the classes of the median Dice. Returns
    its path and every candidate's scores (for the card)."""
    candidates = sorted(run.glob("epoch_*.pt"))
    if not candidates:
        raise SystemExit(f"{run} holds no epoch_NNN.pt checkpoint to choose from.")
    group = load_checkpoint(candidates[0])["group"]
    validation = dataset.group(group).get("val") or []
    if not validation:
        raise SystemExit(f"Group {group} has no validation specimen to choose a checkpoint by.")
    scores = {}
    for path in candidates:
        scores[path.name] = medians(score(path, dataset, validation))
        print(f"{path.name}: validation Dice {' / '.join(f'{v:.3f}' for v in scores[path.name].values())}", flush=True)
    best = max(scores, key=lambda name: sum(scores[name].values()))
    return run / best, {"rule": "the epoch checkpoint with the highest mean Dice (air, soft tissue, bone) on the "
                                "validation specimens", "validation": validation, "chosen": best, "candidates": scores}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="the run's checkpoint to ship (best.pt, last.pt, epoch_NNN.pt), or the run's folder: "
                             "the epoch checkpoint that scores best on the validation specimens")
    parser.add_argument("--data", required=True, help="the prepared phantom it was trained on")
    parser.add_argument("--name", required=True, help="folder name under Resources/models/")
    parser.add_argument("--command", default=None,
                        help="the exact command that trained it (default: the first line of the run's command.txt)")
    parser.add_argument("--summary", required=True, help="one line for the Slicer panel and `microctsynth models`")
    parser.add_argument("--threads", type=int, default=None, help="torch threads the training used (for the card)")
    parser.add_argument("--note", default="", help="anything else a user should know (choice of epoch, ...)")
    args = parser.parse_args(argv)

    dataset = Dataset.load(args.data)
    selection = None
    if Path(args.checkpoint).is_dir():
        checkpoint, selection = select_by_validation(Path(args.checkpoint), dataset)
        args.checkpoint = str(checkpoint)
    state = load_checkpoint(args.checkpoint)
    group = state["group"]
    roles = dataset.group(group)
    folder = Path(str(resource("models", args.name)))
    folder.mkdir(parents=True, exist_ok=True)
    slim = {k: v for k, v in state.items() if k not in STATE_KEYS and k not in ("format", "format_version")}
    slim["generator"] = state["generator"]
    target = folder / "model.pt"
    save_checkpoint(target, slim)
    load_checkpoint(target)  # loads with weights_only=True

    held_out = score(target, dataset, roles["test"])
    validation = score(target, dataset, roles.get("val") or [])
    history = state.get("history") or []
    epochs = int(state["epoch"])
    steps_per_epoch = int(state["preset"].get("max_patches_per_epoch") or 0)
    phantom = dataset.data.get("phantom") or {}
    versions = sorted({p.get("phantom_version") for p in (phantom.get("specimens") or {}).values()})
    card = {
        "name": args.name,
        "model": state["model"],
        "group": group,
        "summary": args.summary,
        "trained_on": "the MicroCTSynth inner-ear phantom (simulated specimens): on a patient's CT it shows the "
                      "workflow, not a clinical result",
        "checkpoint": target.name,
        "sha256": sha256(target),
        "size_bytes": target.stat().st_size,
        "preset": state["preset"].get("name"),
        "preset_settings": state["preset"],
        "command": args.command or _first_command(Path(args.checkpoint).parent),
        "data": {"phantom_version": versions[0] if len(versions) == 1 else versions, "phantom_seed": phantom.get("seed"),
                 "phantom_preset": dataset.data.get("preset"), "train": roles["train"], "val": roles.get("val") or [],
                 "test": roles["test"]},
        "seed": state.get("seed"),
        "epoch": epochs,
        "steps": epochs * steps_per_epoch if steps_per_epoch else None,
        "training_seconds": round(sum(float(h.get("seconds") or 0.0) for h in history[:epochs]), 1),
        "machine": machine() if args.threads is None else machine().replace(
            f"{torch.get_num_threads()} torch threads here", f"{args.threads} torch thread(s) in training"),
        "held_out": {"specimens": held_out, "median": medians(held_out)},
        "validation": validation,
        "selection": selection,
        "note": args.note,
    }
    write_json(folder / "model.json", card)
    print(json.dumps({k: card[k] for k in ("name", "epoch", "steps", "training_seconds", "held_out", "validation",
                                           "size_bytes")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
