"""Dice, HD95 and the perceptual error, cross-checked against MONAI on random label maps."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from MicroCTSynthLib.metrics import dice, dice_per_class, evaluate, hausdorff95, hd95_per_class, perceptual_error
from MicroCTSynthLib.volume import Volume, write_volume

monai_metrics = pytest.importorskip("monai.metrics")


def _random_labels(rng, shape=(20, 24, 22)):
    """Blobby random label maps (smoothed noise, thresholded) so surfaces are non-trivial."""
    from scipy import ndimage

    field = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    return np.digitize(field, np.quantile(field, [0.3, 0.65])).astype(np.uint8) + 1


def _onehot(labels, k):
    return torch.from_numpy(labels == k)[None, None].float()


def test_dice_against_monai(rng):
    for _ in range(3):
        ref, pred = _random_labels(rng), _random_labels(rng)
        ours = dice_per_class(ref, pred)
        for k, name in [(1, "Air"), (2, "Soft tissue"), (3, "Bone")]:
            theirs = monai_metrics.DiceMetric(include_background=True)(_onehot(pred, k), _onehot(ref, k)).item()
            assert ours[name] == pytest.approx(theirs, abs=1e-6)


def test_hd95_against_monai(rng):
    spacing_xyz = (0.3, 0.5, 0.7)
    for _ in range(2):
        ref, pred = _random_labels(rng), _random_labels(rng)
        ours = hd95_per_class(ref, pred, spacing_xyz)
        for k, name in [(1, "Air"), (2, "Soft tissue"), (3, "Bone")]:
            theirs = monai_metrics.compute_hausdorff_distance(
                _onehot(pred, k), _onehot(ref, k), include_background=True, percentile=95,
                spacing=list(spacing_xyz[::-1]),
            ).item()
            assert ours[name] == pytest.approx(theirs, rel=1e-6, abs=1e-6)


def test_dice_by_hand_and_edge_cases():
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros((4, 4, 4), bool)
    a[:2] = True  # 32 voxels
    b[1:3] = True  # 32 voxels, 16 shared
    assert dice(a, b) == pytest.approx(0.5)
    assert math.isnan(dice(np.zeros(3, bool), np.zeros(3, bool)))
    assert hausdorff95(a, np.zeros_like(a), (1, 1, 1)) == math.inf


def test_reference_outside_is_ignored():
    ref = np.array([[[0, 1, 2, 3]]])
    pred = np.array([[[3, 1, 2, 3]]])  # a wrong label outside the reference FOV does not count
    assert dice_per_class(ref, pred) == {"Air": 1.0, "Soft tissue": 1.0, "Bone": 1.0}


def test_perceptual_error_eq8_and_zero_guard():
    m = np.array([100.0, 200.0, 0.0])
    s = np.array([110.0, 180.0, 1.0])
    # eps = 1 % of max|m| = 2: (10/100 + 20/200 + 1/2) / 3
    assert perceptual_error(m, s) == pytest.approx((0.1 + 0.1 + 0.5) / 3)
    assert perceptual_error(m, m) == 0.0
    assert perceptual_error(m, s, mask=np.array([True, True, False])) == pytest.approx(0.1)


def test_evaluate_command_writes_json(tmp_path, rng):
    ref = Volume(_random_labels(rng), spacing=(0.1, 0.1, 0.1))
    pred = ref.with_array(_random_labels(rng))
    micro = ref.with_array(rng.random(ref.shape).astype(np.float32) + 1)
    synth = ref.with_array(micro.array * 1.1)
    paths = {n: write_volume(v, tmp_path / f"{n}.nrrd") for n, v in dict(ref=ref, pred=pred, micro=micro, synth=synth).items()}
    out = tmp_path / "metrics.json"
    run = subprocess.run(
        [sys.executable, "-m", "MicroCTSynthLib", "evaluate", "--reference", str(paths["ref"]), "--prediction", str(paths["pred"]),
         "--microct", str(paths["micro"]), "--synthetic", str(paths["synth"]), "--json", str(out)],
        capture_output=True, text=True, check=True,
    )
    assert "Soft tissue" in run.stdout
    data = json.loads(out.read_text())
    expected = evaluate(ref, pred, micro, synth)
    assert data["dice"] == pytest.approx(expected["dice"])
    assert data["perceptual_error"] == pytest.approx(0.1, rel=1e-5)


def test_evaluate_refuses_other_grid(rng):
    ref = Volume(_random_labels(rng))
    other = Volume(ref.array, spacing=(2, 1, 1))
    with pytest.raises(ValueError, match="grid"):
        evaluate(ref, other)
