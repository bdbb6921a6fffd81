"""The MRML bridge on the Qt-free slicer-core: geometry RAS <-> LPS, segmentations, transforms, tables."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="the MRML bridge tests need the slicer-core package")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("this 'slicer' module has no MRML", allow_module_level=True)

import SimpleITK as sitk  # noqa: E402
import vtk  # noqa: E402

from MicroCTSynthLib import mrml  # noqa: E402
from MicroCTSynthLib.errors import MicroCTSynthError  # noqa: E402
from MicroCTSynthLib.labels import TISSUE_COLORS, TISSUE_NAMES  # noqa: E402
from MicroCTSynthLib.volume import Volume, read_volume, write_volume  # noqa: E402

pytestmark = pytest.mark.slicer


def oblique_volume(rng, dtype=np.int16) -> Volume:
    """Anisotropic spacing and a direction with no zero entry: any axis mix-up shows."""
    rotation = sitk.VersorTransform((0.3, -0.5, 0.8), 0.7).GetMatrix()
    array = rng.integers(-1000, 2000, size=(7, 9, 11)).astype(dtype)
    return Volume(array, spacing=(0.3, 0.45, 0.8), origin=(12.5, -33.25, 71.0), direction=rotation)


def assert_same_volume(a: Volume, b: Volume):
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.spacing, b.spacing, rtol=0, atol=1e-9)
    np.testing.assert_allclose(a.origin, b.origin, rtol=0, atol=1e-9)
    np.testing.assert_allclose(a.direction, b.direction, rtol=0, atol=1e-9)


def ijk_to_ras_of(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return mrml.array_from_vtk_matrix(m)


# -- volumes ------------------------------------------------------------------------------
def test_engine_written_volume_loaded_by_slicer_lands_where_it_was(scene, rng, tmp_path):
    volume = oblique_volume(rng)
    path = write_volume(volume, tmp_path / "ct.nrrd")
    node = mrml.load_volume_file(path, "ct", scene)  # Slicer's own reader and LPS->RAS handling
    np.testing.assert_allclose(ijk_to_ras_of(node), mrml.ijk_to_ras(volume), atol=1e-9)
    # LPS -> RAS is the flip of x and y: the first voxel's centre, by hand.
    np.testing.assert_allclose(ijk_to_ras_of(node)[:3, 3], [-12.5, 33.25, 71.0])
    back = mrml.volume_from_node(node)
    assert_same_volume(back, volume)
    assert back.array.dtype == np.int16


def test_node_from_volume_matches_slicer_reader_and_round_trips(scene, rng, tmp_path):
    volume = oblique_volume(rng, dtype=np.float32)
    node = mrml.node_from_volume(volume, "synthetic", scene)
    loaded = mrml.load_volume_file(write_volume(volume, tmp_path / "s.nrrd"), "loaded", scene)
    np.testing.assert_allclose(ijk_to_ras_of(node), ijk_to_ras_of(loaded), atol=1e-9)
    assert_same_volume(mrml.volume_from_node(node), volume)
    assert node.GetDisplayNode() is not None


def test_node_written_by_slicer_is_read_by_the_engine_in_place(scene, rng, tmp_path):
    volume = oblique_volume(rng)
    node = mrml.node_from_volume(volume, "ct", scene)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(tmp_path / "from_slicer.nrrd"))
    assert storage.WriteData(node)
    assert_same_volume(read_volume(tmp_path / "from_slicer.nrrd"), volume)


def test_real_head_ct_round_trip(scene, head_ct_path):
    engine = read_volume(head_ct_path)
    node = mrml.load_volume_file(head_ct_path, "head", scene)
    np.testing.assert_allclose(ijk_to_ras_of(node), mrml.ijk_to_ras(engine), atol=1e-6)
    back = mrml.volume_from_node(node)
    assert_same_volume(back, engine)
    again = mrml.volume_from_node(mrml.node_from_volume(back, "again", scene))
    assert_same_volume(again, engine)


def test_world_geometry_follows_a_rigid_parent_transform(scene, rng):
    volume = oblique_volume(rng)
    node = mrml.node_from_volume(volume, "ct", scene)
    rigid = sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.2, -0.1, 0.3, (4.0, -5.0, 6.0))
    transform_node = mrml.transform_node_from_sitk(rigid, "t", scene)
    node.SetAndObserveTransformNodeID(transform_node.GetID())
    local, world = mrml.volume_from_node(node, world=False), mrml.volume_from_node(node, world=True)
    assert_same_volume(local, volume)
    # The node is shown where the inverse of the resampling transform takes its voxels.
    inverse = rigid.GetInverse()
    corner = volume.physical_points([(10, 8, 6)])[0]
    np.testing.assert_allclose(world.physical_points([(10, 8, 6)])[0], inverse.TransformPoint(tuple(corner)), atol=1e-9)
    np.testing.assert_allclose(world.spacing, volume.spacing, atol=1e-9)

    scale = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    scale.SetMatrixTransformToParent(mrml.vtk_matrix_from_array(np.diag([2.0, 1.0, 1.0, 1.0]) @ np.eye(4)))
    sheared = np.eye(4)
    sheared[0, 1] = 0.5
    scale.SetMatrixTransformToParent(mrml.vtk_matrix_from_array(sheared))
    node.SetAndObserveTransformNodeID(scale.GetID())
    with pytest.raises(MicroCTSynthError, match="orthonormal"):
        mrml.volume_from_node(node)


def test_not_a_scalar_volume_is_a_sentence(scene):
    with pytest.raises(MicroCTSynthError, match="Select a scalar volume"):
        mrml.volume_from_node(None)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(MicroCTSynthError, match="holds no voxels"):
        mrml.volume_from_node(empty)


# -- segmentations ------------------------------------------------------------------------
def label_volume(rng, volume: Volume) -> Volume:
    labels = np.zeros(volume.shape, np.uint8)
    labels[1:6, 1:8, 1:5] = 1
    labels[1:6, 1:8, 5:8] = 2
    labels[1:6, 1:8, 8:10] = 3
    labels[3, 4, 2] = 3  # an isolated voxel: exactness, not smoothing
    return volume.with_array(labels)


def test_segmentation_from_labels_has_the_three_named_coloured_segments(scene, rng):
    labels = label_volume(rng, oblique_volume(rng))
    node = mrml.segmentation_from_labels(labels, "tissue", scene)
    assert mrml.segment_names(node) == ["Air", "Soft tissue", "Bone"]
    segmentation = node.GetSegmentation()
    for value, name in TISSUE_NAMES.items():
        segment = segmentation.GetSegment(mrml.segment_id_by_name(node, name))
        np.testing.assert_allclose(segment.GetColor(), TISSUE_COLORS[value], atol=1e-6)


def test_labels_round_trip_on_an_oblique_grid(scene, rng):
    volume = oblique_volume(rng)
    labels = label_volume(rng, volume)
    reference = mrml.node_from_volume(volume, "reference", scene)
    node = mrml.segmentation_from_labels(labels, "tissue", scene)
    back = mrml.labels_from_segmentation(node, reference)
    assert_same_volume(back, labels)
    # The temporary export node is gone.
    assert scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode").GetNumberOfItems() == 0


def test_empty_class_gives_an_empty_segment(scene, rng):
    volume = oblique_volume(rng)
    labels = volume.with_array(np.where(label_volume(rng, volume).array == 3, 3, 0).astype(np.uint8))
    node = mrml.segmentation_from_labels(labels, "bone only", scene)
    assert mrml.segment_names(node) == ["Air", "Soft tissue", "Bone"]
    back = mrml.labels_from_segmentation(node, mrml.node_from_volume(volume, "ref", scene))
    assert_same_volume(back, labels)


def test_labels_come_back_by_segment_name_not_label_value(scene, rng):
    """A hand-made segmentation: segments in another order, other ids, overlap resolved by priority."""
    volume = oblique_volume(rng)
    truth = label_volume(rng, volume).array
    reference = mrml.node_from_volume(volume, "reference", scene)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "by hand")
    node.CreateDefaultDisplayNodes()
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    masks = {"bone": truth == 3, "Soft Tissue": truth == 2, "air": (truth == 1) | (truth == 2)}  # air overlaps soft tissue
    for i, (name, mask) in enumerate(masks.items()):
        segment_id = node.GetSegmentation().AddEmptySegment(f"Segment_{i + 7}", name)
        logic.SetBinaryLabelmapToSegment(mrml._oriented_image(mask, volume), node, segment_id, logic.MODE_REPLACE, None, False)
    back = mrml.labels_from_segmentation(node, reference)
    np.testing.assert_array_equal(back.array, truth)  # soft tissue wins where it overlaps air


def test_a_segmentation_without_tissue_names_is_a_sentence(scene, rng):
    volume = oblique_volume(rng)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "other")
    node.GetSegmentation().AddEmptySegment("x", "Cochlea")
    with pytest.raises(MicroCTSynthError, match="no segment named Air, Soft tissue or Bone"):
        mrml.labels_from_segmentation(node, mrml.node_from_volume(volume, "ref", scene))


# -- transforms ---------------------------------------------------------------------------
def test_transform_file_and_node_agree_with_slicer_reader(scene, tmp_path):
    transform = sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.1, 0.2, -0.3, (4.0, 5.0, 6.0))
    path = tmp_path / "ct_to_microct.tfm"
    sitk.WriteTransform(transform, str(path))
    ours = mrml.transform_node_from_file(path, "ours", scene)
    theirs = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "slicer")
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(str(path))
    theirs.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(theirs)
    a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    ours.GetMatrixTransformToParent(a)
    theirs.GetMatrixTransformToParent(b)
    np.testing.assert_allclose(mrml.array_from_vtk_matrix(a), mrml.array_from_vtk_matrix(b), atol=1e-9)

    # A micro-CT point (fixed, LPS) maps to the CT point the engine's transform gives.
    p = np.array([7.0, -3.0, 11.0])
    from_parent = vtk.vtkMatrix4x4()
    ours.GetMatrixTransformFromParent(from_parent)
    ras = mrml.array_from_vtk_matrix(from_parent) @ np.r_[mrml.LPS_TO_RAS @ p, 1.0]
    np.testing.assert_allclose(mrml.LPS_TO_RAS @ ras[:3], transform.TransformPoint(tuple(p)), atol=1e-9)

    out = mrml.write_transform_from_node(ours, tmp_path / "back.tfm")
    back = sitk.ReadTransform(str(out))
    for q in ([0, 0, 0], [10, -20, 5]):
        np.testing.assert_allclose(back.TransformPoint(q), transform.TransformPoint(q), atol=1e-9)

    # The bridge reads and writes transform files as the engine does, with its checks.
    path.write_text(path.read_text().replace("Parameters: 0.1", "Parameters: nan", 1))
    with pytest.raises(MicroCTSynthError, match="NaN or infinite"):
        mrml.transform_node_from_file(path, "bad", scene)
    with pytest.raises(MicroCTSynthError, match="ending .tfm"):
        mrml.write_transform_from_node(ours, tmp_path / "back.png")


def test_non_linear_transform_is_refused():
    bspline = sitk.BSplineTransform(3)
    bspline.SetTransformDomainOrigin((0, 0, 0))
    bspline.SetTransformDomainPhysicalDimensions((10, 10, 10))
    bspline.SetTransformDomainMeshSize((2, 2, 2))
    params = np.zeros(bspline.GetNumberOfParameters())
    params[10] = 3.0
    bspline.SetParameters(tuple(params))
    with pytest.raises(MicroCTSynthError, match="not linear"):
        mrml.matrix_from_sitk_transform(bspline)


# -- markups, tables, charts --------------------------------------------------------------
def test_roi_is_given_to_the_engine_in_lps(scene, rng):
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "roi")
    roi.SetCenter(10.0, 20.0, 30.0)
    roi.SetSize(4.0, 5.0, 6.0)
    center, size = mrml.roi_from_node(roi)
    np.testing.assert_allclose(center, [-10.0, -20.0, 30.0])
    np.testing.assert_allclose(size, [4.0, 5.0, 6.0])
    volume = oblique_volume(rng)
    default = mrml.default_roi_node(mrml.node_from_volume(volume, "ct", scene), size_mm=3.0, scene=scene)
    center, size = mrml.roi_from_node(default)
    np.testing.assert_allclose(center, volume.center, atol=1e-9)
    np.testing.assert_allclose(size, [3.0, 3.0, 3.0])


def test_metrics_table_round_trip(scene):
    results = {
        "cGAN": {"dice": {"Air": 0.9, "Soft tissue": 0.6, "Bone": 0.85}, "hd95_mm": {"Air": 0.2, "Soft tissue": 0.5, "Bone": 0.3}},
        "Atlas": {"dice": {"Air": 0.8, "Soft tissue": None, "Bone": 0.7}, "hd95_mm": {"Air": 0.4, "Soft tissue": None, "Bone": 0.6}},
    }
    node = mrml.table_from_metrics(results, "comparison", scene)
    assert node.GetTable().GetNumberOfRows() == 6
    back = mrml.metrics_from_table(node)
    assert back["cGAN"]["dice"] == pytest.approx(results["cGAN"]["dice"])
    assert np.isnan(back["Atlas"]["dice"]["Soft tissue"])
    assert back["Atlas"]["hd95_mm"]["Bone"] == pytest.approx(0.6)


def test_loss_chart_grows_with_training_events(scene):
    chart = mrml.LossChart("losses", scene)
    assert not chart.append({"event": "progress", "step": 1, "epoch": 1, "seconds_left": 3})
    chart.append({"event": "progress", "step": 1, "G_GAN": 0.7, "G_L1": 0.5, "D_real": 0.6, "epoch": 1})
    chart.append({"event": "progress", "step": 2, "G_GAN": 0.6, "G_L1": 0.4, "D_real": 0.5, "val_loss": 0.9})
    assert chart.terms == ["G_GAN", "G_L1", "D_real", "val_loss"]
    assert chart.chart_node.GetNumberOfPlotSeriesNodes() == 4
    table = chart.table_node.GetTable()
    assert table.GetNumberOfRows() == 2
    assert table.GetColumnByName("G_L1").GetValue(1) == pytest.approx(0.4)
    assert np.isnan(table.GetColumnByName("val_loss").GetValue(0))
    assert chart.values("G_GAN") == [0.7, 0.6]


def test_loss_chart_appends_rows_without_rebuilding_its_table(scene):
    """An event adds one row to the same columns: the cost of an event does not grow with the
    rows before it (hours of training stream thousands of events into the chart)."""
    chart = mrml.LossChart("losses", scene)
    chart.append({"event": "progress", "step": 1, "G_L1": 0.5})
    table = chart.table_node.GetTable()
    step_column, loss_column = table.GetColumnByName("step").__this__, table.GetColumnByName("G_L1").__this__
    for step in range(2, 2001):
        chart.append({"event": "progress", "step": step, "G_L1": 1.0 / step})
    assert chart.rows == table.GetNumberOfRows() == 2000
    assert table.GetColumnByName("step").__this__ == step_column and table.GetColumnByName("G_L1").__this__ == loss_column
    assert table.GetColumnByName("G_L1").GetValue(1999) == pytest.approx(1 / 2000)
    # A term that arrives late gets a column, empty for the rows before it, and a curve.
    chart.append({"event": "progress", "step": 2001, "G_L1": 0.1, "val_loss": 0.9})
    assert chart.values("val_loss")[-1] == pytest.approx(0.9) and np.isnan(chart.values("val_loss")[:2000]).all()
    assert chart.chart_node.GetNumberOfPlotSeriesNodes() == 2 and table.GetNumberOfRows() == 2001


def test_job_summary_line():
    from MicroCTSynthLib.process import Job, JobState

    job = Job(["true"])
    job.state = JobState.RUNNING
    job.progress = {"event": "progress", "task": "train", "step": 12, "total": 40, "seconds_left": 91.4}
    assert mrml.job_summary(job) == "train · 12/40 · 1:31 left"
    assert mrml.format_seconds(3725) == "1:02:05"
    job.state, job.error = JobState.FAILED, "The model file is not a checkpoint of ours."
    assert mrml.job_summary(job) == "The model file is not a checkpoint of ours."
