"""Tissue labels, names and colours: the same everywhere (maps, segmentations, reports)."""

from __future__ import annotations

OUTSIDE = 0
AIR = 1
SOFT_TISSUE = 2
BONE = 3

#: label value -> segment name, in label order
TISSUE_NAMES = {AIR: "Air", SOFT_TISSUE: "Soft tissue", BONE: "Bone"}

#: label value -> RGB in [0, 1]; fixed so that every segmentation node and figure agrees
TISSUE_COLORS = {
    AIR: (0.35, 0.70, 0.90),
    SOFT_TISSUE: (0.90, 0.45, 0.35),
    BONE: (0.95, 0.90, 0.75),
}

TISSUE_LABELS = tuple(TISSUE_NAMES)

#: Where the closed classes of the thesis' tissue map overlap, the first listed wins (Fig. 2);
#: the atlas' majority vote breaks ties in the same order.
PRIORITY = (SOFT_TISSUE, AIR, BONE)


def check_tissue_map(array, what: str = "The tissue map"):
    """``array`` as uint8 labels, refused unless it holds whole numbers among 0 (outside) and 1-3."""
    import numpy as np

    from .errors import MicroCTSynthError

    a = np.asarray(array)
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise MicroCTSynthError(f"{what} has voxels of type {a.dtype}; a tissue map holds the labels 0-3.")
    if np.issubdtype(a.dtype, np.floating) and not np.array_equal(a, np.round(a)):
        raise MicroCTSynthError(f"{what} holds fractional values (it looks like an intensity image); a tissue map "
                                "holds the whole labels 0 outside, 1 air, 2 soft tissue, 3 bone.")
    values = np.unique(a)
    extra = [v for v in values.tolist() if v not in (OUTSIDE, AIR, SOFT_TISSUE, BONE)]
    if extra:
        shown = ", ".join(f"{v:g}" for v in extra[:5]) + (", ..." if len(extra) > 5 else "")
        raise MicroCTSynthError(f"{what} holds values other than the tissue labels 0-3 ({shown}; {len(values)} distinct "
                                "values): give a tissue map (0 outside, 1 air, 2 soft tissue, 3 bone), not an image.")
    return a.astype(np.uint8)
