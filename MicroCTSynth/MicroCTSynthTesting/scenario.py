"""The self-test scenario: a tiny phantom case through every step of the module's logic.

Written once, run twice: by ``MicroCTSynthTest`` inside 3D Slicer (the self-test runner and
``slicer_add_python_unittest``) and by pytest on the Qt-free ``slicer-core`` package, so CI
proves the logic even where no Slicer application exists. It uses only the logic's public,
typed methods, as a console user would:

phantom pair in the scene -> register -> tissue map -> add the case to a dataset folder ->
train a tiny single-task model for one epoch (``wait=True``) -> synthesize on the micro-CT grid
-> compare the synthetic and micro-CT tissue maps with the phantom's truth in a table.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

#: Specimens of the tiny dataset: one to train on, one held out as the test specimen (no
#: validation case, so that the one-epoch training does not spend most of its time validating).
TRAIN_CASE, TEST_CASE = "S3_1", "S3_8"
GROUP = "SelfTest"


def _check(condition, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _add_specimen(logic, dataset_dir: Path, name: str, split: str, log) -> dict:
    """One phantom specimen: nodes in the scene, registered, tissue-mapped, exported."""
    from MicroCTSynthLib import mrml
    from MicroCTSynthLib.phantom import make_specimen

    start = time.monotonic()
    specimen = make_specimen(name, preset="tiny", seed=0)
    ct = mrml.node_from_volume(specimen.ct, f"{name} CT", logic.scene)
    microct = mrml.node_from_volume(specimen.microct, f"{name} micro-CT", logic.scene)
    log(f"{name}: phantom pair in the scene ({time.monotonic() - start:.1f} s)")

    start = time.monotonic()
    transform, registered = logic.register(ct, microct)
    _check(ct.GetParentTransformNode() is transform, "the registration transform is applied to the CT")
    _check(mrml.volume_from_node(registered).same_geometry(mrml.volume_from_node(microct)),
           "the resampled CT lies on the micro-CT grid")
    # Registration error at the centre of the micro-CT against the phantom's true transform.
    estimated = mrml.sitk_transform_from_node(transform)
    centre = tuple(specimen.microct.center)
    error = float(np.linalg.norm(np.subtract(estimated.TransformPoint(centre), specimen.true_transform.TransformPoint(centre))))
    _check(error < 0.15, f"{name}: registration error at the centre {error:.3f} mm is within half a CT voxel")
    log(f"{name}: registered, error at the centre {error:.3f} mm ({time.monotonic() - start:.1f} s)")

    tissue = logic.tissueMap(microct)
    _check(mrml.segment_names(tissue) == ["Air", "Soft tissue", "Bone"], "the tissue map has the three named segments")
    logic.addCase(dataset_dir, name, ct, microct, transform, tissue, group=GROUP, split=split)
    return {"specimen": specimen, "ct": ct, "microct": microct, "tissue": tissue, "registration_error_mm": error}


def run_scenario(logic, work_dir, log=print, epochs: int = 1) -> dict:
    """Run the scenario with ``logic`` (a ``MicroCTSynthSceneLogic``) in ``work_dir``; returns its figures.

    Raises ``AssertionError`` with a sentence at the first check that fails.
    """
    from MicroCTSynthLib import mrml
    from MicroCTSynthLib.dataset import Dataset

    work_dir = Path(work_dir)
    dataset_dir = work_dir / "dataset"
    figures: dict = {}
    total = time.monotonic()

    train = _add_specimen(logic, dataset_dir, TRAIN_CASE, "train", log)
    test = _add_specimen(logic, dataset_dir, TEST_CASE, "test", log)
    dataset = Dataset.load(dataset_dir)
    _check(dataset.group(GROUP) == {"train": [TRAIN_CASE], "val": [], "test": [TEST_CASE]},
           "cases.json lists the exported cases in the group")
    for role in ("ct", "microct", "transform", "ct_registered", "tissue"):
        _check(dataset.path(TRAIN_CASE, role).is_file(), f"the case folder holds its {role} file")
    figures["registration_error_mm"] = {TRAIN_CASE: train["registration_error_mm"], TEST_CASE: test["registration_error_mm"]}

    start = time.monotonic()
    model = logic.train(dataset_dir, group=GROUP, model="single", preset="tiny", outDir=work_dir / "run",
                        epochsConstant=epochs, epochsDecay=0, device="cpu", wait=True)
    figures["train_seconds"] = time.monotonic() - start
    _check(Path(model).is_file(), "the training left a model file")
    _check(logic.lossChart is not None and logic.lossChart.rows, "the loss chart received the training losses")
    _check(logic.lossChart.chart_node.GetNumberOfPlotSeriesNodes() >= 1, "the loss chart has a curve")
    log(f"trained {epochs} epoch(s) in {figures['train_seconds']:.1f} s -> {model}")

    start = time.monotonic()
    # The held-out specimen, on its micro-CT grid (where its CT is shown through its registration).
    # overlap 0 (the thesis' tiling): a fifth of the time of the default Gaussian-blended 0.5.
    synthetic = logic.synthesize(test["ct"], model, referenceNode=test["microct"], overlap=0.0, device="cpu", wait=True)
    figures["synthesis_seconds"] = time.monotonic() - start
    _check(synthetic.microct is not None and synthetic.microct.GetImageData() is not None, "the synthetic micro-CT is a volume node")
    _check(mrml.volume_from_node(synthetic.microct).same_geometry(mrml.volume_from_node(test["microct"])),
           "the synthetic micro-CT lies on the requested grid")
    _check(mrml.segment_names(synthetic.tissue) == ["Air", "Soft tissue", "Bone"],
           "the synthetic tissue segmentation has the three named segments")
    log(f"synthesized in {figures['synthesis_seconds']:.1f} s")

    # A region of interest off the centre, with dropout uncertainty: the output lies in the box.
    roi = mrml.default_roi_node(test["ct"], size_mm=1.5, scene=logic.scene)
    center_ras = np.add(roi.GetCenter(), (0.6, -0.45, 0.3))
    roi.SetCenter(*center_ras)
    boxed = logic.synthesize(test["ct"], model, roiNode=roi, samples=2, overlap=0.0, device="cpu", wait=True)
    boxed_volume = mrml.volume_from_node(boxed.microct)
    offset = float(np.abs(boxed_volume.center - mrml.LPS_TO_RAS @ center_ras).max())
    _check(offset < 0.5 * max(boxed_volume.spacing), f"the synthesized box is centred on the ROI (off by {offset:.3f} mm)")
    _check(boxed.uncertainty is not None and mrml.volume_from_node(boxed.uncertainty).same_geometry(boxed_volume),
           "two stochastic passes give an uncertainty volume on the same grid")
    figures["roi_center_offset_mm"] = offset
    log(f"ROI synthesis with uncertainty: box centred on the ROI within {offset:.4f} mm")

    truth = mrml.segmentation_from_labels(test["specimen"].labels, f"{TEST_CASE} truth", logic.scene)
    table = logic.compare(truth, {"cGAN (1 epoch)": synthetic.tissue, "micro-CT tissue map": test["tissue"]},
                          referenceVolumeNode=test["microct"])
    metrics = mrml.metrics_from_table(table)
    _check(table.GetTable().GetNumberOfRows() == 6, "the comparison table has one row per segmentation and tissue")
    for method, values in metrics.items():
        for tissue, dice in values["dice"].items():
            _check(math.isnan(dice) or 0.0 <= dice <= 1.0, f"Dice of {method} / {tissue} is in [0, 1]")
    # The micro-CT's own map is the thesis' reference: on the phantom it must match the truth well.
    for tissue, dice in metrics["micro-CT tissue map"]["dice"].items():
        _check(dice >= 0.9, f"the micro-CT tissue map's {tissue} Dice {dice:.3f} is at least 0.9")
    figures["dice"] = {method: values["dice"] for method, values in metrics.items()}
    figures["total_seconds"] = time.monotonic() - total
    log("Dice: " + "; ".join(f"{m}: " + ", ".join(f"{t} {d:.3f}" for t, d in v.items()) for m, v in figures["dice"].items()))
    return figures
