"""Tissue maps of a micro-CT: the thesis' 3-class multi-Otsu, per-class closing, recombination.

The thesis (Fig. 2) labels a micro-CT as air / soft tissue / bone by a 3-class Otsu threshold,
fills the small holes of each class with a binary closing, and recombines the closed classes
with priority soft tissue > air > bone where they overlap. Labels: 0 outside the field of view,
1 air, 2 soft tissue, 3 bone (:mod:`MicroCTSynthLib.labels`).
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_multiotsu

from .errors import MicroCTSynthError
from .labels import AIR, BONE, OUTSIDE, PRIORITY, SOFT_TISSUE
from .presets import load_preset
from .volume import Volume, read_volume, write_volume

#: The closing radius of the thesis' hole filling, in mm (from the paper preset).
DEFAULT_CLOSING_RADIUS_MM = float(load_preset("paper")["tissue_closing_radius_mm"])
#: The largest closing radius taken, in mm and in voxels (a ball beyond it fills whole structures
#: of the inner ear and takes minutes to apply).
MAX_CLOSING_RADIUS_MM = 1.0
MAX_CLOSING_RADIUS_VOXELS = 25


def field_of_view(volume: Volume) -> np.ndarray:
    """Boolean mask of the reconstructed field of view of a micro-CT.

    Micro-CT scanners reconstruct a cylinder and write one constant fill value outside it. When
    all eight corners of the volume hold the same value, the voxels of exactly that value that
    are connected to a corner are outside; otherwise the whole grid is the field of view.
    """
    a = volume.array
    corners = a[np.ix_((0, -1), (0, -1), (0, -1))].ravel()
    if not np.all(corners == corners[0]):
        return np.ones(a.shape, dtype=bool)
    fill = a == corners[0]
    components, _ = ndimage.label(fill)
    corner_ids = np.unique(components[np.ix_((0, -1), (0, -1), (0, -1))])
    outside = np.isin(components, corner_ids[corner_ids > 0])
    return ~outside if not outside.all() else np.ones(a.shape, dtype=bool)


def ball(radius_mm: float, spacing_xyz) -> np.ndarray:
    """Ellipsoidal structuring element of ``radius_mm`` on a grid of the given spacing, (z, y, x)."""
    radii = [radius_mm / s for s in spacing_xyz[::-1]]  # voxels along z, y, x
    half = [int(np.floor(r)) for r in radii]
    grids = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    dist2 = sum((g / max(r, 1e-9)) ** 2 for g, r in zip(grids, radii))
    return dist2 <= 1.0


def _closing(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """Binary closing that is extensive up to the array border (padding by edge replication)."""
    if structure.size == 1:
        return mask
    pad = [(s // 2 + 1,) * 2 for s in structure.shape]
    padded = np.pad(mask, pad, mode="edge")
    closed = ndimage.binary_closing(padded, structure=structure)
    return closed[tuple(slice(p[0], -p[0]) for p in pad)]


def otsu_thresholds(values: np.ndarray, classes: int = 3) -> np.ndarray:
    """Multi-Otsu thresholds (``skimage.filters.threshold_multiotsu``) of the given intensities."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise MicroCTSynthError("The micro-CT has no voxel inside its field of view.")
    if np.unique(values[: min(values.size, 1_000_000)]).size < classes:
        raise MicroCTSynthError(
            f"The micro-CT has fewer than {classes} distinct intensities in its field of view; "
            "air, soft tissue and bone cannot be told apart."
        )
    hist, edges = np.histogram(values, bins=256)
    thresholds = threshold_multiotsu(hist=(hist, (edges[:-1] + edges[1:]) / 2), classes=classes)
    # Where the classes are separated by empty bins, Otsu's criterion is flat across the gap
    # and skimage returns its lower end, next to the darker class; take the gap's middle.
    centers = (edges[:-1] + edges[1:]) / 2
    for n, t in enumerate(thresholds):
        j = int(np.searchsorted(centers, t - 1e-9 * max(1.0, abs(t))))
        k = j + 1
        while k < hist.size and hist[k] == 0:
            k += 1
        if k > j + 1 and k < hist.size:
            thresholds[n] = (centers[j] + centers[k]) / 2
    return thresholds


def check_closing_radius(radius_mm, spacing_xyz) -> float:
    """The closing radius (default the thesis'), refused unless finite, 0 to 1 mm and at most 25 voxels."""
    radius = DEFAULT_CLOSING_RADIUS_MM if radius_mm is None else float(radius_mm)
    if not np.isfinite(radius) or radius < 0 or radius > MAX_CLOSING_RADIUS_MM:
        raise MicroCTSynthError(f"The closing radius must be a finite number, zero or positive and at most {MAX_CLOSING_RADIUS_MM:g} mm "
                                f"(the thesis uses {DEFAULT_CLOSING_RADIUS_MM:g} mm), not {radius:g}.")
    voxels = radius / min(spacing_xyz)
    if voxels > MAX_CLOSING_RADIUS_VOXELS:
        raise MicroCTSynthError(f"The closing radius {radius:g} mm spans {voxels:.0f} voxels of this micro-CT; "
                                f"at most {MAX_CLOSING_RADIUS_VOXELS} are taken (the thesis uses {DEFAULT_CLOSING_RADIUS_MM:g} mm).")
    return radius


def tissue_map(
    microct: Volume,
    closing_radius_mm: float | None = None,
    mask: np.ndarray | None = None,
    thresholds: tuple[float, float] | None = None,
) -> Volume:
    """Air / soft tissue / bone map of ``microct`` (uint8 labels on the same grid).

    ``mask`` is the field of view (default :func:`field_of_view`); ``thresholds`` skip the Otsu
    step (two intensities: air | soft tissue | bone). The closing radius defaults to the thesis'
    hole filling (:data:`DEFAULT_CLOSING_RADIUS_MM`); 0 disables it.
    """
    radius = check_closing_radius(closing_radius_mm, microct.spacing)
    fov = field_of_view(microct) if mask is None else np.asarray(mask, dtype=bool)
    if fov.shape != microct.shape:
        raise MicroCTSynthError("The field-of-view mask does not match the micro-CT's grid.")
    a = microct.array
    t_low, t_high = otsu_thresholds(a[fov]) if thresholds is None else sorted(thresholds)
    classes = {AIR: a < t_low, SOFT_TISSUE: (a >= t_low) & (a < t_high), BONE: a >= t_high}
    structure = ball(radius, microct.spacing)
    labels = np.zeros(a.shape, dtype=np.uint8)
    for label in reversed(PRIORITY):  # lowest priority first, so higher priorities overwrite it
        labels[_closing(classes[label] & fov, structure)] = label
    labels[~fov] = OUTSIDE
    return microct.with_array(labels)


def command_tissue_map(args: argparse.Namespace) -> int:
    if args.closing_radius is not None:
        check_closing_radius(args.closing_radius, (1e9, 1e9, 1e9))  # range first, voxels once the image is read
    microct = read_volume(args.microct, what=f"The micro-CT '{args.microct}'")
    labels = tissue_map(microct, args.closing_radius)
    write_volume(labels, args.out)
    counts = np.bincount(labels.array.ravel(), minlength=4)
    total = max(int(counts[1:].sum()), 1)
    print(
        f"Wrote {args.out}: air {100 * counts[AIR] / total:.1f} %, soft tissue {100 * counts[SOFT_TISSUE] / total:.1f} %, "
        f"bone {100 * counts[BONE] / total:.1f} % of the field of view"
    )
    return 0
