"""How hard is the phantom, and for whom? Class fractions, the micro-CT's own tissue map, the
naive method and the atlas baseline on group A, beside the thesis' figures.

    python benchmarks/bench_phantom.py [--seed N] [--preset quick]

Each specimen is made in memory (no files). The atlas uses the true CT-to-micro-CT transforms
(``prepare`` estimates them within 0.15 mm, so the experiment's figures are close), the training
specimens of group A as atlases and the test specimens as targets; everything is scored against
the micro-CT's own tissue map, as the experiment does. Medians over the specimens / targets.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from MicroCTSynthLib import phantom
from MicroCTSynthLib.atlas import AtlasCase, atlas_segment
from MicroCTSynthLib.dataset import SPECIMENS, THESIS_GROUPS
from MicroCTSynthLib.metrics import dice_per_class
from MicroCTSynthLib.tissue import tissue_map

#: The thesis' atlas baseline on its six real specimens (median Dice, air / soft tissue / bone).
THESIS_ATLAS = (0.83, 0.43, 0.68)


def _make(job):
    name, preset, seed = job
    sp = phantom.make_specimen(name, preset, seed)
    own = tissue_map(sp.microct)
    naive = tissue_map(phantom.ct_on_microct_grid(sp))
    return sp, own, naive


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--group", default="A")
    args = parser.parse_args(argv)
    start = time.monotonic()
    with ProcessPoolExecutor(2) as pool:
        made = dict(zip(SPECIMENS, pool.map(_make, [(n, args.preset, args.seed) for n in SPECIMENS])))
    print(f"Phantom seed {args.seed} ({args.preset}), made in {time.monotonic() - start:.0f} s\n")
    print("| specimen | CT scanner | pneumatisation | air | soft tissue | bone | micro-CT map Dice | naive Dice |")
    print("|---|---|---|---|---|---|---|---|")
    fractions = []
    for name, (sp, own, naive) in made.items():
        truth = sp.labels.array
        counts = np.bincount(truth.ravel(), minlength=4)[1:]
        f = counts / counts.sum()
        fractions.append(f)
        d_own = dice_per_class(truth, own.array).values()
        d_naive = dice_per_class(truth, naive.array).values()
        s = sp.params["ct_scanner"]
        print(f"| {name} | {s['kind']} {s['voxel_mm']:.2f} mm, FWHM {s['psf_fwhm_mm']:.2f} mm | "
              f"{sp.params['anatomy']['pneumatisation']:.2f} | {f[0]:.3f} | {f[1]:.3f} | {f[2]:.3f} | "
              + " / ".join(f"{v:.3f}" for v in d_own) + " | " + " / ".join(f"{v:.3f}" for v in d_naive) + " |")
    med = np.median(fractions, axis=0)
    print(f"\nMedian fractions air / soft tissue / bone: {med[0]:.3f} / {med[1]:.3f} / {med[2]:.3f}\n")
    group = THESIS_GROUPS[args.group]
    atlases = [AtlasCase(name=n, ct=made[n][0].ct, tissue=made[n][1], transform=made[n][0].true_transform)
               for n in group["train"]]
    scores = []
    for name in group["test"]:
        sp, own, _ = made[name]
        t = time.monotonic()
        prediction = atlas_segment(sp.ct, atlases, own, target_transform=sp.true_transform)
        d = list(dice_per_class(own.array, prediction.array).values())
        scores.append(d)
        print(f"atlas {name}: " + " / ".join(f"{v:.3f}" for v in d) + f"  ({time.monotonic() - t:.0f} s)")
    med = np.median(scores, axis=0)
    print("atlas median (group %s): %s   thesis: %s" % (
        args.group, " / ".join(f"{v:.3f}" for v in med), " / ".join(f"{v:.2f}" for v in THESIS_ATLAS)))
    print("within 0.15 of the thesis on every class:", bool(np.all(np.abs(med - np.asarray(THESIS_ATLAS)) <= 0.15)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
