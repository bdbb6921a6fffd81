"""Evaluation: Dice per class (Eq. 7), 95 % Hausdorff distance per class, perceptual error (Eq. 8).

All metrics compare a prediction with a reference tissue map on the same grid and ignore the
voxels where the reference is 0 (outside its field of view).
"""

from __future__ import annotations

import argparse
import math

import numpy as np
from scipy import ndimage

from .errors import MicroCTSynthError
from .labels import TISSUE_NAMES, check_tissue_map
from .volume import Volume, read_volume, write_json


def _within_reference(reference: np.ndarray, prediction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    reference, prediction = np.asarray(reference), np.asarray(prediction)
    if reference.shape != prediction.shape:
        raise MicroCTSynthError(
            f"The prediction's grid {prediction.shape} differs from the reference's {reference.shape}; "
            "resample it onto the reference grid first."
        )
    prediction = np.where(reference > 0, prediction, 0)
    return reference, prediction


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient 2|A∩B| / (|A| + |B|) of two boolean masks (Eq. 7); NaN if both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    denominator = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / denominator if denominator else math.nan


def dice_per_class(reference: np.ndarray, prediction: np.ndarray, labels=tuple(TISSUE_NAMES)) -> dict[str, float]:
    """Dice of each tissue class (Eq. 7), keyed by class name, over the reference's field of view."""
    reference, prediction = _within_reference(reference, prediction)
    return {TISSUE_NAMES.get(k, str(k)): dice(reference == k, prediction == k) for k in labels}


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0)


def hausdorff95(a: np.ndarray, b: np.ndarray, spacing_xyz) -> float:
    """95 % Hausdorff distance in mm between the surfaces of two masks.

    The larger of the two directed 95th percentiles of surface-to-surface distances (the
    convention of MONAI's ``compute_hausdorff_distance(percentile=95)``). NaN if both masks are
    empty, infinite if only one is.
    """
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if not a.any() and not b.any():
        return math.nan
    if not a.any() or not b.any():
        return math.inf
    sampling = tuple(float(s) for s in spacing_xyz[::-1])
    sa, sb = _surface(a), _surface(b)
    to_b = ndimage.distance_transform_edt(~sb, sampling=sampling)
    to_a = ndimage.distance_transform_edt(~sa, sampling=sampling)
    return float(max(np.percentile(to_b[sa], 95), np.percentile(to_a[sb], 95)))


def hd95_per_class(reference: np.ndarray, prediction: np.ndarray, spacing_xyz, labels=tuple(TISSUE_NAMES)) -> dict[str, float]:
    """95 % Hausdorff distance (mm) of each tissue class, keyed by class name."""
    reference, prediction = _within_reference(reference, prediction)
    return {TISSUE_NAMES.get(k, str(k)): hausdorff95(reference == k, prediction == k, spacing_xyz) for k in labels}


def perceptual_error(microct: np.ndarray, synthetic: np.ndarray, mask: np.ndarray | None = None, eps: float | None = None) -> float:
    """Perceptual error of Eq. 8: mean over voxels of |micro-CT - synthetic| / micro-CT.

    Guard against division by zero (dark air voxels of a micro-CT can be 0 or negative): the
    denominator is ``max(|micro-CT|, eps)`` with ``eps`` = 1 % of the largest absolute
    micro-CT intensity in the mask unless given. ``mask`` limits the mean (e.g. the field of view).
    """
    m = np.asarray(microct, dtype=np.float64)
    s = np.asarray(synthetic, dtype=np.float64)
    if m.shape != s.shape:
        raise MicroCTSynthError(f"The synthetic micro-CT's grid {s.shape} differs from the micro-CT's {m.shape}.")
    if mask is not None:
        m, s = m[np.asarray(mask, bool)], s[np.asarray(mask, bool)]
    if m.size == 0:
        return math.nan
    eps = 0.01 * float(np.abs(m).max()) if eps is None else float(eps)
    eps = eps if eps > 0 else 1.0
    return float(np.mean(np.abs(m - s) / np.maximum(np.abs(m), eps)))


def evaluate(reference: Volume, prediction: Volume, microct: Volume | None = None, synthetic: Volume | None = None) -> dict:
    """Dice and HD95 per class, and the perceptual error when both images are given."""
    if not reference.same_geometry(prediction, tol=1e-3):
        raise MicroCTSynthError(
            "The prediction does not lie on the reference's grid (size, spacing, origin or direction differ); "
            "resample it onto the reference first."
        )
    result = {
        "dice": dice_per_class(reference.array, prediction.array),
        "hd95_mm": hd95_per_class(reference.array, prediction.array, reference.spacing),
    }
    if (microct is None) != (synthetic is None):
        raise MicroCTSynthError("The perceptual error needs both the micro-CT and the synthetic micro-CT.")
    if microct is not None:
        if not microct.same_geometry(synthetic, tol=1e-3) or microct.shape != reference.shape:
            raise MicroCTSynthError("The micro-CT, the synthetic micro-CT and the reference must share one grid.")
        result["perceptual_error"] = perceptual_error(microct.array, synthetic.array, mask=reference.array > 0)
    return result


def format_table(result: dict) -> str:
    """A plain-text table of :func:`evaluate`'s result."""
    lines = [f"{'class':<12} {'Dice':>7} {'HD95 (mm)':>10}"]
    for name in TISSUE_NAMES.values():
        d, h = result["dice"].get(name, math.nan), result["hd95_mm"].get(name, math.nan)
        lines.append(f"{name:<12} {d:7.3f} {h:10.3f}")
    if "perceptual_error" in result:
        lines.append(f"perceptual error (Eq. 8): {result['perceptual_error']:.4f}")
    return "\n".join(lines)


def command_evaluate(args: argparse.Namespace) -> int:
    reference = read_volume(args.reference, what=f"The reference '{args.reference}'")
    prediction = read_volume(args.prediction, what=f"The prediction '{args.prediction}'")
    reference = reference.with_array(check_tissue_map(reference.array, f"The reference '{args.reference}'"))
    prediction = prediction.with_array(check_tissue_map(prediction.array, f"The prediction '{args.prediction}'"))
    if not (reference.array > 0).any():
        raise MicroCTSynthError(f"The reference '{args.reference}' is 0 (outside) everywhere: there is nothing to score.")
    microct = read_volume(args.microct, what=f"The micro-CT '{args.microct}'") if args.microct else None
    synthetic = read_volume(args.synthetic, what=f"The synthetic micro-CT '{args.synthetic}'") if args.synthetic else None
    result = evaluate(reference, prediction, microct, synthetic)
    print(format_table(result))
    if args.json:
        write_json(args.json, result)
    return 0
