"""The module's self-test scenario on the Qt-free slicer-core: the logic end to end, as Slicer runs it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="the scenario needs the slicer-core package")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("this 'slicer' module has no MRML", allow_module_level=True)
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "MicroCTSynth"))

from MicroCTSynthLib.mrml import MicroCTSynthSceneLogic  # noqa: E402
from MicroCTSynthTesting.scenario import run_scenario  # noqa: E402

pytestmark = [pytest.mark.slicer, pytest.mark.slow]


def test_self_test_scenario(scene, tmp_path):
    pytest.importorskip("torch")
    for module in ("train", "synthesize", "phantom", "registration"):
        pytest.importorskip(f"MicroCTSynthLib.{module}")
    logic = MicroCTSynthSceneLogic(scene, workDir=tmp_path / "jobs", device="cpu")
    lines = []
    figures = run_scenario(logic, tmp_path, log=lines.append)
    print("\n".join(lines))
    assert set(figures["dice"]) == {"cGAN (1 epoch)", "micro-CT tissue map"}
    # Nothing half-made was left behind by the jobs: exactly the nodes the steps promise.
    names = [scene.GetNthNode(i).GetName() for i in range(scene.GetNumberOfNodes())]
    synthetic = [n for n in names if n.startswith("S3_8 CT synthetic micro-CT")]
    assert sum("tissue" not in n and "uncertainty" not in n for n in synthetic) == 2  # grid and ROI runs
    assert sum("uncertainty" in n for n in synthetic) == 1
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
    # The engine's own sentence about the file (e.g. "... is not a MicroCTSynth checkpoint"), not a crash.
    message = str(error.value)
    assert str(bogus) in message and "Traceback" not in message and not message.split(":")[0].endswith("Error")
    assert _node_names(scene) == before
    assert list((tmp_path / "jobs").iterdir()) == []  # the job's files are gone too


def _record_jobs(monkeypatch) -> list:
    """Background jobs stood in for: each records its command line (in the list returned) and is done at once."""
    from MicroCTSynthLib import mrml

    started = []

    class Recorder:
        running = False

        def __init__(self, command, **callbacks):
            started.append(command)

        def start(self):
            return self

    monkeypatch.setattr(mrml, "Job", Recorder)
    return started


def test_synthesis_hands_a_negative_roi_centre_to_the_engine(scene, tmp_path, monkeypatch):
    """The bridge writes the region as --roi-center=X,Y,Z --roi-size=...: a centre at negative LPS
    coordinates reaches the engine's parser as a value."""
    import numpy as np

    from MicroCTSynthLib import cli, mrml
    from MicroCTSynthLib.volume import Volume

    started = _record_jobs(monkeypatch)
    logic = MicroCTSynthSceneLogic(scene, workDir=tmp_path / "jobs")
    ct = mrml.node_from_volume(Volume(np.zeros((8, 8, 8), np.int16), (0.3, 0.3, 0.3), (-20.0, -10.0, -8.0)), "CT", scene)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenter(12.3, 4.0, -5.0)  # RAS: LPS (-12.3, -4, -5)
    roi.SetSize(2.0, 2.0, 2.0)
    model = tmp_path / "best.pt"
    model.write_bytes(b"a checkpoint")
    logic.synthesize(ct, model, roiNode=roi, wait=False)
    args = cli.build_parser().parse_args(started[0][3:])  # after "python -m MicroCTSynthLib"
    assert [float(v) for v in args.roi_center.split(",")] == [-12.3, -4.0, -5.0]
    assert args.roi_size == "2.000000,2.000000,2.000000"


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


# -- the module file itself, imported on slicer-core with the application's Python parts stood in --
def install_stand_ins(set_module) -> None:
    """Stand-ins for what only the Slicer application has (Qt, the scripted-module base classes,
    the parameter node wrapper, translation), installed with ``set_module(name, module)``."""
    import types

    import unittest

    qt = types.ModuleType("qt")
    qt.QTimer = object
    qt.Qt = types.SimpleNamespace(WaitCursor=3)  # what slicer.util.tryWithErrorDisplay(waitCursor=True) reads
    base = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModuleLogic:  # as Slicer's: cooperative __init__, module name from the class
        def __init__(self, parent=None):
            super().__init__()
            self.moduleName = self.__class__.__name__.removesuffix("Logic")

    class ScriptedLoadableModuleTest(unittest.TestCase):  # as Slicer's: a TestCase that can show messages
        messages: list = []

        def delayDisplay(self, message, msec=None):
            self.messages.append(message)

    base.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    base.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget"):
        setattr(base, name, type(name, (), {}))
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = lambda choices: ("Choice", tuple(choices))
    wrapper.WithinRange = lambda lo, hi: ("WithinRange", lo, hi)
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    for name, module in {"qt": qt, "slicer.ScriptedLoadableModule": base, "slicer.parameterNodeWrapper": wrapper,
                         "slicer.i18n": i18n}.items():
        set_module(name, module)


@pytest.fixture
def module_file(scene, monkeypatch):
    """MicroCTSynth.py imported on slicer-core with the stand-ins, slicer.mrmlScene = ``scene``."""
    install_stand_ins(lambda name, module: monkeypatch.setitem(sys.modules, name, module))
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.delitem(sys.modules, "MicroCTSynth", raising=False)
    import MicroCTSynth

    yield MicroCTSynth
    monkeypatch.delitem(sys.modules, "MicroCTSynth", raising=False)


def test_importing_the_module_imports_no_heavy_dependency(tmp_path):
    """Dependencies are checked on first use, never at import: in a fresh interpreter, importing
    MicroCTSynth.py leaves torch, scikit-image and scipy unimported."""
    import json
    import subprocess

    script = tmp_path / "import_module.py"
    script.write_text(
        "import json, sys\n"
        f"sys.path[:0] = [{str(ROOT / 'Testing')!r}, {str(ROOT / 'MicroCTSynth')!r}]\n"
        "import slicer\n"
        "from test_slicer_scenario import install_stand_ins\n"
        "install_stand_ins(sys.modules.__setitem__)\n"
        "slicer.mrmlScene = slicer.vtkMRMLScene()\n"
        "import MicroCTSynth\n"
        "print(json.dumps(sorted(m for m in ('torch', 'skimage', 'scipy', 'monai') if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_module_logic_is_the_scene_logic_on_slicer_mrml_scene(module_file, scene):
    import numpy as np

    from MicroCTSynthLib import mrml
    from MicroCTSynthLib.volume import Volume

    module = module_file
    logic = module.MicroCTSynthLogic()
    assert logic.moduleName == "MicroCTSynth" and logic.scene is scene
    assert logic.python == sys.executable  # no PythonSlicer outside the application
    assert module.MicroCTSynthLogic.missingPackages() == []  # this environment has them all
    assert set(module.REQUIRED_PACKAGES) >= {"torch", "SimpleITK", "scikit-image"}
    fields = module.MicroCTSynthParameterNode.__annotations__
    assert "ctVolume" in fields and "comparisonTable" in fields
    # A step through the Slicer-based class.
    array = np.zeros((12, 12, 12), np.float32)
    array[:, :, 4:8], array[:, :, 8:] = 1.0, 2.0
    microct = mrml.node_from_volume(Volume(array, (0.1, 0.1, 0.1)), "micro-CT", scene)
    assert mrml.segment_names(logic.tissueMap(microct)) == ["Air", "Soft tissue", "Bone"]


class _Widget:
    """A stand-in Qt widget: the attributes and calls the module's widget uses."""

    def __init__(self, text=""):
        self.text, self.enabled, self.visible, self.toolTip = text, False, True, ""
        self.range, self.value = (0, 100), 0

    def show(self):
        self.visible = True

    def hide(self):
        self.visible = False

    def setRange(self, low, high):
        self.range = (low, high)

    def setValue(self, value):
        self.value = value


class _Timer:
    def __init__(self):
        self.active = False

    def start(self):
        self.active = True

    def stop(self):
        self.active = False


def _panel(module, logic, monkeypatch):
    """The module's widget without Qt: stand-in widgets, a parameter node with nothing chosen."""
    import tempfile
    import types

    errors, asked = [], []
    # Slicer's own slicer.util.tryWithErrorDisplay (slicer-core ships Slicer's util.py): it shows
    # the error and re-raises. Only the application's pop-ups and cursor are stood in for.
    app = types.SimpleNamespace(testingEnabled=lambda: False, setOverrideCursor=lambda cursor: None,
                                restoreOverrideCursor=lambda: None, temporaryPath=tempfile.mkdtemp(prefix="slicer-app-"))
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: errors.append(text), raising=False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, *a, **kw: asked.append(text) or False, raising=False)
    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", lambda **kw: None, raising=False)
    widget = module.MicroCTSynthWidget.__new__(module.MicroCTSynthWidget)
    names = ["placeRoiButton", "registerButton", "tissueMapButton", "addCaseButton", "compareButton", "trainButton",
             "resumeButton", "synthesizeButton", "atlasButton", "progressBar", "statusLabel", "overlapSliderWidget"]
    widget.ui = types.SimpleNamespace(**{n: _Widget(n.removesuffix("Button").capitalize()) for n in names})
    fields = {k: None for k in module.MicroCTSynthParameterNode.__annotations__}
    fields.update(group="A", caseName="case1", datasetDir=Path("."), modelPath=Path("."), synthesizeOnMicroCTGrid=False,
                  useModelOverlap=True, overlap=0.5)
    widget._parameterNode = types.SimpleNamespace(**fields)
    widget.logic, widget._timer = logic, _Timer()
    widget._job = widget._jobButton = widget._jobDone = None
    widget._jobButtonText = ""
    widget.asked = asked
    return widget, errors


def test_panel_runs_a_job_swaps_apply_and_cancel_and_shows_progress(module_file, scene, tmp_path, monkeypatch):
    from MicroCTSynthLib.process import Job

    widget, errors = _panel(module_file, module_file.MicroCTSynthLogic(), monkeypatch)
    widget._checkCanApply()
    assert not widget.ui.trainButton.enabled and not widget.ui.registerButton.enabled  # nothing chosen yet

    child = tmp_path / "child.py"
    child.write_text("import json, time\n"
                     "for i in range(1, 4):\n"
                     "    print(json.dumps({'event': 'progress', 'task': 'train', 'step': i, 'total': 3, 'seconds_left': 3 - i}), flush=True)\n"
                     "    time.sleep(0.05)\n"
                     "print(json.dumps({'event': 'log', 'level': 'warning', 'message': 'The CT is coarse.'}), flush=True)\n"
                     "print(json.dumps({'event': 'result', 'outputs': {'best': 'run/best.pt'}}), flush=True)\n")
    shown = []
    start = lambda: (Job([sys.executable, str(child)], on_result=lambda j: j.outputs["best"]).start(), shown.append)
    button = widget.ui.trainButton
    widget._startOrCancel(button, start)
    assert button.text == "Cancel" and button.enabled and widget._timer.active and widget.ui.progressBar.visible
    assert not widget.ui.synthesizeButton.enabled  # one job at a time
    while widget._timer.active:
        widget._onTimer()
    assert shown == ["run/best.pt"] and errors == []
    assert button.text == "Train" and not widget.ui.progressBar.visible and widget._job is None
    assert widget.ui.progressBar.range == (0, 3) and widget.ui.progressBar.value == 3
    assert widget.ui.statusLabel.text.startswith("Done in") and widget.ui.statusLabel.text.endswith(" The CT is coarse.")


def test_panel_cancel_and_failure(module_file, scene, tmp_path, monkeypatch):
    from MicroCTSynthLib.process import Job

    widget, errors = _panel(module_file, module_file.MicroCTSynthLogic(), monkeypatch)
    button = widget.ui.synthesizeButton
    shown = []
    widget._startOrCancel(button, lambda: (Job([sys.executable, "-c", "import time; time.sleep(60)"]).start(), shown.append))
    assert button.text == "Cancel"
    widget._startOrCancel(widget.ui.trainButton, lambda: pytest.fail("a second job must not start"))
    widget._startOrCancel(button, None)  # the Cancel click
    while widget._timer.active:
        widget._onTimer()
    assert button.text == "Synthesize" and shown == [] and errors == []
    assert widget.ui.statusLabel.text == "Cancelled; the scene is as it was."

    failing = "import json, sys; print(json.dumps({'event': 'error', 'message': 'The CT is empty.'})); sys.exit(2)"
    widget._startOrCancel(button, lambda: (Job([sys.executable, "-c", failing]).start(), shown.append))
    while widget._timer.active:
        widget._onTimer()
    assert errors == ["The CT is empty."] and widget.ui.statusLabel.text == "The CT is empty." and shown == []

    widget._startOrCancel(button, lambda: module_file.MicroCTSynthLogic().synthesize(None, "missing.pt"))
    # Shown once, as Slicer shows it: the panel's message, then the error's own sentence.
    assert errors[-1] == "The job could not start.\n\nSelect the CT volume first." and len(errors) == 2
    assert widget._job is None and "Select the CT volume first." in widget.ui.statusLabel.text


def test_panel_shows_an_error_of_the_results_once_and_stays_usable(module_file, scene, tmp_path, monkeypatch):
    """Slicer's tryWithErrorDisplay re-raises after showing: the panel catches it after the one
    pop-up, so the status line and the buttons are still brought up to date."""
    from MicroCTSynthLib.process import Job

    widget, errors = _panel(module_file, module_file.MicroCTSynthLogic(), monkeypatch)
    refreshed = []
    real_check = widget._checkCanApply
    monkeypatch.setattr(widget, "_checkCanApply", lambda *a: refreshed.append(1) or real_check())

    def done(result):
        raise RuntimeError("the volume node went away")

    widget._startOrCancel(widget.ui.trainButton, lambda: (Job([sys.executable, "-c", "pass"]).start(), done))
    while widget._timer.active:
        widget._onTimer()
    assert errors == ["The results could not be shown.\n\nthe volume node went away"]
    assert widget.ui.statusLabel.text == "The results could not be shown. the volume node went away"
    assert widget._job is None and widget.ui.trainButton.text == "Train" and refreshed

    # An error inside a progress callback fails the job with that error: not "Cancelled".
    def bad_event(event):
        raise ValueError("bad progress field")

    child = "import json, time; print(json.dumps({'event': 'progress', 'step': 1, 'total': 2}), flush=True); time.sleep(30)"
    widget._startOrCancel(widget.ui.trainButton, lambda: (Job([sys.executable, "-c", child], on_event=bad_event).start(), done))
    while widget._timer.active:
        widget._onTimer()
    assert errors[-1] == "Showing the job's progress failed: ValueError: bad progress field"
    assert widget.ui.statusLabel.text == errors[-1] and len(errors) == 2


def test_each_button_asks_only_for_the_packages_of_its_step(module_file, scene, monkeypatch):
    """Without torch, registering needs no install; training asks (and stops when declined)."""
    import importlib.util

    module = module_file
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real_find_spec(name, *a))
    logic = module.MicroCTSynthLogic()
    assert logic.missingPackages("register") == [] and logic.missingPackages("compare") == []
    assert logic.missingPackages("train") == ["torch"] and logic.missingPackages("selfTest") == ["torch"]
    widget, errors = _panel(module, logic, monkeypatch)
    assert widget._ready("register") and widget.asked == []
    widget._startOrCancel(widget.ui.trainButton, widget.onTrain)  # the user declines the install
    assert len(widget.asked) == 1 and "torch" in widget.asked[0] and widget._job is None and errors == []
    with pytest.raises(Exception, match="Unknown step"):
        logic.missingPackages("paint")


def test_register_button_runs_in_the_background(module_file, scene, specimen, monkeypatch):
    from MicroCTSynthLib import mrml

    module = module_file
    widget, errors = _panel(module, module.MicroCTSynthLogic(), monkeypatch)
    p = widget._parameterNode
    p.ctVolume = mrml.node_from_volume(specimen.ct, "CT", scene)
    p.microCTVolume = mrml.node_from_volume(specimen.microct, "micro-CT", scene)
    widget._checkCanApply()
    button = widget.ui.registerButton
    assert button.enabled
    widget._startOrCancel(button, widget.onRegister)
    assert button.text == "Cancel" and widget._job is not None and widget._job.command[3] == "register"
    assert p.registrationTransform is None  # nothing in the scene until the job is done
    while widget._timer.active:
        widget._onTimer()
    assert errors == [] and button.text == "Register"
    assert p.ctVolume.GetParentTransformNode() is p.registrationTransform is not None
    assert mrml.volume_from_node(p.registeredCT).same_geometry(specimen.microct)
    assert widget.ui.statusLabel.text.startswith("Registered")


def test_self_test_makes_sure_of_its_packages_first(module_file, scene, monkeypatch, tmp_path):
    """On a fresh Slicer the self-test installs what the scenario needs, as the panel would, or
    stops with one sentence naming what is missing, before any step runs."""
    import MicroCTSynthTesting.scenario as scenario

    module = module_file
    installed, ran = [], []
    present = {"torch": False}
    monkeypatch.setattr(module.MicroCTSynthLogic, "missingPackages",
                        staticmethod(lambda step=None: [n for n, ok in present.items() if not ok]))
    monkeypatch.setattr(module.MicroCTSynthLogic, "installPackages", staticmethod(lambda packages: installed.append(list(packages))))
    monkeypatch.setattr(scenario, "run_scenario", lambda logic, folder, log: ran.append(folder) or {"dice": {}})
    answers = [False]
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, *a, **kw: answers[-1], raising=False)
    test = module.MicroCTSynthTest()
    with pytest.raises(module.MicroCTSynthError, match=r"needs these Python packages: torch; accept"):
        test.test_MicroCTSynth_scenario()  # the install declined: nothing installed, nothing run
    assert installed == [] and ran == []
    answers.append(True)  # as Slicer answers in testing mode
    with pytest.raises(module.MicroCTSynthError, match=r"missing and could not be installed: torch\."):
        test.test_MicroCTSynth_scenario()
    assert installed == [["torch"]] and ran == []
    present["torch"] = True  # the install worked this time
    test.test_MicroCTSynth_scenario()
    assert len(ran) == 1 and test.messages[-1] == "Test passed"


def test_the_panels_cpu_backend_reaches_the_engine_and_openvino_is_installed_first(module_file, scene, monkeypatch,
                                                                                  tmp_path):
    """Synthesis runs with the panel's CPU backend; OpenVINO, chosen and missing, is asked for
    (and nothing starts when the user declines), while auto and torch ask for nothing more."""
    import importlib.util

    import numpy as np

    from MicroCTSynthLib import mrml
    from MicroCTSynthLib.volume import Volume

    module = module_file
    started = _record_jobs(monkeypatch)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else real_find_spec(name, *a))
    logic = module.MicroCTSynthLogic()
    assert logic.missingPackages("synthesize") == [] and logic.missingPackages("synthesizeOpenVINO") == ["openvino"]
    assert "openvino" not in logic.missingPackages() and "openvino" not in logic.missingPackages("selfTest")
    widget, errors = _panel(module, logic, monkeypatch)
    p = widget._parameterNode
    p.ctVolume = mrml.node_from_volume(Volume(np.zeros((8, 8, 8), np.int16), (0.3, 0.3, 0.3)), "CT", scene)
    p.modelPath = tmp_path / "best.pt"
    p.modelPath.write_bytes(b"a checkpoint")
    p.samples, p.device = 1, "cpu"
    p.backend = "openvino"
    widget._startOrCancel(widget.ui.synthesizeButton, widget.onSynthesize)  # the user declines the install
    assert len(widget.asked) == 1 and "openvino" in widget.asked[0] and started == [] and errors == []
    for backend in ("auto", "torch"):
        p.backend = backend
        widget._job = None
        widget._startOrCancel(widget.ui.synthesizeButton, widget.onSynthesize)
        command = started[-1]
        assert command[command.index("--backend") + 1] == backend
    assert len(widget.asked) == 1 and errors == []
    with pytest.raises(module.MicroCTSynthError, match="backend must be one of auto, torch, openvino"):
        logic.synthesize(p.ctVolume, p.modelPath, backend="tensorrt")
