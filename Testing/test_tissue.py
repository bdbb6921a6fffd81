"""Tissue maps: multi-Otsu classes, per-class closing, priority soft tissue > air > bone, FOV."""

from __future__ import annotations

import numpy as np
import pytest

from MicroCTSynthLib.errors import MicroCTSynthError
from MicroCTSynthLib.labels import AIR, BONE, SOFT_TISSUE
from MicroCTSynthLib.tissue import ball, field_of_view, tissue_map
from MicroCTSynthLib.volume import Volume, read_volume


def _three_slabs(rng, noise=5.0):
    """Air | soft tissue | bone slabs along x at intensities 0 / 100 / 200."""
    a = np.zeros((12, 12, 30), np.float32)
    a[..., 10:20] = 100
    a[..., 20:] = 200
    return Volume(a + rng.normal(0, noise, a.shape).astype(np.float32), spacing=(0.05, 0.05, 0.05))


def test_three_classes_are_found(rng):
    labels = tissue_map(_three_slabs(rng), closing_radius_mm=0).array
    assert np.all(labels[..., :10] == AIR)
    assert np.all(labels[..., 10:20] == SOFT_TISSUE)
    assert np.all(labels[..., 20:] == BONE)


def test_closing_fills_small_holes_and_priority_decides_overlaps(rng):
    vol = _three_slabs(rng, noise=0)
    a = vol.array.copy()
    a[6, 6, 25] = 0.0  # a one-voxel air hole in bone: closed bone covers it, but air has priority over bone
    a[6, 6, 15] = 200.0  # a one-voxel bone speck in soft tissue: soft tissue's closing covers it and wins
    a[3, 3, 5] = 100.0  # a soft-tissue voxel in air: soft tissue wins over air
    labels = tissue_map(vol.with_array(a), closing_radius_mm=0.06).array
    assert labels[6, 6, 25] == AIR
    assert labels[6, 6, 15] == SOFT_TISSUE
    assert labels[3, 3, 5] == SOFT_TISSUE
    # Without closing each voxel keeps its own class.
    raw = tissue_map(vol.with_array(a), closing_radius_mm=0).array
    assert (raw[6, 6, 25], raw[6, 6, 15], raw[3, 3, 5]) == (AIR, BONE, SOFT_TISSUE)


def test_closing_bridges_a_thin_gap_in_bone(rng):
    a = np.zeros((10, 10, 40), np.float32)
    a[..., 5:35] = 200.0  # bone
    a[..., 19:21] = 100.0  # a 2-voxel crack of soft tissue: soft tissue is kept (it has priority)
    a[2:8, 2:8, 10] = 0.0  # a 1-voxel sheet of air: bone closes over it, air stays (priority air > bone)
    a[..., :5] = 0.0
    vol = Volume(a, spacing=(0.04, 0.04, 0.04))
    labels = tissue_map(vol, closing_radius_mm=0.08).array
    assert np.all(labels[3:7, 3:7, 19:21] == SOFT_TISSUE)


def test_outside_the_cylindrical_fov_is_zero(rng):
    z, y, x = np.mgrid[:16, :32, :32]
    inside = (y - 15.5) ** 2 + (x - 15.5) ** 2 < 14**2
    a = np.where(x < 12, 10.0, np.where(x < 20, 100.0, 200.0)) + rng.normal(0, 3, inside.shape)
    a[~inside] = -1.0  # the scanner's constant fill
    vol = Volume(a.astype(np.float32), spacing=(0.05,) * 3)
    np.testing.assert_array_equal(field_of_view(vol), inside)
    labels = tissue_map(vol).array
    assert np.all(labels[~inside] == 0)
    assert set(np.unique(labels[inside])) == {AIR, SOFT_TISSUE, BONE}


def test_ball_is_anisotropic():
    b = ball(0.2, (0.1, 0.1, 0.2))  # spacing x, y, z
    assert b.shape == (3, 5, 5)  # z radius 1 voxel, y/x radius 2 voxels


def test_constant_micro_ct_is_refused():
    with pytest.raises(MicroCTSynthError, match="told apart"):
        tissue_map(Volume(np.full((5, 5, 5), 7.0)))
    with pytest.raises(MicroCTSynthError, match="positive"):
        tissue_map(Volume(np.arange(125.0).reshape(5, 5, 5)), closing_radius_mm=-1)


def test_real_trabecular_micro_ct(trabecular_path):
    vol = read_volume(trabecular_path)
    vol = Volume(vol.array[:80, :80, :80], vol.spacing, vol.origin, vol.direction)
    labels = tissue_map(vol).array
    fractions = np.bincount(labels.ravel(), minlength=4)[1:] / labels.size
    assert labels.min() >= 1, "the whole grid is the field of view (corners differ)"
    # Trabecular bone: bright struts are a minority; all three classes present.
    assert np.all(fractions > 0.01)
    assert fractions[BONE - 1] < 0.5
