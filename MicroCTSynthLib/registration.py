"""Registration of the CT (moving) onto the micro-CT (fixed): the thesis' pre-processing.

The thesis registers each clinical CT onto its micro-CT by a manual initialization followed by
maximisation of Mattes mutual information, first rigid, then (optionally) affine, and resamples
the CT onto the micro-CT grid (or that grid x2 downsampled). Here the initialization is one of

* a transform file (``--init``), e.g. made by hand in 3D Slicer;
* paired landmarks in physical space (LPS mm), fitted by least squares (Kabsch);
* the best of identity, centred geometry and centred intensity moments, judged by the mutual
  information itself (no user input).

Then multi-resolution rigid optimisation (Euler angles about the centre of the micro-CT field
of view, regular step gradient descent, parameter scales from physical shifts) and an optional
affine stage. Only the micro-CT's field of view counts (fixed mask), so the constant fill a
micro-CT scanner writes outside its reconstruction cylinder does not drive the metric.

Transforms follow SimpleITK's resampling convention: they map a point of the fixed (micro-CT)
grid to the moving (CT) image. When mutual information cannot be computed (too little overlap,
"joint PDF summed to zero") the error says to give an initial transform or landmarks.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import MicroCTSynthError
from .progress import Progress, report_result
from .volume import Volume, atomic_path, read_volume, write_volume

#: Histogram bins of Mattes mutual information (ITK's usual 32-50).
HISTOGRAM_BINS = 40
#: Random metric samples per resolution level; ~20 per joint-histogram bin.
SAMPLES_PER_LEVEL = 40_000
#: Iterations of the regular step gradient descent per level.
ITERATIONS = 200
#: First step of each level, in voxels of that level (largest physical shift, mm).
STEP_VOXELS = 0.5
#: The optimiser stops when its step falls to this fraction of the first step.
STEP_RANGE = 1e-3
#: Step reduction at each change of direction of the gradient.
RELAXATION = 0.5
#: The least fraction of the fixed field of view that must fall inside the moving image.
MIN_OVERLAP = 0.2
#: Fixed seed of the metric's sampling (results still vary by multithreaded rounding, ~0.01 mm).
SEED = 20210401

#: Why the optimiser of the last level stopped, and after how many iterations (diagnostics).
_LAST_STOP: list = []

INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "bspline": sitk.sitkBSpline,
}

_ADVICE = ("give an initial transform (--init) or paired landmarks "
           "(--landmarks-fixed/--landmarks-moving) that bring the CT roughly onto the micro-CT")
_MI_FAILURES = ("joint pdf summed to zero", "too many samples map outside moving image buffer",
                "all samples map outside moving image buffer", "do not sufficiently overlap",
                "all the points mapped to outside", "no valid points", "not enough samples")


# -- transforms ---------------------------------------------------------------------------
def _map_points(transform: sitk.Transform, points) -> np.ndarray:
    """Apply ``transform`` to LPS points (N, 3); vectorised when the transform is linear."""
    pts = np.atleast_2d(np.asarray(points, dtype=float))
    if pts.shape[1] != 3:
        raise MicroCTSynthError(f"Points must be given as (x, y, z) rows, not an array of shape {pts.shape}.")
    linear = _linear_part(transform)
    if linear is not None:
        a, t = linear
        return pts @ a.T + t
    return np.array([transform.TransformPoint(tuple(map(float, p))) for p in pts], dtype=float)


def _linear_part(transform: sitk.Transform):
    """``(A, t)`` with ``T(x) = A x + t`` if ``transform`` is linear (checked on probe points), else None."""
    probes = np.vstack([np.zeros(3), np.eye(3) * 100.0])
    try:
        mapped = np.array([transform.TransformPoint(tuple(p)) for p in probes])
    except RuntimeError:
        return None
    t = mapped[0]
    a = (mapped[1:] - t).T / 100.0
    check = np.array([[37.0, -61.0, 23.0], [-140.0, 85.0, -9.0], [5.0, 250.0, 310.0]])
    got = np.array([transform.TransformPoint(tuple(p)) for p in check])
    if not np.allclose(got, check @ a.T + t, atol=1e-6, rtol=1e-9):
        return None
    return a, t


def _is_rotation(a: np.ndarray, tol: float = 1e-4) -> bool:
    return np.allclose(a @ a.T, np.eye(3), atol=tol) and np.linalg.det(a) > 0


def _euler(rotation: np.ndarray, translation_at_center: np.ndarray, center) -> sitk.Euler3DTransform:
    """``x -> R (x - c) + c + t``: rigid transform with rotation centre ``c``."""
    transform = sitk.Euler3DTransform()
    transform.SetCenter(tuple(float(c) for c in center))
    u, _, vt = np.linalg.svd(rotation)  # re-orthonormalise what came out of a file or a fit
    transform.SetMatrix(tuple((u @ vt).ravel()), 1e-6)
    transform.SetTranslation(tuple(float(v) for v in translation_at_center))
    return transform


def _recentre(transform: sitk.Transform, center) -> sitk.Transform | None:
    """``transform`` as an Euler3D (rigid) or Affine transform about ``center``; None if not linear."""
    linear = _linear_part(transform)
    if linear is None:
        return None
    a, t = linear
    c = np.asarray(center, dtype=float)
    # A x + t = A (x - c) + c + (A c + t - c)
    shift = a @ c + t - c
    if _is_rotation(a):
        return _euler(a, shift, c)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(tuple(c))
    affine.SetMatrix(tuple(a.ravel()))
    affine.SetTranslation(tuple(shift))
    return affine


def rigid_from_landmarks(fixed_points, moving_points) -> sitk.Transform:
    """Least-squares rigid transform (Kabsch) mapping each fixed landmark onto its moving one.

    Points are (N, 3) in LPS mm, in the same order, N >= 3 and not all on one line. The result
    maps a micro-CT point to the CT (SimpleITK's resampling convention), rotating about the
    fixed landmarks' centroid.
    """
    f = np.asarray(fixed_points, dtype=float)
    m = np.asarray(moving_points, dtype=float)
    for pts, which in ((f, "micro-CT (fixed)"), (m, "CT (moving)")):
        if pts.ndim != 2 or pts.shape[1] != 3:
            raise MicroCTSynthError(f"The {which} landmarks must be rows of x, y, z in mm, not an array of shape {pts.shape}.")
        if not np.all(np.isfinite(pts)):
            raise MicroCTSynthError(f"The {which} landmarks hold a coordinate that is not a finite number.")
    if len(f) != len(m):
        raise MicroCTSynthError(
            f"The landmark files do not pair up: {len(f)} point(s) in the micro-CT and {len(m)} in the CT; "
            "give the same landmarks in the same order in both."
        )
    if len(f) < 3:
        raise MicroCTSynthError(f"A rigid fit needs at least 3 paired landmarks, but only {len(f)} were given.")
    cf, cm = f.mean(axis=0), m.mean(axis=0)
    for pts, c, which in ((f, cf, "micro-CT"), (m, cm, "CT")):
        s = np.linalg.svd(pts - c, compute_uv=False)
        if s[0] <= 1e-9 or s[1] <= 1e-3 * s[0]:
            raise MicroCTSynthError(
                f"The {which} landmarks lie on one line (or on one point), which leaves a rotation undetermined; "
                "place at least 3 landmarks that are not in a row."
            )
    h = (f - cf).T @ (m - cm)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    rotation = vt.T @ np.diag([1.0, 1.0, d]) @ u.T  # no reflection: a CT is not a mirror image
    return _euler(rotation, cm - cf, cf)


def target_registration_error(estimated: sitk.Transform, true: sitk.Transform, points) -> np.ndarray:
    """Per-point distance (mm) between where ``estimated`` and ``true`` send each point (N, 3) LPS."""
    return np.linalg.norm(_map_points(estimated, points) - _map_points(true, points), axis=1)


def _check_transform_text(path: Path) -> None:
    """Refuse a text transform file whose parameters are not finite numbers before SimpleITK reads it
    (its reader crashes the process on a NaN parameter)."""
    if path.suffix.lower() not in (".tfm", ".txt"):
        return
    try:
        with open(path, "r", encoding="latin-1") as f:
            for number, line in enumerate(f, start=1):
                key, sep, values = line.partition(":")
                if not sep or key.strip() not in ("Parameters", "FixedParameters"):
                    continue
                try:
                    numbers = [float(v) for v in values.split()]
                except ValueError:
                    raise MicroCTSynthError(f"The transform file '{path}' has a {key.strip()} line (line {number}) "
                                            "that is not a list of numbers.") from None
                if not all(np.isfinite(numbers)):
                    raise MicroCTSynthError(f"The transform file '{path}' holds NaN or infinite parameters "
                                            f"(line {number}); a transform must be finite.")
    except OSError as exc:
        raise MicroCTSynthError(f"The transform file '{path}' could not be read ({exc.strerror}).") from None


def check_transform(transform: sitk.Transform, what: str) -> None:
    """Refuse a transform that is not 3D, not finite or (when linear) not invertible."""
    if transform.GetDimension() != 3:
        raise MicroCTSynthError(f"{what} holds a {transform.GetDimension()}D transform; a 3D transform is needed.")
    linear = _linear_part(transform)
    if linear is None:
        return
    a, t = linear
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(t))):
        raise MicroCTSynthError(f"{what} holds NaN or infinite parameters; a transform must be finite.")
    singular = np.linalg.svd(a, compute_uv=False)
    if singular[-1] <= 1e-6 * max(singular[0], 1e-12) or singular[-1] < 1e-6:
        raise MicroCTSynthError(f"{what} is singular (it squashes space onto a plane, a line or a point, "
                                f"singular values {', '.join(f'{v:.3g}' for v in singular)}); it cannot map a "
                                "micro-CT onto a CT.")


def read_transform(path) -> sitk.Transform:
    """Read an ITK transform file (.tfm, .txt, .h5, .mat): 3D, finite and, if linear, invertible."""
    path = Path(path)
    if not path.is_file():
        raise MicroCTSynthError(f"The transform file '{path}' does not exist: check the path.")
    _check_transform_text(path)
    try:
        transform = sitk.ReadTransform(str(path))
    except RuntimeError:
        raise MicroCTSynthError(
            f"The transform file '{path}' could not be read as an ITK transform (.tfm, .txt, .h5 or .mat, as Slicer saves them)."
        ) from None
    check_transform(transform, f"The transform file '{path}'")
    return transform


def check_transform_name(path) -> Path:
    """``path`` if its ending is one an ITK transform file can have, else one sentence."""
    path = Path(path)
    if path.suffix.lower() not in (".tfm", ".txt", ".h5", ".hdf5", ".mat"):
        raise MicroCTSynthError(f"Cannot write the transform '{path}': use the ending .tfm (or .txt, .h5, .mat).")
    return path


def write_transform(transform: sitk.Transform, path) -> Path:
    """Write ``transform`` as an ITK transform file, atomically (temporary name, then rename)."""
    path = check_transform_name(path)
    try:
        with atomic_path(path) as tmp:
            sitk.WriteTransform(transform, str(tmp))
    except (RuntimeError, OSError) as exc:
        raise MicroCTSynthError(f"Cannot write the transform '{path}': {str(exc).strip().splitlines()[-1][:200]}") from None
    return path


# -- landmarks ----------------------------------------------------------------------------
def read_landmarks(path) -> np.ndarray:
    """Landmarks (N, 3) in LPS mm from a CSV (x,y,z; header optional) or a Slicer ``.mrk.json``/``.fcsv``.

    Slicer's markups files state their coordinate system; RAS points are converted to LPS
    (x and y negated), the engine's convention. A plain CSV is LPS.
    """
    path = Path(path)
    if not path.is_file():
        raise MicroCTSynthError(f"The landmark file '{path}' does not exist: check the path.")
    if path.name.lower().endswith(".json"):
        return _read_markups_json(path)
    if path.name.lower().endswith(".fcsv"):
        return _read_fcsv(path)
    return _read_landmarks_csv(path)


def _read_fcsv(path: Path) -> np.ndarray:
    """Slicer's older fiducial CSV: ``# CoordinateSystem = RAS|LPS|0|1`` and rows ``id,x,y,z,...``."""
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise MicroCTSynthError(f"The landmark file '{path}' is not a text .fcsv file.") from None
    system = "RAS"  # Slicer's default before it wrote the header
    for line in lines:
        if line.startswith("#") and "coordinatesystem" in line.lower().replace(" ", ""):
            value = line.split("=", 1)[-1].strip().upper()
            system = {"0": "RAS", "1": "LPS"}.get(value, value)
    if system not in ("RAS", "LPS"):
        raise MicroCTSynthError(f"The landmark file '{path}' uses the coordinate system '{system}'; LPS or RAS is needed.")
    points = []
    for row in csv.reader(ln for ln in lines if ln.strip() and not ln.startswith("#")):
        if len(row) < 4 or not _numeric(row[1:4]):
            raise MicroCTSynthError(f"The landmark file '{path}' has a row without x,y,z in columns 2-4: {','.join(row)[:80]!r}.")
        points.append([float(v) for v in row[1:4]])
    if not points:
        raise MicroCTSynthError(f"The landmark file '{path}' holds no points.")
    flip = np.array([-1.0, -1.0, 1.0]) if system == "RAS" else np.ones(3)
    return np.asarray(points, dtype=float) * flip


def _read_markups_json(path: Path) -> np.ndarray:
    try:
        doc = json.loads(path.read_text())
        markups = doc["markups"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise MicroCTSynthError(f"The landmark file '{path}' is not a Slicer markups JSON file (no 'markups' list).") from None
    points = []
    for markup in markups if isinstance(markups, list) else []:
        system = str(markup.get("coordinateSystem", "LPS")).upper()
        if system not in ("LPS", "RAS"):
            raise MicroCTSynthError(f"The landmark file '{path}' uses the coordinate system '{system}'; LPS or RAS is needed.")
        flip = np.array([-1.0, -1.0, 1.0]) if system == "RAS" else np.ones(3)
        for cp in markup.get("controlPoints", []) or []:
            pos = cp.get("position")
            if pos is None or len(pos) != 3:
                raise MicroCTSynthError(f"The landmark file '{path}' has a control point without a 3D position.")
            points.append(np.asarray(pos, dtype=float) * flip)
    if not points:
        raise MicroCTSynthError(f"The landmark file '{path}' holds no control points.")
    return np.vstack(points)


def _read_landmarks_csv(path: Path) -> np.ndarray:
    try:
        # (line number, fields) of every line that is neither blank nor a comment
        rows = [(n, r) for n, r in enumerate(csv.reader(path.read_text().splitlines()), start=1)
                if r and not r[0].lstrip().startswith("#")]
    except (UnicodeDecodeError, csv.Error):
        raise MicroCTSynthError(f"The landmark file '{path}' is not a text CSV file of x,y,z coordinates.") from None
    columns = (0, 1, 2)
    if rows:
        first = rows[0][1]
        header = [c.strip().lower() for c in first]
        if not _numeric(first[:3]):
            if all(k in header for k in ("x", "y", "z")):
                columns = tuple(header.index(k) for k in ("x", "y", "z"))
            rows = rows[1:]
    points = []
    for line, row in rows:
        values = [row[c] for c in columns if c < len(row)]
        if len(values) != 3 or not _numeric(values):
            raise MicroCTSynthError(f"Line {line} of the landmark file '{path}' is not three numbers x,y,z: "
                                    f"{','.join(row)[:80]!r}.")
        points.append([float(v) for v in values])
    if not points:
        raise MicroCTSynthError(f"The landmark file '{path}' holds no points.")
    return np.asarray(points, dtype=float)


def _numeric(values) -> bool:
    try:
        [float(v) for v in values]
        return len(values) > 0
    except ValueError:
        return False


# -- grids and resampling -----------------------------------------------------------------
def downsample_grid(reference: Volume, factor: int) -> Volume:
    """An empty (zero) volume on ``reference``'s grid coarsened ``factor`` times per axis.

    Same field of view (up to the last fine voxel of an axis whose size is not a multiple of
    ``factor``), ``size // factor`` voxels per axis, spacing x ``factor``; each coarse voxel
    covers a block of ``factor**3`` fine voxels, so its centre is the block's centre.
    """
    factor = int(factor)
    if factor < 1:
        raise MicroCTSynthError(f"The downsampling factor must be a whole number >= 1, not {factor}.")
    if factor == 1:
        return Volume(np.zeros(reference.shape, dtype=np.uint8), reference.spacing, reference.origin, reference.direction)
    size = [max(1, n // factor) for n in reference.size]
    spacing = tuple(s * factor for s in reference.spacing)
    origin = reference.physical_points(np.full(3, (factor - 1) / 2.0))[0]
    return Volume(np.zeros(size[::-1], dtype=np.uint8), spacing, tuple(origin), reference.direction)


def resample(moving: Volume, reference: Volume, transform: sitk.Transform | None = None,
             interpolator: str = "linear", default_value: float | None = None, downsample: int = 1) -> Volume:
    """``moving`` resampled onto ``reference``'s grid (or that grid ``downsample`` times coarser).

    ``transform`` maps a reference point to the moving image (identity if None). ``"nearest"``
    keeps the moving voxel type (label maps); ``"linear"``/``"bspline"`` give float32. Outside
    the moving image the value is ``default_value``, the moving image's minimum if None (air
    for a CT).
    """
    if interpolator not in INTERPOLATORS:
        raise MicroCTSynthError(f"The interpolator must be one of {', '.join(INTERPOLATORS)}, not {interpolator!r}.")
    grid = downsample_grid(reference, downsample) if downsample != 1 else reference
    image = moving.to_sitk()
    if default_value is None:
        default_value = float(np.min(moving.array))
    if interpolator == "nearest":
        pixel = image.GetPixelID()
    else:
        pixel = sitk.sitkFloat32
        image = sitk.Cast(image, sitk.sitkFloat32)
    reference_image = sitk.Image(grid.size, sitk.sitkUInt8)
    reference_image.SetSpacing(grid.spacing)
    reference_image.SetOrigin(grid.origin)
    reference_image.SetDirection(grid.direction)
    out = sitk.Resample(image, reference_image, transform or sitk.Transform(3, sitk.sitkIdentity),
                        INTERPOLATORS[interpolator], float(default_value), pixel)
    return Volume.from_sitk(out)


# -- registration -------------------------------------------------------------------------
def _fixed_mask(fixed: Volume) -> np.ndarray:
    from .tissue import field_of_view  # the micro-CT's reconstruction cylinder

    return field_of_view(fixed)


def _mask_centroid(fixed: Volume, mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    zyx = np.asarray(ndimage.center_of_mass(mask), dtype=float)
    return fixed.physical_points(zyx[::-1])[0]


def _moments_centre(volume: Volume, mask: np.ndarray | None = None) -> np.ndarray:
    """Intensity-weighted centre (LPS) with the darkest value as zero weight (air / fill)."""
    a = volume.array.astype(np.float64)
    w = a - a.min() if mask is None else np.where(mask, a - a[mask].min(), 0.0)
    total = w.sum()
    if total <= 0:
        return volume.center
    zyx = np.array([(w.sum(axis=tuple(j for j in range(3) if j != i)) * np.arange(a.shape[i])).sum() / total for i in range(3)])
    return volume.physical_points(zyx[::-1])[0]


def _overlap(transform: sitk.Transform, points: np.ndarray, moving: Volume) -> float:
    """Fraction of fixed field-of-view points that ``transform`` maps inside the moving image."""
    idx = moving.continuous_indices(_map_points(transform, points))
    inside = np.all((idx >= -0.5) & (idx <= np.asarray(moving.size) - 0.5), axis=1)
    return float(inside.mean())


def _sample_points(fixed: Volume, mask: np.ndarray, n: int = 4000) -> np.ndarray:
    flat = np.flatnonzero(mask)
    if len(flat) > n:
        flat = np.sort(np.random.default_rng(SEED).choice(flat, n, replace=False))
    zyx = np.stack(np.unravel_index(flat, mask.shape), axis=1)
    return fixed.physical_points(zyx[:, ::-1].astype(float))


def _crop_to_field_of_view(moving: Volume, transform: sitk.Transform, fixed: Volume, mask: np.ndarray) -> Volume:
    """The part of the CT around where ``transform`` puts the micro-CT's field of view.

    A clinical CT covers far more than a micro-CT specimen; smoothing and sampling all of it at
    every level would cost time for nothing. The margin (a quarter of the field of view, at
    least 2 mm) leaves room for what the optimisation still has to move.
    """
    # Bounding box of the field of view, (z, y, x) voxel indices.
    occupied = [np.flatnonzero(mask.any(axis=tuple(j for j in range(3) if j != i))) for i in range(3)]
    lo, hi = [int(o[0]) for o in occupied], [int(o[-1]) for o in occupied]
    corners_zyx = np.array([[z, y, x] for z in (lo[0], hi[0]) for y in (lo[1], hi[1]) for x in (lo[2], hi[2])], dtype=float)
    corners = _map_points(transform, fixed.physical_points(corners_zyx[:, ::-1]))
    margin_mm = max(2.0, 0.25 * float(np.max(fixed.extent_mm)))
    idx = moving.continuous_indices(corners)
    pad = margin_mm / np.asarray(moving.spacing)
    start = np.maximum(np.floor(idx.min(axis=0) - pad), 0).astype(int)
    stop = np.minimum(np.ceil(idx.max(axis=0) + pad) + 1, np.asarray(moving.size)).astype(int)
    if np.any(stop - start < 4) or np.prod(stop - start) > 0.7 * np.prod(moving.size):
        return moving  # no overlap to speak of (reported later), or not worth a copy
    (x0, y0, z0), (x1, y1, z1) = start, stop
    origin = moving.physical_points(start.astype(float))[0]
    return Volume(moving.array[z0:z1, y0:y1, x0:x1], moving.spacing, tuple(origin), moving.direction)


def _mi_error(exc: Exception) -> MicroCTSynthError | None:
    """The user's sentence for SimpleITK's ways of saying that mutual information failed."""
    text = str(exc).lower()
    if any(key in text for key in _MI_FAILURES):
        return MicroCTSynthError(
            "Mutual information could not be computed because the CT and the micro-CT barely overlap; " + _ADVICE + "."
        )
    return None


def _as_image(volume: Volume) -> sitk.Image:
    return sitk.Cast(volume.to_sitk(), sitk.sitkFloat32)


def _level(transform: sitk.Transform, images, mask_voxels: int, shrink: int, sigma_mm: float, step_mm: float,
           moving_initial, progress: Progress, stage: str, level: int, state: dict) -> float:
    """One resolution level of Mattes MI, regular step gradient descent; ``transform`` updated in place.

    Each level is its own optimisation so that its steps start at its own voxel size: a fine
    level restarted with the coarse level's steps jumps out of the basin it was given.
    """
    fixed_image, moving_image, mask_image = images
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
    samples = mask_voxels / float(shrink) ** 3
    if samples <= SAMPLES_PER_LEVEL:
        reg.SetMetricSamplingStrategy(reg.NONE)  # every voxel of the level: a smooth metric
    else:
        reg.SetMetricSamplingStrategy(reg.REGULAR)
        reg.SetMetricSamplingPercentage(float(SAMPLES_PER_LEVEL / samples), SEED)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel([int(shrink)])
    reg.SetSmoothingSigmasPerLevel([float(sigma_mm)])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetMetricFixedMask(mask_image)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=step_mm, minStep=STEP_RANGE * step_mm, numberOfIterations=ITERATIONS,
        relaxationFactor=RELAXATION, gradientMagnitudeTolerance=1e-8,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(transform, inPlace=True)
    if moving_initial is not None:
        reg.SetMovingInitialTransform(moving_initial)

    def on_iteration():
        state["iterations"] += 1
        if reg.GetOptimizerIteration() % 10 == 9:
            progress.update(0, stage=stage, level=level, iteration=reg.GetOptimizerIteration() + 1,
                            metric=round(reg.GetMetricValue(), 5))

    reg.AddCommand(sitk.sitkIterationEvent, on_iteration)
    try:
        reg.Execute(fixed_image, moving_image)
    except RuntimeError as exc:
        err = _mi_error(exc)
        if err is not None:
            raise err from None
        raise
    _LAST_STOP[:] = [reg.GetOptimizerStopConditionDescription(), reg.GetOptimizerIteration()]
    metric = reg.GetMetricValue()
    progress.update(1, stage=stage, level=level, iterations=reg.GetOptimizerIteration(), metric=round(metric, 5))
    return metric


def _pyramid(fixed: Volume, moving: Volume, levels: int = 3) -> tuple[list[int], list[float]]:
    """Shrink factors and smoothing sigmas (mm) of the fixed image, coarse to fine.

    The finest level stops at half the CT voxel: a micro-CT finer than that adds samples but no
    information the CT can match.
    """
    fine = min(fixed.spacing)
    finest = max(1, int(round(min(moving.spacing) / 2.0 / fine)))
    # Keep at least ~8 voxels along the shortest axis at the coarsest level.
    while finest > 1 and min(fixed.size) / (finest * 2 ** (levels - 1)) < 8:
        finest -= 1
    shrinks = [finest * 2 ** (levels - 1 - i) for i in range(levels)]
    while len(shrinks) > 1 and min(fixed.size) / shrinks[0] < 8:
        shrinks = shrinks[1:]
    sigmas = [0.5 * s * fine if s > 1 else 0.0 for s in shrinks]
    # The CT's own resolution sets the least smoothing worth applying to the micro-CT.
    sigmas = [max(sig, 0.5 * min(moving.spacing)) if min(moving.spacing) > 2 * fine else sig for sig in sigmas]
    return shrinks, sigmas


def _coarse_scorer(fixed_image, moving_image, mask_image, shrink: int, sigma_mm: float):
    """A function giving the Mattes MI (negative: lower is better) of a transform at the coarsest level.

    The images are prepared once: block-averaged by ``shrink`` (cheap anti-aliasing), then
    smoothed by the level's sigma. A transform the metric cannot evaluate scores +inf.
    """
    fixed_small = sitk.BinShrink(fixed_image, [int(shrink)] * 3)
    mask_small = sitk.BinShrink(sitk.Cast(mask_image, sitk.sitkFloat32), [int(shrink)] * 3) > 0.5
    if sigma_mm > 0:
        fixed_small = sitk.SmoothingRecursiveGaussian(fixed_small, sigma_mm)
        moving_image = sitk.SmoothingRecursiveGaussian(moving_image, sigma_mm)

    def score(transform: sitk.Transform) -> float:
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
        reg.SetMetricSamplingStrategy(reg.NONE)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetMetricFixedMask(mask_small)
        reg.SetInitialTransform(transform, inPlace=False)
        try:
            return float(reg.MetricEvaluate(fixed_small, moving_image))
        except RuntimeError:
            return float("inf")

    return score


def _check_contrast(values: np.ndarray, what: str) -> None:
    if values.size and float(values.max()) == float(values.min()):
        raise MicroCTSynthError(f"The {what} holds one value ({float(values.min()):g}) everywhere: mutual "
                                "information needs contrast; check that the right image was given.")


def register(fixed: Volume, moving: Volume, initial: sitk.Transform | None = None,
             landmarks_fixed=None, landmarks_moving=None, affine: bool = False,
             progress: str | Progress = "none") -> sitk.Transform:
    """Register the CT (``moving``) onto the micro-CT (``fixed``) by Mattes mutual information.

    Initialization: ``initial`` (a transform, e.g. read from a file), else the least-squares
    rigid fit of paired ``landmarks_fixed``/``landmarks_moving`` (LPS mm), else the best of
    identity, centred geometry and centred moments by the metric. Then a multi-resolution rigid
    stage and, if ``affine``, an affine stage. Returns an ``Euler3DTransform`` (rigid) or an
    ``AffineTransform`` mapping a point of the fixed grid to the moving image.
    """
    start = time.monotonic()
    mask = _fixed_mask(fixed)
    if mask.sum() < 27:
        raise MicroCTSynthError("The micro-CT's field of view holds almost no voxels; check that the fixed image is the micro-CT.")
    _check_contrast(fixed.array[mask], "micro-CT (fixed image)")
    _check_contrast(moving.array, "CT (moving image)")
    centre = _mask_centroid(fixed, mask)
    points = _sample_points(fixed, mask)
    fixed_image, moving_image = _as_image(fixed), _as_image(moving)
    mask_image = Volume(mask.astype(np.uint8), fixed.spacing, fixed.origin, fixed.direction).to_sitk()
    shrinks, sigmas = _pyramid(fixed, moving)
    candidates = _starts(fixed, moving, mask, centre, initial, landmarks_fixed, landmarks_moving)
    score = _coarse_scorer(fixed_image, moving_image, mask_image, shrinks[0], sigmas[0]) if len(candidates) > 1 else None
    init_name, init = _best_start(candidates, score, points, moving)

    rigid = _recentre(init, centre)
    moving_initial = None
    if rigid is None or not isinstance(rigid, sitk.Euler3DTransform):
        # A non-rigid initial transform stays as given; the rigid stage refines on top of it.
        moving_initial = init
        rigid = _euler(np.eye(3), np.zeros(3), centre)
    cropped = _crop_to_field_of_view(moving, init, fixed, mask)
    if cropped is not moving:
        moving_image = _as_image(cropped)

    stages = len(shrinks) + (min(2, len(shrinks)) if affine else 0)
    own = not isinstance(progress, Progress)
    bar = Progress(total=stages, task="register", mode=progress, unit="level") if own else progress
    try:
        bar.log(f"Registration: initialized by {init_name}; rigid Mattes MI at shrink factors {shrinks}.")
        state = {"iterations": 0}
        result, metric = _optimise(rigid, affine, (fixed_image, moving_image, mask_image), int(mask.sum()), shrinks,
                                   sigmas, min(fixed.spacing), min(moving.spacing), moving_initial, bar, state)
        if moving_initial is not None:
            composite = sitk.CompositeTransform([moving_initial, result])
            result = _recentre(composite, centre) or composite
        overlap = _overlap(result, points, moving)
        if overlap < MIN_OVERLAP:
            raise MicroCTSynthError(
                f"The registration drifted until only {overlap:.0%} of the micro-CT's field of view lies inside the CT; {_ADVICE}."
            )
        bar.log(f"Registration done in {time.monotonic() - start:.1f} s: Mattes MI {metric:.4f} "
                f"after {state['iterations']} iterations.")
    finally:
        if own:
            bar.close()
    return result


def _starts(fixed: Volume, moving: Volume, mask: np.ndarray, centre, initial, landmarks_fixed,
            landmarks_moving) -> dict:
    """The initial transforms to choose from, by name: the one given, the landmarks' rigid fit, or
    identity, centred geometry and centred intensity moments."""
    if (landmarks_fixed is None) != (landmarks_moving is None):
        raise MicroCTSynthError("Landmarks come in pairs: give both the micro-CT landmarks and the CT landmarks.")
    if initial is not None and landmarks_fixed is not None:
        raise MicroCTSynthError("Give either an initial transform or landmarks, not both.")
    if initial is not None:
        return {"initial transform": initial}
    if landmarks_fixed is not None:
        return {"landmarks": rigid_from_landmarks(landmarks_fixed, landmarks_moving)}
    return {
        "identity": sitk.Euler3DTransform(),
        "centred geometry": _euler(np.eye(3), moving.center - fixed.center, centre),
        "centred moments": _euler(np.eye(3), _moments_centre(moving) - _moments_centre(fixed, mask), centre),
    }


def _best_start(candidates: dict, score, points: np.ndarray, moving: Volume) -> tuple[str, sitk.Transform]:
    """The candidate with the best coarse mutual information (``score``; the only one when there
    is one) among those that overlap the CT enough for mutual information."""
    scored = []
    for name, candidate in candidates.items():
        if _overlap(candidate, points, moving) < MIN_OVERLAP:
            continue
        scored.append((score(candidate) if score else 0.0, name, candidate))
    if not scored:
        name = next(iter(candidates))
        raise MicroCTSynthError(
            f"After the {'initialization' if len(candidates) > 1 else name}, less than {MIN_OVERLAP:.0%} of the micro-CT's "
            f"field of view lies inside the CT, too little for mutual information; {_ADVICE}."
        )
    _, name, transform = min(scored, key=lambda s: s[0])
    return name, transform


def _optimise(rigid: sitk.Euler3DTransform, affine: bool, images, voxels: int, shrinks, sigmas, fine: float,
              moving_spacing: float, moving_initial, bar: Progress, state: dict) -> tuple[sitk.Transform, float]:
    """The rigid stage at every level, then (``affine``) an affine stage at the two finest; returns
    the transform and the last metric value."""
    metric = float("nan")
    for i, (shrink, sigma) in enumerate(zip(shrinks, sigmas), start=1):
        # First steps of half a voxel of the level, never below a tenth of a CT voxel.
        step = max(STEP_VOXELS * shrink * fine, 0.1 * moving_spacing)
        metric = _level(rigid, images, voxels, shrink, sigma, step, moving_initial, bar, "rigid", i, state)
    if not affine:
        return rigid, metric
    aff = sitk.AffineTransform(3)
    aff.SetCenter(rigid.GetCenter())
    aff.SetMatrix(rigid.GetMatrix())
    aff.SetTranslation(rigid.GetTranslation())
    for i, (shrink, sigma) in enumerate(zip(shrinks[-2:], sigmas[-2:]), start=1):
        step = max(STEP_VOXELS * shrink * fine, 0.1 * moving_spacing) / 2.0
        metric = _level(aff, images, voxels, shrink, sigma, step, moving_initial, bar, "affine", i, state)
    return aff, metric


def _transform_summary(transform: sitk.Transform, centre) -> str:
    linear = _linear_part(transform)
    if linear is None:
        return transform.GetName()
    a, t = linear
    shift = a @ np.asarray(centre) + t - np.asarray(centre)
    u, s, vt = np.linalg.svd(a)
    angle = np.degrees(np.arccos(np.clip((np.trace(u @ vt) - 1) / 2, -1, 1)))
    return f"rotation {angle:.2f} deg, shift {np.linalg.norm(shift):.2f} mm at the field-of-view centre"


def command_register(args: argparse.Namespace) -> int:
    """``microctsynth register``: estimate the transform, write it and the resampled CT."""
    mode = args.progress
    fixed = read_volume(args.fixed, what=f"The micro-CT '{args.fixed}'")
    moving = read_volume(args.moving, what=f"The CT '{args.moving}'")
    initial = read_transform(args.init) if args.init else None
    lf, lm = args.landmarks_fixed, args.landmarks_moving
    if (lf is None) != (lm is None):
        raise MicroCTSynthError("Landmarks come in pairs: give both --landmarks-fixed and --landmarks-moving.")
    landmarks_fixed = read_landmarks(lf) if lf else None
    landmarks_moving = read_landmarks(lm) if lm else None
    out_transform, out_resampled = check_transform_name(args.out_transform), Path(args.out_resampled)
    start = time.monotonic()
    transform = register(fixed, moving, initial, landmarks_fixed, landmarks_moving,
                         affine=args.affine, progress=mode)
    seconds = time.monotonic() - start
    downsample = int(args.downsample)
    resampled = resample(moving, fixed, transform, interpolator="linear", downsample=downsample)
    write_transform(transform, out_transform)
    write_volume(resampled, out_resampled)
    summary = (f"Registered '{args.moving}' onto '{args.fixed}' in {seconds:.1f} s "
               f"({_transform_summary(transform, _mask_centroid(fixed, _fixed_mask(fixed)))}): "
               f"{out_transform}, {out_resampled}" + (f" (grid x{downsample} downsampled)" if downsample > 1 else ""))
    report_result(mode, summary, outputs={"transform": str(out_transform), "resampled": str(out_resampled)},
                  seconds=round(seconds, 2))
    return 0
