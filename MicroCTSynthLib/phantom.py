"""The inner-ear phantom: paired clinical CT / micro-CT specimens with their true tissue maps.

No public paired CT / micro-CT of the temporal bone is reachable, so the project makes its own
specimens, named as the thesis' study codes (S3_1, S3_2, S3_7, S3_8, S3_11, S3_12). Each is what
a micro-CT scanner sees of an ex-vivo temporal-bone specimen: a sawn block of bone lying in air,
with its own anatomy (:mod:`MicroCTSynthLib.anatomy`: labyrinth, nerves, middle ear, ossicles,
membranes, mucosa, antrum and air cells, each structure varying on its own within published
ranges), its own pose on the scanner bed (about +-15 deg per axis, a few mm) and its own clinical
scanner.

The micro-CT renders the truth at its own voxel size with a small (about one voxel) blur,
scanner gain/offset and noise, inside a cylindrical field of view with an exact constant fill
value outside, as real reconstructions have. The CT comes from a scanner of the specimen's own
(:data:`CT_SCANNERS`): multi-detector or cone-beam CT with a native voxel of 0.2-0.4 mm, rendered
finer, blurred by its point-spread function (FWHM 0.4-0.7 mm), averaged over its voxels (partial
volume), darkened by mild beam-hardening streaks along the lines through dense bone, calibrated
off by a scale and an offset (cone-beam "HU"), with noise of its own level and texture, then
resampled (linear) to the 0.3 mm grid a user would work on. It lies misaligned by a random rigid
transform (``true_transform``, up to 10 deg and 2 mm: a micro-CT point maps to the CT point,
SimpleITK's resampling convention) and holds the whole micro-CT field of view after that
misalignment, plus a margin. The scanner's settings are kept in the specimen's parameters: the
tissue map belongs to the anatomy, not to the scanner.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .anatomy import BONE as _BONE
from .anatomy import Anatomy, draw_anatomy, rotation, unit
from .dataset import CASES_FILE, SPECIMENS, Dataset
from .errors import MicroCTSynthError
from .labels import AIR, BONE, OUTSIDE, SOFT_TISSUE
from .presets import load_preset
from .progress import Progress, emit_json, report_result
from .volume import FWHM_PER_SIGMA, Volume, atomic_path, write_volume

#: Version of the phantom's model, written into every dataset (cases.json) and model card.
PHANTOM_VERSION = 2

# Material codes of the anatomy (1 air, 2 fluid, 3 bone, 4 soft tissue) -> tissue labels.
_MATERIAL_TO_LABEL = np.array([OUTSIDE, AIR, SOFT_TISSUE, BONE, SOFT_TISSUE], dtype=np.uint8)

#: Points evaluated at once: bounds the temporaries to a few tens of MB whatever the grid.
_CHUNK = 1 << 20

#: The clinical scanners a specimen's CT may come from (uniform ranges per kind). Multi-detector
#: CT is calibrated in HU; cone-beam CT's grey values are "HU" off by a scale and an offset, with
#: more and coarser-grained noise. Native voxels of 0.2-0.4 mm are resampled to the 0.3 mm grid.
CT_SCANNERS = {
    "MDCT": {"voxel_mm": (0.2, 0.4), "psf_fwhm_mm": (0.4, 0.7), "gain": (0.97, 1.03), "offset_hu": (-20.0, 20.0),
             "noise_hu": (15.0, 50.0), "noise_correlation_mm": (0.0, 0.2), "streak_hu": (20.0, 60.0)},
    "CBCT": {"voxel_mm": (0.2, 0.4), "psf_fwhm_mm": (0.4, 0.7), "gain": (0.75, 1.25), "offset_hu": (-250.0, 150.0),
             "noise_hu": (30.0, 90.0), "noise_correlation_mm": (0.1, 0.35), "streak_hu": (30.0, 100.0)},
}


def _bright_and_dark(common: dict, dark: tuple, bright: tuple) -> dict:
    """Two cone-beam scanners alike but for their calibration: ``dark`` and ``bright`` are
    ((gain low, high), (offset low, high HU))."""
    return {name: {**common, "gain": gain, "offset_hu": offset}
            for name, (gain, offset) in (("CBCT-bright", bright), ("CBCT-dark", dark))}


#: Scanners just outside every range of :data:`CT_SCANNERS`: calibrated further off (brighter or
#: darker), a little coarser, blurrier and noisier. ``phantom --scanners unseen`` renders the same
#: specimens (same anatomy, pose and misalignment) as such a scanner would, to test that a model
#: trained on the clinical ranges follows the anatomy rather than the scanner.
UNSEEN_SCANNERS = _bright_and_dark(
    {"voxel_mm": (0.4, 0.44), "psf_fwhm_mm": (0.7, 0.75), "noise_hu": (90.0, 105.0),
     "noise_correlation_mm": (0.35, 0.4), "streak_hu": (100.0, 115.0)},
    dark=((0.68, 0.74), (-320.0, -250.0)), bright=((1.26, 1.32), (150.0, 220.0)))
#: Scanners far outside (``--scanners far``): 0.42-0.5 mm voxels, 0.75-0.85 mm blur, 95-120 HU of
#: coarse noise; thin soft tissue (membranes, the lamina's edges) is then below what the CT resolves.
FAR_SCANNERS = _bright_and_dark(
    {"voxel_mm": (0.42, 0.5), "psf_fwhm_mm": (0.75, 0.85), "noise_hu": (95.0, 120.0),
     "noise_correlation_mm": (0.36, 0.45), "streak_hu": (105.0, 130.0)},
    dark=((0.64, 0.72), (-330.0, -260.0)), bright=((1.28, 1.36), (160.0, 250.0)))
#: The coarsest, noisiest and furthest-calibrated corner *inside* the clinical cone-beam ranges
#: (``--scanners edge``): what a scanner the training ranges hold loses against a typical one, to
#: tell it apart from what leaving the ranges (``unseen``) loses.
EDGE_SCANNERS = _bright_and_dark(
    {"voxel_mm": (0.38, 0.4), "psf_fwhm_mm": (0.67, 0.7), "noise_hu": (85.0, 90.0),
     "noise_correlation_mm": (0.32, 0.35), "streak_hu": (95.0, 100.0)},
    dark=((0.75, 0.78), (-250.0, -220.0)), bright=((1.22, 1.25), (120.0, 150.0)))
SCANNER_SETS = {"clinical": CT_SCANNERS, "edge": EDGE_SCANNERS, "unseen": UNSEEN_SCANNERS, "far": FAR_SCANNERS}
#: Bone denser than this (HU) hardens the beam.
_DENSE_BONE_HU = 1500.0


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------
def specimen_seed(name: str, seed: int = 0) -> int:
    """The specimen's own seed, derived from its name and the base seed (stable across runs)."""
    digest = hashlib.sha256(f"microctsynth-phantom:{name}:{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def draw_ct_scanner(rng: np.random.Generator, scanners: dict = CT_SCANNERS) -> dict:
    """A clinical scanner: its kind and one setting drawn from each of its ranges (JSON-able)."""
    kind = str(rng.choice(sorted(scanners)))
    return {"kind": kind, **{key: float(rng.uniform(*bounds)) for key, bounds in sorted(scanners[kind].items())}}


def draw_parameters(name: str, seed: int = 0, preset: dict | None = None, scanners: str = "clinical") -> dict:
    """The specimen's drawn parameters (JSON-able): pose, misalignment, anatomy and scanners
    (``scanners``: a name of :data:`SCANNER_SETS`; the rest does not depend on it)."""
    preset = load_preset("quick") if preset is None else preset
    root = specimen_seed(name, seed)
    rng = np.random.default_rng(root)
    pose_sd, pose_max = preset["phantom_pose_sd_deg"], preset["phantom_pose_max_deg"]
    shift_sd, shift_max = preset["phantom_pose_shift_sd_mm"], preset["phantom_pose_shift_max_mm"]
    mis_deg, mis_mm = preset["phantom_misalignment_max_deg"], preset["phantom_misalignment_max_mm"]
    # The CT / micro-CT misalignment: a random axis, an angle up to the maximum, a shift up to it.
    axis = unit(rng.normal(size=3))
    angle = rng.uniform(0.3, 1.0) * mis_deg
    shift_dir = unit(rng.normal(size=3))
    p = {
        "name": name,
        "seed": int(seed),
        "specimen_seed": root,
        "phantom_version": PHANTOM_VERSION,
        # Pose on the scanner bed: small rotations about each axis, a shift of a few mm.
        "pose_rotation_deg": np.clip(rng.normal(0, pose_sd, 3), -pose_max, pose_max).tolist(),
        "pose_shift_mm": np.clip(rng.normal(0, shift_sd, 3), -shift_max, shift_max).tolist(),
        "ct_misalignment_rotvec_rad": (axis * math.radians(angle)).tolist(),
        "ct_misalignment_deg": angle,
        "ct_misalignment_shift_mm": (shift_dir * rng.uniform(0.3, 1.0) * mis_mm).tolist(),
        # Micro-CT scanner (arbitrary grey units)
        "microct_gain": rng.uniform(9000.0, 11000.0),
        "microct_offset": rng.uniform(800.0, 1500.0),
        "microct_noise": rng.uniform(0.02, 0.035),  # sigma as a fraction of the bone - air contrast
        "microct_fill_value": 0.0,
    }
    # Anatomy and CT scanner from streams of their own: a change to one leaves the other alone.
    p["anatomy"] = draw_anatomy(np.random.default_rng([root, 2]))
    p["ct_scanner"] = draw_ct_scanner(np.random.default_rng([root, 3]), _scanner_set(scanners))
    return p


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
@dataclass
class Specimen:
    name: str
    microct: Volume  #: micro-CT at the preset's voxel size (grey values)
    ct: Volume  #: clinical CT on its own native grid, HU (int16)
    labels: Volume  #: truth on the micro-CT grid: 0 outside the FOV, 1 air, 2 soft tissue, 3 bone
    true_transform: sitk.Transform  #: micro-CT point -> CT point (SimpleITK resampling convention)
    params: dict = field(default_factory=dict)  #: the drawn parameters, JSON-able


def _render(anatomy: Anatomy, M: np.ndarray, b: np.ndarray, size_xyz, spacing, origin, structures: bool = False):
    """Material codes and bone density (and, with ``structures``, structure codes) on an
    axis-aligned grid whose physical points ``x`` lie at ``M @ x + b`` in the specimen's frame;
    slab by slab, so memory stays bounded."""
    nx, ny, nz = size_xyz
    A = np.asarray(M, float) @ np.diag(spacing)  # index (i, j, k) -> specimen frame
    c = np.asarray(M, float) @ np.asarray(origin, float) + np.asarray(b, float)
    i = np.arange(nx, dtype=np.float32)[None, None, :]
    j = np.arange(ny, dtype=np.float32)[None, :, None]
    out = [np.empty((nz, ny, nx), np.uint8), np.empty((nz, ny, nx), np.float32)]
    if structures:
        out.append(np.empty((nz, ny, nx), np.uint8))
    step = max(1, _CHUNK // (nx * ny))
    for z0 in range(0, nz, step):
        z1 = min(nz, z0 + step)
        k = np.arange(z0, z1, dtype=np.float32)[:, None, None]
        q = np.empty((3, (z1 - z0) * ny * nx), np.float32)
        for r in range(3):
            row = np.float32(c[r]) + np.float32(A[r, 0]) * i + np.float32(A[r, 1]) * j + np.float32(A[r, 2]) * k
            q[r] = row.ravel()
        for array, values in zip(out, anatomy.materials(q, structures=structures)):
            array[z0:z1] = values.reshape(z1 - z0, ny, nx)
    return tuple(out)


def structure_map(specimen: "Specimen", preset=None) -> np.ndarray:
    """The anatomical structure of every micro-CT voxel (codes of
    :data:`~MicroCTSynthLib.anatomy.STRUCTURES`; 255 outside the field of view)."""
    cfg = load_preset(specimen.params.get("preset", "quick") if preset is None else preset)
    (size, spacing, origin), _, (M, b) = _microct_frame(cfg, specimen.params)
    codes = _render(Anatomy(specimen.params["anatomy"]), M, b, size, spacing, origin, structures=True)[2]
    codes[specimen.labels.array == OUTSIDE] = 255
    return codes


def _pose(params: dict, center: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Affine map (M, b) from a physical micro-CT point to the specimen frame: the pose on the
    scanner bed (rotation, shift about the grid centre) and the size, undone."""
    R = rotation(params["pose_rotation_deg"])
    t = np.asarray(center, float) + np.asarray(params["pose_shift_mm"], float)
    return R.T, -(R.T @ t)


def true_transform_of(params: dict, center) -> sitk.Euler3DTransform:
    """The CT / micro-CT misalignment: a micro-CT point -> the CT point, centred on the micro-CT."""
    rot = sitk.VersorRigid3DTransform()
    rotvec = np.asarray(params["ct_misalignment_rotvec_rad"], float)
    angle = float(np.linalg.norm(rotvec))
    axis = rotvec / angle if angle > 0 else np.array([0.0, 0.0, 1.0])
    rot.SetRotation(tuple(axis), angle)
    t = sitk.Euler3DTransform()
    t.SetCenter(tuple(float(c) for c in center))
    t.SetMatrix(rot.GetMatrix())
    t.SetTranslation(tuple(float(v) for v in params["ct_misalignment_shift_mm"]))
    return t


def _check_preset(cfg: dict) -> None:
    """Refuse grids the phantom cannot make, with a sentence (a preset file may hold anything)."""
    for key in ("microct_spacing_mm", "ct_spacing_mm", "phantom_fov_mm"):
        value = cfg.get(key)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise MicroCTSynthError(f"The preset's {key} must be a positive number of mm, not {value!r}.")
    n = float(cfg["phantom_fov_mm"]) / float(cfg["microct_spacing_mm"])
    if not 16 <= n <= 1024:
        raise MicroCTSynthError(
            f"A {cfg['phantom_fov_mm']} mm field of view at {cfg['microct_spacing_mm']} mm voxels gives "
            f"{n:.0f} voxels per side; the phantom needs between 16 and 1024."
        )
    k = cfg.get("phantom_ct_supersampling")
    if not isinstance(k, int) or not 1 <= k <= 8:
        raise MicroCTSynthError(f"The preset's phantom_ct_supersampling must be a whole number from 1 to 8, not {k!r}.")


def _microct_geometry(preset: dict):
    spacing = float(preset["microct_spacing_mm"])
    fov = float(preset["phantom_fov_mm"])
    n = int(round(fov / spacing))
    origin = np.full(3, -(n - 1) / 2.0 * spacing)  # the grid is centred on the scanner's axis
    return (n, n, n), (spacing,) * 3, tuple(origin)


def _microct_frame(preset: dict, params: dict):
    """The micro-CT grid (size, spacing, origin), its centre, and the map (M, b) from its points
    to the specimen's frame."""
    size, spacing, origin = _microct_geometry(preset)
    center = np.asarray(origin) + (np.asarray(size) - 1) / 2.0 * np.asarray(spacing)
    return (size, spacing, origin), center, _pose(params, center)


def _ct_geometry(preset: dict):
    spacing = float(preset["ct_spacing_mm"])
    half = float(preset["phantom_fov_mm"]) / 2.0
    tilt = math.radians(float(preset["phantom_misalignment_max_deg"]))
    # Half-width that holds the whole (cylindrical) micro-CT field of view after the
    # misalignment, plus a margin, so registration has full overlap.
    need = half * (math.cos(tilt) + math.sin(tilt)) + float(preset["phantom_misalignment_max_mm"]) + float(
        preset["phantom_ct_margin_mm"]
    )
    n = int(math.ceil(2 * need / spacing))
    origin = np.full(3, -(n - 1) / 2.0 * spacing)
    return (n, n, n), (spacing,) * 3, tuple(origin)


def _microct_intensity(mat: np.ndarray, dens: np.ndarray) -> np.ndarray:
    """Linear attenuation relative to bone of density 1 (air 0, fluid 0.32, soft tissue 0.37)."""
    lut = np.array([0.0, 0.0, 0.32, 0.0, 0.37], np.float32)
    out = lut[mat]
    bone = mat == _BONE
    out[bone] = dens[bone]
    return out


def _ct_hu(mat: np.ndarray, dens: np.ndarray) -> np.ndarray:
    lut = np.array([-1000.0, -1000.0, 20.0, 0.0, 40.0], np.float32)  # fluid 20 HU, soft tissue 40 HU
    out = lut[mat]
    bone = mat == _BONE
    out[bone] = 1700.0 * dens[bone]
    return out


def _ct_native_grid(ct_size, ct_spacing, ct_origin, voxel_mm: float):
    """The scanner's own grid (isotropic ``voxel_mm``) over the delivered CT grid's extent."""
    extent = (np.asarray(ct_size) - 1) * np.asarray(ct_spacing)
    n = np.ceil(extent / voxel_mm).astype(int) + 2
    center = np.asarray(ct_origin) + extent / 2
    origin = center - (n - 1) / 2.0 * voxel_mm
    return tuple(int(v) for v in n), (voxel_mm,) * 3, tuple(origin)


def _beam_hardening(hu: np.ndarray, spacing_mm: float, streak_hu: float) -> np.ndarray:
    """Dark streaks along the scanner's in-plane axes through dense bone: each line is darkened by
    the square of the dense bone it crosses, near that bone (a cheap stand-in for the
    polychromatic beam's error). Returns the artefact (HU, <= 0), at most ``streak_hu`` deep."""
    dense = (hu > _DENSE_BONE_HU).astype(np.float32)
    if not dense.any():
        return np.zeros_like(hu)
    lx = dense.sum(axis=2, keepdims=True) * spacing_mm  # (z, y, 1): mm of dense bone along x
    ly = dense.sum(axis=1, keepdims=True) * spacing_mm  # (z, 1, x)
    path = lx * lx + ly * ly
    near = np.clip(3.0 * ndimage.gaussian_filter(dense, sigma=1.0 / spacing_mm), 0.0, 1.0)
    return -np.float32(streak_hu) * near * path / max(float(path.max()), 1e-6)


def _correlated_noise(rng, shape, sigma_hu: float, correlation_voxels: float) -> np.ndarray:
    noise = rng.standard_normal(shape, dtype=np.float32)
    if correlation_voxels > 0.3:
        noise = ndimage.gaussian_filter(noise, sigma=correlation_voxels, output=np.float32)
        noise /= max(float(noise.std()), 1e-6)
    return noise * np.float32(sigma_hu)


def render_ct(anatomy: Anatomy, params: dict, cfg: dict, M, b, transform: sitk.Transform, rng) -> Volume:
    """The specimen's clinical CT (int16 HU) on the delivered 0.3 mm grid, through its scanner."""
    scanner = params["ct_scanner"]
    inverse = transform.GetInverse()
    A = np.asarray(inverse.GetMatrix(), float).reshape(3, 3)
    a0 = np.asarray(inverse.TransformPoint((0.0, 0.0, 0.0)), float)
    ct_size, ct_spacing, ct_origin = _ct_geometry(cfg)
    voxel = float(scanner["voxel_mm"])
    nat_size, nat_spacing, nat_origin = _ct_native_grid(ct_size, ct_spacing, ct_origin, voxel)
    # Rendered finer than the native voxel (about ct_spacing / phantom_ct_supersampling).
    k = max(1, int(round(int(cfg["phantom_ct_supersampling"]) * voxel / float(ct_spacing[0]))))
    fine_spacing = tuple(s / k for s in nat_spacing)
    fine_origin = tuple(o - (k - 1) / (2.0 * k) * s for o, s in zip(nat_origin, nat_spacing))
    fine_size = tuple(n * k for n in nat_size)
    # A CT point y is the micro-CT point A y + a0, hence the specimen point M (A y + a0) + b.
    mat, dens = _render(anatomy, M @ A, M @ a0 + b, fine_size, fine_spacing, fine_origin)
    hu = _ct_hu(mat, dens)
    del mat, dens
    hu += _beam_hardening(hu, fine_spacing[0], scanner["streak_hu"])
    sigma = scanner["psf_fwhm_mm"] / FWHM_PER_SIGMA / fine_spacing[0]
    hu = ndimage.gaussian_filter(hu, sigma=sigma, output=np.float32)
    nz, ny, nx = nat_size[::-1]
    hu = hu.reshape(nz, k, ny, k, nx, k).mean(axis=(1, 3, 5))
    hu = hu * np.float32(scanner["gain"]) + np.float32(scanner["offset_hu"])
    hu += _correlated_noise(rng, hu.shape, scanner["noise_hu"], scanner["noise_correlation_mm"] / voxel)
    native = Volume(hu, nat_spacing, nat_origin).to_sitk()
    grid = sitk.Image([int(n) for n in ct_size], sitk.sitkFloat32)
    grid.SetSpacing(ct_spacing)
    grid.SetOrigin(ct_origin)
    delivered = sitk.GetArrayFromImage(sitk.Resample(native, grid, sitk.Transform(), sitk.sitkLinear, -1000.0))
    return Volume(np.clip(np.rint(delivered), -1024, 3071).astype(np.int16), ct_spacing, ct_origin)


def _scanner_set(name: str) -> dict:
    if name not in SCANNER_SETS:
        raise MicroCTSynthError(f"The scanners are {', '.join(SCANNER_SETS)}, not '{name}'.")
    return SCANNER_SETS[name]


def make_specimen(name: str, preset="quick", seed: int = 0, scanners: str = "clinical") -> Specimen:
    """One phantom specimen, deterministic per ``(name, seed)`` (and the preset's grids); its CT
    from a scanner of the set ``scanners`` (a name of :data:`SCANNER_SETS`)."""
    if name not in SPECIMENS:
        raise MicroCTSynthError(f"Unknown specimen '{name}': the phantom has {', '.join(SPECIMENS)}.")
    cfg = load_preset(preset)
    _check_preset(cfg)
    params = draw_parameters(name, seed, cfg, scanners)
    params["preset"] = cfg.get("name", str(preset))
    anatomy = Anatomy(params["anatomy"])
    rng = np.random.default_rng([params["specimen_seed"], 1])

    # Micro-CT: the truth sampled at the voxel centres, blurred by a ~1 voxel PSF (partial volume).
    (size, spacing, origin), center, (M, b) = _microct_frame(cfg, params)
    mat, dens = _render(anatomy, M, b, size, spacing, origin)
    labels = _MATERIAL_TO_LABEL[mat]
    mu = _microct_intensity(mat, dens)
    del mat, dens
    mu = ndimage.gaussian_filter(mu, sigma=float(cfg["phantom_microct_psf_voxels"]), output=np.float32)
    mu += rng.standard_normal(mu.shape, dtype=np.float32) * np.float32(params["microct_noise"])
    mu *= np.float32(params["microct_gain"])
    mu += np.float32(params["microct_offset"])
    # The scanner reconstructs a cylinder about z and writes one constant value outside it.
    n = size[0]
    yy, xx = np.ogrid[:n, :n]
    r = (n - 1) / 2.0
    disk = (xx - r) ** 2 + (yy - r) ** 2 <= r * r
    outside = np.broadcast_to(~disk, mu.shape)
    mu[outside] = np.float32(params["microct_fill_value"])
    labels[outside] = OUTSIDE
    microct = Volume(mu, spacing, origin)
    labels = Volume(labels, spacing, origin)

    transform = true_transform_of(params, center)
    ct = render_ct(anatomy, params, cfg, M, b, transform, rng)
    return Specimen(name, microct, ct, labels, transform, params)


# ---------------------------------------------------------------------------------------------
# Checks, preview, dataset, command
# ---------------------------------------------------------------------------------------------
def ct_on_microct_grid(specimen: Specimen) -> Volume:
    """The CT resampled (linear) onto the micro-CT grid with the true transform."""
    ref = specimen.microct.to_sitk()
    out = sitk.Resample(specimen.ct.to_sitk(), ref, specimen.true_transform, sitk.sitkLinear, -1000.0, sitk.sitkFloat32)
    return Volume.from_sitk(out)


def difficulty(specimen: Specimen) -> dict:
    """Dice per class of the naive method (CT on the micro-CT grid, Otsu + closing) and of the
    micro-CT's own tissue map, against the truth (Eq. 7)."""
    from .metrics import dice_per_class
    from .tissue import tissue_map

    truth = specimen.labels.array
    naive = tissue_map(ct_on_microct_grid(specimen)).array
    own = tissue_map(specimen.microct).array
    return {"naive": dice_per_class(truth, naive), "microct": dice_per_class(truth, own)}


def save_preview(specimen: Specimen, path) -> Path:
    """Three orthogonal mid-slices of the CT (on the micro-CT grid), the micro-CT and the labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from .labels import TISSUE_COLORS

    path = Path(path)
    ct = ct_on_microct_grid(specimen).array
    mu = specimen.microct.array
    lab = specimen.labels.array
    inside = lab > 0
    lo, hi = np.percentile(mu[inside], [0.5, 99.5]) if inside.any() else (mu.min(), mu.max())
    cmap = ListedColormap([(0, 0, 0)] + [TISSUE_COLORS[k] for k in (AIR, SOFT_TISSUE, BONE)])
    n = np.asarray(mu.shape) // 2
    views = [("axial", lambda a: a[n[0]]), ("coronal", lambda a: a[:, n[1]][::-1]), ("sagittal", lambda a: a[:, :, n[2]][::-1])]
    rows = [("CT (0.3 mm, HU)", ct, dict(cmap="gray", vmin=-1000, vmax=2500)),
            ("micro-CT", mu, dict(cmap="gray", vmin=lo, vmax=hi)),
            ("labels", lab, dict(cmap=cmap, vmin=0, vmax=3, interpolation="nearest"))]
    fig, axes = plt.subplots(3, 3, figsize=(7.2, 7.2), dpi=72)
    for i, (title, arr, kw) in enumerate(rows):
        for j, (vname, take) in enumerate(views):
            ax = axes[i, j]
            ax.imshow(take(arr), **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(vname, fontsize=9)
            if j == 0:
                ax.set_ylabel(title, fontsize=9)
    anatomy, scanner = specimen.params["anatomy"], specimen.params["ct_scanner"]
    fig.suptitle(f"{specimen.name}: {anatomy['cochlea_turns']:.2f} turns, pneumatisation "
                 f"{anatomy['pneumatisation']:.2f}; {scanner['kind']} {scanner['voxel_mm']:.2f} mm, "
                 f"misaligned {specimen.params['ct_misalignment_deg']:.1f} deg", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def _write_transform(transform: sitk.Transform, path: Path) -> Path:
    with atomic_path(path) as tmp:
        sitk.WriteTransform(transform, str(tmp))
    return path


def _specimen_list(specimens) -> list[str]:
    if specimens is None:
        return list(SPECIMENS)
    if isinstance(specimens, str):
        specimens = [s.strip() for s in specimens.split(",") if s.strip()]
    names = list(specimens)
    unknown = [s for s in names if s not in SPECIMENS]
    if unknown or not names:
        raise MicroCTSynthError(
            f"Unknown specimen(s) {', '.join(unknown) or '(none given)'}: choose among {', '.join(SPECIMENS)}."
        )
    return names


def _write_specimen(out_dir: Path, name: str, cfg: dict, seed: int, entry: dict,
                    scanners: str = "clinical") -> tuple[str, dict, dict, str]:
    """Make one specimen and write its files; returns (name, params, outputs, summary line)."""
    sp = make_specimen(name, cfg, seed, scanners)
    case = out_dir / name
    written = {
        "ct": write_volume(sp.ct, out_dir / entry["ct"]),
        "microct": write_volume(sp.microct, out_dir / entry["microct"]),
        "labels_true": write_volume(sp.labels, out_dir / entry["labels_true"]),
        "true_transform": _write_transform(sp.true_transform, out_dir / entry["true_transform"]),
        "preview": save_preview(sp, case / "preview.png"),
    }
    summary = (f"{name}: wrote {', '.join(p.name for p in written.values())} in {case} "
               f"(micro-CT {sp.microct.shape[0]}^3 at {sp.microct.spacing[0]:g} mm, "
               f"CT {sp.ct.shape[0]}^3 at {sp.ct.spacing[0]:g} mm, misaligned "
               f"{sp.params['ct_misalignment_deg']:.1f} deg)")
    return name, sp.params, {k: str(v) for k, v in written.items()}, summary


def _default_workers(cfg: dict, n_specimens: int) -> int:
    # Two processes halve the time on two cores; a paper-size specimen needs about 1 GB, so
    # those are made one at a time.
    # Inside the Slicer application sys.executable is Slicer itself, which cannot be spawned.
    if not Path(sys.executable).name.lower().startswith("python"):
        return 1
    n_voxels = (float(cfg["phantom_fov_mm"]) / float(cfg["microct_spacing_mm"])) ** 3
    return max(1, min(2, os.cpu_count() or 1, n_specimens, 1 if n_voxels > 20e6 else 2))


def make_phantom(out_dir, preset="quick", seed: int = 0, specimens=None, progress: str = "bar",
                 workers: int | None = 1, scanners: str = "clinical") -> Dataset:
    """Write the phantom dataset: one folder per specimen and ``cases.json`` with the thesis' groups.

    Specimens are made in ``workers`` processes (``None``: 2 when there are 2 cores and more than
    one specimen, as the command line does); each is deterministic, so the result does not
    depend on it. Several workers are spawned processes, so a calling script needs the usual
    ``if __name__ == "__main__":`` guard; the default (1) works in-process.
    """
    names = _specimen_list(specimens)
    _scanner_set(scanners)
    cfg = load_preset(preset)
    out_dir = Path(out_dir)
    _check_preset(cfg)
    if out_dir.exists() and not out_dir.is_dir():
        raise MicroCTSynthError(f"'{out_dir}' exists and is not a folder: choose another --out.")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MicroCTSynthError(f"Cannot create the folder '{out_dir}' ({exc.strerror}): choose another --out.") from None
    ds = Dataset.create(out_dir, preset=cfg.get("name", str(preset)),
                        phantom={"seed": int(seed), "scanners": scanners, "specimens": {}})
    entries = {name: dict(ds.add_case(name)) for name in names}
    workers = _default_workers(cfg, len(names)) if workers is None else max(1, int(workers))
    results = {}
    with Progress(total=len(names), task="phantom", mode=progress, unit="specimen") as bar:

        def report(name, params, outputs, summary):
            results[name] = params
            if progress == "json":
                emit_json("result", task="phantom", case=name, outputs=outputs)
            bar.log(summary) if progress != "none" else print(summary, flush=True)
            bar.update(1, case=name)

        jobs = [(out_dir, name, cfg, int(seed), entries[name], scanners) for name in names]
        if workers == 1:
            for job in jobs:
                report(*_write_specimen(*job))
        else:
            # spawn, not fork: the caller may hold threads (torch, BLAS) that a fork would copy.
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                futures = [pool.submit(_write_specimen, *job) for job in jobs]
                for future in as_completed(futures):
                    report(*future.result())
    ds.data["phantom"]["specimens"] = {name: results[name] for name in names}
    ds.save()
    return ds


def command_phantom(args: argparse.Namespace) -> int:
    progress = args.progress
    ds = make_phantom(args.out, preset=args.preset, seed=args.seed, specimens=args.specimens, progress=progress,
                      workers=None, scanners=args.scanners)
    cases = ds.root / CASES_FILE
    report_result(progress, f"Wrote {cases} with {len(ds.cases)} specimen(s) and groups {', '.join(ds.groups)}",
                  outputs={"cases": str(cases)})
    return 0
