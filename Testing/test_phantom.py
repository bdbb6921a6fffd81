"""The inner-ear phantom: contract, geometry, determinism, and that it is hard in the thesis' way.

The acceptance numbers are checked on two specimens of the ``quick`` preset (the thesis' x2
downsampled micro-CT): the naive method (CT resampled onto the micro-CT grid with the true
transform, then the same Otsu + closing) must stay below 0.75 Dice for soft tissue and 0.90 for
bone, while the micro-CT's own tissue map reaches 0.95 on every class.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from MicroCTSynthLib import cli, phantom
from MicroCTSynthLib.dataset import SPECIMENS, THESIS_GROUPS, Dataset
from MicroCTSynthLib.errors import MicroCTSynthError
from MicroCTSynthLib.metrics import dice_per_class
from MicroCTSynthLib.presets import load_preset
from MicroCTSynthLib.tissue import field_of_view, tissue_map
from MicroCTSynthLib.volume import read_volume


@pytest.fixture(scope="module")
def quick_pair():
    """Two specimens of the quick preset (the test cases of the thesis' group A)."""
    return [phantom.make_specimen(name, "quick", seed=0) for name in ("S3_2", "S3_7")]


@pytest.fixture(scope="module")
def tiny_specimen():
    return phantom.make_specimen("S3_1", "tiny", seed=0)


# -- the thesis' difficulty ----------------------------------------------------------------------
def test_naive_method_fails_where_the_microct_succeeds(quick_pair):
    for sp in quick_pair:
        truth = sp.labels.array
        naive = dice_per_class(truth, tissue_map(phantom.ct_on_microct_grid(sp)).array)
        own = dice_per_class(truth, tissue_map(sp.microct).array)
        for name, value in own.items():
            assert value >= 0.95, (sp.name, name, own)
            assert naive[name] < value - 0.04, (sp.name, name, naive, own)
        assert naive["Soft tissue"] < 0.75, (sp.name, naive)
        assert np.mean(list(naive.values())) < np.mean(list(own.values())) - 0.15, (sp.name, naive, own)


def test_soft_tissue_is_a_thin_minority_beside_air_and_bone(quick_pair):
    """As in the thesis' specimens: soft tissue at most half of air and half of bone."""
    fractions = []
    for sp in quick_pair:
        counts = np.bincount(sp.labels.array.ravel(), minlength=4)[1:]
        fractions.append(counts / counts.sum())
    air, soft, bone = np.median(fractions, axis=0)
    assert soft <= 0.5 * air and soft <= 0.5 * bone, (air, soft, bone)
    assert min(air, soft, bone) > 0.03, (air, soft, bone)


def test_every_structure_of_the_specimen_is_there(quick_pair):
    """Each structure of the anatomy is in the micro-CT's field of view of a group-A test
    specimen, with its own material; the specimen lies in air."""
    from MicroCTSynthLib.anatomy import STRUCTURE_CODE, STRUCTURES

    seen = {}
    for sp in quick_pair:
        codes = phantom.structure_map(sp)
        labels = sp.labels.array
        for code in np.unique(codes[codes != 255]):
            inside = codes == code
            seen[STRUCTURES[int(code)][0]] = seen.get(STRUCTURES[int(code)][0], 0) + int(inside.sum())
            expected = phantom._MATERIAL_TO_LABEL[STRUCTURES[int(code)][1]]
            assert np.mean(labels[inside] == expected) > 0.999, STRUCTURES[int(code)]
        assert (codes == STRUCTURE_CODE["surrounding air"]).mean() > 0.01, sp.name
    by_chance = {"effusion", "tympanic membrane", "external auditory canal"}
    missing = set(STRUCTURE_CODE) - by_chance - set(seen)
    assert not missing, missing


def test_fine_structures_are_finer_than_a_ct_voxel(quick_pair):
    """Bony septa, lamina, crura and thin soft tissue: parts a 0.3 mm ball does not fit in."""
    from scipy import ndimage

    from MicroCTSynthLib.tissue import ball

    for sp in quick_pair:
        truth = sp.labels.array
        structure = ball(0.15, sp.labels.spacing)
        thin = {k: (truth == k) & ~ndimage.binary_opening(truth == k, structure) for k in (2, 3)}
        assert thin[3].sum() > 0.03 * (truth == 3).sum(), sp.name  # septa, lamina, crura, canal walls
        assert thin[2].sum() > 1000, sp.name


# -- images and geometry -------------------------------------------------------------------------
def test_specimen_contract(tiny_specimen):
    sp = tiny_specimen
    cfg = load_preset("tiny")
    assert sp.name == "S3_1"
    assert np.allclose(sp.microct.spacing, cfg["microct_spacing_mm"])
    assert np.allclose(sp.ct.spacing, cfg["ct_spacing_mm"])
    assert sp.labels.array.dtype == np.uint8 and set(np.unique(sp.labels.array)) <= {0, 1, 2, 3}
    assert sp.labels.same_geometry(sp.microct)
    assert sp.microct.array.dtype == np.float32
    assert sp.ct.array.dtype in (np.int16, np.float32)
    assert abs(sp.microct.extent_mm[0] - cfg["phantom_fov_mm"]) < 2 * cfg["microct_spacing_mm"]
    json.dumps(sp.params)  # JSON-able


def test_microct_field_of_view_is_a_cylinder_with_an_exact_fill(tiny_specimen):
    sp = tiny_specimen
    outside = sp.labels.array == 0
    fill = sp.params["microct_fill_value"]
    assert outside.any() and (~outside).any()
    assert np.all(sp.microct.array[outside] == fill)
    assert not np.any(sp.microct.array[~outside] == fill)
    # The tissue map finds exactly this field of view.
    assert np.array_equal(field_of_view(sp.microct), ~outside)
    # A cylinder about z: every slice holds the same disk.
    assert np.array_equal(outside[0], outside[-1])


def test_microct_contrast_air_dark_soft_mid_bone_bright(tiny_specimen):
    sp = tiny_specimen
    a, lab = sp.microct.array, sp.labels.array
    air, soft, bone = (np.median(a[lab == k]) for k in (1, 2, 3))
    assert air < soft < bone
    assert (soft - air) > 0.2 * (bone - air)


def test_ct_is_in_hounsfield_units_of_its_scanner(quick_pair):
    """Each CT is in HU up to its scanner's calibration (scale and offset, as cone-beam "HU" are)."""
    from scipy import ndimage

    for sp in quick_pair:
        scanner = sp.params["ct_scanner"]
        ct = (phantom.ct_on_microct_grid(sp).array - scanner["offset_hu"]) / scanner["gain"]
        lab = sp.labels.array

        def core(k, mm, lab=lab, spacing=sp.labels.spacing[0]):  # deep inside a class, away from partial volume
            return ndimage.binary_erosion(lab == k, iterations=int(round(mm / spacing)))

        assert np.median(ct[core(1, 0.75)]) < -850
        assert -50 < np.median(ct[core(2, 0.3)]) < 400  # thin canals: the PSF brings bone in
        assert 1000 < np.median(ct[core(3, 0.75)]) < 2500
        assert sp.ct.array.min() >= -1024


def test_true_transform_is_rigid_bounded_and_centred(tiny_specimen):
    sp = tiny_specimen
    t = sp.true_transform
    assert isinstance(t, (sitk.Euler3DTransform, sitk.VersorRigid3DTransform))
    assert np.allclose(t.GetCenter(), sp.microct.center, atol=1e-6)
    R = np.asarray(t.GetMatrix()).reshape(3, 3)
    assert np.allclose(R @ R.T, np.eye(3), atol=1e-9)
    angle = math.degrees(math.acos(np.clip((np.trace(R) - 1) / 2, -1, 1)))
    assert 0 < angle <= 10.0 + 1e-6
    assert np.linalg.norm(t.GetTranslation()) <= 2.0 + 1e-6


def test_ct_grid_covers_the_whole_microct_field_of_view(quick_pair):
    for sp in quick_pair:
        inside = np.argwhere(sp.labels.array > 0)[:, ::-1]  # (x, y, z) indices
        pts = sp.microct.physical_points(inside[:: 97])
        mapped = np.array([sp.true_transform.TransformPoint(tuple(p)) for p in pts])
        idx = sp.ct.continuous_indices(mapped)
        assert np.all(idx >= 0) and np.all(idx <= np.asarray(sp.ct.size) - 1)


def _correlation(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum()))


def test_true_transform_aligns_the_ct_with_the_microct(quick_pair):
    sp = quick_pair[0]
    inside = sp.labels.array > 0
    micro = sp.microct.array[inside]
    best = _correlation(phantom.ct_on_microct_grid(sp).array[inside], micro)
    for shift in ((0.5, 0, 0), (0, 0.5, 0), (0, 0, 0.5)):
        off = sitk.CompositeTransform([sp.true_transform, sitk.TranslationTransform(3, shift)])
        moved = phantom.Specimen(sp.name, sp.microct, sp.ct, sp.labels, off, sp.params)
        assert _correlation(phantom.ct_on_microct_grid(moved).array[inside], micro) < best - 0.02
    identity = phantom.Specimen(sp.name, sp.microct, sp.ct, sp.labels, sitk.Euler3DTransform(), sp.params)
    assert _correlation(phantom.ct_on_microct_grid(identity).array[inside], micro) < best - 0.05


# -- variation and determinism -------------------------------------------------------------------
def test_specimens_vary_like_specimens_on_a_scanner_bed():
    cfg = load_preset("quick")
    params = [phantom.draw_parameters(name, 0, cfg) for name in SPECIMENS]
    rotations = np.array([p["pose_rotation_deg"] for p in params])
    assert np.all(np.abs(rotations) <= 15.0) and rotations.std() > 1.0
    assert all(np.linalg.norm(p["pose_shift_mm"]) <= 1.0 * math.sqrt(3) for p in params)
    assert all(0 < p["ct_misalignment_deg"] <= 10 for p in params)


def test_anatomy_varies_structure_by_structure_within_published_ranges():
    """Each structure varies on its own between specimens and seeds (no global scale)."""
    from MicroCTSynthLib.anatomy import PUBLISHED_RANGES

    cfg = load_preset("quick")
    anatomies = [phantom.draw_parameters(name, seed, cfg)["anatomy"] for name in SPECIMENS for seed in (0, 1)]
    for key, (lo, hi, _) in PUBLISHED_RANGES.items():
        stored = {"iac_diameter_mm": ("iac_radius_mm", 2), "cochlear_nerve_diameter_mm": ("cochlear_nerve_radius_mm", 2),
                  "facial_nerve_diameter_mm": ("facial_nerve_radius_mm", 2),
                  "facial_nerve_height_over_oval_window_mm": ("facial_nerve_height_mm", 1),
                  "scc_anterior_radius_mm": None, "scc_posterior_radius_mm": None, "scc_lateral_radius_mm": None,
                  "scc_plane_tilt_deg": None, "air_cell_size_mm": None, "cochlear_duct_length_mm": None}.get(key, (key, 1))
        if stored is None:
            continue
        name, factor = stored
        values = np.ravel([a[name] for a in anatomies]) * factor
        assert np.all((values >= lo - 1e-9) & (values <= hi + 1e-9)), (key, values)
        assert len(set(np.round(values, 6))) == len(values), key  # each specimen its own
    # The duct length the spiral has lies in the published range; the canals' radii are their own.
    lengths = [a["cochlear_duct_length_mm"] for a in anatomies]
    assert 30.0 <= min(lengths) and max(lengths) <= 44.0, lengths
    radii = np.array([a["scc_major_radius_mm"] for a in anatomies])
    assert np.all(radii >= 2.0) and np.all(radii <= 3.6)
    # Sizes are not one template under a scale: the ratios between structures change.
    ratio = [a["cochlea_basal_diameter_mm"] / a["iac_radius_mm"] for a in anatomies]
    assert np.std(ratio) / np.mean(ratio) > 0.05
    assert {a["effusion"] for a in anatomies} == {True, False}
    pneumatisation = [a["pneumatisation"] for a in anatomies]
    assert min(pneumatisation) < 0.3 and max(pneumatisation) > 0.7  # sclerotic to well pneumatised
    cuts = [len(a["saw_planes"]) for a in anatomies]
    assert min(cuts) >= 4 and max(cuts) <= 6 and len(set(cuts)) > 1


def test_each_ct_comes_from_its_own_scanner():
    cfg = load_preset("quick")
    scanners = [phantom.draw_parameters(name, 0, cfg)["ct_scanner"] for name in SPECIMENS]
    assert {s["kind"] for s in scanners} == {"MDCT", "CBCT"}
    for s in scanners:
        for key, (lo, hi) in phantom.CT_SCANNERS[s["kind"]].items():
            assert lo <= s[key] <= hi, (s, key)
    assert len({round(s["gain"], 6) for s in scanners}) == len(SPECIMENS)


def test_deterministic_per_name_and_seed(tiny_specimen):
    again = phantom.make_specimen("S3_1", "tiny", seed=0)
    assert np.array_equal(again.microct.array, tiny_specimen.microct.array)
    assert np.array_equal(again.ct.array, tiny_specimen.ct.array)
    assert np.array_equal(again.labels.array, tiny_specimen.labels.array)
    assert again.params == tiny_specimen.params
    other = phantom.draw_parameters("S3_1", 1, load_preset("tiny"))
    assert other["anatomy"]["air_cell_seed"] != tiny_specimen.params["anatomy"]["air_cell_seed"]
    assert other["anatomy"] != tiny_specimen.params["anatomy"]
    assert other["ct_scanner"] != tiny_specimen.params["ct_scanner"]
    assert phantom.specimen_seed("S3_1", 0) != phantom.specimen_seed("S3_2", 0)


# -- files, command line, bad input --------------------------------------------------------------
def test_command_writes_the_dataset(tmp_path, capsys):
    out = tmp_path / "ph"
    rc = cli.main(["phantom", "--out", str(out), "--preset", "tiny", "--seed", "3",
                   "--specimens", "S3_8", "--progress", "json"])
    assert rc == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert any(e["event"] == "log" and "S3_8" in e["message"] and "microct.nrrd" in e["message"] for e in events)
    assert any(e["event"] == "progress" and e["step"] == 1 for e in events)
    ds = Dataset.load(out)
    assert ds.cases == ["S3_8"]
    assert ds.groups == THESIS_GROUPS
    assert ds.data["preset"] == "tiny" and ds.data["phantom"]["seed"] == 3
    for role in ("ct", "microct", "labels_true", "true_transform"):
        assert ds.path("S3_8", role).is_file()
    assert (out / "S3_8" / "preview.png").stat().st_size < 250_000
    sp = phantom.make_specimen("S3_8", "tiny", seed=3)
    assert np.array_equal(read_volume(ds.path("S3_8", "labels_true")).array, sp.labels.array)
    assert read_volume(ds.path("S3_8", "microct")).same_geometry(sp.microct)
    t = sitk.ReadTransform(str(ds.path("S3_8", "true_transform")))
    for p in ((0.0, 0.0, 0.0), (2.0, -1.0, 1.5)):
        assert np.allclose(t.TransformPoint(p), sp.true_transform.TransformPoint(p), atol=1e-6)
    assert not list(out.rglob("*.part*"))  # atomic writes leave no temporary files


def test_parallel_workers_give_the_same_specimens(tmp_path):
    ds = phantom.make_phantom(tmp_path / "par", preset="tiny", specimens="S3_11,S3_12", progress="none", workers=2)
    assert ds.cases == ["S3_11", "S3_12"]
    for name in ds.cases:
        sp = phantom.make_specimen(name, "tiny")
        assert np.array_equal(read_volume(ds.path(name, "microct")).array, sp.microct.array)
        assert ds.data["phantom"]["specimens"][name] == json.loads(json.dumps(sp.params))


def test_unknown_specimen_is_refused_with_a_sentence(tmp_path, capsys):
    with pytest.raises(MicroCTSynthError, match="S3_99"):
        phantom.make_specimen("S3_99")
    rc = cli.main(["phantom", "--out", str(tmp_path / "x"), "--preset", "tiny", "--specimens", "S3_1,S3_99"])
    assert rc == 2
    assert "S3_99" in capsys.readouterr().err
    assert not (tmp_path / "x" / "cases.json").exists()


def test_bad_output_folder_and_preset_are_refused_with_a_sentence(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(MicroCTSynthError, match="not a folder"):
        phantom.make_phantom(a_file, preset="tiny", specimens="S3_1", progress="none")
    with pytest.raises(MicroCTSynthError, match="Cannot create the folder"):
        phantom.make_phantom(a_file / "sub", preset="tiny", specimens="S3_1", progress="none")
    bad = dict(load_preset("tiny"), microct_spacing_mm=0.0)
    with pytest.raises(MicroCTSynthError, match="microct_spacing_mm"):
        phantom.make_specimen("S3_1", bad)
    huge = dict(load_preset("tiny"), microct_spacing_mm=0.001)
    with pytest.raises(MicroCTSynthError, match="voxels per side"):
        phantom.make_phantom(tmp_path / "huge", preset=huge, specimens="S3_1", progress="none")


def test_preview_is_a_small_png(tiny_specimen, tmp_path):
    path = phantom.save_preview(tiny_specimen, tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size < 250_000
