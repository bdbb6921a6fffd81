"""The MRML bridge: MRML nodes (RAS) <-> engine volumes, transforms and tables (LPS).

This is the only file of the engine that imports ``slicer``, and it uses MRML alone: no Qt,
no ``slicer.app``, no ``slicer.util`` helpers that reach for the application. So it runs in
3D Slicer and, unchanged, on the Qt-free ``slicer-core`` package (where the tests run it).
Every function takes an explicit ``scene``; it defaults to ``slicer.mrmlScene`` when that
exists (inside the application).

Geometry: MRML places voxels with the node's IJK-to-RAS matrix; the engine with SimpleITK's
origin, spacing and direction in LPS. The two differ by a flip of the x and y axes of physical
space, ``F = diag(-1, -1, 1)``, applied to the origin and to each direction column. Nothing else
converts between the two, so a volume written by the engine and loaded in Slicer lands exactly
where its input was.

Tissue labels travel as a segmentation node with the segments "Air", "Soft tissue", "Bone" in
the fixed colours of :mod:`labels`, and come back by segment name, not by label value, so a
segmentation edited or built by hand in Slicer maps to the right class.

:class:`MicroCTSynthSceneLogic` is the typed console logic (register, tissue map, train,
synthesize, atlas, compare), each step returning nodes; the Slicer module's logic adds only
the Slicer base class to it. Long steps run ``python -m MicroCTSynthLib ... --progress json`` in
a background :class:`~MicroCTSynthLib.process.Job`; their results are loaded into the scene
only when they succeed, so a failed or cancelled job leaves the scene as it was.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from .choices import check_backend, check_model_kind
from .errors import MicroCTSynthError
from .labels import PRIORITY, TISSUE_COLORS, TISSUE_NAMES
from .process import Job, JobState, engine_command
from .volume import Volume, check_geometry, read_volume, write_volume

#: Marks the transform nodes :meth:`MicroCTSynthSceneLogic.register` made (and may refine).
REGISTRATION_ATTRIBUTE = "MicroCTSynth.Registration"

#: LPS <-> RAS: flip the x and y axes of physical space (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def default_scene(scene=None):
    """``scene`` or, inside the Slicer application, ``slicer.mrmlScene``."""
    if scene is not None:
        return scene
    scene = getattr(slicer, "mrmlScene", None)
    if scene is None:
        raise MicroCTSynthError("No MRML scene was given and none is open (pass scene=...).")
    return scene


# -- matrices -------------------------------------------------------------------------------------
def array_from_vtk_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(i, j) for j in range(4)] for i in range(4)])


def vtk_matrix_from_array(array) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    array = np.asarray(array, dtype=float)
    for i in range(4):
        for j in range(4):
            matrix.SetElement(i, j, float(array[i, j]))
    return matrix


def ijk_to_ras(volume: Volume) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix MRML uses for ``volume`` (whose geometry is LPS)."""
    m = np.eye(4)
    m[:3, :3] = LPS_TO_RAS @ volume.direction_matrix @ np.diag(volume.spacing)
    m[:3, 3] = LPS_TO_RAS @ np.asarray(volume.origin)
    return m


def geometry_from_ijk_to_ras(matrix, what: str = "The volume node") -> tuple[tuple, tuple, tuple]:
    """(spacing, origin, direction) in LPS of a 4x4 IJK-to-RAS matrix."""
    matrix = np.asarray(matrix, dtype=float)
    columns = LPS_TO_RAS @ matrix[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing <= 0):
        raise MicroCTSynthError(f"{what} has a zero voxel spacing; it cannot be placed in space.")
    direction = columns / spacing
    check_geometry(spacing, direction, what)
    origin = LPS_TO_RAS @ matrix[:3, 3]
    return tuple(spacing), tuple(origin), tuple(direction.ravel())


def ras_to_lps_matrix(matrix) -> np.ndarray:
    """A 4x4 point transform in RAS expressed in LPS (and back: the flip is its own inverse)."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ np.asarray(matrix, dtype=float) @ flip


# -- volumes --------------------------------------------------------------------------------------
def _parent_to_world(node) -> np.ndarray | None:
    """4x4 of the node's linear parent transforms, ``None`` when it has none."""
    transform = node.GetParentTransformNode()
    if transform is None:
        return None
    if not transform.IsTransformToWorldLinear():
        raise MicroCTSynthError(
            f"'{node.GetName()}' is under a non-linear transform; harden it (Transforms module) first."
        )
    m = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(m)
    return array_from_vtk_matrix(m)


def node_ijk_to_ras(node, world: bool = True) -> np.ndarray:
    """The node's IJK-to-RAS matrix, with its linear parent transforms when ``world``."""
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    matrix = array_from_vtk_matrix(m)
    if world:
        parent = _parent_to_world(node)
        if parent is not None:
            matrix = parent @ matrix
    return matrix


def volume_from_node(node, world: bool = True) -> Volume:
    """The voxels and LPS geometry of a scalar volume node as a :class:`Volume`.

    ``world``: place the volume where it is shown, i.e. with the linear transforms the node is
    under (a rigid transform changes only the origin and direction; a transform that scales or
    shears is refused with a sentence, since no grid can express it). ``world=False`` gives the
    node's own geometry, ignoring its transforms.
    """
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
        raise MicroCTSynthError("Select a scalar volume (a CT or micro-CT) first.")
    image = node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise MicroCTSynthError(f"The volume '{node.GetName()}' holds no voxels.")
    scalars = image.GetPointData().GetScalars()
    if scalars.GetNumberOfComponents() != 1:
        raise MicroCTSynthError(
            f"The volume '{node.GetName()}' has {scalars.GetNumberOfComponents()} components per voxel; "
            "a single-component grey-level volume is needed."
        )
    nx, ny, nz = image.GetDimensions()
    array = numpy_support.vtk_to_numpy(scalars).reshape(nz, ny, nx).copy()
    spacing, origin, direction = geometry_from_ijk_to_ras(node_ijk_to_ras(node, world), f"The volume '{node.GetName()}'")
    return Volume(array, spacing, origin, direction)


def _image_data(array: np.ndarray) -> vtk.vtkImageData:
    array = np.ascontiguousarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    scalars = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    return image


def update_node_from_volume(node, volume: Volume):
    """Replace the voxels and geometry of ``node`` with ``volume``; returns ``node``."""
    node.SetAndObserveImageData(_image_data(volume.array))
    node.SetIJKToRASMatrix(vtk_matrix_from_array(ijk_to_ras(volume)))
    display = node.GetDisplayNode()
    if display is not None and hasattr(display, "AutoWindowLevelOn"):
        display.AutoWindowLevelOn()
    node.Modified()
    return node


def node_from_volume(volume: Volume, name: str, scene=None, class_name: str = "vtkMRMLScalarVolumeNode"):
    """A new scalar volume node (or ``class_name``) in ``scene`` holding ``volume`` where it lies."""
    scene = default_scene(scene)
    node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name))
    node.CreateDefaultDisplayNodes()
    return update_node_from_volume(node, volume)


def load_volume_file(path, name: str | None = None, scene=None):
    """Load a volume file with Slicer's own reader (its LPS->RAS handling) as a scalar volume node."""
    scene = default_scene(scene)
    path = Path(path)
    if not path.exists():
        raise MicroCTSynthError(f"The volume file '{path}' does not exist.")
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name or path.name.split(".")[0]))
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise MicroCTSynthError(f"Slicer could not read the volume file '{path}'.")
    node.CreateDefaultDisplayNodes()
    return node


# -- segmentations --------------------------------------------------------------------------------
def _oriented_image(mask: np.ndarray, volume: Volume):
    image = slicer.vtkOrientedImageData()
    image.ShallowCopy(_image_data(mask.astype(np.uint8)))
    image.SetImageToWorldMatrix(vtk_matrix_from_array(ijk_to_ras(volume)))
    return image


def segmentation_from_labels(labels: Volume, name: str = "Tissue map", scene=None, node=None):
    """A segmentation node with the segments "Air", "Soft tissue", "Bone" from a label volume.

    Labels 1 / 2 / 3 become the three named segments, each in its fixed colour, even when a
    class is absent (an empty segment) so that every tissue segmentation looks the same. The
    segmentation's reference geometry is the label volume's grid. ``node``: fill this
    segmentation node instead of a new one (its segments are replaced).
    """
    scene = default_scene(scene)
    array = np.asarray(labels.array)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(name))
        node.CreateDefaultDisplayNodes()
    segmentation = node.GetSegmentation()
    segmentation.RemoveAllSegments()
    geometry = _oriented_image(np.zeros((1, 1, 1), np.uint8), labels)
    geometry.SetExtent(0, array.shape[2] - 1, 0, array.shape[1] - 1, 0, array.shape[0] - 1)
    converter = slicer.vtkSegmentationConverter
    segmentation.SetConversionParameter(converter.GetReferenceImageGeometryParameterName(),
                                        converter.SerializeImageGeometry(geometry))
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    for value, segment_name in TISSUE_NAMES.items():
        segment_id = segmentation.AddEmptySegment(segment_name, segment_name, list(TISSUE_COLORS[value]))
        mask = array == value
        if mask.any():
            logic.SetBinaryLabelmapToSegment(_oriented_image(mask, labels), node, segment_id,
                                             logic.MODE_REPLACE, None, False)
    display = node.GetDisplayNode()
    if display is not None:
        for segment_name in TISSUE_NAMES.values():
            display.SetSegmentVisibility(segment_name, True)
    node.Modified()
    return node


def segment_id_by_name(node, segment_name: str) -> str | None:
    """The id of the segment called ``segment_name`` (case-insensitive), ``None`` if absent."""
    segmentation = node.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(i)
        if segmentation.GetSegment(segment_id).GetName().strip().lower() == segment_name.lower():
            return segment_id
    return None


def labels_from_segmentation(node, reference_volume_node) -> Volume:
    """The tissue labels (1 air, 2 soft tissue, 3 bone) of a segmentation on a volume's grid.

    Segments are found by NAME ("Air", "Soft tissue", "Bone"), whatever their order or label
    values; where two overlap, the thesis' priority (soft tissue > air > bone) decides.
    """
    if node is None or not node.IsA("vtkMRMLSegmentationNode"):
        raise MicroCTSynthError("Select a segmentation with the segments Air, Soft tissue and Bone.")
    if reference_volume_node is None:
        raise MicroCTSynthError("A reference volume is needed to give the segmentation a grid.")
    scene = node.GetScene()
    found = {value: segment_id_by_name(node, n) for value, n in TISSUE_NAMES.items()}
    if not any(found.values()):
        raise MicroCTSynthError(
            f"The segmentation '{node.GetName()}' has no segment named Air, Soft tissue or Bone."
        )
    reference = volume_from_node(reference_volume_node, world=False)
    out = np.zeros(reference.shape, dtype=np.uint8)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__MicroCTSynth_export__")
    try:
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        # Lowest priority first, so that the classes the thesis prefers are written last.
        for value in reversed(PRIORITY):
            segment_id = found[value]
            if segment_id is None:
                continue
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(segment_id)
            if not logic.ExportSegmentsToLabelmapNode(node, ids, labelmap, reference_volume_node):
                raise MicroCTSynthError(f"The segment '{TISSUE_NAMES[value]}' could not be exported onto the reference grid.")
            mask = volume_from_node(labelmap, world=False).array
            if mask.shape != out.shape:
                raise MicroCTSynthError("The exported segment does not match the reference grid.")
            out[mask > 0] = value
    finally:
        display = labelmap.GetDisplayNode()
        scene.RemoveNode(labelmap)
        if display is not None:
            scene.RemoveNode(display)
    return reference.with_array(out)


def segment_names(node) -> list[str]:
    segmentation = node.GetSegmentation()
    return [segmentation.GetSegment(segmentation.GetNthSegmentID(i)).GetName()
            for i in range(segmentation.GetNumberOfSegments())]


# -- transforms -----------------------------------------------------------------------------------
def matrix_from_sitk_transform(transform: sitk.Transform) -> np.ndarray:
    """The 4x4 LPS matrix of a linear SimpleITK transform (composite of linear ones included).

    Sampled at the origin and the unit points, then checked on random points: a transform that
    is not linear (B-spline, displacement field) is refused rather than approximated.
    """
    basis = np.vstack([np.zeros(3), np.eye(3)])
    mapped = np.array([transform.TransformPoint(tuple(p)) for p in basis])
    matrix = np.eye(4)
    matrix[:3, 3] = mapped[0]
    matrix[:3, :3] = (mapped[1:] - mapped[0]).T
    probe = np.random.default_rng(0).uniform(-100, 100, size=(5, 3))
    expected = probe @ matrix[:3, :3].T + matrix[:3, 3]
    actual = np.array([transform.TransformPoint(tuple(p)) for p in probe])
    if not np.allclose(actual, expected, atol=1e-4):
        raise MicroCTSynthError("The transform is not linear; only rigid and affine transforms can become a linear transform node.")
    return matrix


def sitk_transform_from_matrix(matrix) -> sitk.AffineTransform:
    matrix = np.asarray(matrix, dtype=float)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(matrix[:3, :3].ravel()))
    transform.SetTranslation(tuple(matrix[:3, 3]))
    return transform


def transform_node_from_sitk(transform: sitk.Transform, name: str = "Transform", scene=None, node=None):
    """A linear transform node from an engine transform (fixed point -> moving point, LPS).

    The engine's transforms are resampling transforms; in MRML that is the node's
    "from parent" direction, so applying the node to the CT (moving) shows it on the micro-CT.
    """
    scene = default_scene(scene)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", scene.GenerateUniqueName(name))
    node.SetMatrixTransformFromParent(vtk_matrix_from_array(ras_to_lps_matrix(matrix_from_sitk_transform(transform))))
    return node


def sitk_transform_from_node(node) -> sitk.AffineTransform:
    """The engine transform (fixed point -> moving point, LPS) of a linear transform node."""
    if node is None or not node.IsLinear():
        raise MicroCTSynthError("Only a linear (rigid or affine) transform can initialise the registration.")
    m = vtk.vtkMatrix4x4()
    node.GetMatrixTransformFromParent(m)
    return sitk_transform_from_matrix(ras_to_lps_matrix(array_from_vtk_matrix(m)))


def transform_node_from_file(path, name: str | None = None, scene=None):
    """Read an engine ``.tfm`` (or any linear ITK transform file, checked as the engine checks
    it: :func:`~MicroCTSynthLib.registration.read_transform`) into a linear transform node."""
    from .registration import read_transform

    transform = read_transform(path)
    return transform_node_from_sitk(transform, name or Path(path).name.split(".")[0], scene)


def write_transform_from_node(node, path) -> Path:
    """Write a linear transform node as an engine ``.tfm`` (atomically, as the engine writes its own)."""
    from .registration import write_transform

    return write_transform(sitk_transform_from_node(node), path)


def points_lps_from_markups(node) -> np.ndarray:
    """(N, 3) LPS points of a markups point list (world coordinates)."""
    if node is None:
        return np.zeros((0, 3))
    points = []
    for i in range(node.GetNumberOfControlPoints()):
        p = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(i, p)
        points.append(LPS_TO_RAS @ np.asarray(p))
    return np.asarray(points, dtype=float).reshape(-1, 3)


def roi_from_node(node) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(centre LPS mm, size mm) of a markups ROI, as the synthesis' ``--roi`` takes it.

    The synthesis grid is axis-aligned, so a rotated ROI contributes its centre and size.
    """
    if node is None:
        raise MicroCTSynthError("Place a region of interest around the cochlea first.")
    center = [0.0, 0.0, 0.0]
    node.GetCenterWorld(center)
    size = list(node.GetSize())
    if min(size) <= 0:
        raise MicroCTSynthError("The region of interest has no volume; give it a size in every direction.")
    return tuple(LPS_TO_RAS @ np.asarray(center)), tuple(float(s) for s in size)


def default_roi_node(volume_node, size_mm: float = 6.0, name: str = "Cochlea ROI", scene=None):
    """A markups ROI of ``size_mm`` (a cube) at the centre of ``volume_node`` (move it onto the cochlea)."""
    scene = default_scene(scene or volume_node.GetScene())
    volume = volume_from_node(volume_node)
    size = float(min(size_mm, *volume.extent_mm))
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", scene.GenerateUniqueName(name))
    node.CreateDefaultDisplayNodes()
    node.SetCenter(*(LPS_TO_RAS @ volume.center))
    node.SetSize(size, size, size)
    return node


# -- tables and charts ----------------------------------------------------------------------------
def _table_columns(table_node, names_types):
    table = table_node.GetTable()
    table.Initialize()
    columns = []
    for column_name, kind in names_types:
        column = vtk.vtkStringArray() if kind == "string" else vtk.vtkDoubleArray()
        column.SetName(column_name)
        table.AddColumn(column)
        columns.append(column)
    return columns


def table_from_metrics(results: dict, name: str = "MicroCTSynth comparison", scene=None, node=None):
    """A table node with one row per (segmentation, tissue): Dice (Eq. 7) and HD95 in mm.

    ``results``: segmentation name -> the engine's ``evaluate`` dict (``"dice"`` and
    ``"hd95_mm"``, each class name -> value). A class that is empty in both maps has no
    Dice (NaN), shown as an empty cell.
    """
    scene = default_scene(scene)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    was = node.StartModify()
    seg_col, tissue_col, dice_col, hd_col = _table_columns(
        node, [("Segmentation", "string"), ("Tissue", "string"), ("Dice", "double"), ("HD95 (mm)", "double")])
    for method, result in results.items():
        for tissue in TISSUE_NAMES.values():
            seg_col.InsertNextValue(str(method))
            tissue_col.InsertNextValue(tissue)
            dice = result.get("dice", {}).get(tissue)
            hd = result.get("hd95_mm", {}).get(tissue)
            dice_col.InsertNextValue(float("nan") if dice is None else float(dice))
            hd_col.InsertNextValue(float("nan") if hd is None else float(hd))
    node.GetTable().Modified()
    node.EndModify(was)
    return node


def metrics_from_table(node) -> dict:
    """Back from :func:`table_from_metrics`: segmentation -> {"dice": {...}, "hd95_mm": {...}}."""
    table = node.GetTable()
    seg, tissue = table.GetColumnByName("Segmentation"), table.GetColumnByName("Tissue")
    dice, hd = table.GetColumnByName("Dice"), table.GetColumnByName("HD95 (mm)")
    out: dict = {}
    for row in range(table.GetNumberOfRows()):
        entry = out.setdefault(seg.GetValue(row), {"dice": {}, "hd95_mm": {}})
        entry["dice"][tissue.GetValue(row)] = dice.GetValue(row)
        entry["hd95_mm"][tissue.GetValue(row)] = hd.GetValue(row)
    return out


#: Loss terms of the training's progress events worth a curve, in the order they are plotted.
LOSS_PREFIXES = ("G_", "D_", "loss", "val")

#: Curve colours of the loss chart (matplotlib's "tab10"), fixed rather than drawn from a colour
#: table, so that the chart looks the same in Slicer and on slicer-core.
CURVE_COLORS = ((0.12, 0.47, 0.71), (1.0, 0.50, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16), (0.58, 0.40, 0.74),
                (0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.50, 0.50, 0.50), (0.74, 0.74, 0.13), (0.09, 0.75, 0.81))


class LossChart:
    """The live loss chart of a training: a table node, one plot series per loss, a chart node.

    ``append(event)`` takes a training ``progress`` event and adds its loss fields as a new row
    (one curve per loss term, x = step); curves appear as new terms arrive. A row is appended
    to the table's columns (a new term adds a column, empty for the rows before it), so each
    event costs the same however long the training has run.
    """

    def __init__(self, name: str = "MicroCTSynth training losses", scene=None):
        self.scene = default_scene(scene)
        self.name = name
        self.table_node = self.scene.AddNewNodeByClass("vtkMRMLTableNode", self.scene.GenerateUniqueName(name + " table"))
        self.chart_node = self.scene.AddNewNodeByClass("vtkMRMLPlotChartNode", self.scene.GenerateUniqueName(name))
        self.chart_node.SetTitle("Training losses")
        self.chart_node.SetXAxisTitle("step")
        self.chart_node.SetYAxisTitle("loss")
        self.terms: list[str] = []
        self.series: dict[str, object] = {}
        self._columns: dict[str, object] = {"step": self._add_column("step", 0)}

    @property
    def rows(self) -> int:
        """The number of rows (events with losses) so far."""
        return int(self._columns["step"].GetNumberOfTuples())

    @staticmethod
    def loss_fields(event: dict) -> dict:
        return {k: float(v) for k, v in event.items()
                if k.startswith(LOSS_PREFIXES) and isinstance(v, (int, float)) and not isinstance(v, bool)
                and np.isfinite(v)}

    def _add_column(self, term: str, rows: int):
        column = vtk.vtkDoubleArray()
        column.SetName(term)
        for _ in range(rows):
            column.InsertNextValue(float("nan"))
        self.table_node.GetTable().AddColumn(column)
        return column

    def append(self, event: dict) -> bool:
        """Add a row from a training progress event; ``False`` if it carries no loss."""
        losses = self.loss_fields(event)
        if not losses:
            return False
        rows = self.rows
        step = float(event.get("step", rows + 1))
        new_terms = [k for k in losses if k not in self.terms]
        for term in new_terms:
            self._columns[term] = self._add_column(term, rows)
            self.terms.append(term)
        self._columns["step"].InsertNextValue(step)
        for term in self.terms:
            self._columns[term].InsertNextValue(losses.get(term, float("nan")))
        self.table_node.GetTable().Modified()
        self.table_node.Modified()
        for term in new_terms:
            self._add_series(term)
        return True

    def _add_series(self, term: str) -> None:
        series = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", self.scene.GenerateUniqueName(term))
        series.SetAndObserveTableNodeID(self.table_node.GetID())
        series.SetXColumnName("step")
        series.SetYColumnName(term)
        series.SetPlotType(series.PlotTypeScatter)
        series.SetMarkerStyle(series.MarkerStyleNone)
        series.SetColor(*CURVE_COLORS[len(self.series) % len(CURVE_COLORS)])
        self.chart_node.AddAndObservePlotSeriesNodeID(series.GetID())
        self.series[term] = series

    def remove(self) -> None:
        """Take the chart, its curves and its table out of the scene."""
        for node in [*self.series.values(), self.chart_node, self.table_node]:
            if node is not None and node.GetScene() is not None:
                self.scene.RemoveNode(node)
        self.series = {}

    def values(self, term: str) -> list[float]:
        column = self._columns.get(term)
        if column is None:
            return [float("nan")] * self.rows
        return [column.GetValue(i) for i in range(self.rows)]


# -- the console logic ----------------------------------------------------------------------------
@dataclass
class SynthesisNodes:
    """What a synthesis puts into the scene (``microct`` None for the direct segmenter)."""

    microct: object | None
    tissue: object
    uncertainty: object | None = None


def _scalar_volume(node, what: str):
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise MicroCTSynthError(f"Select the {what} volume first.")
    return node


class MicroCTSynthSceneLogic:
    """The module's logic on a MRML scene, free of Qt: every step takes and returns nodes.

    ``scene``: the MRML scene (default ``slicer.mrmlScene``). ``python``: the interpreter for
    background jobs (the Slicer module passes PythonSlicer; default: this interpreter).
    ``workDir``: where jobs exchange files (default: a temporary folder).
    Background steps (``train``, ``synthesize``, ``atlasSegment``) return a running
    :class:`Job` whose ``result`` holds the nodes once :meth:`Job.poll` has seen it finish, or,
    with ``wait=True``, block and return the result itself (for console scripts and tests).
    """

    def __init__(self, scene=None, python: str | None = None, workDir=None, device: str = "auto"):
        self.scene = default_scene(scene)
        self.python = python or sys.executable
        self._workDir = Path(workDir) if workDir else None
        self.device = device
        self.job: Job | None = None
        self.lossChart: LossChart | None = None
        self.onJobEvent: Callable[[dict], None] | None = None

    # -- plumbing ---------------------------------------------------------------------------
    @property
    def workDir(self) -> Path:
        if self._workDir is None:
            self._workDir = Path(tempfile.mkdtemp(prefix="MicroCTSynth-"))
        self._workDir.mkdir(parents=True, exist_ok=True)
        return self._workDir

    def jobDir(self, kind: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=self.workDir))

    def _writeVolume(self, node, path: Path, world: bool = True) -> Path:
        return write_volume(volume_from_node(node, world=world), path)

    def _checkIdle(self) -> None:
        if self.job is not None and self.job.running:
            raise MicroCTSynthError("Another job is still running; wait for it or cancel it first.")

    def _startJob(self, command: str, args: list[str], onResult: Callable[[Job], object], wait: bool,
                  onEvent: Callable[[dict], None] | None = None, onFinish: Callable[[Job], None] | None = None):
        self._checkIdle()

        def on_event(event: dict) -> None:
            if event.get("event") == "log" and event.get("level") == "warning":
                logging.warning("MicroCTSynth %s: %s", command, event.get("message"))  # Slicer's log and console
            if onEvent is not None:
                onEvent(event)
            if self.onJobEvent is not None:
                self.onJobEvent(event)

        job = Job(engine_command(command, *args, python=self.python), on_event=on_event, on_result=onResult,
                  on_finish=onFinish)
        self.job = job
        job.start()
        if not wait:
            return job
        job.wait()
        if job.state != JobState.DONE:
            raise MicroCTSynthError(job.error or f"The {command} job stopped ({job.state}).")
        return job.result

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()

    # -- 2. registration --------------------------------------------------------------------
    def register(self, ctNode, microCTNode, initialTransform=None, landmarksFixed=None, landmarksMoving=None,
                 affine: bool = False, downsample: int = 1, wait: bool = True):
        """Register the CT (moving) onto the micro-CT (fixed) with Mattes mutual information.

        ``initialTransform``: a linear transform node (default: the one the CT is under, e.g.
        a manual alignment); or ``landmarksFixed`` / ``landmarksMoving``: markups point lists
        in the micro-CT and the CT (they take the place of an initial transform). The
        registration runs in the background (``microctsynth register``) like every long step.
        Result: ``(transformNode, resampledCTNode)``: the transform is applied to the CT node,
        and the resampled CT lies on the micro-CT grid. ``wait=False`` returns the running job.
        """
        self._checkIdle()
        _scalar_volume(ctNode, "CT")
        _scalar_volume(microCTNode, "micro-CT")
        if landmarksFixed is not None or landmarksMoving is not None:
            fixed_pts, moving_pts = points_lps_from_markups(landmarksFixed), points_lps_from_markups(landmarksMoving)
            if len(fixed_pts) < 3 or len(fixed_pts) != len(moving_pts):
                raise MicroCTSynthError("Landmark registration needs the same three or more points in the micro-CT and the CT.")
            initialTransform = None
        else:
            fixed_pts = moving_pts = None
            if initialTransform is None:
                initialTransform = ctNode.GetParentTransformNode()
                if initialTransform is not None and not initialTransform.IsLinear():
                    initialTransform = None
        folder = self.jobDir("register")
        out_transform, out_resampled = folder / "ct_to_microct.tfm", folder / "ct_registered.nrrd"
        args = ["--fixed", str(self._writeVolume(microCTNode, folder / "microct.nrrd", world=True)),
                "--moving", str(self._writeVolume(ctNode, folder / "ct.nrrd", world=False)),
                "--out-transform", str(out_transform), "--out-resampled", str(out_resampled)]
        if fixed_pts is not None:
            for flag, points, name in (("--landmarks-fixed", fixed_pts, "fixed"), ("--landmarks-moving", moving_pts, "moving")):
                path = folder / f"landmarks_{name}.csv"
                path.write_text("".join(",".join(f"{v:.6f}" for v in p) + "\n" for p in points))
                args += [flag, str(path)]
        elif initialTransform is not None:
            args += ["--init", str(write_transform_from_node(initialTransform, folder / "initial.tfm"))]
        if affine:
            args.append("--affine")
        if int(downsample) > 1:
            args += ["--downsample", str(int(downsample))]
        # Registering again refines the transform this method made; a user's own initial
        # transform (a manual alignment) is left as it was.
        reused = initialTransform if (initialTransform is not None and initialTransform.GetScene() is self.scene
                                      and initialTransform.GetAttribute(REGISTRATION_ATTRIBUTE)) else None
        name = f"{ctNode.GetName()} to {microCTNode.GetName()}"

        def on_result(job: Job):
            from .registration import read_transform

            # Read both outputs before touching the scene, so that a bad file adds no node.
            transform = read_transform(job.outputs.get("transform", out_transform))
            resampled = read_volume(job.outputs.get("resampled", out_resampled), "The registered CT")
            transformNode = transform_node_from_sitk(transform, name, self.scene, node=reused)
            transformNode.SetAttribute(REGISTRATION_ATTRIBUTE, "1")
            ctNode.SetAndObserveTransformNodeID(transformNode.GetID())
            resampledNode = node_from_volume(resampled, f"{ctNode.GetName()} registered", self.scene)
            return transformNode, resampledNode

        return self._startJob("register", args, on_result, wait, onFinish=lambda job: shutil.rmtree(folder, ignore_errors=True))

    # -- 3. tissue map ----------------------------------------------------------------------
    def tissueMap(self, microCTNode, closingRadiusMm: float | None = None, name: str | None = None):
        """The thesis' tissue map of a micro-CT (multi-Otsu, per-class closing, priority; Fig. 2)
        as a segmentation node with the segments Air, Soft tissue and Bone."""
        from .tissue import tissue_map

        _scalar_volume(microCTNode, "micro-CT")
        labels = tissue_map(volume_from_node(microCTNode), closing_radius_mm=closingRadiusMm)
        node = segmentation_from_labels(labels, name or f"{microCTNode.GetName()} tissue map", self.scene)
        node.SetReferenceImageGeometryParameterFromVolumeNode(microCTNode)
        return node

    # -- 4. training data -------------------------------------------------------------------
    def addCase(self, datasetDir, caseName: str, ctNode, microCTNode, transformNode=None, tissueSegmentation=None,
                group: str = "Custom", split: str = "train") -> Path:
        """Export the registered pair and its tissue map as case ``caseName`` of a dataset folder.

        Writes ``ct.nrrd`` (native grid), ``microct.nrrd``, ``ct_to_microct.tfm``,
        ``ct_registered.nrrd`` and ``tissue.nrrd`` (by segment name from the segmentation,
        or made from the micro-CT), and lists the case in ``cases.json`` under ``group``'s
        ``split`` (train / val / test). Returns the case folder.
        """
        from .dataset import Dataset
        from .registration import resample, write_transform
        from .tissue import tissue_map

        if not caseName or any(c in caseName for c in "/\\:"):
            raise MicroCTSynthError("Give the case a name without slashes or colons.")
        _scalar_volume(ctNode, "CT")
        _scalar_volume(microCTNode, "micro-CT")
        transformNode = transformNode or ctNode.GetParentTransformNode()
        if transformNode is None:
            raise MicroCTSynthError("Register the CT to the micro-CT first (the case needs its transform).")
        dataset = Dataset.open(datasetDir)
        dataset.add_case(caseName)
        dataset.assign(caseName, group, split)
        ct = volume_from_node(ctNode, world=False)
        microct = volume_from_node(microCTNode)
        transform = sitk_transform_from_node(transformNode)
        write_volume(ct, dataset.path(caseName, "ct", must_exist=False))
        write_volume(microct, dataset.path(caseName, "microct", must_exist=False))
        write_transform(transform, dataset.path(caseName, "transform", must_exist=False))
        write_volume(resample(ct, microct, transform, interpolator="linear"),
                     dataset.path(caseName, "ct_registered", must_exist=False))
        if tissueSegmentation is not None:
            labels = labels_from_segmentation(tissueSegmentation, microCTNode)
        else:
            labels = tissue_map(microct)
        write_volume(labels, dataset.path(caseName, "tissue", must_exist=False))
        dataset.save()
        return dataset.path(caseName, "ct").parent

    # -- 4. training ------------------------------------------------------------------------
    def train(self, datasetDir, group: str = "A", model: str = "single", preset: str = "quick", outDir=None,
              resume: bool = False, epochsConstant: int | None = None, epochsDecay: int | None = None,
              device: str | None = None, wait: bool = False, chart: bool = True, overwrite: bool = False):
        """Train the single-task (Eq. 5) or multitask (Eq. 6) 3D cGAN, or the direct segmenter, on
        ``group`` in the background.

        A run folder that holds a run is continued with ``resume`` or replaced with ``overwrite``
        (its checkpoints deleted); with neither the job refuses it.

        The losses stream into a plot chart node (``self.lossChart``). Result: the path of
        ``best.pt`` (the epoch with the lowest validation loss).
        """
        self._checkIdle()
        check_model_kind(model)
        outDir = Path(outDir) if outDir else Path(datasetDir) / "runs" / f"{group}_{model}"
        args = ["--data", str(datasetDir), "--group", group, "--model", model, "--preset", str(preset),
                "--out", str(outDir), "--device", device or self.device]
        if resume:
            args.append("--resume")
        elif overwrite:
            args.append("--overwrite")
        if epochsConstant is not None:
            args += ["--epochs-constant", str(int(epochsConstant))]
        if epochsDecay is not None:
            args += ["--epochs-decay", str(int(epochsDecay))]
        self.lossChart = LossChart(scene=self.scene) if chart else None
        chart_ = self.lossChart

        def on_event(event):
            if chart_ is not None and event.get("event") == "progress":
                chart_.append(event)

        def on_result(job: Job):
            best = job.outputs.get("best") or job.outputs.get("last")
            if best is None and (outDir / "best.pt").exists():
                best = outDir / "best.pt"
            if best is None:
                raise MicroCTSynthError("The training ended without writing a model.")
            return Path(best)

        def on_finish(job: Job):
            # A failed or cancelled job leaves the scene as it was: its chart goes too.
            if job.state != JobState.DONE and chart_ is not None:
                chart_.remove()
                if self.lossChart is chart_:
                    self.lossChart = None

        return self._startJob("train", args, on_result, wait, on_event, on_finish)

    # -- 5. synthesis -----------------------------------------------------------------------
    def synthesize(self, ctNode, modelPath, roiNode=None, referenceNode=None, samples: int = 1,
                   overlap: float | None = None, device: str | None = None, wait: bool = False, name: str | None = None,
                   backend: str = "auto"):
        """Synthetic micro-CT and tissue map of a CT with a trained model (in the background).

        The output grid: the ROI (axis-aligned, at the model's voxel size), or the grid of
        ``referenceNode`` (e.g. the micro-CT, for evaluation), or the CT's field of view. The
        CT is taken where it is shown (with its registration transform). ``samples`` > 1 also
        gives the voxel-wise standard deviation (an uncertainty volume). ``overlap``: of the windows, a
        fraction (default: the model's preset's ``synthesis_overlap``). ``backend``: how the windows
        run on a CPU, ``auto``, ``torch`` or ``openvino`` (see :mod:`MicroCTSynthLib.inference`).
        Result: :class:`SynthesisNodes`.
        """
        self._checkIdle()
        _scalar_volume(ctNode, "CT")
        if not modelPath or not Path(modelPath).is_file():
            raise MicroCTSynthError(f"The model file '{modelPath}' does not exist; train a model or choose its best.pt.")
        check_backend(backend)
        folder = self.jobDir("synthesize")
        ct_path = self._writeVolume(ctNode, folder / "ct.nrrd")
        out_microct, out_tissue = folder / "synthetic_microct.nrrd", folder / "synthetic_tissue.nrrd"
        args = ["--model", str(modelPath), "--ct", str(ct_path), "--out-microct", str(out_microct),
                "--out-tissue", str(out_tissue), "--device", device or self.device, "--backend", backend]
        if overlap is not None:
            args += ["--overlap", str(overlap)]
        if referenceNode is not None:
            args += ["--reference-grid", str(self._writeVolume(referenceNode, folder / "reference.nrrd"))]
        elif roiNode is not None:
            center, size = roi_from_node(roiNode)
            # After "=", a centre starting with a minus sign is a value, not an option.
            args += ["--roi-center=" + ",".join(f"{v:.6f}" for v in center),
                     "--roi-size=" + ",".join(f"{v:.6f}" for v in size)]
        if samples > 1:
            args += ["--samples", str(int(samples)), "--uncertainty", str(folder / "uncertainty.nrrd")]
        base = name or f"{ctNode.GetName()} synthetic micro-CT"

        def on_result(job: Job):
            # Read every output before touching the scene, so that a bad file adds no node.
            # A direct segmenter writes no micro-CT: its result has the tissue map only.
            microct = job.outputs.get("microct")
            microct = read_volume(microct, "The synthetic micro-CT") if microct else None
            tissue = read_volume(job.outputs.get("tissue", out_tissue), "The synthetic tissue map")
            uncertainty = job.outputs.get("uncertainty")
            uncertainty = read_volume(uncertainty, "The uncertainty volume") if uncertainty else None
            nodes = SynthesisNodes(
                microct=node_from_volume(microct, base, self.scene) if microct is not None else None,
                tissue=segmentation_from_labels(tissue, f"{base} tissue map", self.scene),
                uncertainty=node_from_volume(uncertainty, f"{base} uncertainty", self.scene) if uncertainty is not None else None,
            )
            if nodes.microct is not None:
                nodes.tissue.SetReferenceImageGeometryParameterFromVolumeNode(nodes.microct)
            return nodes

        return self._startJob("synthesize", args, on_result, wait, onFinish=lambda job: shutil.rmtree(folder, ignore_errors=True))

    @staticmethod
    def shippedModels() -> list[dict]:
        """The models shipped with the extension: name, its card's summary, a tooltip and the
        checkpoint's path, for the synthesis section's list (``Resources/models/``)."""
        from .package_data import shipped_checkpoint, shipped_models

        models = []
        for name, card in shipped_models().items():
            median = (card.get("held_out") or {}).get("median") or {}
            scores = " / ".join(f"{median[c]:.2f}" for c in ("Air", "Soft tissue", "Bone") if c in median)
            models.append({
                "name": name, "summary": str(card.get("summary", "")), "path": str(shipped_checkpoint(card)),
                "tooltip": (f"{card.get('summary', '')}. Trained on the project's inner-ear phantom (simulated "
                            "specimens): on a patient's CT it shows the workflow, not a clinical result."
                            + (f" Held-out phantom Dice air / soft tissue / bone: {scores}." if scores else "")),
            })
        return models

    # -- 6. atlas ---------------------------------------------------------------------------
    def atlasSegment(self, ctNode, datasetDir, group: str = "A", referenceNode=None, atlases: Iterable[str] | None = None,
                     wait: bool = True, name: str = "Atlas tissue map"):
        """The atlas baseline: the group's training CTs registered to this CT, their tissue maps
        warped and majority-voted. The output lies on ``referenceNode``'s grid (default: the CT's,
        as shown). Result: a segmentation node "Atlas tissue map"."""
        self._checkIdle()
        _scalar_volume(ctNode, "CT")
        folder = self.jobDir("atlas")
        out = folder / "atlas_tissue.nrrd"
        args = ["--ct", str(self._writeVolume(ctNode, folder / "ct.nrrd", world=False)), "--data", str(datasetDir),
                "--group", group, "--out", str(out)]
        if atlases:
            args += ["--atlases", ",".join(atlases)]
        grid = referenceNode if referenceNode is not None else ctNode
        args += ["--reference-grid", str(self._writeVolume(grid, folder / "reference.nrrd"))]
        transform = ctNode.GetParentTransformNode()
        if transform is not None and transform.IsLinear():
            # The CT is written on its own grid; its transform places it on the reference grid.
            args += ["--target-transform", str(write_transform_from_node(transform, folder / "ct_transform.tfm"))]

        def on_result(job: Job):
            labels = read_volume(job.outputs.get("tissue", out), "The atlas tissue map")
            return segmentation_from_labels(labels, name, self.scene)

        return self._startJob("atlas", args, on_result, wait, onFinish=lambda job: shutil.rmtree(folder, ignore_errors=True))

    # -- 7. compare -------------------------------------------------------------------------
    def compare(self, referenceSegmentation, segmentations, referenceVolumeNode=None, name: str = "MicroCTSynth comparison"):
        """Dice per class (Eq. 7) and HD95 of each segmentation against the reference, as a table node.

        ``segmentations``: a list of segmentation nodes (named by their node names) or a dict
        name -> node. All are compared on ``referenceVolumeNode``'s grid (default: the
        reference segmentation's own geometry), class by class, by segment name.
        """
        from .metrics import evaluate

        if isinstance(segmentations, dict):
            items = list(segmentations.items())
        else:
            if not isinstance(segmentations, (list, tuple)):
                segmentations = [segmentations]
            items = [(s.GetName(), s) for s in segmentations if s is not None]
        if referenceSegmentation is None or not items:
            raise MicroCTSynthError("Choose a reference segmentation and at least one segmentation to compare.")
        temporary = None
        if referenceVolumeNode is None:
            temporary = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__MicroCTSynth_grid__")
            logic = slicer.vtkSlicerSegmentationsModuleLogic
            if not logic.ExportAllSegmentsToLabelmapNode(referenceSegmentation, temporary, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY):
                self.scene.RemoveNode(temporary)
                raise MicroCTSynthError("The reference segmentation has no geometry; give a reference volume.")
            referenceVolumeNode = temporary
        try:
            reference = labels_from_segmentation(referenceSegmentation, referenceVolumeNode)
            results = {}
            for label, node in items:
                prediction = labels_from_segmentation(node, referenceVolumeNode)
                results[label] = evaluate(reference, prediction)
        finally:
            if temporary is not None:
                display = temporary.GetDisplayNode()
                self.scene.RemoveNode(temporary)
                if display is not None:
                    self.scene.RemoveNode(display)
        return table_from_metrics(results, name, self.scene)


def job_summary(job: Job) -> str:
    """One line on a job's state for a status label: progress, time left or its error."""
    if job is None:
        return ""
    if job.state == JobState.FAILED:
        return job.error or "The job failed."
    if job.state == JobState.CANCELLED:
        return "Cancelled."
    if job.state == JobState.DONE:
        return "Done."
    p = job.progress or {}
    parts = []
    if p.get("task"):
        parts.append(str(p["task"]))
    if p.get("total"):
        parts.append(f"{p.get('step', 0)}/{p['total']}")
    if p.get("seconds_left") is not None:
        parts.append(f"{format_seconds(p['seconds_left'])} left")
    return " · ".join(parts) or job.state.value


def format_seconds(seconds: float) -> str:
    seconds = int(round(float(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


__all__ = [
    "LPS_TO_RAS", "LossChart", "MicroCTSynthSceneLogic", "SynthesisNodes", "default_roi_node", "default_scene",
    "ijk_to_ras", "labels_from_segmentation", "load_volume_file", "metrics_from_table", "node_from_volume",
    "roi_from_node", "segmentation_from_labels", "sitk_transform_from_node", "table_from_metrics",
    "transform_node_from_file", "transform_node_from_sitk", "update_node_from_volume", "volume_from_node",
    "write_transform_from_node", "job_summary", "format_seconds",
]
