"""Whole-volume synthesis from patches: synthetic micro-CT, tissue map and their uncertainty.

The generator was trained on patches (96³ in the thesis), so a volume is synthesized patch by
patch and stitched. The thesis tiled the volume without overlap, which leaves visible seams at
patch borders (instance normalisation and zero padding make each patch's output depend on its
own window); its future work proposes overlapping patches blended by a Gaussian weight, which
is the default here (``--overlap 0`` reproduces the thesis' tiling).

The vocabulary is MONAI's / TorchIO's: :func:`sliding_window_synthesis` runs ``predictor`` on
``roi_size`` windows of an image at ``overlap``, weights each window by
:func:`gaussian_importance_map` (``mode="gaussian"``) or by ones (``mode="constant"``), and
returns ``sum(w * pred) / sum(w)``. The image and the accumulators stay on the CPU; only
windows travel to ``device``.

:func:`synthesize` is the pipeline for a CT of any orientation and spacing:

1. :func:`output_grid`: the model's voxel size (the checkpoint's ``spacing_mm`` x its
   ``downsample``) over a region of interest around the cochlea (centre + size in mm,
   axis-aligned in LPS), or a given reference grid (the registered micro-CT's, for evaluation).
2. The CT is resampled (linear) onto that grid one slab at a time, normalised with the
   checkpoint's :class:`~MicroCTSynthLib.data.Normalization` and run patch-wise. Slabs follow
   the rows of patches along z: the partial sums of a slab's last patches carry over to the
   next slab, so every patch runs once and the chunked result equals the unchunked one, while
   only one slab (a patch deep plus a halo) is ever in memory.
3. Tissue map: single-task by the thesis' multi-Otsu + closing of the synthetic micro-CT
   (:func:`MicroCTSynthLib.tissue.tissue_map`); multitask by the argmax of the blended softmax
   of the tissue head. Label 0 outside the CT's field of view.
4. Uncertainty (beyond the thesis): with ``samples > 1`` the generator keeps its dropout (the
   thesis' noise z) and runs N stochastic passes; the voxel-wise standard deviation of the
   synthetic micro-CT and the entropy of the tissue map are returned as volumes.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from . import augment
from .choices import BLEND_MODES
from .errors import MicroCTSynthError
from .inference import WindowPredictor, resolve_batch_size, resolve_device
from .labels import AIR, OUTSIDE
from .progress import Progress, log, report_result, warn
from .tiling import SYNTHESIS_OVERLAP, check_overlap, patch_starts
from .volume import FWHM_PER_SIGMA, Volume, read_volume, write_volume

#: Output voxels of one slab (before the patch-sized halo); 2**24 keeps a 400³ synthesis of
#: the paper's network well within 8 GB on a CPU.
DEFAULT_CHUNK_VOXELS = 2**24

#: The largest output grid synthesize accepts (a whole head at 37.6 µm would be ~10^11 voxels).
MAX_OUTPUT_VOXELS = 512**3


@dataclass
class SynthesisResult:
    """The synthetic micro-CT and tissue map on the output grid, and their uncertainty.

    ``microct``: None for the direct segmenter, which gives the tissue map only.

    ``std``: voxel-wise standard deviation of the synthetic micro-CT over the stochastic
    passes (micro-CT units; None with one deterministic pass). ``entropy``: entropy of the
    tissue map, normalised by log(3) to [0, 1] (0 certain, 1 all three classes equally
    likely; None unless asked for). Both are 0 outside the field of view.
    """

    microct: Volume | None
    tissue: Volume
    std: Volume | None = None
    entropy: Volume | None = None


# -- sliding window ----------------------------------------------------------------------------
def gaussian_importance_map(patch_size, sigma_scale=0.125) -> np.ndarray:
    """Weights of one window: a separable Gaussian, sigma = ``sigma_scale`` x the window's edge.

    Identical to MONAI's ``compute_importance_map(mode="gaussian")``: centred between the
    middle voxels, not normalised, clamped from below at max(min, 1e-3) so no voxel of a window
    has zero weight.
    """
    patch_size = _triple(patch_size, "patch_size", int)
    sigma_scale = _triple(sigma_scale, "sigma_scale", float)
    weights = np.ones((), dtype=np.float64)
    for n, s in zip(patch_size, sigma_scale):
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
        g = np.exp(-(x**2) / (2.0 * (s * n) ** 2))
        weights = np.multiply.outer(weights, g)
    weights = weights.astype(np.float32)
    return np.maximum(weights, max(float(weights.min()), 1e-3)).astype(np.float32)


def importance_map(patch_size, mode="gaussian") -> np.ndarray:
    """The window weight of ``mode`` (``"gaussian"`` or ``"constant"``), float32."""
    if mode == "gaussian":
        return gaussian_importance_map(patch_size)
    if mode == "constant":
        return np.ones(_triple(patch_size, "patch_size", int), dtype=np.float32)
    raise MicroCTSynthError(f"The blending mode must be one of {', '.join(BLEND_MODES)}, not {mode!r}.")


def _triple(value, name, kind=float) -> tuple:
    if np.isscalar(value):
        return (kind(value),) * 3
    value = tuple(kind(v) for v in value)
    if len(value) != 3:
        raise MicroCTSynthError(f"{name} needs one value or three (x, y, z), not {len(value)}.")
    return value


#: Voxels of the blend's denominator computed at once (256 kB of float32): a few planes, never a window's depth.
DENOMINATOR_VOXELS = 2**16


def plane_chunks(lo: int, hi: int, shape_yx):
    """[lo, hi) cut into runs of planes of at most :data:`DENOMINATOR_VOXELS` voxels (one plane at least)."""
    step = max(1, DENOMINATOR_VOXELS // max(1, int(shape_yx[0]) * int(shape_yx[1])))
    for a in range(lo, hi, step):
        yield a, min(a + step, hi)


def weight_sum(lo: int, hi: int, starts, roi, weight: np.ndarray, shape_yx) -> np.ndarray:
    """``sum(w)`` over all windows of the grid ``starts`` (z, y, x lists) on planes [lo, hi), float32.

    The blend's denominator is computed only for the planes being finished, so no volume-sized
    weight map is ever kept (MONAI keeps one, ``count_map``, the size of the output).
    """
    out = np.zeros((hi - lo, *shape_yx), dtype=np.float32)
    for z in starts[0]:
        a, b = max(lo, z), min(hi, z + roi[0])
        if b <= a:
            continue
        w = weight[a - z:b - z]
        for y in starts[1]:
            for x in starts[2]:
                out[a - lo:b - lo, y:y + roi[1], x:x + roi[2]] += w
    return out


class _Blend:
    """``sum(w * pred)`` of the windows, in place, over the planes [start, start + depth) of the working grid.

    ``numerators`` (one (C_out, depth, H, W) float32 array per output) are made on the first
    window, or handed over (``into``) to blend straight into the caller's output arrays.
    """

    def __init__(self, start: int, depth: int, shape_yx, into=None):
        self.start, self.depth, self.shape_yx = int(start), int(depth), tuple(int(s) for s in shape_yx)
        self.numerators = into

    def add(self, position, outputs, weight: np.ndarray):
        if self.numerators is None:
            self.numerators = [np.zeros((o.shape[0], self.depth, *self.shape_yx), dtype=np.float32) for o in outputs]
        z, y, x = int(position[0]) - self.start, int(position[1]), int(position[2])
        box = (slice(None), slice(z, z + weight.shape[0]), slice(y, y + weight.shape[1]), slice(x, x + weight.shape[2]))
        for numerator, out in zip(self.numerators, outputs):
            np.multiply(out, weight, out=out)
            numerator[box] += out


def _run_windows(image: torch.Tensor, origin_z: int, positions, roi, runner: WindowPredictor, batch_size: int,
                 weight: np.ndarray, blend: _Blend, progress=None, n_outputs=None, background=None):
    """Run the windows of ``image`` (C, D, H, W, CPU; plane 0 is ``origin_z``) at ``positions`` and blend them.

    Windows go to the device ``batch_size`` at a time. With ``background`` (a number), a window
    whose every voxel is at or below it (outside the CT, or air below the CT window's floor)
    is not run: it takes the network's output for a window filled with ``background``,
    computed once.
    """
    def window(p):
        z, y, x = int(p[0]) - origin_z, int(p[1]), int(p[2])
        return image[:, z:z + roi[0], y:y + roi[1], x:x + roi[2]]

    def check(outs, count):
        if n_outputs is not None and len(outs) != n_outputs:
            raise ValueError(f"The predictor returned {len(outs)} outputs, {n_outputs} were expected.")
        for o in outs:
            if o.shape[0] != count or tuple(o.shape[2:]) != tuple(roi):
                raise ValueError(f"The predictor returned windows of {tuple(o.shape[2:])}, not {tuple(roi)}.")

    def tell(n):
        if hasattr(progress, "update"):
            progress.update(n)
        elif progress is not None:
            progress(n)

    run, skipped = list(positions), []
    if background is not None:
        run, skipped = [], []
        for p in positions:
            (skipped if float(window(p).max()) <= background else run).append(p)
    if skipped:
        filled = torch.full((1, image.shape[0], *roi), float(background), dtype=torch.float32)
        outs = runner.predict(filled)
        check(outs, 1)
        for p in skipped:
            blend.add(p, [o[0].copy() for o in outs], weight)
        tell(len(skipped))
    for a in range(0, len(run), batch_size):
        batch = run[a:a + batch_size]
        outs = runner.predict(torch.stack([window(p) for p in batch]))
        check(outs, len(batch))
        for i, p in enumerate(batch):
            blend.add(p, [o[i] for o in outs], weight)
        tell(len(batch))
    return len(run), len(skipped)


def sliding_window_synthesis(image: torch.Tensor | np.ndarray, predictor: Callable, roi_size,
                             overlap=SYNTHESIS_OVERLAP, mode="gaussian", sw_batch_size="auto", device="cpu",
                             n_outputs=None, progress=None, cval=0.0, precision="auto", backend="auto", background=None):
    """Patch-wise inference of ``predictor`` over ``image``, blended: ``sum(w * pred) / sum(w)``.

    The same contract as MONAI's ``sliding_window_inference``: ``image`` is (D, H, W),
    (C, D, H, W) or (1, C, D, H, W) on the CPU (numpy or torch, possibly larger than the
    device's memory); windows of ``roi_size`` start every ``int(roi * (1 - overlap))`` voxels,
    the last one shifted inward; an image smaller than a window is padded with ``cval``
    (half before, half after) and the output cropped back. ``predictor`` takes (B, C, *roi) on
    ``device`` and returns one tensor or a tuple (``n_outputs``, checked when given) of
    (B, C_out, *roi). Returns one array per output, (C_out, D, H, W) float32 (a 1-batch
    (1, C_out, D, H, W) for a 5D input), as numpy or torch like ``image``; a single output is
    returned bare. ``progress``: a :class:`Progress` or a callable, told the number of
    windows done.

    Beyond MONAI (see :mod:`MicroCTSynthLib.inference`): ``precision`` (``"auto"``: bf16 where
    the hardware has it), ``backend`` (``"auto"``: OpenVINO on a CPU when installed),
    ``sw_batch_size="auto"``, and ``background``: windows at or below that value everywhere are
    not run (see :func:`_run_windows`). ``precision="fp32", backend="torch"`` gives MONAI's
    result. The windows are blended in place into the output, whose denominator is computed
    plane by plane: the only volume-sized array is the output itself.
    """
    as_torch = isinstance(image, torch.Tensor)
    array = image.detach().cpu() if as_torch else torch.from_numpy(np.ascontiguousarray(image))
    ndim = array.ndim
    if ndim == 3:
        array = array[None]
    elif ndim == 5:
        if array.shape[0] != 1:
            raise ValueError("sliding_window_synthesis takes one image at a time (batch of 1).")
        array = array[0]
    elif ndim != 4:
        raise ValueError(f"The image must be (D, H, W), (C, D, H, W) or (1, C, D, H, W), not {tuple(array.shape)}.")
    array = array.float()
    roi = _triple(roi_size, "roi_size", int)
    overlap = check_overlap(overlap)
    size = tuple(array.shape[1:])
    pad_before = [max(r - s, 0) // 2 for r, s in zip(roi, size)]
    pad_after = [max(r - s, 0) - b for r, s, b in zip(roi, size, pad_before)]
    if any(pad_before) or any(pad_after):
        pads = []
        for b, a in zip(reversed(pad_before), reversed(pad_after)):
            pads += [b, a]
        array = torch.nn.functional.pad(array, pads, mode="constant", value=float(cval))
    work = tuple(array.shape[1:])
    starts = [patch_starts(n, r, overlap) for n, r in zip(work, roi)]
    positions = [(z, y, x) for z in starts[0] for y in starts[1] for x in starts[2]]
    runner = WindowPredictor(predictor, roi, device, precision, backend, windows=len(positions))
    batch_size = resolve_batch_size(sw_batch_size, roi, runner.device, runner.backend)
    weight = importance_map(roi, mode)
    blend = _Blend(0, work[0], work[1:])
    _run_windows(array, 0, positions, roi, runner, batch_size, weight, blend, progress, n_outputs, background)
    # Normalise in place, a few planes at a time: no volume-sized weight map.
    for lo, hi in plane_chunks(0, work[0], work[1:]):
        denominator = weight_sum(lo, hi, starts, roi, weight, work[1:])
        for numerator in blend.numerators:
            numerator[:, lo:hi] /= denominator
    crop = (slice(None),) + tuple(slice(b, b + n) for b, n in zip(pad_before, size))
    outputs = []
    for numerator in blend.numerators:
        out = numerator[crop] if any(pad_before) or any(pad_after) else numerator
        if ndim == 5:
            out = out[None]
        outputs.append(torch.from_numpy(np.ascontiguousarray(out)) if as_torch else out)
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


# -- patch-border seams --------------------------------------------------------------------------
def patch_border_jump(array: np.ndarray, roi_size, overlap=0.0) -> dict:
    """How much the intensity jumps across patch borders compared with inside patches.

    For each axis, the absolute differences between neighbouring voxels are split into pairs
    that straddle a window border of the tiling ``patch_starts(size, roi, overlap)`` (a plane
    where a window starts or ends, inside the volume) and all other pairs. Returns the mean
    absolute difference of each (``border``, ``interior``) and their ``ratio``: about 1 when the
    stitching leaves no seam, well above 1 when patch borders show.
    """
    a = np.asarray(array, dtype=np.float32)
    roi = _triple(roi_size, "roi_size", int)
    border_sum = interior_sum = 0.0
    border_n = interior_n = 0
    for axis in range(3):
        size = a.shape[axis]
        cuts = set()
        for s in patch_starts(size, roi[axis], overlap):
            cuts.update(c for c in (s, s + roi[axis]) if 0 < c < size)
        diff = np.abs(np.diff(a, axis=axis))  # diff[i] pairs voxel i with i + 1
        on_border = np.zeros(size - 1, dtype=bool)
        on_border[[c - 1 for c in sorted(cuts)]] = True
        shape = [1, 1, 1]
        shape[axis] = size - 1
        mask = np.broadcast_to(on_border.reshape(shape), diff.shape)
        border_sum += float(diff[mask].sum())
        border_n += int(mask.sum())
        interior_sum += float(diff[~mask].sum())
        interior_n += int((~mask).sum())
    border = border_sum / border_n if border_n else float("nan")
    interior = interior_sum / interior_n if interior_n else float("nan")
    return {"border": border, "interior": interior, "ratio": border / interior if interior > 0 else float("nan")}


# -- geometry -------------------------------------------------------------------------------------
def output_grid(ct: Volume, spacing_mm, roi=None, reference=None) -> Volume:
    """The empty output grid (zeros, uint8) on which a CT is synthesized.

    ``reference`` (a :class:`Volume`): its grid exactly. ``roi`` = (centre, size): an
    axis-aligned box in LPS centred on ``centre`` (x, y, z mm) of ``size`` mm (one number or
    three) at ``spacing_mm`` (the model's voxel size). Neither: the CT's whole field of view,
    in its own orientation, at ``spacing_mm``.
    """
    if roi is not None and reference is not None:
        raise MicroCTSynthError("Give either a region of interest or a reference grid, not both.")
    if reference is not None:
        grid = Volume(np.zeros(reference.shape, dtype=np.uint8), reference.spacing, reference.origin, reference.direction)
    else:
        spacing = np.asarray(_triple(spacing_mm, "The model's voxel size", float))
        if np.any(spacing <= 0):
            raise MicroCTSynthError(f"The model's voxel size must be positive, not {tuple(spacing)} mm.")
        if roi is not None:
            try:
                center, size_mm = roi
                center = np.asarray(_triple(center, "The region's centre", float))
                size_mm = np.asarray(_triple(size_mm, "The region's size", float))
            except (TypeError, ValueError) as exc:
                if isinstance(exc, MicroCTSynthError):
                    raise
                raise MicroCTSynthError("A region of interest is a centre (x, y, z mm) and a size (mm).") from None
            if not np.all(np.isfinite(center)) or np.any(~np.isfinite(size_mm)) or np.any(size_mm <= 0):
                raise MicroCTSynthError(f"The region of interest needs a finite centre and a positive size, not {tuple(size_mm)} mm.")
            direction = np.eye(3)
        else:
            direction = ct.direction_matrix
            size_mm = ct.extent_mm
            center = ct.center
        n = np.maximum(np.round(size_mm / spacing), 1).astype(int)
        voxels = int(np.prod(n.astype(np.float64)))
        if voxels > MAX_OUTPUT_VOXELS:
            raise MicroCTSynthError(
                f"The output grid would have {n[0]} x {n[1]} x {n[2]} voxels at {spacing.round(4).tolist()} mm; "
                "give a smaller region of interest around the cochlea."
            )
        origin = center - direction @ ((n - 1) / 2.0 * spacing)
        grid = Volume(np.zeros(tuple(n[::-1]), dtype=np.uint8), tuple(spacing), tuple(origin), tuple(direction.ravel()))
    return grid


def _resample(image: sitk.Image, grid: Volume, start_xyz, size_xyz, interpolator, default, pixel_type) -> np.ndarray:
    """``image`` on the box of ``grid`` indices ``[start, start + size)`` (may leave the grid), as (z, y, x)."""
    origin = grid.physical_points(np.asarray(start_xyz, dtype=float))[0]
    out = sitk.Resample(image, [int(s) for s in size_xyz], sitk.Transform(), interpolator, tuple(origin),
                        grid.spacing, grid.direction, float(default), pixel_type)
    return sitk.GetArrayFromImage(out)


def crop_to_grid(ct: Volume, grid: Volume, margin_mm: float) -> Volume:
    """The part of ``ct`` that a synthesis onto ``grid`` can read: the CT voxels within ``margin_mm``
    of the grid's box (and two more, for linear interpolation), a view of the CT's array, not a
    copy; the CT itself where that is all of it or none (the synthesis then says so)."""
    n = np.asarray(grid.size, dtype=float)
    corners = np.array([[x, y, z] for x in (-0.5, n[0] - 0.5) for y in (-0.5, n[1] - 0.5) for z in (-0.5, n[2] - 0.5)])
    index = ct.continuous_indices(grid.physical_points(corners))  # (8, 3) x, y, z of the CT
    reach = float(margin_mm) / np.asarray(ct.spacing) + 2.0  # a ball of margin_mm, in each CT axis' voxels
    lo = np.maximum(np.floor(index.min(axis=0) - reach), 0).astype(int)
    hi = np.minimum(np.ceil(index.max(axis=0) + reach) + 1, ct.size).astype(int)
    if np.any(hi <= lo) or (np.all(lo == 0) and np.all(hi == np.asarray(ct.size))):
        return ct
    array = ct.array[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]
    return Volume(array, ct.spacing, ct.physical_points(lo)[0], ct.direction)


def field_of_view(ct: Volume | sitk.Image, grid: Volume) -> np.ndarray:
    """Voxels of ``grid`` that fall inside the CT (a ones-image resampled with default 0), bool (z, y, x)."""
    image = ct if isinstance(ct, sitk.Image) else ct.to_sitk()
    ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(image)
    return _resample(ones, grid, (0, 0, 0), grid.size, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8).astype(bool)


# -- the generator as a predictor --------------------------------------------------------------
def enable_dropout(net: nn.Module) -> int:
    """Dropout modules to train mode (stochastic), everything else untouched; returns how many."""
    count = 0
    for module in net.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.train()
            count += 1
    return count


class _Passes(nn.Module):
    """N passes of the generator per window, packed as channels.

    Output channels: the N synthetic micro-CT passes, then (multitask) the mean over the
    passes of the tissue head's softmax. Blending is linear, so the blend of the mean softmax
    is the mean of the blended softmaxes.
    """

    def __init__(self, generator: nn.Module, samples: int, multitask: bool, image_head: bool = True):
        super().__init__()
        self.generator, self.samples, self.multitask, self.image_head = generator, samples, multitask, image_head

    def forward(self, x):
        images, probabilities = [], None
        for _ in range(self.samples):
            out = self.generator(x)
            if not self.image_head:  # the direct segmenter: logits only
                p = torch.softmax(out.float(), dim=1)
                probabilities = p if probabilities is None else probabilities + p
                continue
            if self.multitask:
                image, logits = out
                p = torch.softmax(logits.float(), dim=1)
                probabilities = p if probabilities is None else probabilities + p
            else:
                image = out[0] if isinstance(out, (tuple, list)) else out
            images.append(image.float())
        channels = images
        if self.multitask:
            channels = channels + [probabilities / self.samples]
        return torch.cat(channels, dim=1)


def _passes(generator: nn.Module, samples: int, multitask: bool, image_head: bool = True) -> _Passes:
    """One _Passes per generator and setting, kept with the generator (not a submodule: no state), so
    that a network compiled for it (OpenVINO) is reused by later syntheses (the cases of an experiment)."""
    per_generator = generator.__dict__.setdefault("_synthesis_passes", {})
    key = (int(samples), bool(multitask), bool(image_head))
    if key not in per_generator:
        per_generator[key] = _Passes(generator, samples, multitask, image_head)
    return per_generator[key]


def _entropy(probabilities: np.ndarray, axis=0) -> np.ndarray:
    """Entropy of class probabilities along ``axis``, normalised by log(n_classes) to [0, 1]."""
    p = np.clip(probabilities, 1e-12, 1.0)
    n = probabilities.shape[axis]
    return (-(p * np.log(p)).sum(axis=axis) / math.log(n)).astype(np.float32)


def _otsu_tissue(volume: Volume, fov: np.ndarray, closing_radius_mm=None) -> np.ndarray:
    """The thesis' tissue map (multi-Otsu + closing) of a synthetic micro-CT, 0 outside the FOV."""
    from .tissue import tissue_map

    values = volume.array[fov]
    if values.size and np.ptp(values) <= 1e-6 * max(1.0, float(np.abs(values).max())):
        raise MicroCTSynthError(
            "The synthetic micro-CT is uniform, so Otsu cannot split air, soft tissue and bone; check that the model is trained."
        )
    labels = np.asarray(tissue_map(volume, closing_radius_mm=closing_radius_mm, mask=fov).array, dtype=np.uint8)
    labels[~fov] = OUTSIDE
    return labels


# -- the pipeline ---------------------------------------------------------------------------------
def _slab_groups(rows, roi_z: int, plane: int, chunk_voxels: int) -> list:
    """Rows of windows (z starts) grouped into slabs of about ``chunk_voxels`` (at least one row each)."""
    groups, i = [], 0
    while i < len(rows):
        j = i
        while j + 1 < len(rows) and (rows[j + 1] - rows[i] + roi_z) * plane <= chunk_voxels:
            j += 1
        groups.append(rows[i:j + 1])
        i = j + 1
    return groups


class _Tiling:
    """The working grid of a synthesis and its windows: the output grid, at least a window wide
    (the CT fills the margin, cropped at the end), tiled by :func:`~MicroCTSynthLib.tiling.patch_starts`;
    the rows of windows grouped into slabs of about ``chunk_voxels``."""

    def __init__(self, grid_shape, patch_size: int, overlap: float, blend: str, chunk_voxels: int):
        self.roi = (int(patch_size),) * 3
        self.shape = np.asarray(grid_shape)
        self.pad_before = np.maximum(np.asarray(self.roi) - self.shape, 0) // 2
        self.work = np.maximum(self.shape, self.roi)
        self.shape_yx = (int(self.work[1]), int(self.work[2]))
        self.starts = [patch_starts(int(n), r, overlap) for n, r in zip(self.work, self.roi)]
        self.weight = importance_map(self.roi, blend)
        self.n_windows = len(self.starts[0]) * len(self.starts[1]) * len(self.starts[2])
        self.slabs = _slab_groups(self.starts[0], self.roi[0], int(self.work[1] * self.work[2]), chunk_voxels)

    def positions(self, rows) -> list:
        return [(z, y, x) for z in rows for y in self.starts[1] for x in self.starts[2]]

    def finished(self, acc: _Blend, z_end: int):
        """Planes [acc.start, z_end) of the working grid that lie on the output grid: their blended
        values (numerator / weight sum, in place) and where they go, or None."""
        pad, shape, z0 = self.pad_before, self.shape, acc.start
        lo, hi = max(z0, int(pad[0])), min(z_end, int(pad[0] + shape[0]))
        if hi <= lo:
            return None
        src = (slice(lo - z0, hi - z0), slice(pad[1], pad[1] + shape[1]), slice(pad[2], pad[2] + shape[2]))
        blended = acc.numerators[0][(slice(None),) + src]
        for a, b in plane_chunks(lo, hi, self.shape_yx):
            blended[:, a - lo:b - lo] /= weight_sum(a, b, self.starts, self.roi, self.weight, self.shape_yx)[(slice(None),) + src[1:]]
        return blended, slice(lo - pad[0], hi - pad[0])


class _Outputs:
    """The volumes a synthesis fills plane by plane, only those asked for: the synthetic micro-CT
    (the mean of the passes) and its standard deviation, a multitask model's labels and entropy,
    and, for a single-task entropy (Otsu is global), every pass in a temporary folder on disk,
    removed when the outputs are closed, whatever happened."""

    def __init__(self, grid_shape, samples: int, image_head: bool, multitask: bool, want_entropy: bool, normalization):
        self.samples, self.image_head, self.multitask, self.normalization = samples, image_head, multitask, normalization
        self.n_images = samples if image_head else 0
        self.microct = np.zeros(grid_shape, dtype=np.float32) if image_head else None
        self.std = np.zeros(grid_shape, dtype=np.float32) if samples > 1 and image_head else None
        self.labels = np.zeros(grid_shape, dtype=np.uint8) if multitask else None
        self.entropy = np.zeros(grid_shape, dtype=np.float32) if want_entropy else None
        self.passes, self._folder = None, None
        if samples > 1 and not multitask and want_entropy:
            self._folder = tempfile.TemporaryDirectory(prefix="microctsynth-passes-")
            self.passes = np.lib.format.open_memmap(os.path.join(self._folder.name, "passes.npy"), mode="w+",
                                                    dtype=np.float32, shape=(samples, *grid_shape))

    def __enter__(self) -> "_Outputs":
        return self

    def __exit__(self, *exc) -> None:
        self.passes = None  # the memory map goes before its file
        if self._folder is not None:
            self._folder.cleanup()

    def write(self, blended: np.ndarray, dst: slice) -> None:
        """Output planes ``dst`` from the blended channels: the passes' micro-CTs, then the mean softmax."""
        if self.image_head:
            passes = self.normalization.net_to_microct(blended[:self.samples]).astype(np.float32)
            self.microct[dst] = passes.mean(axis=0)
            if self.std is not None:
                self.std[dst] = passes.std(axis=0)
            if self.passes is not None:
                self.passes[:, dst] = passes
        if self.multitask:
            probabilities = blended[self.n_images:self.n_images + 3]
            self.labels[dst] = np.argmax(probabilities, axis=0).astype(np.uint8) + AIR
            if self.entropy is not None:
                self.entropy[dst] = _entropy(probabilities)


def _window_runner(generator: nn.Module, samples: int, multitask: bool, image_head: bool, roi, device, precision,
                   backend, sw_batch_size, mode: str, windows=None) -> tuple[WindowPredictor, int]:
    """The generator's passes as a predictor of windows, and how many windows go per call."""
    if samples > 1 and enable_dropout(generator) == 0:
        log("The model has no dropout: all samples are equal and the uncertainty is zero.", mode)
    if samples > 1 and backend in (None, "auto"):
        backend = "torch"  # stochastic passes keep dropout on, which only PyTorch runs
    runner = WindowPredictor(_passes(generator, samples, multitask, image_head), roi, device, precision, backend,
                             windows=windows)
    batch_size = resolve_batch_size(sw_batch_size, roi, runner.device, runner.backend)
    log(f"Synthesis: {runner.description}, {batch_size} window{'s' if batch_size > 1 else ''} per call.", mode)
    return runner, batch_size


def _carried_over(carry: _Blend | None, acc: _Blend) -> None:
    """Hand ``acc`` the partial sums of the previous slab's windows that reach into it."""
    if carry is None or carry.numerators is None:
        return
    n_keep = carry.start + carry.depth - acc.start
    if n_keep > 0:
        acc.numerators = [np.zeros((c.shape[0], acc.depth, *acc.shape_yx), dtype=np.float32) for c in carry.numerators]
        for a, c in zip(acc.numerators, carry.numerators):
            a[:, :n_keep] = c[:, acc.start - carry.start:]


def _run_slabs(ct_image: sitk.Image, grid: Volume, tiling: _Tiling, normalization, outside_value: float,
               runner: WindowPredictor, batch_size: int, outputs: _Outputs, bar: Progress, background) -> int:
    """Every slab: the CT resampled onto it and normalised, its windows run and blended, its finished
    planes written out and the rest carried over, one slab in memory at a time. Returns how many
    windows were not run (``background``, see :func:`_run_windows`)."""
    pad, work = tiling.pad_before, tiling.work
    carry, skipped = None, 0
    for g, rows in enumerate(tiling.slabs):
        z_lo, z_hi = rows[0], rows[-1] + tiling.roi[0]
        acc = _Blend(z_lo, z_hi - z_lo, tiling.shape_yx)
        _carried_over(carry, acc)
        carry = None  # only one slab in memory at a time
        # The CT on this slab of the working grid (indices relative to the output grid).
        start_xyz = (-int(pad[2]), -int(pad[1]), z_lo - int(pad[0]))
        size_xyz = (int(work[2]), int(work[1]), z_hi - z_lo)
        ct_slab = _resample(ct_image, grid, start_xyz, size_xyz, sitk.sitkLinear, outside_value, sitk.sitkFloat32)
        net_in = torch.from_numpy(np.ascontiguousarray(normalization.ct_to_net(ct_slab), dtype=np.float32))[None]
        del ct_slab
        _, n_skipped = _run_windows(net_in, z_lo, tiling.positions(rows), tiling.roi, runner, batch_size,
                                    tiling.weight, acc, bar, background=background)
        skipped += n_skipped
        del net_in
        finished = tiling.finished(acc, tiling.slabs[g + 1][0] if g + 1 < len(tiling.slabs) else int(work[0]))
        if finished is not None:
            outputs.write(*finished)
        carry = acc
    return skipped


def _result(outputs: _Outputs, grid: Volume, fov: np.ndarray, normalization, closing_radius_mm, mode: str) -> SynthesisResult:
    """The outputs as volumes: nothing outside the CT (the darkest micro-CT value, label 0, no
    spread); a single-task tissue map (and entropy over the passes) by the thesis' Otsu + closing."""
    if outputs.microct is not None:
        outputs.microct[~fov] = float(normalization.net_to_microct(np.float32(-1.0)))
    if outputs.std is not None:
        outputs.std[~fov] = 0.0
    microct = grid.with_array(outputs.microct) if outputs.microct is not None else None
    entropy = outputs.entropy
    if outputs.multitask:
        labels = outputs.labels
    else:
        log("Tissue map of the synthetic micro-CT: multi-Otsu and closing.", mode)
        labels = _otsu_tissue(microct, fov, closing_radius_mm)
        if entropy is not None and outputs.samples > 1:
            counts = np.zeros((3, *grid.shape), dtype=np.uint16)
            for k in range(outputs.samples):
                pass_labels = _otsu_tissue(grid.with_array(np.asarray(outputs.passes[k])), fov, closing_radius_mm)
                for c in range(3):
                    counts[c] += pass_labels == c + AIR
            entropy = _entropy(counts.astype(np.float32) / outputs.samples)
    labels[~fov] = OUTSIDE
    if entropy is not None:
        entropy[~fov] = 0.0
    return SynthesisResult(microct=microct, tissue=grid.with_array(labels),
                           std=grid.with_array(outputs.std) if outputs.std is not None else None,
                           entropy=grid.with_array(entropy) if entropy is not None else None)


def synthesize_on_grid(ct: Volume, grid: Volume, generator: nn.Module, normalization, patch_size: int,
                       multitask: bool = False, overlap=SYNTHESIS_OVERLAP, blend="gaussian", samples=1, device="cpu",
                       progress="none", chunk_voxels=DEFAULT_CHUNK_VOXELS, sw_batch_size="auto",
                       closing_radius_mm=None, spacing_mm=None, precision="auto", backend="auto",
                       entropy=None, skip_background=True, image_head=True) -> SynthesisResult:
    """Synthesize ``ct`` onto ``grid`` with ``generator`` (any module with the Generator's outputs;
    ``image_head`` False: a segmenter's logits only, which gives the tissue map and no micro-CT).

    The CT is resampled (linear, outside the CT the darkest value of the CT window) onto the
    grid one slab of patch rows at a time, normalised (``normalization.ct_to_net``), run
    patch-wise and blended in place; finished planes leave the slab as soon as no later patch
    covers them (a multitask model's labels are decided there, uint8), the rest carries over.
    See the module docstring for the outputs. ``spacing_mm``: the model's voxel size; when
    ``grid``'s differs, the synthesis runs at the model's voxel size over the grid's field of
    view and is resampled onto ``grid`` (labels by nearest neighbour).

    Only what is asked for is kept: ``std`` with ``samples`` > 1, ``entropy`` when ``entropy``
    is true (default: with ``samples`` > 1); otherwise they are None. ``precision``,
    ``backend``, ``sw_batch_size``: see :mod:`MicroCTSynthLib.inference`.
    ``skip_background``: windows wholly at the CT window's floor (outside the CT, or air darker
    than the window) take the network's output for such a window, computed once, instead of
    running (the same result, bar round-off).
    """
    samples = int(samples)
    if samples < 1:
        raise MicroCTSynthError(f"The number of samples must be at least 1, not {samples}.")
    want_entropy = samples > 1 if entropy is None else bool(entropy)
    if spacing_mm is not None and not np.allclose(grid.spacing, _triple(spacing_mm, "spacing_mm"), rtol=0.01):
        # The network only knows its own voxel size: synthesize at it over the same field of
        # view, then resample onto the requested grid.
        result = synthesize_on_grid(
            ct, regrid(grid, spacing_mm), generator, normalization, patch_size, multitask=multitask, overlap=overlap,
            blend=blend, samples=samples, device=device, progress=progress, chunk_voxels=chunk_voxels,
            sw_batch_size=sw_batch_size, closing_radius_mm=closing_radius_mm, precision=precision, backend=backend,
            entropy=want_entropy, skip_background=skip_background, image_head=image_head)
        return _resample_result(result, grid, field_of_view(ct, grid), float(normalization.net_to_microct(np.float32(-1.0))))
    overlap = check_overlap(overlap)
    if blend not in BLEND_MODES:
        raise MicroCTSynthError(f"The blending mode must be one of {', '.join(BLEND_MODES)}, not {blend!r}.")
    tiling = _Tiling(grid.shape, patch_size, overlap, blend, chunk_voxels)
    device, mode = resolve_device(device), _mode(progress)
    ct_image = ct.to_sitk()
    if ct_image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        ct_image = sitk.Cast(ct_image, sitk.sitkFloat32)
    fov = field_of_view(ct_image, grid)
    if not fov.any():
        raise MicroCTSynthError("The region of interest lies entirely outside the CT; centre it on the cochlea.")
    generator = generator.to(device).eval()
    multitask = multitask or not image_head
    runner, batch_size = _window_runner(generator, samples, multitask, image_head, tiling.roi, device, precision,
                                        backend, sw_batch_size, mode, tiling.n_windows)
    # Outside the CT: the darkest value of the CT window, whose network value is the floor of a window.
    outside_value = float(normalization.ct_window[0]) if hasattr(normalization, "ct_window") else -1000.0
    floor = float(np.min(normalization.ct_to_net(np.float32([outside_value, outside_value - 1.0]))))
    bar = progress if isinstance(progress, Progress) else Progress(tiling.n_windows, "synthesize", mode, unit="patch")
    with _Outputs(grid.shape, samples, image_head, multitask, want_entropy, normalization) as outputs:
        try:
            skipped = _run_slabs(ct_image, grid, tiling, normalization, outside_value, runner, batch_size, outputs, bar,
                                 floor if skip_background else None)
        finally:
            generator.eval()  # dropout off again: the caller gets the network as it was handed over
            if bar is not progress:
                bar.close()
        if skipped:
            log(f"{skipped} of {tiling.n_windows} windows lie wholly outside the CT or in air below its window: "
                "not run, they take the network's output for such a window.", mode)
        return _result(outputs, grid, fov, normalization, closing_radius_mm, mode)


def regrid(grid: Volume, spacing_mm) -> Volume:
    """A grid with ``grid``'s orientation and field of view at another voxel size."""
    spacing = np.asarray(_triple(spacing_mm, "spacing_mm", float))
    n = np.maximum(np.round(grid.extent_mm / spacing), 1).astype(int)
    corner = grid.physical_points(np.full(3, -0.5))[0]  # outer edge of the first voxel
    origin = corner + grid.direction_matrix @ (spacing / 2)
    return Volume(np.zeros(tuple(n[::-1]), np.uint8), tuple(spacing), tuple(origin), grid.direction)


def _resample_result(result: SynthesisResult, grid: Volume, fov: np.ndarray, outside: float) -> SynthesisResult:
    def onto(volume: Volume, interpolator, pixel) -> np.ndarray:
        return _resample(volume.to_sitk(), grid, (0, 0, 0), grid.size, interpolator, 0, pixel)

    microct = onto(result.microct, sitk.sitkLinear, sitk.sitkFloat32) if result.microct is not None else None
    tissue = onto(result.tissue, sitk.sitkNearestNeighbor, sitk.sitkUInt8)
    tissue[~fov] = OUTSIDE
    if microct is not None:
        microct[~fov] = outside
    extras = []
    for volume in (result.std, result.entropy):
        if volume is None:
            extras.append(None)
            continue
        array = onto(volume, sitk.sitkLinear, sitk.sitkFloat32)
        array[~fov] = 0.0
        extras.append(grid.with_array(array))
    return SynthesisResult(grid.with_array(microct) if microct is not None else None, grid.with_array(tissue), *extras)


def _mode(progress) -> str:
    if isinstance(progress, Progress):
        return progress.mode
    return progress if progress in ("bar", "json", "none") else "none"


def coarser_than_training(ct_spacing, meta: dict) -> str | None:
    """A sentence when the CT's voxels are coarser than any the model's training drew (its
    resolution randomisation, ``augment_voxel_mm``), else None: such a CT does not resolve the
    thinnest soft tissue the model learnt to map. Models trained without that randomisation say
    nothing (their training CTs' voxel size is not in the checkpoint)."""
    preset = meta.get("preset") or {}
    bounds = preset.get("augment_voxel_mm")
    if not bounds or not augment.enabled(preset):
        return None
    coarsest, limit = max(float(v) for v in ct_spacing), float(bounds[1])
    if coarsest <= limit * 1.001:
        return None
    return (f"The CT's voxels are up to {coarsest:.3g} mm, coarser than any this model was trained on (up to "
            f"{limit:.3g} mm): thin soft tissue may be missing from its tissue map; a CT reconstructed with "
            "thinner slices or a smaller voxel size gives a better one.")


def air_above_training(air_level: float, meta: dict) -> str | None:
    """A sentence when a CT's air (its :func:`~MicroCTSynthLib.data.ct_levels`) is brighter than in
    any CT the model's training drew (air at -1000 HU under the calibration randomisation,
    ``augment_gain`` x ``augment_offset_hu``), else None: such a CT is likely not in Hounsfield units.
    Darker air is clipped by the CT window, so it is not doubtful; models that calibrate each CT
    (``ct_calibration``) or were trained without that randomisation say nothing."""
    preset = meta.get("preset") or {}
    gain, offset = preset.get("augment_gain"), preset.get("augment_offset_hu")
    if not gain or not offset or not augment.enabled(preset):
        return None
    brightest = -1000.0 * min(float(g) for g in gain) + max(float(o) for o in offset)
    if air_level <= brightest:
        return None
    return (f"The CT's air lies at {air_level:.0f}, brighter than in any CT this model was trained on (at most "
            f"{brightest:.0f} HU): the CT may not be in Hounsfield units (values stored without their rescale "
            "intercept, a cone-beam CT's own grey scale), and its tissue map may be wrong. A model trained with CT "
            "calibration (the shipped multitask model) maps each CT's own air and bone first.")


def doubts_about_ct(ct: Volume, meta: dict, calibrated: bool) -> list[str]:
    """What a user should hear about a CT the model will still run on: voxels coarser than its
    training's (:func:`coarser_than_training`) and, for a model that does not calibrate each CT
    itself, air brighter than its training's (:func:`air_above_training`)."""
    from .data import ct_levels

    doubts = [coarser_than_training(ct.spacing, meta)]
    if not calibrated:
        try:
            doubts.append(air_above_training(ct_levels(ct.array)[0], meta))
        except MicroCTSynthError:  # no air and bone to measure: the network runs on the CT as it is
            pass
    return [d for d in doubts if d]


def model_spacing(meta: dict) -> tuple[float, float, float]:
    """The model's voxel size: the checkpoint's ``spacing_mm`` x its ``downsample``."""
    spacing = meta.get("spacing_mm")
    if spacing is None:
        raise MicroCTSynthError("The model file does not say at which voxel size it was trained (no 'spacing_mm').")
    factor = float(meta.get("downsample") or 1)
    return tuple(float(s) * factor for s in _triple(spacing, "spacing_mm", float))


def model_overlap(meta: dict) -> float:
    """The window overlap the model's preset gives synthesis (``synthesis_overlap``), or
    :data:`~MicroCTSynthLib.tiling.SYNTHESIS_OVERLAP` for a checkpoint without one."""
    return check_overlap((meta.get("preset") or {}).get("synthesis_overlap", SYNTHESIS_OVERLAP))


def synthesize(ct: Volume, model_path, roi=None, reference=None, overlap=None, blend="gaussian",
               samples=1, device="auto", progress="none", chunk_voxels=DEFAULT_CHUNK_VOXELS, precision="auto",
               backend="auto", sw_batch_size="auto", entropy=None) -> SynthesisResult:
    """Synthetic micro-CT and tissue map of ``ct`` with the trained model at ``model_path``.

    ``roi``: (centre x, y, z mm, size mm) of the output region; ``reference``: a
    :class:`Volume` (or path) whose grid the output takes; neither: the CT's field of view.
    ``overlap``: a fraction of the window (:mod:`tiling`; 0 is the thesis' tiling), by default the
    model's own (:func:`model_overlap`); ``blend`` "gaussian" or "constant"; ``samples`` > 1
    keeps dropout on for that many stochastic passes; ``progress`` "bar", "json", "none" or a
    :class:`Progress`. ``chunk_voxels`` bounds the slab processed at once. ``precision``,
    ``backend``, ``sw_batch_size``: see :mod:`MicroCTSynthLib.inference`; ``entropy``: see
    :func:`synthesize_on_grid`.
    """
    from .checkpoint import load_generator
    from .data import Normalization, ct_levels

    if not isinstance(ct, Volume):
        ct = read_volume(ct, "The CT")
    if reference is not None and not isinstance(reference, Volume):
        reference = read_volume(reference, "The reference grid")
    dev = resolve_device(device)
    generator, meta = load_generator(model_path, device=dev)
    normalization = Normalization.from_dict(meta["normalization"])
    patch_size = int(meta.get("patch_size") or 0)
    if patch_size <= 0 or patch_size % 4:
        raise MicroCTSynthError(f"The model file's patch size {patch_size} is not a positive multiple of 4.")
    spacing = model_spacing(meta)
    grid = output_grid(ct, spacing, roi=roi, reference=reference)
    # A model trained with ct_calibration sees CTs calibrated to its training scanners' air and bone
    # levels (the whole CT's own), and one trained with ct_harmonize_fwhm_mm sees them blurred as
    # its training CTs were; only the part of the CT that the windows reach is prepared.
    own = ct_levels(ct.array) if normalization.ct_levels is not None else None
    for doubt in doubts_about_ct(ct, meta, calibrated=own is not None):
        warn(doubt, _mode(progress))
    reach_mm = patch_size * max(spacing) + 3.0 * normalization.ct_harmonize_fwhm_mm / FWHM_PER_SIGMA
    part = crop_to_grid(ct, grid, reach_mm)
    ct = part.with_array(normalization.prepare_ct(part.array, part.spacing, own))
    multitask = meta.get("model") == "multi" or bool(meta.get("generator_args", {}).get("multitask", False))
    image_head = meta.get("model") != "segmenter"
    if not image_head and (precision is None or str(precision).lower() == "auto"):
        # The segmenter's thin soft tissue sits on near-ties of its four logits: in bf16 its tissue
        # maps agreed with fp32 to Dice 0.985-0.986 only (soft tissue, the shipped segmenter on
        # quick phantom specimens; 0.991 on a GPU), below the 0.99 every bf16 shortcut must keep.
        precision = "fp32"
    from .memory import check_memory, synthesis_bytes

    voxels = float(np.prod(grid.shape)) + float(np.prod(regrid(grid, spacing).shape))
    slab = max(float(chunk_voxels), float(patch_size) * np.prod(grid.shape[1:]))
    check_memory(synthesis_bytes(meta["generator_args"], patch_size, voxels, int(samples), slab, meta.get("model")),
                 f"Synthesizing a grid of {grid.shape[2]} x {grid.shape[1]} x {grid.shape[0]} voxels",
                 "give a smaller region of interest (--roi) or fewer --samples", dev)
    closing = (meta.get("preset") or {}).get("tissue_closing_radius_mm")
    overlap = model_overlap(meta) if overlap is None else overlap
    return synthesize_on_grid(ct, grid, generator, normalization, patch_size, multitask=multitask, overlap=overlap,
                              blend=blend, samples=samples, device=dev, progress=progress, chunk_voxels=chunk_voxels,
                              closing_radius_mm=closing, spacing_mm=spacing, precision=precision, backend=backend,
                              sw_batch_size=sw_batch_size, entropy=entropy, image_head=image_head)


# -- command line ---------------------------------------------------------------------------------
def parse_roi(center: str, size: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """``'x,y,z'`` (LPS mm) and ``'sx,sy,sz'`` or one number (mm) -> (centre, size)."""
    try:
        c = [float(v) for v in center.replace(" ", "").split(",")]
        s = [float(v) for v in size.replace(" ", "").split(",")]
    except ValueError:
        raise MicroCTSynthError(f"The region of interest '{center} {size}' must be numbers: centre 'x,y,z' and size 'sx,sy,sz' in mm.") from None
    if len(c) != 3 or len(s) not in (1, 3):
        raise MicroCTSynthError(f"The region of interest needs a centre 'x,y,z' and a size 's' or 'sx,sy,sz' in mm, not '{center} {size}'.")
    return tuple(c), tuple(s * 3 if len(s) == 1 else s)


def _region_of_interest(args):
    """(centre, size) of ``--roi-center`` and ``--roi-size``, or None when neither is given."""
    if args.roi_center is None and args.roi_size is None:
        return None
    if args.roi_center is None or args.roi_size is None:
        raise MicroCTSynthError("A region of interest needs both --roi-center and --roi-size.")
    if args.reference_grid:
        raise MicroCTSynthError("Give either a region of interest (--roi-center, --roi-size) or --reference-grid, not both.")
    return parse_roi(args.roi_center, args.roi_size)


def command_synthesize(args) -> int:
    """``microctsynth synthesize``: write the synthetic micro-CT, tissue map and uncertainty."""
    if args.uncertainty and args.samples < 2:
        raise MicroCTSynthError("The uncertainty needs --samples of 2 or more: one deterministic pass has no spread.")
    if not Path(args.model).exists():
        raise MicroCTSynthError(f"The model file '{args.model}' does not exist: check the path.")
    roi = _region_of_interest(args)
    ct = read_volume(args.ct, f"The CT '{args.ct}'")
    reference = read_volume(args.reference_grid, f"The reference grid '{args.reference_grid}'") if args.reference_grid else None
    result = synthesize(ct, args.model, roi=roi, reference=reference, overlap=args.overlap, blend=args.blend,
                        samples=args.samples, device=args.device, progress=args.progress,
                        precision=args.precision, backend=args.backend, sw_batch_size=args.sw_batch_size,
                        entropy=bool(args.entropy))
    outputs = {"tissue": str(write_volume(result.tissue, args.out_tissue))}
    if result.microct is not None and args.out_microct:
        outputs["microct"] = str(write_volume(result.microct, args.out_microct))
    elif args.out_microct:
        log(f"The model is a direct segmenter: it makes a tissue map and no micro-CT, so '{args.out_microct}' "
            "is not written.", args.progress)
    if args.uncertainty:
        outputs["uncertainty"] = str(write_volume(result.std, args.uncertainty))
    if args.entropy:
        outputs["entropy"] = str(write_volume(result.entropy, args.entropy))
    report_result(args.progress, "Wrote " + ", ".join(f"{k} {v}" for k, v in outputs.items()), outputs=outputs)
    return 0
