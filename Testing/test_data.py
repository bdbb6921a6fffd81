"""Patches, downsampling and intensity normalisation of the cGAN's training data (data.py).

``synthetic_dataset`` builds a small prepared dataset folder without the phantom: 32³ cases of a
bone shell around an air core in soft tissue, inside a spherical field of view; the CT is the
micro-CT's tissues in HU, blurred, downsampled ×4 and brought back onto the micro-CT grid.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from MicroCTSynthLib.data import (Normalization, PatchDataset, PatchSampler, build_datasets, downsample_image,
                                  downsample_labels, downsample_volume, load_case, patch_grid)
from MicroCTSynthLib.dataset import Dataset
from MicroCTSynthLib.errors import MicroCTSynthError
from MicroCTSynthLib.presets import load_preset
from MicroCTSynthLib.tiling import patch_starts, scan_interval
from MicroCTSynthLib.volume import Volume, write_volume

SPACING = (0.0752, 0.0752, 0.0752)
HU = {1: -1000.0, 2: 40.0, 3: 1500.0}
MICRO = {1: 0.05, 2: 0.45, 3: 0.95}


def synthetic_case(size: int = 32, seed: int = 0) -> dict:
    """Arrays (z, y, x) of one case: tissue (0 outside the FOV), micro-CT, registered CT (HU)."""
    rng = np.random.default_rng(seed)
    centre = size / 2 - 0.5 + rng.uniform(-2, 2, 3)
    zz, yy, xx = np.indices((size,) * 3)
    r = np.sqrt((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2)
    r_air, r_bone = rng.uniform(3.5, 5.5), rng.uniform(8, 10)
    tissue = np.full((size,) * 3, 2, np.uint8)
    tissue[r < r_bone] = 3
    tissue[r < r_air] = 1
    fov = np.sqrt(sum((g - size / 2 + 0.5) ** 2 for g in (zz, yy, xx))) < size * 0.45
    tissue[~fov] = 0
    microct = np.zeros(tissue.shape, np.float32)
    for label, value in MICRO.items():
        microct[tissue == label] = value
    microct += rng.normal(0, 0.02, microct.shape).astype(np.float32) * fov
    hu = np.full(tissue.shape, HU[2], np.float32)
    for label, value in HU.items():
        hu[(tissue == label)] = value
    low = ndimage.zoom(ndimage.gaussian_filter(hu, 1.5), 0.25, order=1)
    ct = ndimage.zoom(low, size / low.shape[0], order=1).astype(np.float32)[:size, :size, :size]
    ct += rng.normal(0, 20, ct.shape).astype(np.float32)
    return {"tissue": tissue, "microct": microct, "ct_registered": ct}


def write_synthetic_dataset(root, n_cases: int = 4, size: int = 32, groups=None) -> Dataset:
    """A prepared dataset folder of ``n_cases`` synthetic cases; group A: 2 train, 1 val, the rest test."""
    names = [f"C{i}" for i in range(n_cases)]
    groups = groups or {"A": {"train": names[:2], "val": names[2:3], "test": names[3:]}}
    ds = Dataset.create(root, cases=names, groups=groups, preset="tiny")
    for i, name in enumerate(names):
        arrays = synthetic_case(size, seed=i)
        for role, array in arrays.items():
            write_volume(Volume(array, SPACING, (i * 10.0, 0.0, 0.0)), ds.path(name, role, must_exist=False))
    ds.save()
    return ds


@pytest.fixture(scope="module")
def synthetic_dataset(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"))


# -- normalisation -----------------------------------------------------------------------------
def test_normalization_maps_window_to_unit_range_and_back():
    norm = Normalization((-1000.0, 3000.0), (0.0, 2.0))
    assert np.allclose(norm.ct_to_net(np.array([-2000.0, -1000.0, 1000.0, 3000.0, 5000.0])), [-1, -1, 0, 1, 1])
    micro = np.array([0.0, 0.5, 2.0], np.float32)
    assert np.allclose(norm.net_to_microct(norm.microct_to_net(micro)), micro, atol=1e-6)
    again = Normalization.from_dict(norm.to_dict())
    assert again == norm and isinstance(norm.to_dict()["ct_window"], list)


def test_normalization_fit_uses_field_of_view_percentiles(rng):
    ct = rng.normal(0, 100, (20, 20, 20)).astype(np.float32)
    micro = rng.uniform(0, 1, (20, 20, 20)).astype(np.float32)
    mask = np.zeros(ct.shape, bool)
    mask[5:15] = True
    ct[~mask], micro[~mask] = 1e6, -1e6            # outside the FOV: must not count
    norm = Normalization.fit([ct], [micro], [mask])
    assert norm.ct_window == pytest.approx(tuple(np.percentile(ct[mask], [0.5, 99.5])))
    assert norm.microct_range == pytest.approx(tuple(np.percentile(micro[mask], [0.5, 99.5])))
    assert Normalization.fit([ct], [micro], [mask], ct_window=(-1000, 3000)).ct_window == (-1000.0, 3000.0)


def test_normalization_refuses_flat_or_empty_inputs():
    flat = np.ones((4, 4, 4), np.float32)
    with pytest.raises(MicroCTSynthError, match="no contrast"):
        Normalization.fit([flat], [flat], [flat > 0])
    with pytest.raises(MicroCTSynthError, match="field of view"):
        Normalization.fit([flat], [flat], [flat < 0])
    with pytest.raises(MicroCTSynthError, match="high above low"):
        Normalization((1.0, 1.0), (0.0, 1.0))
    with pytest.raises(MicroCTSynthError, match="damaged"):
        Normalization.from_dict({"ct_window": [0, 1]})


# -- downsampling ----------------------------------------------------------------------------------
def test_downsample_image_is_block_average_and_labels_the_mode():
    a = np.arange(4 * 4 * 5, dtype=np.float32).reshape(4, 4, 5)
    d = downsample_image(a, 2)
    assert d.shape == (2, 2, 2)                      # the trailing odd x column is dropped
    assert d[0, 0, 0] == pytest.approx(a[:2, :2, :2].mean())
    assert d[1, 1, 1] == pytest.approx(a[2:4, 2:4, 2:4].mean())
    labels = np.zeros((2, 2, 4), np.uint8)
    labels[:, :, :2] = 3
    labels[0, 0, 0] = 1                              # 7 bone, 1 air -> bone
    labels[:, :, 2:] = 0
    labels[0, :, 2:] = 2                             # 4 soft tissue, 4 outside -> tie goes to tissue
    assert downsample_labels(labels, 2).ravel().tolist() == [3, 2]


def test_downsample_volume_keeps_physical_extent():
    vol = Volume(np.zeros((8, 8, 8), np.float32), (0.5, 0.5, 0.5), (10.0, 20.0, 30.0))
    d = downsample_volume(vol, 2)
    assert d.shape == (4, 4, 4) and d.spacing == (1.0, 1.0, 1.0)
    # The first block's centre: the mean of voxel centres 0 and 1.
    assert np.allclose(d.origin, (10.25, 20.25, 30.25))
    assert np.allclose(d.physical_points([[3, 3, 3]])[0] + 0.25, vol.physical_points([[7, 7, 7]])[0])


# -- tiling -------------------------------------------------------------------------------------
def test_patch_starts_cover_the_box_with_the_last_patch_shifted_inward():
    assert scan_interval(96, 0.25) == 72 and scan_interval(24, 0.333) == 16 and scan_interval(16, 0.0) == 16
    assert patch_starts(160, 96, 0.25) == [0, 64]
    assert patch_starts(160, 32, 0.25, 10, 100) == [10, 34, 58, 68]
    assert patch_starts(20, 32, 0.25) == [0]                   # smaller than a patch: padded
    assert patch_starts(160, 32, 0.25, 150, 160) == [128]     # never beyond the volume
    for lo, hi, size, p, overlap in [(0, 97, 200, 32, 0.25), (3, 64, 64, 16, 0.0), (0, 100, 100, 96, 0.25)]:
        starts = patch_starts(size, p, overlap, lo, hi)
        covered = np.zeros(size, bool)
        for start in starts:
            assert 0 <= start and start + p <= size
            covered[start:start + p] = True
        assert covered[lo:hi].all()


def test_patch_grid_overlap_and_fov_skipping():
    tissue = np.zeros((64, 64, 64), np.uint8)
    tissue[:, :, :] = 2
    assert len(patch_grid(tissue, 32, 0)) == 8                 # validation tiling: no overlap
    train = patch_grid(tissue, 32, 0.25)                        # stride 24: starts 0, 24, 32
    assert len(train) == 27 and (24, 0, 32) in train
    tissue[:, :, :] = 0
    tissue[40:50, 40:50, 40:50] = 3                             # FOV only in one corner
    starts = patch_grid(tissue, 16, 0)
    assert all(tissue[z:z + 16, y:y + 16, x:x + 16].any() for z, y, x in starts)
    covered = np.zeros(tissue.shape, bool)
    for z, y, x in starts:
        covered[z:z + 16, y:y + 16, x:x + 16] = True
    assert covered[tissue > 0].all()
    assert patch_grid(np.zeros((8, 8, 8)), 8, 0) == []
    with pytest.raises(MicroCTSynthError, match="overlap"):
        patch_grid(tissue, 16, 1.0)


def test_patch_grid_skips_patches_wholly_outside_the_fov():
    tissue = np.zeros((48, 48, 48), np.uint8)
    zz, yy, xx = np.indices(tissue.shape)
    tissue[(zz - 23.5) ** 2 + (yy - 23.5) ** 2 + (xx - 23.5) ** 2 < 22 ** 2] = 2   # a ball: the 8 corners miss it
    starts = patch_grid(tissue, 8, 0)
    assert len(starts) < 6 ** 3
    assert all(tissue[z:z + 8, y:y + 8, x:x + 8].any() for z, y, x in starts)


def test_patch_dataset_items_pad_small_volumes(rng):
    from MicroCTSynthLib.data import CasePair

    tissue = np.full((12, 20, 20), 2, np.uint8)
    case = CasePair("x", rng.normal(0, 300, tissue.shape).astype(np.float32),
                    rng.uniform(0, 1, tissue.shape).astype(np.float32), tissue, SPACING)
    ds = PatchDataset([case], Normalization((-1000, 1000), (0, 1)), 16, overlap=0.25)
    assert len(ds) == 4                                         # z padded to 16; y, x: starts 0 and 4
    item = ds[0]
    assert item["real_A"].shape == (1, 16, 16, 16) and item["real_A"].dtype == torch.float32
    assert item["tissue"].dtype == torch.int64
    assert float(item["real_A"].min()) >= -1 and float(item["real_B"].max()) <= 1
    assert (item["tissue"][0, 12:] == 0).all() and (item["real_B"][0, 12:] == -1).all()   # padding
    with pytest.raises(MicroCTSynthError, match="multiple of 4"):
        PatchDataset([case], Normalization((-1000, 1000), (0, 1)), 18)


# -- samplers -------------------------------------------------------------------------------------
def test_patch_sampler_caps_and_shards_deterministically():
    data = list(range(50))
    one = PatchSampler(data, shuffle=True, seed=3, max_patches=7)
    one.set_epoch(2)
    first = list(one)
    assert len(first) == 7 == len(one) and len(set(first)) == 7
    again = PatchSampler(data, shuffle=True, seed=3, max_patches=7)
    again.set_epoch(2)
    assert list(again) == first
    again.set_epoch(3)
    assert list(again) != first                                  # a fresh subset each epoch
    ranks = [PatchSampler(data, num_replicas=2, rank=r, shuffle=True, seed=3, max_patches=8) for r in (0, 1)]
    shards = [list(s) for s in ranks]
    assert [len(s) for s in shards] == [4, 4] and not set(shards[0]) & set(shards[1])
    full = [list(PatchSampler(data, num_replicas=2, rank=r, shuffle=False)) for r in (0, 1)]
    assert sorted(full[0] + full[1]) == data
    with pytest.raises(MicroCTSynthError):
        PatchSampler(data, max_patches=0)


# -- the prepared dataset ---------------------------------------------------------------------------
def test_build_datasets_from_a_prepared_folder(synthetic_dataset):
    preset = load_preset("tiny")
    built = build_datasets(synthetic_dataset.root, "A", preset)
    train, val, norm = built["train"], built["val"], built["normalization"]
    assert train.names == ["C0", "C1"] and val.names == ["C2"]
    assert norm.ct_window == tuple(preset["ct_window_hu"])
    assert 0.0 <= norm.microct_range[0] < 0.1 and 0.9 < norm.microct_range[1] <= 1.1
    assert built["spacing_mm"] == pytest.approx(SPACING) and built["downsample"] == 1
    # The preset's overlaps: a quarter of the patch (4 voxels) for training, none for validation; the
    # tiling spans the FOV's box.
    assert (train.overlap, val.overlap, train.patch_size) == (0.25, 0.0, 16)
    for ds in (train, val):
        for case, (z, y, x) in ds.index:
            assert bool((ds.images[case][2][z:z + 16, y:y + 16, x:x + 16] > 0).any())
        fov = ds.images[0][2] > 0
        covered = torch.zeros_like(fov)
        for case, (z, y, x) in ds.index:
            if case == 0:
                covered[z:z + 16, y:y + 16, x:x + 16] = True
        assert bool(covered[fov].all())
    # Fitted on the training cases only: a changed validation case leaves it alone.
    assert build_datasets(synthetic_dataset.root, "A", preset)["normalization"] == norm

    down = build_datasets(synthetic_dataset.root, "A", {**preset, "downsample": 2})
    assert down["train"].images[0][0].shape == (16, 16, 16)
    assert down["spacing_mm"] == pytest.approx(SPACING) and down["downsample"] == 2
    case = load_case(synthetic_dataset, "C0", 2)
    assert case.spacing == pytest.approx(tuple(2 * s for s in SPACING))


def test_a_group_is_built_case_by_case(tmp_path):
    """Dataset.open lets a group lack its training case while it is being built; assign moves a case
    between the parts of a group; a finished group loads as any other."""
    ds = Dataset.open(tmp_path)
    assert ds.groups == {}
    ds.add_case("V")
    ds.assign("V", "Mine", "val")
    ds.save()
    ds = Dataset.open(tmp_path)
    with pytest.raises(MicroCTSynthError, match="no training case"):
        Dataset.load(tmp_path)
    ds.add_case("T")
    ds.assign("T", "Mine", "test")
    ds.assign("T", "Mine", "train")
    ds.save()
    assert Dataset.load(tmp_path).group("Mine") == {"train": ["T"], "val": ["V"], "test": []}
    with pytest.raises(MicroCTSynthError, match="train, val or test"):
        ds.assign("T", "Mine", "holdout")


def test_build_datasets_explains_unprepared_cases(tmp_path):
    ds = Dataset.create(tmp_path, cases=["C0", "C1"], groups={"A": {"train": ["C0"], "val": ["C1"], "test": []}})
    ds.save()
    with pytest.raises(MicroCTSynthError, match="prepare"):
        build_datasets(tmp_path, "A", load_preset("tiny"))
    with pytest.raises(MicroCTSynthError, match="Group 'Z'"):
        build_datasets(tmp_path, "Z", load_preset("tiny"))
