"""Tiling a volume with patches: the one rule of training, validation and synthesis.

The vocabulary is MONAI's (``sliding_window_inference``): windows of ``patch`` voxels a side
overlap by ``overlap``, a fraction of the patch in [0, 1). They start every
:func:`scan_interval` = ``int(patch * (1 - overlap))`` voxels, and the last one is moved inward
to end at the edge of what is tiled. Overlap 0 is the thesis' regular tiling.

The presets name three overlaps in this unit: ``train_patch_overlap`` (the thesis' 24 of 96
voxels: 0.25, windows every 72), ``eval_patch_overlap`` (0: validation and test patches do not
overlap) and ``synthesis_overlap`` (the windows of synthesis, which ``microctsynth synthesize
--overlap`` and the panel's Overlap replace when the user gives one).
"""

from __future__ import annotations

from .errors import MicroCTSynthError

#: The window overlap of synthesis when neither the user nor the model's preset gives one: the
#: paper preset's ``synthesis_overlap`` (Testing/test_synthesize.py checks that they agree).
SYNTHESIS_OVERLAP = 0.5


def check_overlap(overlap) -> float:
    """``overlap`` as a float in [0, 1), else one sentence."""
    overlap = float(overlap)
    if not 0.0 <= overlap < 1.0:
        raise MicroCTSynthError(f"The patch overlap is a fraction of the patch, at least 0 and below 1, not {overlap}.")
    return overlap


def scan_interval(patch: int, overlap) -> int:
    """Voxels from one window's start to the next: ``int(patch * (1 - overlap))``, at least 1
    (MONAI's ``_get_scan_interval``)."""
    return max(int(int(patch) * (1.0 - check_overlap(overlap))), 1)


def patch_starts(size: int, patch: int, overlap, lo: int = 0, hi: int | None = None) -> list[int]:
    """Window starts along an axis of ``size`` voxels, covering [lo, hi) (default: all of it).

    Every :func:`scan_interval` voxels from ``lo``; the last window is moved inward to end at
    ``max(hi, lo + patch)``, and every window lies inside the axis. An axis no longer than a
    window has one window, at 0 (the caller pads it).
    """
    size, patch = int(size), int(patch)
    step = scan_interval(patch, overlap)
    if size <= patch:
        return [0]
    lo = min(max(int(lo), 0), size - patch)
    end = min(max(size if hi is None else int(hi), lo + patch), size)
    return list(range(lo, end - patch, step)) + [end - patch]
