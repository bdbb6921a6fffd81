"""The atlas baseline: the thesis' "previous method" that the cGANs replace.

Each atlas is a training specimen: its clinical CT, its micro-CT tissue map and the transform
``T_a`` placing its micro-CT grid in its CT (a micro-CT point -> the CT point, SimpleITK's
resampling convention, as ``prepare`` estimates it). For a target CT:

1. register each atlas CT (moving) onto the target CT (fixed) by Mattes mutual information:
   a rigid stage (after centring and a coarse search over orientations, since specimens lie on
   the scanner bed up to ~15 deg apart about each axis), an affine stage (specimens differ in
   size by about +-10 %), then a B-spline stage on a coarse control mesh. The result ``R_a``
   maps a target CT point to the atlas CT point;
2. warp the atlas tissue map onto the target grid with nearest-neighbour interpolation, a grid
   point ``p`` taking the label at ``T_a^-1(R_a(T_t(p)))``, where ``T_t`` places the target grid
   in the target CT (the target's own CT-to-micro-CT transform when the grid is its micro-CT);
3. take the majority vote of the warped maps, ties broken soft tissue > air > bone (the tissue
   map's priority, :data:`~MicroCTSynthLib.labels.PRIORITY`). Label 0 stays where no warped atlas
   reaches.

Registration runs at the CT's resolution on the part of each CT that matters (the target grid's
footprint in the target CT, the atlas micro-CT's footprint in the atlas CT, plus a margin), so
one atlas takes seconds, not minutes, even on a whole-head CT.
"""

from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .dataset import Dataset
from .errors import MicroCTSynthError
from .labels import PRIORITY, TISSUE_LABELS
from .progress import Progress, report_result
from .volume import Volume, read_volume, write_volume

#: Histogram bins of Mattes mutual information.
HISTOGRAM_BINS = 32
#: Fraction of the fixed voxels sampled by the metric at each level (random, fixed seed): the
#: linear stages have few parameters; the B-spline stage's cost grows with its samples.
SAMPLING_FRACTION = 0.1
BSPLINE_SAMPLING_FRACTION = 0.05
#: Fixed seed: the same inputs give the same registration.
SEED = 20210401
#: Shrink factors of the rigid and affine stages, coarse to fine (at the CT's own voxel size);
#: a level is kept only where the shrunk CT still has MIN_LEVEL_VOXELS along each axis, since a
#: coarser image of a small field of view loses the structures that fix the pose.
LINEAR_SHRINKS = (4, 2, 1)
MIN_LEVEL_VOXELS = 16
#: Shrink factors of the B-spline stage.
BSPLINE_SHRINKS = (2, 1)
#: Spacing of the B-spline control mesh: coarse, so the warp follows the gross anatomy and not
#: the air-cell pattern that the atlas cannot know.
BSPLINE_GRID_MM = 5.0
#: At most this many mesh cells per axis, whatever the field of view: bounds the parameters (and
#: memory) on a large CT, where the mesh then stays coarser than BSPLINE_GRID_MM.
BSPLINE_MAX_CELLS = 6
#: Iterations per level of each stage (L-BFGS-B converges on the coarse mesh in ~20).
LINEAR_ITERATIONS = 60
BSPLINE_ITERATIONS = 20
#: Orientations tried before the rigid stage, per axis (deg): covers two specimens each up to
#: ~15 deg off on the scanner bed without relying on the optimiser to travel that far.
SEARCH_ANGLES_DEG = (-20.0, -10.0, 0.0, 10.0, 20.0)
#: The search runs on the CTs shrunk as far as this many voxels per axis allow (it only has to
#: find the right basin; the rigid stage and the full-resolution metric decide).
SEARCH_MIN_VOXELS = 12
#: Best orientations of the search that the rigid stage starts from before one is kept.
SEARCH_KEEP = 3
#: Margin (mm) kept around the target grid's footprint in the target CT and around the atlas
#: micro-CT's footprint in the atlas CT when the CTs are cropped for registration.
TARGET_MARGIN_MM = 2.0
ATLAS_MARGIN_MM = 5.0


@dataclass
class AtlasCase:
    """One atlas: a training specimen's CT, its micro-CT tissue map and ``T_a``."""

    name: str
    ct: Volume  #: clinical CT (HU), native grid
    tissue: Volume  #: tissue map on the micro-CT grid: 0 outside, 1 air, 2 soft tissue, 3 bone
    transform: sitk.Transform  #: T_a: a micro-CT point -> the CT point


# -- majority vote ------------------------------------------------------------------------
def majority_vote(label_maps: list[np.ndarray], labels=TISSUE_LABELS, priority=PRIORITY) -> np.ndarray:
    """Voxel-wise majority vote of label maps on one grid.

    Label 0 is no vote (the voxel lies outside that atlas); a voxel where every map is 0 stays
    0. A tie among the most voted labels goes to the one listed first in ``priority`` (soft
    tissue > air > bone, the order that recombines the thesis' tissue map, Fig. 2); labels not
    in ``priority`` come after those that are, in the order of ``labels``.
    """
    if len(label_maps) == 0:
        raise MicroCTSynthError("The majority vote needs at least one label map.")
    maps = [np.asarray(m) for m in label_maps]
    shape = maps[0].shape
    if any(m.shape != shape for m in maps):
        raise MicroCTSynthError(
            f"The label maps of the vote lie on different grids ({', '.join(str(m.shape) for m in maps)}); "
            "resample them onto one grid first."
        )
    labels = [int(k) for k in labels]
    if 0 in labels:
        raise MicroCTSynthError("Label 0 means outside and cannot be voted for.")
    order = [int(k) for k in priority if int(k) in labels] + [k for k in labels if k not in priority]
    dtype = np.uint8 if max(order) < 256 else np.uint16
    count_type = np.uint8 if len(maps) < 256 else np.uint32
    result = np.zeros(shape, dtype)
    best = np.zeros(shape, count_type)
    # Highest priority first, and a later label must strictly beat the count: ties keep the earlier.
    for label in order:
        count = np.zeros(shape, count_type)
        for m in maps:
            count += m == label
        wins = count > best
        result[wins] = label
        best[wins] = count[wins]
    return result


# -- geometry -----------------------------------------------------------------------------
def _corners(volume: Volume) -> np.ndarray:
    """The 8 outer corners (LPS) of ``volume``'s grid, half a voxel beyond the voxel centres."""
    lo, hi = -0.5, np.asarray(volume.size, float) - 0.5
    idx = np.array([[x, y, z] for x in (lo, hi[0]) for y in (lo, hi[1]) for z in (lo, hi[2])])
    return volume.physical_points(idx)


def _map(transform: sitk.Transform, points: np.ndarray) -> np.ndarray:
    return np.array([transform.TransformPoint(tuple(float(c) for c in p)) for p in points])


def crop_to_points(volume: Volume, points: np.ndarray, margin_mm: float) -> Volume | None:
    """The part of ``volume`` covering the bounding box of ``points`` (LPS) plus ``margin_mm``;
    None if the box misses the volume."""
    idx = volume.continuous_indices(points)
    margin = margin_mm / np.asarray(volume.spacing, float)
    lo = np.maximum(np.floor(idx.min(axis=0) - margin).astype(int), 0)
    hi = np.minimum(np.ceil(idx.max(axis=0) + margin).astype(int) + 1, np.asarray(volume.size))
    if np.any(hi - lo < 1):
        return None
    array = volume.array[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]
    origin = volume.physical_points(lo.astype(float))[0]
    return Volume(np.ascontiguousarray(array), volume.spacing, tuple(origin), volume.direction)


def _flatten(transforms) -> list[sitk.Transform]:
    out = []
    for t in transforms:
        if isinstance(t, sitk.CompositeTransform) or t.GetName() == "CompositeTransform":
            t = sitk.CompositeTransform(t)
            out += _flatten([t.GetNthTransform(i) for i in range(t.GetNumberOfTransforms())])
        else:
            out.append(t)
    return out


def _inverse(transform: sitk.Transform, what: str) -> sitk.Transform:
    try:
        return transform.GetInverse()
    except RuntimeError:
        raise MicroCTSynthError(
            f"The {what} cannot be inverted; use a rigid or affine CT-to-micro-CT transform."
        ) from None


def compose(*transforms: sitk.Transform) -> sitk.CompositeTransform:
    """``compose(A, B, C)`` maps ``p`` to ``A(B(C(p)))``.

    SimpleITK's ``CompositeTransform`` applies the transform added last first (a stack), so the
    list reads like the mathematical composition.
    """
    return sitk.CompositeTransform(_flatten(transforms))


def atlas_to_target(registration: sitk.Transform, atlas_transform: sitk.Transform,
                    target_transform: sitk.Transform | None = None) -> sitk.CompositeTransform:
    """``p -> T_a^-1(R_a(T_t(p)))``: a target grid point to the atlas micro-CT point."""
    parts = [_inverse(atlas_transform, "atlas' CT-to-micro-CT transform"), registration]
    if target_transform is not None:
        parts.append(target_transform)
    return compose(*parts)


# -- CT-to-CT registration ----------------------------------------------------------------
def _image(volume: Volume) -> sitk.Image:
    # Clipping to the CT range keeps stray values (metal, padding) from widening the histogram.
    return sitk.Clamp(sitk.Cast(volume.to_sitk(), sitk.sitkFloat32), sitk.sitkFloat32, -1024.0, 3071.0)


def _method(shrinks, fraction: float = SAMPLING_FRACTION) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(fraction, SEED)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel([int(s) for s in shrinks])
    reg.SetSmoothingSigmasPerLevel([0.5 * s if s > 1 else 0.0 for s in shrinks])  # in voxels
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return reg


def _execute(reg: sitk.ImageRegistrationMethod, fixed: sitk.Image, moving: sitk.Image) -> float:
    try:
        reg.Execute(fixed, moving)
    except RuntimeError as exc:
        text = str(exc).lower()
        if "joint pdf summed to zero" in text or "outside moving image buffer" in text or "no valid points" in text:
            raise MicroCTSynthError(
                "The atlas CT and the target CT barely overlap after initialization, so mutual information "
                "cannot be computed; check that both CTs show the same side of the same region."
            ) from None
        raise
    return reg.GetMetricValue()


def _linear_stage(transform: sitk.Transform, fixed, moving, shrinks, step_mm: float, on_level=None) -> float:
    """Multi-resolution Mattes MI of a rigid or affine ``transform``, optimised in place."""
    reg = _method(shrinks)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=step_mm, minStep=1e-3 * step_mm, numberOfIterations=LINEAR_ITERATIONS,
        relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(transform, inPlace=True)
    if on_level is not None:
        reg.AddCommand(sitk.sitkMultiResolutionIterationEvent, on_level)
    return _execute(reg, fixed, moving)


def _coarse_metric(fixed_small, moving_small, transform) -> float:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetInitialTransform(transform, inPlace=False)
    try:
        return float(reg.MetricEvaluate(fixed_small, moving_small))
    except RuntimeError:
        return float("inf")


def _shrinks(image: sitk.Image, shrinks) -> tuple[int, ...]:
    kept = tuple(s for s in shrinks if min(image.GetSize()) / s >= MIN_LEVEL_VOXELS)
    return kept or (1,)


def _rigid_candidates(fixed: sitk.Image, moving: sitk.Image) -> list[sitk.Euler3DTransform]:
    """Two centrings (the images' centres of mass above air, and their geometric centres) each
    turned through a grid of orientations; the SEARCH_KEEP best by the metric on the coarsest
    level (the specimens' poses differ by tens of degrees, more than a local optimiser travels).

    Both centrings are needed: a specimen lying in air, sawn differently from the atlas, moves
    its centre of mass away from its anatomy, while the field of view's centre stays near it.
    """
    # Moments of the attenuation above air (HU + 1024 >= 0): raw HU give air a negative mass.
    fixed_mass, moving_mass = fixed + 1024.0, moving + 1024.0
    starts = [
        sitk.Euler3DTransform(sitk.CenteredTransformInitializer(fixed_mass, moving_mass, sitk.Euler3DTransform(), mode))
        for mode in (sitk.CenteredTransformInitializerFilter.MOMENTS, sitk.CenteredTransformInitializerFilter.GEOMETRY)
    ]
    shrink = next((s for s in (4, 2) if min(fixed.GetSize()) / s >= SEARCH_MIN_VOXELS), 1)
    sigma = [0.5 * shrink * s for s in fixed.GetSpacing()]
    fixed_small = sitk.Shrink(sitk.SmoothingRecursiveGaussian(fixed, sigma), [shrink] * 3)
    moving_small = sitk.Shrink(sitk.SmoothingRecursiveGaussian(moving, sigma), [shrink] * 3)
    scored = []
    for start in starts:
        for angles in itertools.product(np.radians(SEARCH_ANGLES_DEG), repeat=3):
            candidate = sitk.Euler3DTransform(start)
            candidate.SetRotation(*(float(a) for a in angles))
            value = _coarse_metric(fixed_small, moving_small, candidate)
            if np.isfinite(value):
                scored.append((value, candidate))
    scored.sort(key=lambda s: s[0])
    return [c for _, c in scored[:SEARCH_KEEP]] or starts[:1]


def _rigid_stage(fixed: sitk.Image, moving: sitk.Image, shrinks, step_mm: float) -> sitk.Euler3DTransform:
    """The rigid stage: each candidate refined on the coarse levels, the one of best mutual
    information on every voxel of the full-resolution CTs kept (a small field of view makes the
    coarse metric ambiguous), then refined on the finest level."""
    coarse = shrinks[:-1] or shrinks
    best = None
    for candidate in _rigid_candidates(fixed, moving):
        try:
            _linear_stage(candidate, fixed, moving, coarse, step_mm=step_mm)
        except MicroCTSynthError:
            continue
        value = _coarse_metric(fixed, moving, candidate)
        if best is None or value < best[0]:
            best = (value, candidate)
    if best is None:
        raise MicroCTSynthError(
            "The atlas CT and the target CT barely overlap after initialization, so mutual information "
            "cannot be computed; check that both CTs show the same side of the same region."
        )
    rigid = best[1]
    if len(shrinks) > 1:
        _linear_stage(rigid, fixed, moving, shrinks[-1:], step_mm=step_mm / shrinks[-2])
    return rigid


def _bspline_stage(affine: sitk.Transform, fixed: sitk.Image, moving: sitk.Image) -> sitk.Transform:
    """B-spline free-form deformation on top of ``affine``: returns ``affine o bspline``."""
    extent = np.array(fixed.GetSize()) * np.array(fixed.GetSpacing())
    mesh = [min(BSPLINE_MAX_CELLS, max(1, int(round(e / BSPLINE_GRID_MM)))) for e in extent]
    bspline = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    reg = _method(_shrinks(fixed, BSPLINE_SHRINKS), BSPLINE_SAMPLING_FRACTION)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=BSPLINE_ITERATIONS,
                             maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=2 * BSPLINE_ITERATIONS,
                             costFunctionConvergenceFactor=1e7)
    reg.SetMovingInitialTransform(affine)
    reg.SetInitialTransform(bspline, inPlace=True)
    _execute(reg, fixed, moving)
    return compose(affine, bspline)


def register_ct_to_ct(target_ct: Volume, atlas_ct: Volume, deformable=True, progress=None) -> sitk.Transform:
    """Register the atlas CT (moving) onto the target CT (fixed) by Mattes mutual information.

    Centred moments and a coarse search over orientations, then multi-resolution rigid and
    affine stages and, if ``deformable``, a B-spline stage with a ~5 mm control mesh. Returns
    ``R_a``: a target CT point -> the atlas CT point (an ``AffineTransform``, or a
    ``CompositeTransform`` affine o B-spline). ``progress``: a mode of
    :class:`~MicroCTSynthLib.progress.Progress`, a Progress, or None (silent).
    """
    own = not isinstance(progress, Progress)
    bar = Progress(total=4 if deformable else 3, task="atlas registration", mode=progress or "none", unit="stage") if own else progress
    start = time.monotonic()
    try:
        for volume, what in ((target_ct, "target CT"), (atlas_ct, "atlas CT")):
            if min(volume.size) < 2 * LINEAR_SHRINKS[0]:
                raise MicroCTSynthError(f"The {what} is too small to register ({volume.shape[::-1]} voxels); it needs at least 8 along each axis.")
        fixed, moving = _image(target_ct), _image(atlas_ct)
        shrinks = _shrinks(fixed, LINEAR_SHRINKS)
        step = 4.0 * max(target_ct.spacing)
        rigid = _rigid_stage(fixed, moving, shrinks, step)
        bar.update(2, stage="rigid")
        affine = sitk.AffineTransform(3)
        affine.SetCenter(rigid.GetCenter())
        affine.SetMatrix(rigid.GetMatrix())
        affine.SetTranslation(rigid.GetTranslation())
        metric = _linear_stage(affine, fixed, moving, shrinks[-2:], step_mm=step / 2)
        bar.update(1, stage="affine", metric=round(metric, 5))
        result: sitk.Transform = affine
        if deformable:
            result = _bspline_stage(affine, fixed, moving)
            bar.update(1, stage="bspline")
        bar.log(f"Atlas registration done in {time.monotonic() - start:.1f} s.")
    finally:
        if own:
            bar.close()
    return result


# -- the atlas method ---------------------------------------------------------------------
def _warp_labels(tissue: Volume, reference: Volume, transform: sitk.Transform) -> np.ndarray:
    grid = sitk.Image(reference.size, sitk.sitkUInt8)
    grid.SetSpacing(reference.spacing)
    grid.SetOrigin(reference.origin)
    grid.SetDirection(reference.direction)
    moving = sitk.Cast(tissue.to_sitk(), sitk.sitkUInt8)
    out = sitk.Resample(moving, grid, transform, sitk.sitkNearestNeighbor, 0.0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(out)


def atlas_segment(target_ct: Volume, atlases: list[AtlasCase], reference: Volume,
                  target_transform: sitk.Transform | None = None, deformable=True, progress="none") -> Volume:
    """The atlas method's tissue map of ``target_ct`` on ``reference``'s grid.

    ``target_transform`` (``T_t``) maps a reference grid point to the target CT (the target's
    CT-to-micro-CT transform when ``reference`` is its micro-CT); None means the grid already
    lies in the CT's space. Each atlas is registered (:func:`register_ct_to_ct`), its tissue map
    warped by nearest neighbour through ``T_a^-1 o R_a o T_t``, and the maps voted
    (:func:`majority_vote`). Returns a uint8 Volume on ``reference``'s grid.
    """
    if not atlases:
        raise MicroCTSynthError("The atlas method needs at least one atlas case.")
    footprint = _corners(reference)
    if target_transform is not None:
        footprint = _map(target_transform, footprint)
    target = crop_to_points(target_ct, footprint, TARGET_MARGIN_MM)
    if target is None:
        raise MicroCTSynthError(
            "The output grid does not overlap the target CT; check the target's CT-to-micro-CT transform."
        )
    warped = []
    own = not isinstance(progress, Progress)
    bar = Progress(total=len(atlases), task="atlas", mode=progress, unit="atlas") if own else progress
    try:
        for atlas in atlases:
            start = time.monotonic()
            if atlas.tissue.array.max() == 0:
                raise MicroCTSynthError(f"The tissue map of atlas '{atlas.name}' is empty (all 0).")
            atlas_ct = crop_to_points(atlas.ct, _map(atlas.transform, _corners(atlas.tissue)), ATLAS_MARGIN_MM)
            if atlas_ct is None:
                raise MicroCTSynthError(
                    f"The micro-CT of atlas '{atlas.name}' does not lie inside its CT; check its CT-to-micro-CT transform."
                )
            registration = register_ct_to_ct(target, atlas_ct, deformable=deformable, progress=None)
            labels = _warp_labels(atlas.tissue, reference, atlas_to_target(registration, atlas.transform, target_transform))
            warped.append(labels)
            seconds = time.monotonic() - start
            bar.log(f"Atlas {atlas.name}: registered and warped in {seconds:.1f} s.")
            bar.update(1, atlas=atlas.name, seconds=round(seconds, 2))
    finally:
        if own:
            bar.close()
    return reference.with_array(majority_vote(warped))


# -- data and command ---------------------------------------------------------------------
def load_atlases(dataset: Dataset, names) -> list[AtlasCase]:
    """The atlases ``names`` (a list or a comma-separated string) of a prepared dataset: CT,
    tissue map and estimated CT-to-micro-CT transform of each."""
    from .registration import read_transform

    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names)
    if not names:
        raise MicroCTSynthError("No atlas case given: name at least one training case of the dataset.")
    return [
        AtlasCase(
            name=name,
            ct=read_volume(dataset.path(name, "ct"), what=f"The CT of atlas '{name}'"),
            tissue=read_volume(dataset.path(name, "tissue"), what=f"The tissue map of atlas '{name}'"),
            transform=read_transform(dataset.path(name, "transform")),
        )
        for name in names
    ]


def command_atlas(args: argparse.Namespace) -> int:
    """``microctsynth atlas``: the atlas baseline's tissue map of one CT."""
    from .registration import read_transform

    dataset = Dataset.load(args.data)
    target_transform = read_transform(args.target_transform) if args.target_transform else None
    target_ct = read_volume(args.ct, what="The target CT")
    reference = read_volume(args.reference_grid, what="The reference grid")
    names = args.atlases if args.atlases else dataset.group(args.group)["train"]
    atlases = load_atlases(dataset, names)
    out = Path(args.out)
    start = time.monotonic()
    result = atlas_segment(target_ct, atlases, reference, target_transform=target_transform, progress=args.progress)
    write_volume(result, out)
    seconds = time.monotonic() - start
    report_result(args.progress, f"Atlas tissue map from {', '.join(a.name for a in atlases)} written to {out} "
                  f"({seconds:.0f} s).", outputs={"tissue": str(out)}, task="atlas", atlases=[a.name for a in atlases],
                  seconds=round(seconds, 1))
    return 0
