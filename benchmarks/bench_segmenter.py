"""The generator trained as a plain segmenter: how much of the tissue map it fits in a budget.

The preset's multitask generator is trained on a group's training cases with its tissue head
alone (no image head loss, no discriminator), on random patches of the preset's size, with
cross-entropy, the Dice loss of Eq. 4 or both, then run over whole cases (Gaussian-blended
windows) and scored with Dice per class on the group's test cases and on its first training
case (does it fit what it saw?). Set beside ``bench_tissue_ceiling.py`` it separates what the
network learns in a budget from what the CT holds, and from the GAN's share of the objective.

    python benchmarks/bench_segmenter.py --data DIR [--group A] [--preset quick] [--loss ce|dice|dice+ce]
        [--steps 800] [--batch 1] [--sampling grid|balanced] [--seed 0]

``grid``: the training patches of :class:`PatchDataset` (those the cGAN sees), drawn at random;
``balanced``: a class drawn uniformly, a random voxel of it, the patch centred there.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from MicroCTSynthLib.data import build_datasets, load_case  # noqa: E402
from MicroCTSynthLib.dataset import Dataset  # noqa: E402
from MicroCTSynthLib.labels import TISSUE_LABELS, TISSUE_NAMES  # noqa: E402
from MicroCTSynthLib.losses import dice_loss, loss_options  # noqa: E402
from MicroCTSynthLib.metrics import dice_per_class  # noqa: E402
from MicroCTSynthLib.presets import load_preset  # noqa: E402
from MicroCTSynthLib.synthesize import sliding_window_synthesis  # noqa: E402
from MicroCTSynthLib.train import build_networks  # noqa: E402


def balanced_patch(train, rng: np.random.Generator, voxels: list) -> tuple[torch.Tensor, torch.Tensor]:
    """A patch centred on a random voxel of a uniformly drawn class, in a random training case."""
    case = int(rng.integers(len(train.images)))
    ct, _, tissue = train.images[case]
    of_class = voxels[case][int(rng.integers(len(voxels[case])))]
    centre = of_class[int(rng.integers(len(of_class)))]
    p = train.patch_size
    start = [int(np.clip(c - p // 2, 0, s - p)) for c, s in zip(centre, tissue.shape)]
    box = tuple(slice(s, s + p) for s in start)
    return ct[box][None].clone(), tissue[box][None].long()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a prepared dataset (microctsynth prepare)")
    parser.add_argument("--group", default="A")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--loss", default="ce", choices=("ce", "dice", "dice+ce"))
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--sampling", default="grid", choices=("grid", "balanced"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    preset = load_preset(args.preset)
    dataset = Dataset.load(Path(args.data))
    sets = build_datasets(dataset, args.group, preset)
    train, normalization = sets["train"], sets["normalization"]
    generator, _ = build_networks(preset, "multi")
    optimizer = torch.optim.Adam(generator.parameters(), lr=float(preset["lr"]),
                                 betas=(float(preset["beta1"]), 0.999))
    options = loss_options(preset)
    # per training case, the voxel coordinates of each tissue class present in it
    voxels = [[v for v in (np.argwhere(t.numpy() == k) for k in TISSUE_LABELS) if len(v)] for (_, _, t) in train.images]

    start = time.perf_counter()
    for _ in range(args.steps):
        if args.sampling == "balanced":
            pairs = [balanced_patch(train, rng, voxels) for _ in range(args.batch)]
        else:
            items = [train[int(rng.integers(len(train)))] for _ in range(args.batch)]
            pairs = [(i["real_A"], i["tissue"]) for i in items]
        ct, tissue = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        _, logits = generator(ct)
        loss = torch.zeros(())
        if "dice" in args.loss.split("+"):
            loss = loss + dice_loss(logits, tissue, eps=options["dice_eps"], absent=options["dice_absent"])
        if "ce" in args.loss.split("+"):
            loss = loss + F.cross_entropy(logits, tissue[:, 0] - 1, ignore_index=-1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start

    generator.eval()
    classes = list(TISSUE_NAMES.values())
    scores = {}
    for case in list(sets["cases"]["test"]) + [sets["cases"]["train"][0]]:
        pair = load_case(dataset, case, int(preset.get("downsample") or 1))
        image = torch.from_numpy(normalization.ct_to_net(pair.ct).astype(np.float32))
        with torch.no_grad():
            _, logits = sliding_window_synthesis(image, generator, int(preset["patch_size"]),
                                                 overlap=float(preset.get("synthesis_overlap", 0.5)), n_outputs=2)
        predicted = (logits.argmax(0) + 1).numpy().astype(np.uint8)
        scores[case] = dice_per_class(pair.tissue, predicted)
    print(f"{args.preset}, loss {args.loss}, {args.steps} steps of {args.batch} {args.sampling} patch(es) of "
          f"{preset['patch_size']}^3, {seconds:.0f} s of training; Dice " + " / ".join(classes))
    for case, per in scores.items():
        role = "train" if case == sets["cases"]["train"][0] else "test"
        print(f"  {case} ({role}): " + " / ".join(f"{per[c]:.3f}" for c in classes))
    test = [c for c in scores if c in sets["cases"]["test"]]
    print("  median (test): " + " / ".join(f"{statistics.median(scores[s][c] for s in test):.3f}" for c in classes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
