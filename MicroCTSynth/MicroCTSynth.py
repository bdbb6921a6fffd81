"""MicroCTSynth: synthetic micro-CT and tissue maps of the inner ear from clinical CT (3D Slicer module).

The module is thin: the panel, the parameter node, the background job's progress and cancel.
The work is done by the engine (``MicroCTSynthLib``); the logic on MRML nodes lives in
``MicroCTSynthLib.mrml.MicroCTSynthSceneLogic``, free of Qt so that it also runs (and is tested)
on the Qt-free ``slicer-core`` package. Registration, training, synthesis and atlas runs start
``PythonSlicer -m MicroCTSynthLib ... --progress json`` in a process of their own.
"""

import contextlib
import importlib
import importlib.util
import logging
import os
import pathlib
import shutil
import sys
import tempfile
from typing import Annotated, Optional

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from slicer import (
    vtkMRMLLinearTransformNode,
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLMarkupsROINode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
)


def _engineOnPath() -> None:
    """Find ``MicroCTSynthLib``: installed beside the module (built extension) or one folder up
    (the source folder added through "Additional module paths")."""
    try:
        importlib.import_module("MicroCTSynthLib")
    except ImportError:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


_engineOnPath()

from MicroCTSynthLib.choices import BACKENDS, MODEL_KINDS  # noqa: E402
from MicroCTSynthLib.dataset import SPLITS  # noqa: E402
from MicroCTSynthLib.errors import MicroCTSynthError  # noqa: E402
from MicroCTSynthLib.mrml import MicroCTSynthSceneLogic, default_roi_node, job_summary  # noqa: E402
from MicroCTSynthLib.presets import PRESET_NAMES  # noqa: E402
from MicroCTSynthLib.process import JobState  # noqa: E402

#: Python packages the engine needs: distribution name (what pip installs) -> import name
#: (what is looked for, without importing it). torch comes from the PyTorch extension when it
#: is there, so that it matches the GPU and driver.
#: These are pyproject.toml's dependencies again, and must be: the built extension installs the
#: engine's scripts, not pyproject.toml nor a wheel's metadata, so Slicer has nothing to read
#: them from, and it needs the import names besides. numpy is left out: Slicer ships it.
#: Testing/test_module_static.py checks that the two lists name the same packages.
REQUIRED_PACKAGES = {
    "torch": "torch",
    "SimpleITK": "SimpleITK",
    "scikit-image": "skimage",
    "scipy": "scipy",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "tensorboard": "tensorboard",
    "monai": "monai",
}

#: What each step asks for: the packages the engine modules it runs import (Testing checks
#: this against their imports), so that registering never waits for a multi-GB torch install.
STEP_PACKAGES = {
    "register": ("SimpleITK", "scipy", "scikit-image", "tqdm"),
    "tissueMap": ("SimpleITK", "scipy", "scikit-image"),
    "addCase": ("SimpleITK", "scipy", "scikit-image", "tqdm"),
    "train": ("torch", "SimpleITK", "scipy", "scikit-image", "matplotlib", "tqdm", "tensorboard", "monai"),
    "synthesize": ("torch", "SimpleITK", "scipy", "scikit-image", "tqdm", "monai"),
    "atlas": ("SimpleITK", "scipy", "scikit-image", "tqdm"),
    "compare": ("SimpleITK", "scipy"),
}
#: The self-test runs every step and makes its phantom: it needs them all.
STEP_PACKAGES["selfTest"] = tuple(REQUIRED_PACKAGES)

#: Packages no step needs, installed when the user asks for what they give: OpenVINO runs
#: synthesis on the CPU faster than PyTorch (the paper-size generator 2.3x on a CPU without
#: native bf16, the shipped models 1.2-1.3x on a whole specimen), for 70-100 MB more memory.
OPTIONAL_PACKAGES = {"openvino": "openvino"}
#: Synthesis with the OpenVINO backend chosen on the panel.
STEP_PACKAGES["synthesizeOpenVINO"] = STEP_PACKAGES["synthesize"] + ("openvino",)

#: A layout of three axial views side by side: CT, synthetic micro-CT, micro-CT.
SIDE_BY_SIDE_LAYOUT_ID = 7301
SIDE_BY_SIDE_LAYOUT = """
<layout type="horizontal">
 <item><view class="vtkMRMLSliceNode" singletontag="Red">
  <property name="orientation" action="default">Axial</property>
  <property name="viewlabel" action="default">R</property>
  <property name="viewcolor" action="default">#F34A33</property></view></item>
 <item><view class="vtkMRMLSliceNode" singletontag="Yellow">
  <property name="orientation" action="default">Axial</property>
  <property name="viewlabel" action="default">Y</property>
  <property name="viewcolor" action="default">#EDD54C</property></view></item>
 <item><view class="vtkMRMLSliceNode" singletontag="Green">
  <property name="orientation" action="default">Axial</property>
  <property name="viewlabel" action="default">G</property>
  <property name="viewcolor" action="default">#6EB04B</property></view></item>
</layout>
"""


#
# MicroCTSynth
#


class MicroCTSynth(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MicroCTSynth")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MicroCTSynth contributors"]
        self.parent.helpText = _("""
Synthesizes a micro-CT (37.6 &micro;m) and an air / soft tissue / bone tissue map of the inner ear
from a clinical CT (0.3 mm) with the 3D conditional GANs of X. Sun, <i>Synthesizing Micro-CT from
CT of the inner ear with 3D-conditional GANs</i> (Vanderbilt University, 2021).
<p>Work from top to bottom: choose the CT (and the specimen's micro-CT if you have one), register
the CT to the micro-CT by mutual information, make the micro-CT's tissue map (multi-Otsu and
closing), add registered cases to a dataset folder and train the single-task or multitask cGAN,
then synthesize the micro-CT and tissue map of any CT inside a region of interest around the
cochlea. The atlas baseline (the thesis' previous method) and a comparison table (Dice per
class, 95&nbsp;% Hausdorff distance) show how the methods differ.</p>
<p>Registration, training, synthesis and the atlas run in the background; the Slicer window
stays usable and Cancel stops a job without touching the scene. The same steps are available from the Python
console (<code>MicroCTSynthLogic</code>) and the command line (<code>microctsynth</code>).</p>
""")
        self.parent.acknowledgementText = _("""
The method and its evaluation follow the master's thesis of Xinyi Sun, <i>Synthesizing Micro-CT
from CT of the inner ear with 3D-conditional GANs</i>, Vanderbilt University, 2021 (Department of
Electrical and Computer Engineering), for image-guided cochlear implant programming. The network
is a 3D port of pix2pix (J.-Y. Zhu, P. Isola et al.); the module follows the structure of 3D
Slicer's scripted module template, SlicerNNUnet and SlicerMONAIAuto3DSeg.
""")


#
# MicroCTSynthParameterNode
#


@parameterNodeWrapper
class MicroCTSynthParameterNode:
    """The panel's state; the .ui widgets bind to these names through ``SlicerParameterName``."""

    # 1. Inputs
    ctVolume: vtkMRMLScalarVolumeNode
    microCTVolume: vtkMRMLScalarVolumeNode
    roi: vtkMRMLMarkupsROINode
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    # 2. Registration
    initialTransform: vtkMRMLLinearTransformNode
    landmarksMicroCT: vtkMRMLMarkupsFiducialNode
    landmarksCT: vtkMRMLMarkupsFiducialNode
    affine: bool = False
    registrationTransform: vtkMRMLLinearTransformNode
    registeredCT: vtkMRMLScalarVolumeNode
    # 3. Tissue map
    tissueSegmentation: vtkMRMLSegmentationNode
    # 4. Training
    datasetDir: pathlib.Path
    caseName: str = "case1"
    caseSplit: Annotated[str, Choice(list(SPLITS))] = "train"
    group: str = "A"
    model: Annotated[str, Choice(list(MODEL_KINDS))] = "single"
    preset: Annotated[str, Choice(list(PRESET_NAMES))] = "quick"
    runDir: pathlib.Path
    # 5. Synthesis
    modelPath: pathlib.Path
    synthesizeOnMicroCTGrid: bool = False
    useModelOverlap: bool = True  # the model's preset's synthesis_overlap, unless the user sets one
    overlap: Annotated[float, WithinRange(0.0, 0.9)] = 0.5
    samples: Annotated[int, WithinRange(1, 50)] = 1
    backend: Annotated[str, Choice(list(BACKENDS))] = "auto"
    syntheticMicroCT: vtkMRMLScalarVolumeNode
    syntheticTissue: vtkMRMLSegmentationNode
    uncertainty: vtkMRMLScalarVolumeNode
    # 6. Atlas
    atlasTissue: vtkMRMLSegmentationNode
    # 7. Compare
    referenceSegmentation: vtkMRMLSegmentationNode
    compareCGAN: vtkMRMLSegmentationNode
    compareAtlas: vtkMRMLSegmentationNode
    comparisonTable: vtkMRMLTableNode


def _path(value) -> Optional[pathlib.Path]:
    """A path parameter, ``None`` when the field is empty."""
    if value is None or str(value) in ("", "."):
        return None
    return pathlib.Path(value)


#
# MicroCTSynthWidget
#


class MicroCTSynthWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._jobButton = None
        self._jobButtonText = ""
        self._jobDone = None
        self._timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MicroCTSynth.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = MicroCTSynthLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # The job's queue is drained on the GUI thread, where MRML may be touched.
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self._onTimer)

        self.ui.progressBar.hide()
        self.ui.placeRoiButton.connect("clicked(bool)", self.onPlaceRoi)
        # Quick steps run here, in Slicer's process; each returns its status line.
        self.ui.tissueMapButton.connect("clicked(bool)", lambda: self._runHere(
            "tissueMap", _("The tissue map could not be made."), self.onTissueMap))
        self.ui.addCaseButton.connect("clicked(bool)", lambda: self._runHere(
            "addCase", _("The case could not be added."), self.onAddCase))
        self.ui.compareButton.connect("clicked(bool)", lambda: self._runHere(
            "compare", _("The comparison failed."), self.onCompare))
        # Background steps: while their job runs, the button that started it reads "Cancel".
        self.ui.registerButton.connect("clicked(bool)", lambda: self._startOrCancel(self.ui.registerButton, self.onRegister))
        self.ui.trainButton.connect("clicked(bool)", lambda: self._startOrCancel(self.ui.trainButton, self.onTrain))
        self.ui.resumeButton.connect("clicked(bool)", lambda: self._startOrCancel(self.ui.resumeButton, self.onResume))
        self.ui.synthesizeButton.connect("clicked(bool)", lambda: self._startOrCancel(self.ui.synthesizeButton, self.onSynthesize))
        self.ui.atlasButton.connect("clicked(bool)", lambda: self._startOrCancel(self.ui.atlasButton, self.onAtlas))
        self._listShippedModels()
        self.ui.shippedModelComboBox.connect("currentIndexChanged(int)", self.onShippedModelChosen)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._job is not None:
            self._job.cancel()
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.ctVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.ctVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[MicroCTSynthParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    # -- enabling: every button waits for its inputs -------------------------------------------
    def _checkCanApply(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        busy = self._job is not None
        ct, micro = p.ctVolume, p.microCTVolume
        dataset = _path(p.datasetDir)
        model = _path(p.modelPath)
        hasDataset = dataset is not None and (dataset / "cases.json").is_file()
        self.ui.placeRoiButton.enabled = bool(ct)
        self.ui.tissueMapButton.enabled = bool(micro) and not busy
        self.ui.addCaseButton.enabled = bool(ct and micro and dataset and p.caseName.strip()
                                             and (p.registrationTransform or ct.GetParentTransformNode())) and not busy
        self.ui.compareButton.enabled = bool(p.referenceSegmentation and (p.compareCGAN or p.compareAtlas)) and not busy
        canRun = {
            self.ui.registerButton: bool(ct and micro and ct != micro),
            self.ui.trainButton: hasDataset and bool(p.group.strip()),
            self.ui.resumeButton: hasDataset and bool(p.group.strip()),
            # A whole CT at micro-CT resolution fits nowhere: a region or the micro-CT grid is needed.
            self.ui.synthesizeButton: bool(ct and model and model.is_file() and (micro if p.synthesizeOnMicroCTGrid else p.roi)),
            self.ui.atlasButton: bool(ct) and hasDataset and bool(p.group.strip()),
        }
        for button, ready in canRun.items():
            if button is self._jobButton:
                button.enabled = True  # it is the Cancel button now
            else:
                button.enabled = ready and not busy
        self.ui.overlapSliderWidget.enabled = not p.useModelOverlap
        self.ui.registerButton.toolTip = (_("Register the CT (moving) onto the micro-CT (fixed) by mutual information.")
                                          if ct and micro else _("Select a CT and a micro-CT first."))

    # -- errors and dependencies ---------------------------------------------------------------
    @contextlib.contextmanager
    def _showingErrors(self, message: str):
        """Run one step of the panel. An error is shown once, by Slicer's ``tryWithErrorDisplay``
        (the message and the error's own sentence), and ends here, so that the lines after the
        step (status line, buttons) still run and the panel stays usable."""
        try:
            with slicer.util.tryWithErrorDisplay(message, waitCursor=True):
                yield
        except Exception as exc:
            # tryWithErrorDisplay has shown it (in testing mode it shows nothing: log it there).
            log = logging.error if slicer.app.testingEnabled() else logging.debug
            log("%s %s", message, exc, exc_info=True)
            self.ui.statusLabel.text = f"{message} {exc}"
        finally:
            self._checkCanApply()

    def _ready(self, step: str) -> bool:
        """The packages ``step`` needs (never at import): asked for once and installed, or the
        step does not start (``False`` when the user declines; an install that fails raises)."""

        def ask(missing) -> bool:
            return slicer.util.confirmOkCancelDisplay(
                _("This step needs these Python packages, which will now be installed (this can take several minutes):")
                + "\n\n" + "\n".join(missing),
                _("Install Python packages"),
            )

        return self.logic.ensurePackages(step, ask=ask)

    def _runHere(self, step: str, failure: str, work) -> None:
        """A quick step in Slicer's process: its packages made sure of first (:meth:`_ready`), an
        error shown once (``failure`` and the error's sentence), ``work()``'s sentence on the status line."""
        with self._showingErrors(failure):
            if self._ready(step):
                self.ui.statusLabel.text = work()

    # -- 1. inputs ----------------------------------------------------------------------------
    def onPlaceRoi(self) -> None:
        with self._showingErrors(_("Could not place the region of interest.")):
            self._parameterNode.roi = default_roi_node(self._parameterNode.ctVolume, scene=slicer.mrmlScene)

    # -- 2. registration ----------------------------------------------------------------------
    def onRegister(self):
        if not self._ready("register"):
            return None
        p = self._parameterNode
        landmarks = bool(p.landmarksMicroCT and p.landmarksCT and p.landmarksMicroCT.GetNumberOfControlPoints() > 0)
        job = self.logic.register(
            p.ctVolume, p.microCTVolume, initialTransform=p.initialTransform,
            landmarksFixed=p.landmarksMicroCT if landmarks else None,
            landmarksMoving=p.landmarksCT if landmarks else None, affine=p.affine, wait=False)

        def done(nodes):
            p.registrationTransform, p.registeredCT = nodes
            slicer.util.setSliceViewerLayers(background=p.microCTVolume, foreground=p.ctVolume, foregroundOpacity=0.5, fit=True)
            return _("Registered: the CT is shown on the micro-CT (50 % overlay).")

        return job, done

    # -- 3. tissue map ------------------------------------------------------------------------
    def onTissueMap(self) -> str:
        p = self._parameterNode
        segmentation = self.logic.tissueMap(p.microCTVolume)
        p.tissueSegmentation = segmentation
        if not p.referenceSegmentation:
            p.referenceSegmentation = segmentation
        slicer.util.setSliceViewerLayers(background=p.microCTVolume, fit=True)
        return _("Tissue map: {name}").format(name=segmentation.GetName())

    # -- 4. training ---------------------------------------------------------------------------
    def onAddCase(self) -> str:
        p = self._parameterNode
        folder = self.logic.addCase(_path(p.datasetDir), p.caseName.strip(), p.ctVolume, p.microCTVolume,
                                    p.registrationTransform, p.tissueSegmentation, group=p.group.strip(), split=p.caseSplit)
        return _("Added case {name} ({split} of group {group}) in {folder}.").format(
            name=p.caseName, split=p.caseSplit, group=p.group, folder=folder)

    def onTrain(self, resume: bool = False):
        if not self._ready("train"):
            return None
        p = self._parameterNode
        job = self.logic.train(_path(p.datasetDir), group=p.group.strip(), model=p.model, preset=p.preset,
                               outDir=_path(p.runDir), resume=resume, device=p.device, wait=False)
        slicer.modules.plots.logic().ShowChartInLayout(self.logic.lossChart.chart_node)

        def done(modelPath):
            p.modelPath = pathlib.Path(modelPath)
            return _("Trained: {path}").format(path=modelPath)

        return job, done

    def onResume(self):
        return self.onTrain(resume=True)

    # -- 5. synthesis -------------------------------------------------------------------------
    def _listShippedModels(self) -> None:
        """The shipped models after "Choose a file...", each with its card's one-line summary."""
        self._shippedModels = self.logic.shippedModels()
        combo = self.ui.shippedModelComboBox
        for model in self._shippedModels:
            combo.addItem(f"{model['name']}: {model['summary']}")
            combo.setItemData(combo.count - 1, model["tooltip"], qt.Qt.ToolTipRole)

    def onShippedModelChosen(self, index: int) -> None:
        if index <= 0 or self._parameterNode is None:
            return
        self._parameterNode.modelPath = pathlib.Path(self._shippedModels[index - 1]["path"])

    def onSynthesize(self):
        p = self._parameterNode
        if not self._ready("synthesizeOpenVINO" if p.backend == "openvino" else "synthesize"):
            return None
        onGrid = p.synthesizeOnMicroCTGrid and p.microCTVolume
        job = self.logic.synthesize(p.ctVolume, _path(p.modelPath), roiNode=None if onGrid else p.roi,
                                    referenceNode=p.microCTVolume if onGrid else None, samples=p.samples,
                                    overlap=None if p.useModelOverlap else p.overlap, device=p.device,
                                    backend=p.backend, wait=False)

        def done(nodes):
            p.syntheticMicroCT = nodes.microct
            p.syntheticTissue = nodes.tissue
            p.uncertainty = nodes.uncertainty
            p.compareCGAN = nodes.tissue
            if nodes.microct is not None:  # the direct segmenter makes a tissue map only
                self.showSideBySide(p.ctVolume, nodes.microct, p.microCTVolume)

        return job, done

    def showSideBySide(self, ctNode, syntheticNode, microCTNode=None) -> None:
        """CT, synthetic micro-CT and micro-CT in three linked axial views; segmentations overlaid."""
        layoutManager = slicer.app.layoutManager()
        layoutNode = layoutManager.layoutLogic().GetLayoutNode()
        if not layoutNode.IsLayoutDescription(SIDE_BY_SIDE_LAYOUT_ID):
            layoutNode.AddLayoutDescription(SIDE_BY_SIDE_LAYOUT_ID, SIDE_BY_SIDE_LAYOUT)
        layoutManager.setLayout(SIDE_BY_SIDE_LAYOUT_ID)
        for view, volume in zip(("Red", "Yellow", "Green"), (ctNode, syntheticNode, microCTNode or syntheticNode)):
            widget = layoutManager.sliceWidget(view)
            widget.mrmlSliceNode().SetOrientation("Axial")
            composite = widget.mrmlSliceCompositeNode()
            composite.SetBackgroundVolumeID(volume.GetID() if volume else None)
            composite.SetForegroundVolumeID(None)
        # Frame every view on the synthesized region (a few mm), not on the whole CT.
        layoutManager.sliceWidget("Yellow").fitSliceToBackground()
        fieldOfView = layoutManager.sliceWidget("Yellow").mrmlSliceNode().GetFieldOfView()
        bounds = [0.0] * 6
        syntheticNode.GetRASBounds(bounds)
        center = [(bounds[2 * i] + bounds[2 * i + 1]) / 2.0 for i in range(3)]
        for view in ("Red", "Yellow", "Green"):
            sliceNode = layoutManager.sliceWidget(view).mrmlSliceNode()
            sliceNode.SetFieldOfView(*fieldOfView)
            sliceNode.JumpSliceByCentering(*center)
            layoutManager.sliceWidget(view).mrmlSliceCompositeNode().SetLinkedControl(True)

    # -- 6. atlas -----------------------------------------------------------------------------
    def onAtlas(self):
        if not self._ready("atlas"):
            return None
        p = self._parameterNode
        job = self.logic.atlasSegment(p.ctVolume, _path(p.datasetDir), group=p.group.strip(),
                                      referenceNode=p.microCTVolume or p.syntheticMicroCT, wait=False)

        def done(segmentation):
            p.atlasTissue = segmentation
            p.compareAtlas = segmentation

        return job, done

    # -- 7. compare ---------------------------------------------------------------------------
    def onCompare(self) -> str:
        p = self._parameterNode
        segmentations = {}
        if p.compareCGAN:
            segmentations["cGAN"] = p.compareCGAN
        if p.compareAtlas:
            segmentations["Atlas"] = p.compareAtlas
        table = self.logic.compare(p.referenceSegmentation, segmentations, referenceVolumeNode=p.microCTVolume)
        p.comparisonTable = table
        self.showTable(table)
        return _("Compared: {name}").format(name=table.GetName())

    @staticmethod
    def showTable(table) -> None:
        slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
        selection = slicer.app.applicationLogic().GetSelectionNode()
        selection.SetActiveTableID(table.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()

    # -- background jobs ----------------------------------------------------------------------
    def _startOrCancel(self, button, start) -> None:
        """Start the job of ``button`` (``start()`` -> ``(job, done)`` or ``None``), or cancel it.

        While the job runs the button reads "Cancel"; ``done(result)`` loads the result when
        the job has finished and may return the status line.
        """
        if self._job is not None:
            if button is self._jobButton:
                self._job.cancel()
                self.ui.statusLabel.text = _("Cancelling...")
            return
        started = None
        with self._showingErrors(_("The job could not start.")):
            started = start()
        if not started:
            return
        self._job, self._jobDone = started
        self._jobButton, self._jobButtonText = button, button.text
        button.text = _("Cancel")
        self.ui.progressBar.setRange(0, 0)  # busy until the first progress event gives a total
        self.ui.progressBar.show()
        self.ui.statusLabel.text = _("Starting...")
        self._timer.start()
        self._checkCanApply()

    def _onTimer(self) -> None:
        job = self._job
        if job is None:
            self._timer.stop()
            return
        try:
            running = job.poll()
        except Exception as exc:  # e.g. the job's on_finish failed: the job fails with that error
            logging.exception("MicroCTSynth job")
            job.fail(_("The job failed: {error}").format(error=exc))
            running = False
        progress = job.progress or {}
        if progress.get("total"):
            self.ui.progressBar.setRange(0, int(progress["total"]))
            self.ui.progressBar.setValue(int(progress.get("step", 0)))
        self.ui.statusLabel.text = job_summary(job)
        if running:
            return
        self._timer.stop()
        done, button = self._jobDone, self._jobButton
        self._job, self._jobDone, self._jobButton = None, None, None
        button.text = self._jobButtonText
        self.ui.progressBar.hide()
        if job.state == JobState.DONE:
            self.ui.statusLabel.text = _("Done in {seconds:.0f} s.").format(seconds=job.elapsed)
            with self._showingErrors(_("The results could not be shown.")):
                status = done(job.result)
                if status:
                    self.ui.statusLabel.text = status
            if job.warnings:  # doubtful inputs the job still ran on: beside "Done", not in a dialog
                self.ui.statusLabel.text = " ".join([self.ui.statusLabel.text, *job.warnings])
        elif job.state == JobState.CANCELLED:
            self.ui.statusLabel.text = _("Cancelled; the scene is as it was.")
        else:
            self.ui.statusLabel.text = job.error or _("The job failed.")
            slicer.util.errorDisplay(job.error or _("The job failed."), detailedText="\n".join(job.stderr))
        self._checkCanApply()


#
# MicroCTSynthLogic
#


def pythonSlicerExecutable() -> str:
    """The interpreter for background jobs: PythonSlicer, which sees Slicer's Python packages."""
    found = shutil.which("PythonSlicer")
    if found:
        return found
    home = getattr(slicer.app, "slicerHome", "") if hasattr(slicer, "app") else ""
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        candidate = os.path.join(home, "bin", name)
        if os.path.isfile(candidate):
            return candidate
    return sys.executable


class MicroCTSynthLogic(ScriptedLoadableModuleLogic, MicroCTSynthSceneLogic):
    """The module's logic: :class:`MicroCTSynthSceneLogic` on ``slicer.mrmlScene`` plus the Slicer base.

    Console use (each step returns nodes; background steps take ``wait=True``)::

        logic = slicer.util.getModuleLogic("MicroCTSynth")
        transform, registered = logic.register(ctNode, microCTNode)
        tissue = logic.tissueMap(microCTNode)
        ...
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        workDir = pathlib.Path(slicer.app.temporaryPath) / "MicroCTSynth" if hasattr(slicer, "app") else None
        MicroCTSynthSceneLogic.__init__(self, slicer.mrmlScene, python=pythonSlicerExecutable(), workDir=workDir)

    def getParameterNode(self):
        return MicroCTSynthParameterNode(super().getParameterNode())

    @staticmethod
    def missingPackages(step: Optional[str] = None) -> list:
        """The packages ``step`` needs (default: all the engine's) that are not installed.

        Looked for by import name without importing anything, so that a package Slicer bundles
        (SimpleITK, numpy) is found whether or not it has pip's metadata.
        """
        if step is not None and step not in STEP_PACKAGES:
            raise MicroCTSynthError(f"Unknown step '{step}'; one of {', '.join(STEP_PACKAGES)}.")
        importlib.invalidate_caches()  # see what an install a moment ago added
        names = STEP_PACKAGES[step] if step is not None else tuple(REQUIRED_PACKAGES)
        modules = {**REQUIRED_PACKAGES, **OPTIONAL_PACKAGES}
        return [name for name in names if importlib.util.find_spec(modules[name]) is None]

    @staticmethod
    def installPackages(packages) -> None:
        """Install ``packages``: torch through the PyTorch extension when it is there, the rest by pip."""
        packages = list(packages)
        if "torch" in packages:
            packages.remove("torch")
            try:
                import PyTorchUtils  # the PyTorch extension: picks the build matching the GPU and driver
            except ImportError:
                PyTorchUtils = None
            if PyTorchUtils is not None:
                torchLogic = PyTorchUtils.PyTorchUtilsLogic()
                if torchLogic.installTorch(askConfirmation=False) is None:
                    raise MicroCTSynthError("PyTorch could not be installed; install it from the PyTorch extension's module.")
            else:
                slicer.util.pip_install("torch")
        if packages:
            slicer.util.pip_install(packages)

    def ensurePackages(self, step: Optional[str] = None, ask=None) -> bool:
        """Make sure the packages of ``step`` are there, installing what is missing.

        ``ask(missing) -> bool`` is asked first (the panel's confirmation); ``False`` when it
        declines. Raises :class:`MicroCTSynthError` naming what is still missing after the install.
        """
        missing = self.missingPackages(step)
        if not missing:
            return True
        if ask is not None and not ask(missing):
            return False
        try:
            self.installPackages(missing)
        except MicroCTSynthError:
            raise
        except Exception as exc:
            raise MicroCTSynthError(f"Installing {', '.join(missing)} failed: {exc}") from None
        still = self.missingPackages(step)
        if still:
            raise MicroCTSynthError(
                f"These Python packages are missing and could not be installed: {', '.join(still)}. Install them "
                f"in the Python console with slicer.util.pip_install({still!r}) and try again.")
        return True


#
# MicroCTSynthTest
#


class MicroCTSynthTest(ScriptedLoadableModuleTest):
    """The self-test: the scenario of ``MicroCTSynthTesting.scenario`` (also run by pytest on slicer-core).

    On a fresh Slicer it first installs the packages the scenario needs, as the panel would
    (torch through the PyTorch extension when it is there), or stops with one sentence naming
    what is missing.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_MicroCTSynth_scenario()

    def test_MicroCTSynth_scenario(self):
        logic = MicroCTSynthLogic()
        logic.device = "cpu"
        missing = logic.missingPackages("selfTest")
        if missing:
            self.delayDisplay("The self-test needs these Python packages: " + ", ".join(missing))

        def ask(missing) -> bool:  # as the panel asks; in testing mode Slicer answers OK itself
            return slicer.util.confirmOkCancelDisplay(
                _("The self-test needs these Python packages, which will now be installed (this can take several minutes):")
                + "\n\n" + "\n".join(missing), _("Install Python packages"))

        if not logic.ensurePackages("selfTest", ask=ask):
            raise MicroCTSynthError(f"The self-test needs these Python packages: {', '.join(missing)}; "
                                    "accept their installation or install them, then run it again.")

        from MicroCTSynthTesting.scenario import run_scenario

        self.delayDisplay("Tiny phantom case: register, tissue map, train one epoch, synthesize, compare")
        with tempfile.TemporaryDirectory(prefix="MicroCTSynthTest-") as folder:
            figures = run_scenario(logic, folder, log=self.delayDisplay)
        for method, dice in figures["dice"].items():
            for tissue, value in dice.items():
                self.assertTrue(value != value or 0.0 <= value <= 1.0, f"{method} {tissue} Dice {value}")
        self.delayDisplay("Test passed")
