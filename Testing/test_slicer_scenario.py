"""The module's self-test scenario on the Qt-free slicer-core: the logic end to end, as Slicer runs it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="the scenario needs the slicer-core package")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("this 'slicer' module has no MRML", allow_module_level=True)
pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "MicroCTSynth"))

from MicroCTSynthLib.mrml import MicroCTSynthSceneLogic  # noqa: E402
from MicroCTSynthTesting.scenario import run_scenario  # noqa: E402

pytestmark = [pytest.mark.slicer, pytest.mark.slow]


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    logics = []
    for cls in (slicer.vtkSlicerSegmentationsModuleLogic, slicer.vtkSlicerTransformLogic, slicer.vtkSlicerTablesLogic):
        logic = cls()
        logic.SetMRMLScene(scene)
        logics.append(logic)
    yield scene
    scene.Clear(1)


def test_self_test_scenario(scene, tmp_path):
    for module in ("train", "synthesize", "phantom", "registration"):
        pytest.importorskip(f"MicroCTSynthLib.{module}")
    logic = MicroCTSynthSceneLogic(scene, workDir=tmp_path / "jobs", device="cpu")
    lines = []
    figures = run_scenario(logic, tmp_path, log=lines.append)
    print("\n".join(lines))
    assert set(figures["dice"]) == {"cGAN (1 epoch)", "micro-CT tissue map"}
    # Nothing half-made was left behind by the jobs: exactly the nodes the steps promise.
    names = [scene.GetNthNode(i).GetName() for i in range(scene.GetNumberOfNodes())]
    assert sum(n.startswith("S3_8 CT synthetic micro-CT") and "tissue" not in n for n in names) == 1
    assert not any(n.startswith("__MicroCTSynth") for n in names)


# -- the logic's steps one by one (no training needed) -------------------------------------------
@pytest.fixture(scope="module")
def specimen():
    pytest.importorskip("MicroCTSynthLib.phantom")
    from MicroCTSynthLib.phantom import make_specimen

    return make_specimen("S3_1", preset="tiny", seed=0)


def _node_names(scene) -> list[str]:
    return sorted(scene.GetNthNode(i).GetName() or "" for i in range(scene.GetNumberOfNodes()))


def test_register_tissue_map_add_case_compare(scene, specimen, tmp_path):
    import numpy as np

    from MicroCTSynthLib import mrml
    from MicroCTSynthLib.dataset import Dataset
    from MicroCTSynthLib.volume import read_volume

    logic = MicroCTSynthSceneLogic(scene, workDir=tmp_path / "jobs")
    ct = mrml.node_from_volume(specimen.ct, "CT", scene)
    microct = mrml.node_from_volume(specimen.microct, "micro-CT", scene)
    transform, registered = logic.register(ct, microct)
    assert ct.GetParentTransformNode() is transform
    centre = tuple(specimen.microct.center)
    error = np.linalg.norm(np.subtract(mrml.sitk_transform_from_node(transform).TransformPoint(centre),
                                       specimen.true_transform.TransformPoint(centre)))
    assert error < 0.15  # half a CT voxel
    assert mrml.volume_from_node(registered).same_geometry(specimen.microct)

    # Registering again refines the same transform node; a user's own initial transform stays as it was.
    again, _ = logic.register(ct, microct)
    assert again is transform
    manual = mrml.transform_node_from_sitk(mrml.sitk_transform_from_node(transform), "manual", scene)
    before = mrml.array_from_vtk_matrix(manual.GetMatrixTransformToParent())
    refined, _ = logic.register(ct, microct, initialTransform=manual)
    assert refined is not manual and ct.GetParentTransformNode() is refined
    np.testing.assert_array_equal(mrml.array_from_vtk_matrix(manual.GetMatrixTransformToParent()), before)

    tissue = logic.tissueMap(microct)
    assert mrml.segment_names(tissue) == ["Air", "Soft tissue", "Bone"]

    # A validation case may come first; the group is complete once its training case is added.
    logic.addCase(tmp_path / "data", "S3_1b", ct, microct, group="Mine", split="val")
    case = logic.addCase(tmp_path / "data", "S3_1", ct, microct, group="Mine", split="train")
    dataset = Dataset.load(tmp_path / "data")
    assert case == tmp_path / "data" / "S3_1"
    assert dataset.group("Mine") == {"train": ["S3_1"], "val": ["S3_1b"], "test": []}
    # The case's CT is the native one (not moved); its transform is the registration's.
    assert read_volume(dataset.path("S3_1", "ct")).same_geometry(specimen.ct)
    exported = read_volume(dataset.path("S3_1", "tissue"))
    np.testing.assert_array_equal(exported.array, mrml.labels_from_segmentation(tissue, microct).array)

    truth = mrml.segmentation_from_labels(specimen.labels, "truth", scene)
    table = logic.compare(truth, [tissue], referenceVolumeNode=microct)
    dice = mrml.metrics_from_table(table)["micro-CT tissue map"]["dice"]
    assert all(0.9 <= d <= 1.0 for d in dice.values()), dice
    # The atlas step's geometry, end to end: the CT written on its own grid with its transform,
    # the output on the micro-CT grid. With the case as its own atlas the map must come back.
    atlas = logic.atlasSegment(ct, tmp_path / "data", group="Mine", atlases=["S3_1"], referenceNode=microct, wait=True)
    assert atlas.GetName() == "Atlas tissue map" and mrml.segment_names(atlas) == ["Air", "Soft tissue", "Bone"]
    self_dice = mrml.metrics_from_table(logic.compare(tissue, {"atlas": atlas}, referenceVolumeNode=microct))["atlas"]["dice"]
    assert all(d >= 0.99 for d in self_dice.values()), self_dice

    # Without a reference volume the reference segmentation's own geometry serves.
    again = mrml.metrics_from_table(logic.compare(truth, {"same": tissue}))["same"]["dice"]
    assert again == pytest.approx(dice, abs=1e-6)


def test_failed_synthesis_leaves_the_scene_as_it_was(scene, tmp_path):
    import numpy as np

    from MicroCTSynthLib import mrml
    from MicroCTSynthLib.errors import MicroCTSynthError
    from MicroCTSynthLib.volume import Volume

    logic = MicroCTSynthSceneLogic(scene, workDir=tmp_path / "jobs")
    ct = mrml.node_from_volume(Volume(np.zeros((8, 8, 8), np.int16), (0.3, 0.3, 0.3)), "CT", scene)
    bogus = tmp_path / "best.pt"
    bogus.write_text("not a model")
    before = _node_names(scene)
    with pytest.raises(MicroCTSynthError) as error:
        logic.synthesize(ct, bogus, device="cpu", wait=True)
    assert str(error.value).strip() and "Traceback" not in str(error.value)
    assert _node_names(scene) == before
    assert list((tmp_path / "jobs").iterdir()) == []  # the job's files are gone too


def test_cancelled_training_leaves_the_scene_as_it_was(scene, tmp_path):
    from MicroCTSynthLib.process import JobState

    # Stands in for the interpreter: reports one loss, then works "forever".
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho \'{"event": "progress", "task": "train", "step": 1, "total": 9, "G_L1": 0.5}\'\nexec sleep 60\n')
    fake.chmod(0o755)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cases.json").write_text('{"cases": {}, "groups": {}}')
    logic = MicroCTSynthSceneLogic(scene, python=str(fake), workDir=tmp_path / "jobs")
    before = _node_names(scene)
    job = logic.train(tmp_path / "data", group="A", preset="tiny", wait=False)
    assert job.state == JobState.RUNNING
    while not logic.lossChart.rows:  # the live chart fills from the job's events
        job.poll()
    assert logic.lossChart.chart_node.GetScene() is scene
    with pytest.raises(Exception, match="still running"):
        logic.train(tmp_path / "data", wait=False)
    logic.cancel()
    assert job.wait(timeout=30) == JobState.CANCELLED
    assert _node_names(scene) == before and logic.lossChart is None
