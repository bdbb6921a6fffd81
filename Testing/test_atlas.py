"""The atlas baseline: majority vote, transform composition, CT-to-CT registration, the command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from MicroCTSynthLib import atlas
from MicroCTSynthLib.atlas import AtlasCase, atlas_segment, atlas_to_target, compose, load_atlases, majority_vote
from MicroCTSynthLib.cli import main
from MicroCTSynthLib.dataset import Dataset
from MicroCTSynthLib.errors import MicroCTSynthError
from MicroCTSynthLib.labels import AIR, BONE, SOFT_TISSUE
from MicroCTSynthLib.metrics import dice_per_class
from MicroCTSynthLib.registration import write_transform
from MicroCTSynthLib.volume import Volume, read_volume, write_volume


def vote(*columns):
    """Vote over single voxels: each argument is one atlas' labels for a row of voxels."""
    return majority_vote([np.array(c, np.uint8) for c in columns])


# -- majority vote ------------------------------------------------------------------------
def test_majority_vote_takes_the_most_voted_label_for_odd_and_even_counts():
    # three atlases
    assert vote([1, 2, 3, 3], [1, 2, 3, 1], [2, 3, 1, 3]).tolist() == [1, 2, 3, 3]
    # four atlases, no tie
    assert vote([1, 2, 3, 3], [1, 2, 3, 3], [1, 2, 3, 1], [2, 3, 1, 2]).tolist() == [1, 2, 3, 3]
    # one atlas: its own map
    assert vote([0, 1, 2, 3]).tolist() == [0, 1, 2, 3]


def test_majority_vote_ties_go_soft_tissue_then_air_then_bone():
    # two atlases, every pair tied
    assert vote([SOFT_TISSUE, AIR, BONE, AIR, BONE, SOFT_TISSUE],
                [AIR, SOFT_TISSUE, AIR, BONE, SOFT_TISSUE, BONE]).tolist() == [
        SOFT_TISSUE, SOFT_TISSUE, AIR, AIR, SOFT_TISSUE, SOFT_TISSUE]
    # three atlases, three-way tie, every order of the maps
    for order in ([1, 2, 3], [3, 1, 2], [2, 3, 1], [3, 2, 1]):
        assert vote(*[[k] for k in order]).tolist() == [SOFT_TISSUE]
    # four atlases: 2-2 ties of each pair
    assert vote([1, 1, 2], [1, 1, 2], [3, 2, 3], [3, 2, 3]).tolist() == [AIR, SOFT_TISSUE, SOFT_TISSUE]
    # another priority breaks the same ties the other way
    out = majority_vote([np.array([1, 2, 1]), np.array([3, 3, 2])], priority=(BONE, AIR, SOFT_TISSUE))
    assert out.tolist() == [BONE, BONE, AIR]


def test_majority_vote_label_zero_is_no_vote():
    # all 0 stays 0; an atlas that does not reach a voxel does not vote there
    assert vote([0, 0, 0, 0], [0, 3, 0, 1], [0, 0, 2, 3]).tolist() == [0, 3, 2, AIR]
    # 0 may be the most frequent value and still never wins
    assert vote([0], [0], [BONE]).tolist() == [BONE]
    # a 2-2 tie where the zeros are not counted
    assert vote([0, 0], [0, 0], [BONE, 1], [BONE, 2]).tolist() == [BONE, SOFT_TISSUE]


def test_majority_vote_keeps_shape_and_refuses_bad_input():
    rng = np.random.default_rng(0)
    maps = [rng.integers(0, 4, (3, 4, 5)).astype(np.uint8) for _ in range(5)]
    out = majority_vote(maps)
    assert out.shape == (3, 4, 5) and out.dtype == np.uint8
    counts = np.stack([(np.stack(maps) == k).sum(0) for k in (1, 2, 3)])
    # the winner has the largest count wherever any atlas voted
    voted = counts.sum(0) > 0
    winner_count = np.take_along_axis(counts, np.clip(out.astype(int) - 1, 0, 2)[None], 0)[0]
    assert np.all(winner_count[voted] == counts.max(0)[voted])
    assert np.all(out[~voted] == 0)
    with pytest.raises(MicroCTSynthError, match="at least one"):
        majority_vote([])
    with pytest.raises(MicroCTSynthError, match="different grids"):
        majority_vote([np.zeros((2, 2)), np.zeros((2, 3))])
    with pytest.raises(MicroCTSynthError, match="outside"):
        majority_vote(maps, labels=(0, 1, 2))


# -- geometry -----------------------------------------------------------------------------
def _euler(angles_deg, translation, center=(0.0, 0.0, 0.0)) -> sitk.Euler3DTransform:
    t = sitk.Euler3DTransform()
    t.SetCenter(center)
    t.SetRotation(*np.radians(angles_deg))
    t.SetTranslation(translation)
    return t


def _cube_map() -> Volume:
    labels = np.zeros((20, 22, 24), np.uint8)
    labels[2:18, 2:20, 2:22] = SOFT_TISSUE
    labels[5:9, 6:12, 4:10] = BONE
    labels[12:16, 10:14, 14:20] = AIR
    return Volume(labels, (0.5, 0.5, 0.5), (10.0, -3.0, 2.0))


def test_compose_reads_like_mathematics_and_atlas_to_target_is_Ta_inverse_R_Tt():
    rng = np.random.default_rng(3)
    points = rng.uniform(-20, 20, (10, 3))
    Ta = _euler((5, -10, 20), (1.0, 2.0, -3.0), (1.0, 1.0, 1.0))
    R = sitk.AffineTransform(3)
    R.SetMatrix((1.05, 0.02, 0.0, 0.0, 0.95, 0.03, 0.01, 0.0, 1.1))
    R.SetTranslation((4.0, -1.0, 0.5))
    Tt = _euler((-7, 3, 12), (-2.0, 0.0, 5.0))
    mapped = atlas.atlas_to_target(R, Ta, Tt)
    inverse = Ta.GetInverse()
    for p in points:
        expected = inverse.TransformPoint(R.TransformPoint(Tt.TransformPoint(tuple(p))))
        np.testing.assert_allclose(mapped.TransformPoint(tuple(p)), expected, atol=1e-9)
    # the other order is a different map, so the order above is tested
    wrong = compose(Tt, R, inverse)
    assert not np.allclose(wrong.TransformPoint(tuple(points[0])), mapped.TransformPoint(tuple(points[0])), atol=1e-3)
    # a composite registration (affine o B-spline) is flattened, not nested
    nested = compose(R, compose(Tt, Ta))
    assert nested.GetNumberOfTransforms() == 3


def test_label_map_with_identity_registration_and_equal_transforms_lands_on_itself():
    tissue = _cube_map()
    Ta = _euler((8, -12, 15), (2.0, -1.0, 3.0), tuple(tissue.center))
    warped = atlas._warp_labels(tissue, tissue, atlas_to_target(sitk.Transform(3, sitk.sitkIdentity), Ta, Ta))
    np.testing.assert_array_equal(warped, tissue.array)


def test_label_map_lands_where_the_transforms_send_it():
    tissue = _cube_map()
    # R_a sends a target point 1 mm further along x in the atlas: the map moves 2 voxels down x.
    R = sitk.TranslationTransform(3, (1.0, 0.0, 0.0))
    identity = sitk.Transform(3, sitk.sitkIdentity)
    warped = atlas._warp_labels(tissue, tissue, atlas_to_target(R, identity))
    np.testing.assert_array_equal(warped[:, :, :-2], tissue.array[:, :, 2:])
    assert np.all(warped[:, :, -2:] == 0)  # beyond the atlas: no label
    # A reference grid elsewhere in space, placed onto the atlas by T_t, gets the same labels.
    moved = Volume(np.zeros_like(tissue.array), tissue.spacing, (110.0, 47.0, -8.0))
    Tt = sitk.TranslationTransform(3, tuple(np.subtract(tissue.origin, moved.origin)))
    warped = atlas._warp_labels(tissue, moved, atlas_to_target(identity, identity, Tt))
    np.testing.assert_array_equal(warped, tissue.array)


def test_crop_keeps_physical_positions():
    ct = Volume(np.arange(30 * 30 * 30, dtype=np.int16).reshape(30, 30, 30), (0.3, 0.3, 0.3), (-4.5, -4.5, -4.5))
    crop = atlas.crop_to_points(ct, np.array([[0.0, 0.0, 0.0], [1.0, 1.5, 2.0]]), 0.6)
    assert crop is not None and crop.shape < ct.shape
    p = crop.physical_points(np.array([[1.0, 2.0, 3.0]]))
    i = np.rint(ct.continuous_indices(p)[0]).astype(int)
    assert crop.array[3, 2, 1] == ct.array[i[2], i[1], i[0]]
    assert atlas.crop_to_points(ct, np.array([[100.0, 100.0, 100.0]]), 1.0) is None


# -- registration on a known deformation of a real CT ------------------------------------
@pytest.fixture(scope="module")
def head_atlas(head_ct_path):
    head = read_volume(head_ct_path)
    # Two times coarser (6.4 x 6.4 x 3 mm) keeps the test fast; the head is still a head.
    image = sitk.Shrink(head.to_sitk(), [2, 2, 2])
    ct = Volume.from_sitk(image)
    a = ct.array
    labels = np.where(a < 60, AIR, np.where(a < 700, SOFT_TISSUE, BONE)).astype(np.uint8)
    return ct, ct.with_array(labels)


def test_atlas_recovers_a_known_affine_and_deformation_of_a_real_ct(head_atlas):
    ct, labels = head_atlas
    # target point -> atlas point: 12 deg and 6 deg turns, 8 % larger, shifted, plus a smooth bend
    known = sitk.AffineTransform(3)
    known.SetCenter(tuple(ct.center))
    rot = _euler((6, 0, 12), (0, 0, 0))
    known.SetMatrix(tuple((np.array(rot.GetMatrix()).reshape(3, 3) * 1.08).ravel()))
    known.SetTranslation((8.0, -6.0, 4.0))
    bend = sitk.BSplineTransformInitializer(ct.to_sitk(), [2, 2, 2], order=3)
    params = np.zeros(len(bend.GetParameters()))
    params[len(params) // 2 - 20: len(params) // 2 + 20] = 3.0  # mm, in the middle of the mesh
    bend.SetParameters(tuple(params))
    truth_map = compose(known, bend)
    target_ct = Volume.from_sitk(sitk.Resample(ct.to_sitk(), ct.to_sitk(), truth_map, sitk.sitkLinear, 0.0))
    truth = atlas._warp_labels(labels, ct, truth_map)

    case = AtlasCase("head", ct, labels, sitk.Transform(3, sitk.sitkIdentity))
    result = atlas_segment(target_ct, [case], target_ct)
    assert result.same_geometry(target_ct) and result.array.dtype == np.uint8
    inside = truth > 0
    got = dice_per_class(truth, result.array)
    unregistered = dice_per_class(truth, labels.array)
    print("head CT: atlas Dice", got, "without registration", unregistered)
    agreement = np.mean(result.array[inside] == truth[inside])
    assert agreement > 0.9 and agreement > np.mean(labels.array[inside] == truth[inside]) + 0.05
    assert got["Soft tissue"] > 0.85 and got["Bone"] > 0.85
    for name in got:  # registration removes most of the mismatch
        assert 1 - got[name] < 0.4 * (1 - unregistered[name])


# -- phantom, end to end ------------------------------------------------------------------
@pytest.fixture(scope="module")
def specimens():
    from MicroCTSynthLib.phantom import make_specimen

    return {name: make_specimen(name, "tiny") for name in ("S3_1", "S3_11", "S3_12", "S3_2")}


def test_phantom_atlas_from_three_specimens_with_their_true_transforms(specimens):
    from MicroCTSynthLib.tissue import tissue_map

    target = specimens["S3_2"]
    atlases = [AtlasCase(n, specimens[n].ct, specimens[n].labels, specimens[n].true_transform) for n in ("S3_1", "S3_11", "S3_12")]
    result = atlas_segment(target.ct, atlases, target.microct, target_transform=target.true_transform)
    assert result.same_geometry(target.microct)
    truth = target.labels.array
    got = dice_per_class(truth, result.array)
    own = dice_per_class(truth, tissue_map(target.microct).array)
    print("tiny phantom S3_2 from S3_1, S3_11, S3_12: atlas Dice", got, "micro-CT's own map", own)
    # Most of the micro-CT's field of view is reached by some atlas; not all, since the atlases'
    # own fields of view are as small and their specimens lie otherwise on the scanner bed (even
    # the phantom's exact correspondence leaves about a quarter of a 6 mm field uncovered).
    assert np.mean(result.array[truth > 0] > 0) > 0.6
    # The atlas knows the gross anatomy but not this specimen's air cells.
    assert got["Soft tissue"] > 0.5 and got["Bone"] > 0.5 and got["Air"] > 0.1
    for name in got:
        assert got[name] < own[name] - 0.1


def test_a_specimen_as_its_own_atlas_gets_its_own_map_back(specimens):
    sp = specimens["S3_11"]
    result = atlas_segment(sp.ct, [AtlasCase("self", sp.ct, sp.labels, sp.true_transform)], sp.labels,
                           target_transform=sp.true_transform)
    assert all(d > 0.99 for d in dice_per_class(sp.labels.array, result.array).values())


def test_atlas_command_writes_the_map_on_the_reference_grid(specimens, tmp_path, capsys):
    data = tmp_path / "data"
    ds = Dataset.create(data, cases=["S3_1", "S3_2"])
    for name in ("S3_1", "S3_2"):
        sp = specimens[name]
        write_volume(sp.ct, ds.path(name, "ct", must_exist=False))
        write_volume(sp.microct, ds.path(name, "microct", must_exist=False))
        write_volume(sp.labels, ds.path(name, "tissue", must_exist=False))
        write_transform(sp.true_transform, ds.path(name, "transform", must_exist=False))
    ds.save()
    loaded = load_atlases(Dataset.load(data), "S3_1")
    assert [a.name for a in loaded] == ["S3_1"] and loaded[0].tissue.array.max() == BONE

    out = tmp_path / "atlas_tissue.nrrd"
    args = ["atlas", "--ct", str(ds.path("S3_2", "ct")), "--data", str(data), "--atlases", "S3_1",
            "--reference-grid", str(ds.path("S3_2", "microct")), "--target-transform", str(ds.path("S3_2", "transform")),
            "--out", str(out), "--progress", "json"]
    assert main(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines[-1]["event"] == "result" and lines[-1]["outputs"]["tissue"] == str(out)
    assert any(line["event"] == "progress" and line["task"] == "atlas" for line in lines)
    result = read_volume(out)
    assert result.same_geometry(specimens["S3_2"].microct)
    assert set(np.unique(result.array)) <= {0, AIR, SOFT_TISSUE, BONE}

    # bad inputs: one sentence, exit status 2
    assert main(args[:6] + ["S3_9"] + args[7:-2]) == 2
    assert "Case 'S3_9' is not in" in capsys.readouterr().err
    far = specimens["S3_2"].microct
    write_volume(Volume(np.zeros((4, 4, 4), np.uint8), far.spacing, (500.0, 500.0, 500.0)), tmp_path / "far.nrrd")
    bad = args[:7] + ["--reference-grid", str(tmp_path / "far.nrrd")] + args[9:]
    assert main(bad) == 2
    assert "does not overlap the target CT" in capsys.readouterr().err
