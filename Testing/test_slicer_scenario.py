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
    assert sum(n.startswith("S3_1 CT synthetic micro-CT") and "tissue" not in n for n in names) == 1
    assert not any(n.startswith("__MicroCTSynth") for n in names)
