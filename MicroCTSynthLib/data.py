"""Training data of the cGAN: intensity normalisation, ×2 downsampling and 3D patches.

The thesis trains on 96³ patches of the CT registered onto the micro-CT grid (input A) and the
micro-CT (target B), with the micro-CT's tissue map for the weighted L1 (Eq. 2) and the Dice
loss (Eq. 4):

- training patches overlap by ``train_patch_overlap`` (a fraction of the patch, as every overlap
  of :mod:`tiling`: the thesis' 24 of 96 voxels is 0.25, windows every 72); validation and test
  patches do not overlap (``eval_patch_overlap`` 0);
- the tiling (:func:`~MicroCTSynthLib.tiling.patch_starts`) covers the bounding box of the
  micro-CT field of view (tissue label > 0); the last patch of a row is shifted inward so it ends
  at the box's edge, a volume smaller than a patch is padded (CT and micro-CT with -1, the net's
  floor; tissue with 0, which the losses ignore);
- patches that lie wholly outside the field of view (tissue all 0) are skipped;
- optional ×2 downsampling of both images (the thesis' multitask setting): images by block
  average, tissue maps by the most frequent label of each block;
- the intensity normalisation (CT window and micro-CT range to [-1, 1]) is fitted on the
  training cases only and stored with the model as plain data.

:class:`PatchDataset` is a ``torch.utils.data.Dataset``; :func:`patch_sampler` gives each
process of a distributed run its own patches (a ``DistributedSampler``, capped at
``max_patches_per_epoch`` when the preset asks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from .dataset import Dataset
from .errors import MicroCTSynthError
from .labels import OUTSIDE
from .tiling import check_overlap, patch_starts
from .volume import FWHM_PER_SIGMA, Volume, read_volume

__all__ = ["Normalization", "CasePair", "downsample_image", "downsample_labels", "downsample_volume",
           "patch_grid", "load_case", "load_split", "PatchDataset", "PatchSampler",
           "patch_sampler", "build_datasets"]

#: Padding value of images in network units: the bottom of the [-1, 1] range.
PAD_VALUE = -1.0


# -- intensity normalisation -------------------------------------------------------------------
def _to_unit(a, lo: float, hi: float) -> np.ndarray:
    return np.clip((np.asarray(a, dtype=np.float32) - lo) / (hi - lo) * 2.0 - 1.0, -1.0, 1.0).astype(np.float32)


#: A CT's lowest value is a fill outside its reconstructed field of view (e.g. -3024 or -2048 HU),
#: not air, when it holds this share of the voxels and no other value lies within
#: :data:`FILL_GAP_HU` of it (air is noisy; air clipped at -1024 has its neighbours right above).
FILL_SHARE, FILL_GAP_HU = 0.001, 100.0


def ct_levels(array: np.ndarray) -> tuple[float, float]:
    """The air and bone levels of a CT (its own calibration): the medians of the lowest and highest
    of three multi-Otsu classes of its voxels (at most 2 million of them, evenly strided), leaving
    out a constant fill outside the reconstructed field of view (:data:`FILL_SHARE`)."""
    from skimage.filters import threshold_multiotsu

    flat = np.asarray(array).reshape(-1)  # a view of a whole CT, not a float copy of it
    values = flat[:: max(1, flat.size // 2_000_000)].astype(np.float32)
    values = values[np.isfinite(values)]
    if values.size:
        floor = values.min()
        at_floor = values == floor
        rest = values[~at_floor]
        if at_floor.mean() >= FILL_SHARE and rest.size and np.ptp(rest) > 0 and rest.min() - floor > FILL_GAP_HU:
            values = rest
    if values.size < 27 or np.ptp(values) <= 0:
        raise MicroCTSynthError("The CT has no contrast to find its air and bone levels from.")
    try:
        low, high = threshold_multiotsu(values, classes=3)
    except ValueError:  # fewer than three grey values
        raise MicroCTSynthError("The CT has fewer than three grey values, so no air, soft tissue and bone to find its "
                                "calibration from: check that the volume is a CT, not a label map or mask.") from None
    air, bone = float(np.median(values[values < low])), float(np.median(values[values >= high]))
    if not bone - air >= 300.0:
        raise MicroCTSynthError(f"The CT shows no clear air and bone (levels {air:.0f} and {bone:.0f}): it cannot be "
                                "calibrated; check that it holds the temporal bone and the air around or inside it.")
    return air, bone


def calibrate_ct(array: np.ndarray, levels, own=None) -> np.ndarray:
    """``array`` mapped linearly so that its own air and bone levels (``own``, else measured by
    :func:`ct_levels`) land on ``levels``: one scanner's calibration (a cone-beam CT's "HU" are off
    by a scale and an offset) becomes the training scanners'."""
    air, bone = ct_levels(array) if own is None else own
    target_air, target_bone = (float(v) for v in levels)
    scale = (target_bone - target_air) / (bone - air)
    out = np.array(array, dtype=np.float32)  # the one copy: the rest is in place
    out -= np.float32(air)
    out *= np.float32(scale)
    out += np.float32(target_air)
    return out


def harmonize_ct(array: np.ndarray, spacing_xyz, fwhm_mm: float) -> np.ndarray:
    """``array`` (z, y, x) blurred by a Gaussian of ``fwhm_mm`` (isotropic, in mm; voxel size
    ``spacing_xyz``, edges replicated): with ``ct_harmonize_fwhm_mm`` every CT, sharp or not, is
    blurred by the same kernel before the network, so that the resolutions of different scanners
    (their blur adds in quadrature to this one) differ less in what the network sees."""
    from scipy.ndimage import gaussian_filter

    fwhm = float(fwhm_mm)
    if fwhm <= 0.0:
        return array
    sigma = [fwhm / FWHM_PER_SIGMA / float(s) for s in reversed(tuple(spacing_xyz))]
    return gaussian_filter(np.asarray(array, dtype=np.float32), sigma, mode="nearest", truncate=3.0).astype(np.float32)


@dataclass
class Normalization:
    """Fixed linear maps of the CT window (HU) and the micro-CT range onto [-1, 1], clipped.

    Fitted once on the training cases (:meth:`fit`) and saved in the checkpoint as plain data, so
    synthesis applies exactly the mapping the generator learnt. ``ct_levels``: with the preset's
    ``ct_calibration`` "air-bone", the air and bone levels (HU) every CT is calibrated to first
    (:func:`calibrate_ct`: the training CTs' median levels); None: CTs are taken as they are.
    ``ct_harmonize_fwhm_mm``: the preset's blur every CT gets next (:func:`harmonize_ct`; 0: none).
    """

    ct_window: tuple[float, float]
    microct_range: tuple[float, float]
    ct_levels: tuple[float, float] | None = None
    ct_harmonize_fwhm_mm: float = 0.0

    def __post_init__(self):
        self.ct_window = _check_range(self.ct_window, "CT window")
        self.microct_range = _check_range(self.microct_range, "micro-CT range")
        if self.ct_levels is not None:
            self.ct_levels = _check_range(self.ct_levels, "CT air and bone levels")
        fwhm = self.ct_harmonize_fwhm_mm
        if not (isinstance(fwhm, (int, float)) and math.isfinite(fwhm) and 0.0 <= fwhm <= 5.0):
            raise MicroCTSynthError(f"The CT's harmonising blur must be 0-5 mm FWHM, not {fwhm!r}.")
        self.ct_harmonize_fwhm_mm = float(fwhm)

    def calibrate(self, array: np.ndarray, own=None) -> np.ndarray:
        """A whole CT calibrated to the training CTs' air and bone levels (as is without ``ct_levels``);
        ``own``: the CT's own levels when ``array`` is only a part of it (:func:`ct_levels` of the whole)."""
        return array if self.ct_levels is None else calibrate_ct(array, self.ct_levels, own)

    def prepare_ct(self, array: np.ndarray, spacing_xyz, own=None) -> np.ndarray:
        """A CT (HU, voxel size ``spacing_xyz`` mm) as the network was trained to see it: calibrated
        (:meth:`calibrate`, ``own`` as there), then blurred by the harmonising kernel (:func:`harmonize_ct`)."""
        return harmonize_ct(self.calibrate(array, own), spacing_xyz, self.ct_harmonize_fwhm_mm)

    def ct_to_net(self, a: np.ndarray) -> np.ndarray:
        return _to_unit(a, *self.ct_window)

    def microct_to_net(self, a: np.ndarray) -> np.ndarray:
        return _to_unit(a, *self.microct_range)

    def net_to_microct(self, a: np.ndarray) -> np.ndarray:
        lo, hi = self.microct_range
        return ((np.asarray(a, dtype=np.float32) + 1.0) / 2.0 * (hi - lo) + lo).astype(np.float32)

    def to_dict(self) -> dict:
        levels = {} if self.ct_levels is None else {"ct_levels": list(self.ct_levels)}
        blur = {"ct_harmonize_fwhm_mm": self.ct_harmonize_fwhm_mm} if self.ct_harmonize_fwhm_mm > 0 else {}
        return {"ct_window": list(self.ct_window), "microct_range": list(self.microct_range), **levels, **blur}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalization":
        try:
            levels = d.get("ct_levels")
            return cls(tuple(d["ct_window"]), tuple(d["microct_range"]), tuple(levels) if levels is not None else None,
                       d.get("ct_harmonize_fwhm_mm", 0.0))
        except (KeyError, TypeError):
            raise MicroCTSynthError("The model file's intensity normalisation is missing or damaged.") from None

    @classmethod
    def fit(cls, cts: Sequence[np.ndarray], microcts: Sequence[np.ndarray], masks: Sequence[np.ndarray],
            ct_window=None, percentiles=(0.5, 99.5)) -> "Normalization":
        """Percentiles 0.5 / 99.5 of the CT and micro-CT voxels within the field of view (``masks``)
        of all training cases together; ``ct_window`` (HU) fixes the CT's window instead."""
        if not (len(cts) == len(microcts) == len(masks)) or not cts:
            raise MicroCTSynthError("The normalisation needs the same number (at least one) of CTs, micro-CTs and masks.")
        inside_ct = np.concatenate([np.asarray(c)[np.asarray(m, bool)].ravel() for c, m in zip(cts, masks)])
        inside_micro = np.concatenate([np.asarray(u)[np.asarray(m, bool)].ravel() for u, m in zip(microcts, masks)])
        if inside_ct.size == 0:
            raise MicroCTSynthError("The training cases have no voxel inside the micro-CT field of view (their tissue maps are all 0).")
        window = tuple(ct_window) if ct_window is not None else tuple(np.percentile(inside_ct, percentiles))
        micro = tuple(np.percentile(inside_micro, percentiles))
        if not micro[1] > micro[0]:
            raise MicroCTSynthError("The training micro-CTs have no contrast inside their field of view (all voxels alike).")
        if not window[1] > window[0]:
            raise MicroCTSynthError("The training CTs have no contrast inside the micro-CT field of view (all voxels alike).")
        return cls(window, micro)


def _check_range(r, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in r)
    except (TypeError, ValueError):
        raise MicroCTSynthError(f"The {name} must be two numbers (low, high), not {r!r}.") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise MicroCTSynthError(f"The {name} ({lo}, {hi}) must be finite with high above low.")
    return lo, hi


# -- ×2 downsampling -------------------------------------------------------------------------
def _blocks(a: np.ndarray, factor: int) -> np.ndarray:
    """(z, y, x) cropped to multiples of ``factor`` -> (z', y', x', factor³)."""
    z, y, x = (n // factor for n in a.shape)
    if min(z, y, x) == 0:
        raise MicroCTSynthError(f"A volume of {a.shape} voxels is too small to downsample by {factor}.")
    a = a[: z * factor, : y * factor, : x * factor]
    a = a.reshape(z, factor, y, factor, x, factor).transpose(0, 2, 4, 1, 3, 5)
    return a.reshape(z, y, x, factor ** 3)


def downsample_image(a: np.ndarray, factor: int = 2) -> np.ndarray:
    """Block average over ``factor``³ voxels (a trailing incomplete block is dropped)."""
    if factor == 1:
        return np.asarray(a, dtype=np.float32)
    return _blocks(np.asarray(a, dtype=np.float32), factor).mean(axis=-1, dtype=np.float32)


def downsample_labels(a: np.ndarray, factor: int = 2) -> np.ndarray:
    """The most frequent label of each ``factor``³ block; a tie goes to a tissue label before 0
    (outside), then to the lower label."""
    a = np.asarray(a)
    if factor == 1:
        return a.copy()
    blocks = _blocks(a, factor)
    labels = np.unique(a)
    # Order the candidates so that argmax's first-wins tie rule prefers tissue over "outside".
    order = sorted(labels.tolist(), key=lambda v: (v == OUTSIDE, v))
    counts = np.stack([(blocks == v).sum(axis=-1) for v in order], axis=-1)
    return np.asarray(order, dtype=a.dtype)[counts.argmax(axis=-1)]


def downsample_volume(volume: Volume, factor: int = 2, labels: bool = False) -> Volume:
    """A volume downsampled by ``factor`` with its geometry: spacing × factor, the origin moved to
    the centre of the first block, so the downsampled image covers the same physical space."""
    if factor == 1:
        return volume
    array = downsample_labels(volume.array, factor) if labels else downsample_image(volume.array, factor)
    spacing = np.asarray(volume.spacing) * factor
    shift = volume.direction_matrix @ (np.asarray(volume.spacing) * (factor - 1) / 2.0)
    return Volume(array, tuple(spacing), tuple(np.asarray(volume.origin) + shift), volume.direction)


# -- patch tiling ----------------------------------------------------------------------------------
def patch_grid(tissue: np.ndarray, patch_size: int, overlap: float = 0.0) -> list[tuple[int, int, int]]:
    """Starts (z, y, x) of the patches tiling the field of view (tissue > 0), ``overlap`` a fraction
    of the patch (:mod:`tiling`); patches without any field-of-view voxel are left out."""
    patch_size, overlap = int(patch_size), check_overlap(overlap)
    fov = np.asarray(tissue) > OUTSIDE
    if not fov.any():
        return []
    axes = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(fov.any(axis=other))
        axes.append(patch_starts(fov.shape[axis], patch_size, overlap, int(present[0]), int(present[-1]) + 1))
    starts = []
    for z in axes[0]:
        for y in axes[1]:
            for x in axes[2]:
                if fov[z:z + patch_size, y:y + patch_size, x:x + patch_size].any():
                    starts.append((z, y, x))
    return starts


# -- cases ---------------------------------------------------------------------------------------
@dataclass
class CasePair:
    """One case on the micro-CT grid: registered CT (HU), micro-CT and tissue map, as arrays (z, y, x)."""

    name: str
    ct: np.ndarray
    microct: np.ndarray
    tissue: np.ndarray
    spacing: tuple[float, float, float]   # (x, y, z) mm of these arrays (after any downsampling)

    @property
    def fov(self) -> np.ndarray:
        return self.tissue > OUTSIDE


def load_case(dataset: Dataset, case: str, downsample: int = 1) -> CasePair:
    """Read a prepared case (``ct_registered``, ``microct``, ``tissue``) and downsample it if asked."""
    if downsample not in (1, 2):
        raise MicroCTSynthError(f"The downsampling factor must be 1 or 2, not {downsample}.")
    ct = read_volume(dataset.path(case, "ct_registered"), f"The registered CT of {case}")
    microct = read_volume(dataset.path(case, "microct"), f"The micro-CT of {case}")
    tissue = read_volume(dataset.path(case, "tissue"), f"The tissue map of {case}")
    if ct.shape != microct.shape or tissue.shape != microct.shape:
        raise MicroCTSynthError(f"Case {case}: the registered CT {ct.shape}, micro-CT {microct.shape} and tissue map "
                                f"{tissue.shape} are not on one grid; run 'microctsynth prepare --data DIR --force'.")
    labels = tissue.array
    if np.issubdtype(labels.dtype, np.floating):
        if not np.all(labels == np.round(labels)):
            raise MicroCTSynthError(f"Case {case}: the tissue map must hold whole labels 0-3.")
    labels = labels.astype(np.uint8)
    if labels.max() > 3:
        raise MicroCTSynthError(f"Case {case}: the tissue map holds labels above 3 (0 outside, 1 air, 2 soft tissue, 3 bone).")
    spacing = tuple(s * downsample for s in microct.spacing)
    return CasePair(case, downsample_image(ct.array, downsample), downsample_image(microct.array, downsample),
                    downsample_labels(labels, downsample), spacing)


def load_split(dataset: Dataset, cases: Sequence[str], downsample: int = 1) -> list[CasePair]:
    return [load_case(dataset, c, downsample) for c in cases]


# -- torch datasets ------------------------------------------------------------------------------
def _pad_to(a: np.ndarray, size: int, value) -> np.ndarray:
    pad = [(0, max(size - n, 0)) for n in a.shape]
    return np.pad(a, pad, constant_values=value) if any(p[1] for p in pad) else a


class PatchDataset(torch.utils.data.Dataset):
    """Patches of normalised case pairs: item ``i`` is a dict with ``real_A`` (CT) and ``real_B``
    (micro-CT), float (1, p, p, p) in [-1, 1]; ``tissue``, int64 (1, p, p, p); ``case`` (index into
    :attr:`names`) and ``start`` (z, y, x)."""

    def __init__(self, cases: Sequence[CasePair], normalization: Normalization, patch_size: int, overlap: float = 0.0):
        self.patch_size = int(patch_size)
        if self.patch_size < 8 or self.patch_size % 4:
            raise MicroCTSynthError(f"The patch size must be a multiple of 4 and at least 8 voxels, not {patch_size}.")
        self.names = [c.name for c in cases]
        self.overlap = check_overlap(overlap)
        self.images, self.index = [], []
        for i, c in enumerate(cases):
            p = self.patch_size
            a = _pad_to(normalization.ct_to_net(c.ct), p, PAD_VALUE)
            b = _pad_to(normalization.microct_to_net(c.microct), p, PAD_VALUE)
            t = _pad_to(c.tissue.astype(np.uint8), p, OUTSIDE)
            self.images.append((torch.from_numpy(np.ascontiguousarray(a)), torch.from_numpy(np.ascontiguousarray(b)),
                                torch.from_numpy(np.ascontiguousarray(t))))
            self.index += [(i, s) for s in patch_grid(t, p, self.overlap)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        case, (z, y, x) = self.index[i]
        p = self.patch_size
        box = (slice(z, z + p), slice(y, y + p), slice(x, x + p))
        a, b, t = self.images[case]
        return {"real_A": a[box][None].clone(), "real_B": b[box][None].clone(), "tissue": t[box][None].long(),
                "case": case, "start": torch.tensor((z, y, x))}

    def fov_fraction(self, i: int) -> float:
        case, (z, y, x) = self.index[i]
        p = self.patch_size
        return float((self.images[case][2][z:z + p, y:y + p, x:x + p] > 0).float().mean())


class PatchSampler(DistributedSampler):
    """``DistributedSampler`` (each process its own share, reshuffled each epoch from ``seed`` + epoch)
    that visits at most ``max_patches`` patches per epoch in all, a fresh random subset each epoch."""

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 max_patches: int | None = None):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.per_rank = self.num_samples
        if max_patches is not None:
            if int(max_patches) < 1:
                raise MicroCTSynthError(f"max_patches_per_epoch must be at least 1 (or null), not {max_patches}.")
            self.per_rank = min(self.num_samples, math.ceil(int(max_patches) / num_replicas))

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[: self.per_rank])

    def __len__(self) -> int:
        return self.per_rank


def patch_sampler(dataset, shuffle: bool, seed: int, max_patches: int | None = None) -> PatchSampler:
    """The sampler of this process: its rank's share when ``torch.distributed`` is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    else:
        world, rank = 1, 0
    return PatchSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, max_patches=max_patches)


def implausible_intensities(cases: Sequence[CasePair], ct_window) -> str | None:
    """A warning when the training CTs do not look like Hounsfield units inside the CT window."""
    if ct_window is None or not cases:
        return None
    lo, hi = (float(v) for v in ct_window)
    inside = np.concatenate([c.ct[c.fov].ravel()[::7] for c in cases])
    if inside.size == 0:
        return None
    clipped = float(np.mean((inside < lo) | (inside > hi)))
    if clipped > 0.5 or float(np.ptp(np.percentile(inside, (1, 99)))) < 1e-3 * (hi - lo):
        return (f"Warning: {clipped:.0%} of the training CTs' voxels lie outside the CT window [{lo:g}, {hi:g}] HU "
                f"(median {float(np.median(inside)):.4g}): are the CTs in Hounsfield units?")
    return None


def build_datasets(data_dir, group: str, preset: dict, normalization: Normalization | None = None) -> dict:
    """Training and validation patches of ``group``, with the normalisation fitted on its training cases
    (or the one given, e.g. a resumed run's).

    Returns ``{"train": PatchDataset, "val": PatchDataset | None, "normalization": Normalization,
    "spacing_mm": native micro-CT spacing (x, y, z), "downsample": int, "cases": the group}``.
    """
    dataset = data_dir if isinstance(data_dir, Dataset) else Dataset.load(Path(data_dir))
    split = dataset.group(group)
    factor = int(preset.get("downsample") or 1)
    train_cases = load_split(dataset, split["train"], factor)
    val_cases = load_split(dataset, split["val"], factor)
    # Calibration first (a resumed run keeps its levels), so that the normalisation is fitted on
    # the CTs the network will see; each training CT's own levels are measured once.
    own = [None] * len(train_cases)
    if normalization is not None:
        levels = normalization.ct_levels
    elif preset.get("ct_calibration", "none") == "air-bone":
        own = [ct_levels(c.ct) for c in train_cases]
        levels = tuple(float(v) for v in np.median(np.array(own), axis=0))
    else:
        levels = None
    if levels is not None:
        for c, measured in zip(train_cases + val_cases, own + [None] * len(val_cases)):
            c.ct = calibrate_ct(c.ct, levels, own=measured)
    blur = (normalization.ct_harmonize_fwhm_mm if normalization is not None
            else float(preset.get("ct_harmonize_fwhm_mm", 0.0)))
    for c in train_cases + val_cases:
        c.ct = harmonize_ct(c.ct, c.spacing, blur)
    if normalization is None:
        normalization = Normalization.fit([c.ct for c in train_cases], [c.microct for c in train_cases],
                                          [c.fov for c in train_cases], ct_window=preset.get("ct_window_hu"))
        normalization.ct_levels = levels
        normalization.ct_harmonize_fwhm_mm = blur
    patch = int(preset["patch_size"])
    train = PatchDataset(train_cases, normalization, patch, preset.get("train_patch_overlap", 0.0))
    if len(train) == 0:
        raise MicroCTSynthError(f"Group {group}'s training cases have no patch inside the micro-CT field of view.")
    val = PatchDataset(val_cases, normalization, patch, preset.get("eval_patch_overlap", 0.0)) if val_cases else None
    native = tuple(s / factor for s in train_cases[0].spacing)
    return {"train": train, "val": val, "normalization": normalization, "spacing_mm": native,
            "downsample": factor, "cases": split,
            "warning": implausible_intensities(train_cases, normalization.ct_window)}
