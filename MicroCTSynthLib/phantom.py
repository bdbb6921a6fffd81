"""The inner-ear phantom: paired clinical CT / micro-CT specimens with their true tissue maps.

No public paired CT / micro-CT of the temporal bone is reachable, so the project makes its own
specimens, named as the thesis' study codes (S3_1, S3_2, S3_7, S3_8, S3_11, S3_12). Each is an
analytic model of a temporal-bone block, evaluated point by point (vectorised numpy):

- a cochlea of 2.5-2.8 turns: a fluid-filled canal swept along a conical spiral, tapering from
  about 1.5 mm (basal) to 0.5 mm (apical), partly divided by a thin bony spiral lamina, wound
  around a bony modiolus that carries the cochlear nerve;
- a vestibule, three roughly orthogonal semicircular canals (lumen 0.8-1 mm), all wrapped in the
  dense otic capsule; the internal auditory canal (soft tissue) and the facial nerve canal;
- the middle ear (air) with a stapes (footplate in the oval window, two crura, head), the incus'
  long process and the stapedius tendon;
- mastoid air cells: a Voronoi foam of cells 0.4-3 mm wide separated by thin bony septa.

The micro-CT renders the truth at its own voxel size with a small (about one voxel) blur,
scanner gain/offset and noise, inside a cylindrical field of view with an exact constant fill
value outside, as real reconstructions have. The CT is made from a finer rendering of the same
truth (0.1 mm; ``phantom_ct_supersampling``) by a clinical point-spread function (Gaussian, FWHM
0.5 mm), averaging over its 0.3 mm voxels (partial volume), calibration gain/offset and noise
(sigma 20-60 HU), on its own grid, misaligned by a random rigid transform (``true_transform``,
up to 10 deg and 2 mm: a micro-CT point maps to the CT point, SimpleITK's resampling convention).
The CT grid holds the whole micro-CT field of view after that misalignment, plus a margin.

Mastoid septa are drawn 0.17-0.32 mm thick: thinner ones would be filled by the tissue map's
0.1 mm closing, so that the micro-CT's own map could no longer serve as the truth it stands for.
Specimens vary as real ones do: pose on the scanner bed (about +-15 deg per axis, a few mm),
size (+-10 %), turns, canal radii, the air-cell pattern, bone density, gain, offset and noise.
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
from scipy.spatial import cKDTree

from .dataset import SPECIMENS, Dataset
from .errors import MicroCTSynthError
from .labels import AIR, BONE, OUTSIDE, SOFT_TISSUE
from .presets import load_preset
from .progress import Progress, emit_json, log
from .volume import Volume, atomic_path, write_volume

# Materials of the analytic model; labels are AIR, SOFT_TISSUE (fluid and tissue), BONE.
_AIR, _FLUID, _BONE, _TISSUE = 1, 2, 3, 4
_MATERIAL_TO_LABEL = np.array([OUTSIDE, AIR, SOFT_TISSUE, BONE, SOFT_TISSUE], dtype=np.uint8)

#: Points evaluated at once: bounds the temporaries to a few tens of MB whatever the grid.
_CHUNK = 1 << 20


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------
def specimen_seed(name: str, seed: int = 0) -> int:
    """The specimen's own seed, derived from its name and the base seed (stable across runs)."""
    digest = hashlib.sha256(f"microctsynth-phantom:{name}:{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def _rotation(angles_deg) -> np.ndarray:
    """Rotation matrix of Euler angles (x, then y, then z), as ``sitk.Euler3DTransform`` (ZXY off)."""
    t = sitk.Euler3DTransform()
    t.SetRotation(*[math.radians(a) for a in angles_deg])
    return np.asarray(t.GetMatrix(), dtype=float).reshape(3, 3)


def _jitter_direction(rng, v, max_deg) -> list[float]:
    r = _rotation(rng.uniform(-max_deg, max_deg, 3))
    return (r @ _unit(v)).tolist()


def draw_parameters(name: str, seed: int = 0, preset: dict | None = None) -> dict:
    """The specimen's drawn parameters (JSON-able): anatomy, pose, scanner and misalignment."""
    preset = load_preset("quick") if preset is None else preset
    rng = np.random.default_rng(specimen_seed(name, seed))
    u = rng.uniform
    pose_sd, pose_max = preset["phantom_pose_sd_deg"], preset["phantom_pose_max_deg"]
    shift_sd, shift_max = preset["phantom_pose_shift_sd_mm"], preset["phantom_pose_shift_max_mm"]
    mis_deg, mis_mm = preset["phantom_misalignment_max_deg"], preset["phantom_misalignment_max_mm"]
    # The CT / micro-CT misalignment: a random axis, an angle up to the maximum, a shift up to it.
    axis = _unit(rng.normal(size=3))
    angle = u(0.3, 1.0) * mis_deg
    rotvec = axis * math.radians(angle)
    shift_dir = _unit(rng.normal(size=3))
    p = {
        "name": name,
        "seed": int(seed),
        "specimen_seed": specimen_seed(name, seed),
        # Pose on the scanner bed: small rotations about each axis, a shift of a few mm.
        "pose_rotation_deg": np.clip(rng.normal(0, pose_sd, 3), -pose_max, pose_max).tolist(),
        "pose_shift_mm": np.clip(rng.normal(0, shift_sd, 3), -shift_max, shift_max).tolist(),
        "size_scale": u(0.9, 1.1),
        # Cochlea
        "cochlea_turns": u(2.5, 2.8),
        "cochlea_basal_radius_mm": u(2.9, 3.1),
        "cochlea_apical_radius_mm": u(0.75, 0.9),
        "cochlea_height_per_turn_mm": u(1.28, 1.36),
        "canal_basal_radius_mm": u(0.70, 0.78),
        "canal_apical_radius_mm": u(0.24, 0.28),
        "lamina_thickness_mm": u(0.15, 0.2),
        "lamina_width_fraction": u(0.5, 0.65),
        "cochlea_axis": _jitter_direction(rng, (0.2, 0.3, 1.0), 8),
        "modiolus_nerve_radius_mm": u(0.8, 1.0),
        # Vestibule and semicircular canals
        "vestibule_center_mm": (np.array([1.0, -1.5, -0.5]) + rng.normal(0, 0.15, 3)).tolist(),
        "vestibule_radii_mm": (np.array([1.6, 1.2, 1.2]) * u(0.9, 1.1, 3)).tolist(),
        "scc_major_radius_mm": u(1.8, 2.2, 3).tolist(),
        "scc_lumen_radius_mm": u(0.4, 0.5, 3).tolist(),
        "scc_normals": [
            _jitter_direction(rng, (0.0, 0.0, 1.0), 8),   # lateral
            _jitter_direction(rng, (1.0, 1.0, 0.0), 8),   # superior
            _jitter_direction(rng, (1.0, -1.0, 0.0), 8),  # posterior
        ],
        "otic_capsule_mm": u(0.5, 0.7),
        # Internal auditory canal, facial nerve
        "iac_radius_mm": u(1.7, 2.1),
        "facial_nerve_radius_mm": u(0.5, 0.65),
        "facial_canal_wall_mm": u(0.15, 0.25),
        # Middle ear and ossicles
        "middle_ear_center_mm": (np.array([5.1, 0.5, 0.3]) + rng.normal(0, 0.2, 3)).tolist(),
        "middle_ear_radii_mm": (np.array([2.3, 3.8, 3.2]) * u(0.92, 1.08, 3)).tolist(),
        "stapes_crus_radius_mm": u(0.14, 0.18),
        "stapes_head_offset_mm": (np.array([1.3, -0.2, 0.1]) + rng.normal(0, 0.1, 3)).tolist(),
        "incus_offset_mm": (np.array([0.9, 0.6, 2.4]) + rng.normal(0, 0.2, 3)).tolist(),
        "tendon_offset_mm": (np.array([-0.3, -2.2, -0.4]) + rng.normal(0, 0.2, 3)).tolist(),
        # Mastoid air cells
        "mastoid_center_mm": (np.array([1.5, -3.5, 1.0]) + rng.normal(0, 0.3, 3)).tolist(),
        "mastoid_radii_mm": (np.array([6.0, 5.5, 6.5]) * u(0.9, 1.1, 3)).tolist(),
        "air_cell_min_mm": u(0.4, 0.55),
        "air_cell_max_mm": u(2.4, 3.0),
        "septum_min_mm": u(0.17, 0.2),
        "septum_max_mm": u(0.26, 0.32),
        "air_cell_antrum_reach": u(1.0, 1.3),
        "air_cell_seed": int(rng.integers(0, 2**31 - 1)),
        # Bone density (relative; 1 = 1700 HU) and its slow variation
        "bone_density": u(0.85, 1.05),
        "bone_density_waves": [
            (_unit(rng.normal(size=3)) * u(0.3, 0.9)).tolist() + [u(0, 2 * math.pi)] for _ in range(3)
        ],
        # Micro-CT scanner (arbitrary grey units)
        "microct_gain": u(9000.0, 11000.0),
        "microct_offset": u(800.0, 1500.0),
        "microct_noise": u(0.02, 0.035),  # sigma as a fraction of the bone - air contrast
        "microct_fill_value": 0.0,
        # Clinical CT
        "ct_noise_hu": u(20.0, 60.0),
        "ct_gain": u(0.97, 1.03),  # calibration drift of the clinical scanner
        "ct_offset_hu": u(-15.0, 15.0),
        "ct_psf_fwhm_mm": float(preset["phantom_ct_psf_fwhm_mm"]) * u(0.95, 1.1),
        "ct_misalignment_rotvec_rad": rotvec.tolist(),
        "ct_misalignment_deg": angle,
        "ct_misalignment_shift_mm": (shift_dir * u(0.3, 1.0) * mis_mm).tolist(),
    }
    return p


# ---------------------------------------------------------------------------------------------
# The analytic anatomy (specimen frame, mm)
# ---------------------------------------------------------------------------------------------
def _segment_distance(q: np.ndarray, a, b) -> np.ndarray:
    """Distance of points ``q`` (3, N) to the segment ``a``-``b``."""
    a, b = np.asarray(a, np.float32)[:, None], np.asarray(b, np.float32)[:, None]
    ab = b - a
    d = q - a
    t = np.clip((ab * d).sum(axis=0) / max(float((ab * ab).sum()), 1e-12), 0.0, 1.0)
    return _norm(d - ab * t)


def _norm(v: np.ndarray) -> np.ndarray:
    """Euclidean norm of each column of ``v`` (3, N)."""
    return np.sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2])


def _in_box(q: np.ndarray, lo, hi) -> np.ndarray:
    """Indices of the points (columns of ``q``) inside the axis-aligned box ``lo``-``hi``."""
    lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
    inside = (q[0] >= lo[0]) & (q[0] <= hi[0])
    inside &= (q[1] >= lo[1]) & (q[1] <= hi[1])
    inside &= (q[2] >= lo[2]) & (q[2] <= hi[2])
    return np.flatnonzero(inside)


def _segment_box(q, a, b, radius) -> np.ndarray:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return _in_box(q, np.minimum(a, b) - radius, np.maximum(a, b) + radius)


def _frame(normal) -> np.ndarray:
    """Rows: two unit vectors spanning the plane orthogonal to ``normal``, then ``normal``."""
    n = _unit(normal)
    helper = np.array([1.0, 0.0, 0.0]) if abs(n[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = _unit(np.cross(n, helper))
    return np.stack([e1, np.cross(n, e1), n]).astype(np.float32)


def _col(v) -> np.ndarray:
    return np.asarray(v, np.float32).reshape(3, 1)


class Anatomy:
    """Material and bone density of a specimen at any point of its own frame (mm).

    Points are given as a ``(3, N)`` float32 array (rows x, y, z): row-wise arithmetic on
    contiguous rows is what keeps the evaluation of millions of points fast.
    """

    def __init__(self, params: dict):
        p = params
        self.p = p
        self.capsule = p["otic_capsule_mm"]
        # Cochlea: base centre B, axis a; the canal starts (theta = 0) inside the vestibule.
        self.V = np.asarray(p["vestibule_center_mm"], np.float32)
        a = _unit(p["cochlea_axis"])
        towards = np.array([-0.6, 1.0, 0.0])  # antero-medial of the vestibule
        u0 = _unit(towards - a * (towards @ a))  # across the axis
        self.r0, self.r1 = p["cochlea_basal_radius_mm"], p["cochlea_apical_radius_mm"]
        self.R0, self.R1 = p["canal_basal_radius_mm"], p["canal_apical_radius_mm"]
        self.turns = p["cochlea_turns"]
        self.theta_max = 2 * math.pi * self.turns
        self.H = p["cochlea_height_per_turn_mm"] * self.turns
        self.B = (self.V + (self.r0 + 0.9) * u0).astype(np.float32)
        # u points from B back to the vestibule, so theta = 0 lies in it.
        self.cochlea_frame = np.stack([-u0, np.cross(a, -u0), a]).astype(np.float32)
        self.cochlea_center = self.B + 0.5 * self.H * a.astype(np.float32)
        self.cochlea_bound = math.hypot(self.r0 + self.R0 + self.capsule + 0.2, 0.5 * self.H + self.R0 + self.capsule + 0.2)
        self.axis = a.astype(np.float32)
        # Internal auditory canal: from just below the modiolus' base along -axis, out of view.
        self.iac = (self.B - 0.8 * self.axis, self.B - 16.0 * self.axis)
        # Semicircular canals: tori through the vestibule, away from the cochlea.
        self.sccs = []
        away = _unit(self.V - self.B)
        for n, Rm, r in zip(p["scc_normals"], p["scc_major_radius_mm"], p["scc_lumen_radius_mm"]):
            f = _frame(n)
            inplane = away - f[2] * (away @ f[2])
            if np.linalg.norm(inplane) < 0.3:  # the plane holds little of "away": go up instead
                inplane = np.array([0.0, 0.0, 1.0]) - f[2] * f[2][2]
            c = self.V + (Rm + 0.35) * _unit(inplane)
            self.sccs.append((c.astype(np.float32), f, float(Rm), float(r)))
        self.vest_radii = np.asarray(p["vestibule_radii_mm"], np.float32)
        # Oval window: from the vestibule to the middle ear along +x, closed by the footplate.
        self.me_c = np.asarray(p["middle_ear_center_mm"], np.float32)
        self.me_r = np.asarray(p["middle_ear_radii_mm"], np.float32)
        wall_x = self._middle_ear_wall_x(self.V[1], self.V[2])
        head = (np.array([wall_x, self.V[1], self.V[2]]) + np.asarray(p["stapes_head_offset_mm"])).astype(np.float32)
        self.window_x = (float(self.V[0]), float(wall_x))
        self.footplate = (float(wall_x) - 0.3, float(wall_x) - 0.05)
        self.stapes_head = head
        self.crura = [
            (np.array([wall_x - 0.05, self.V[1] + dy, self.V[2]], np.float32), head) for dy in (-0.55, 0.55)
        ]
        self.incus = (head, head + np.asarray(p["incus_offset_mm"], np.float32))
        self.tendon = (head, head + np.asarray(p["tendon_offset_mm"], np.float32))
        # Facial nerve: along y above the oval window, in the medial wall of the middle ear.
        fn_z = float(self.V[2] + self.vest_radii[2] + 0.9)
        self.facial = (np.array([wall_x - 0.4, -7.0, fn_z], np.float32), np.array([wall_x - 0.4, 4.0, fn_z], np.float32))
        # Mastoid foam
        self._build_air_cells()
        w = np.asarray(p["bone_density_waves"], np.float32)
        self.waves_k, self.waves_phase = w[:, :3] * np.float32(2 * math.pi / 4.0), w[:, 3]

    def _middle_ear_wall_x(self, y: float, z: float) -> float:
        q = ((y - self.me_c[1]) / self.me_r[1]) ** 2 + ((z - self.me_c[2]) / self.me_r[2]) ** 2
        return float(self.me_c[0] - self.me_r[0] * math.sqrt(max(1.0 - q, 0.05)))

    def _build_air_cells(self) -> None:
        """Voronoi seeds: cells small at the periphery, large near the antrum; outer seeds are bone."""
        p = self.p
        rng = np.random.default_rng(p["air_cell_seed"])
        c = np.asarray(p["mastoid_center_mm"], float)
        radii = np.asarray(p["mastoid_radii_mm"], float)
        dmin, dmax = p["air_cell_min_mm"], p["air_cell_max_mm"]
        lo, hi = c - radii - dmax, c + radii + dmax
        # Rejection sampling with density 1/d(q)^3, d growing from the rim to the antrum.
        n_candidates = int(np.prod(hi - lo) / dmin**3 * 1.3)
        q = rng.uniform(lo, hi, size=(n_candidates, 3))
        rel = np.linalg.norm((q - c) / radii, axis=1)
        antrum = c + np.array([0.2, 0.4, 0.0]) * radii  # towards the middle ear
        t = np.clip(np.linalg.norm((q - antrum) / radii, axis=1) / p["air_cell_antrum_reach"], 0.0, 1.0)
        d = dmax + (dmin - dmax) * t ** 0.5
        d = np.where(rel > 1.0, np.maximum(d, 1.2), d)  # coarse bone cells outside the region
        keep = rng.uniform(size=len(q)) < (dmin / d) ** 3
        q, d, rel = q[keep], d[keep], rel[keep]
        # Thin out seeds closer than a third of the local cell size (no slivers of cells).
        pairs = cKDTree(q).query_pairs(r=dmin / 3.0, output_type="ndarray")
        drop = np.zeros(len(q), bool)
        drop[pairs[:, 1]] = True
        q, rel = q[~drop], rel[~drop]
        self.cell_seeds = q.astype(np.float32)
        self.cell_is_air = rel <= 1.0
        self.cell_code = rng.uniform(size=len(q)).astype(np.float32)
        self.cell_tree = cKDTree(self.cell_seeds)
        self.mastoid_c, self.mastoid_r = c.astype(np.float32), radii.astype(np.float32)
        # Beyond this (relative) radius no air cell reaches: skip the Voronoi search there.
        self.mastoid_reach = 1.0 + 0.6 * dmax / float(radii.min())

    # -- pieces -----------------------------------------------------------------------------
    def _cochlea(self, q: np.ndarray):
        """Canal SDF, lamina mask and nerve SDF of points ``q`` (3, N), in mm."""
        x, y, z = self.cochlea_frame @ (q - _col(self.B))
        rho = np.hypot(x, y)
        phi = np.mod(np.arctan2(y, x), np.float32(2 * math.pi))
        best = np.full(x.shape, np.inf, np.float32)
        best_dr = np.zeros_like(best)
        best_dz = np.zeros_like(best)
        best_R = np.ones_like(best)
        for k in range(int(math.ceil(self.turns)) + 1):
            s = (phi + np.float32(2 * math.pi * k)) / np.float32(self.theta_max)
            valid = s <= 1.0
            s = np.minimum(s, 1.0)
            r = self.r0 + (self.r1 - self.r0) * s
            h = self.H * s
            R = self.R1 + (self.R0 - self.R1) * (1.0 - s) ** 1.3
            dr, dz = rho - r, z - h
            sdf = np.where(valid, np.sqrt(dr * dr + dz * dz) - R, np.inf)
            better = sdf < best
            best = np.where(better, sdf, best)
            best_dr = np.where(better, dr, best_dr)
            best_dz = np.where(better, dz, best_dz)
            best_R = np.where(better, R, best_R)
        # Helicotrema: the canal's blind apical end.
        ax, ay = self.r1 * math.cos(self.theta_max), self.r1 * math.sin(self.theta_max)
        best = np.minimum(best, np.sqrt((x - ax) ** 2 + (y - ay) ** 2 + (z - self.H) ** 2) - self.R1)
        # Osseous spiral lamina: a plate through the canal's middle from its inner (modiolar) wall.
        t = self.p["lamina_thickness_mm"] * 0.5
        reach = best_R * (2 * self.p["lamina_width_fraction"] - 1.0)
        lamina = (best < 0) & (np.abs(best_dz) < t) & (best_dr < reach)
        # Cochlear nerve in the modiolus: a cone from the internal auditory canal up the axis.
        top = 0.75 * self.H
        frac = np.clip(z / top, 0.0, 1.0)
        nerve_r = self.p["modiolus_nerve_radius_mm"] * (1 - frac) + 0.15 * frac
        nerve = np.where(z <= top, rho - nerve_r, np.inf)
        return best, lamina, nerve

    def _vestibule(self, q):
        # Approximate SDF of an ellipsoid (exact on the axes), good enough for a capsule shell.
        return (_norm((q - _col(self.V)) / _col(self.vest_radii)) - 1.0) * float(self.vest_radii.min())

    def _scc(self, q, c, f, Rm, r):
        x, y, z = f @ (q - _col(c))
        return np.hypot(np.hypot(x, y) - Rm, z) - r

    def bone_density(self, q: np.ndarray) -> np.ndarray:
        """Relative density of bone (1 = 1700 HU): the specimen's level with slow variation."""
        wave = np.zeros(q.shape[1], np.float32)
        for k, ph in zip(self.waves_k, self.waves_phase):
            wave += np.sin(k[0] * q[0] + k[1] * q[1] + k[2] * q[2] + ph)
        return (np.float32(self.p["bone_density"]) * (1.0 + 0.02 * wave)).astype(np.float32)

    def materials(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Material code (1 air, 2 fluid, 3 bone, 4 soft tissue) and bone density of points ``q`` (3, N).

        Each structure is evaluated only on the points inside its bounding box, so a point far
        from everything costs a few comparisons.
        """
        q = np.ascontiguousarray(q, dtype=np.float32)
        n = q.shape[1]
        mat = np.full(n, _BONE, np.uint8)
        density = self.bone_density(q)
        cap = self.capsule

        # Middle ear cavity.
        idx = _in_box(q, self.me_c - self.me_r, self.me_c + self.me_r)
        middle_ear = idx[_norm((q[:, idx] - _col(self.me_c)) / _col(self.me_r)) < 1.0]

        # Labyrinth and nerves, with their bony walls (otic capsule, canal walls).
        lumen = np.full(n, np.inf, np.float32)
        nerve = np.full(n, np.inf, np.float32)
        lamina = np.zeros(n, bool)
        idx = _in_box(q, self.cochlea_center - self.cochlea_bound, self.cochlea_center + self.cochlea_bound)
        if idx.size:
            lumen[idx], lamina[idx], nerve[idx] = self._cochlea(q[:, idx])
        idx = _in_box(q, self.V - self.vest_radii - cap - 0.1, self.V + self.vest_radii + cap + 0.1)
        lumen[idx] = np.minimum(lumen[idx], self._vestibule(q[:, idx]))
        for c, f, Rm, r in self.sccs:
            reach = Rm + r + cap + 0.1
            idx = _in_box(q, c - reach, c + reach)
            lumen[idx] = np.minimum(lumen[idx], self._scc(q[:, idx], c, f, Rm, r))
        iac_r = self.p["iac_radius_mm"]
        idx = _segment_box(q, *self.iac, iac_r + 0.3)
        nerve[idx] = np.minimum(nerve[idx], _segment_distance(q[:, idx], *self.iac) - iac_r)
        facial = np.full(n, np.inf, np.float32)
        fr, fw = self.p["facial_nerve_radius_mm"], self.p["facial_canal_wall_mm"]
        idx = _segment_box(q, *self.facial, fr + fw)
        facial[idx] = _segment_distance(q[:, idx], *self.facial) - fr
        covered = (lumen < cap) | (facial < fw) | (nerve < 0.25)
        covered[middle_ear] = True

        # Mastoid air cells (Voronoi foam): air where the point is deeper than half a septum
        # inside its cell; the distance to the bisector of the two nearest seeds is exact.
        c, r = self.mastoid_c, self.mastoid_r
        idx = _in_box(q, c - r * self.mastoid_reach, c + r * self.mastoid_reach)
        rel = _norm((q[:, idx] - _col(c)) / _col(r))
        near = rel < self.mastoid_reach
        idx, rel = idx[near], rel[near]
        # Pneumatised bone is less dense than the otic capsule; the change is gradual.
        density[idx] *= 1.0 - 0.08 * np.clip(1.5 - rel, 0.0, 1.0)
        idx = idx[~covered[idx]]  # the cavities and canals painted below hide the foam there
        if idx.size:
            dist, nn = self.cell_tree.query(q[:, idx].T, k=2, workers=2)
            s1, s2 = self.cell_seeds[nn[:, 0]], self.cell_seeds[nn[:, 1]]
            gap = np.linalg.norm(s2 - s1, axis=1)
            to_wall = (dist[:, 1] ** 2 - dist[:, 0] ** 2) / (2 * np.maximum(gap, 1e-6))
            # Each wall between two cells has its own thickness (a symmetric hash of the pair).
            code = np.mod(self.cell_code[nn[:, 0]] + self.cell_code[nn[:, 1]], 1.0)
            septum = self.p["septum_min_mm"] + (self.p["septum_max_mm"] - self.p["septum_min_mm"]) * code
            air = self.cell_is_air[nn[:, 0]] & (to_wall > 0.5 * septum)
            mat[idx[air]] = _AIR
        mat[middle_ear] = _AIR

        capsule = lumen < cap
        mat[capsule | (facial < fw) | (nerve < 0.25)] = _BONE
        density[capsule] *= 1.1  # the otic capsule is the densest bone of the body
        mat[(nerve < 0) | (facial < 0)] = _TISSUE
        mat[lumen < 0] = _FLUID
        mat[lamina] = _BONE

        # Oval window: a short fluid channel from the vestibule to the middle ear, closed by the
        # stapes footplate with the annular ligament around it.
        lo = np.array([self.window_x[0], self.V[1] - 0.9, self.V[2] - 0.5], np.float32)
        hi = np.array([self.window_x[1] + 0.1, self.V[1] + 0.9, self.V[2] + 0.5], np.float32)
        idx = _in_box(q, lo, hi)
        qi = q[:, idx]
        ring = ((qi[1] - self.V[1]) / 0.9) ** 2 + ((qi[2] - self.V[2]) / 0.5) ** 2
        in_fp = (qi[0] >= self.footplate[0]) & (qi[0] <= self.footplate[1])
        mat[idx[ring < 1.0]] = _FLUID
        mat[idx[in_fp & (ring < 1.0)]] = _TISSUE
        mat[idx[in_fp & (ring < 0.72)]] = _BONE

        # Stapes crura and head, the incus' long process; the stapedius tendon in the air.
        crus = self.p["stapes_crus_radius_mm"]
        for (a, b), radius, material in (
            (self.tendon, 0.12, _TISSUE), (self.crura[0], crus, _BONE), (self.crura[1], crus, _BONE),
            (self.incus, 0.3, _BONE), ((self.stapes_head, self.stapes_head), 0.35, _BONE),
        ):
            idx = _segment_box(q, a, b, radius)
            hit = idx[_segment_distance(q[:, idx], a, b) < radius]
            if material == _TISSUE:
                hit = hit[mat[hit] == _AIR]
            else:
                density[hit] *= 1.05
            mat[hit] = material
        return mat, density


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


def _render(anatomy: Anatomy, M: np.ndarray, b: np.ndarray, size_xyz, spacing, origin):
    """Material codes and bone density on an axis-aligned grid whose physical points ``x`` lie at
    ``M @ x + b`` in the specimen's frame; slab by slab, so memory stays bounded."""
    nx, ny, nz = size_xyz
    A = np.asarray(M, float) @ np.diag(spacing)  # index (i, j, k) -> specimen frame
    c = np.asarray(M, float) @ np.asarray(origin, float) + np.asarray(b, float)
    i = np.arange(nx, dtype=np.float32)[None, None, :]
    j = np.arange(ny, dtype=np.float32)[None, :, None]
    mat = np.empty((nz, ny, nx), np.uint8)
    dens = np.empty((nz, ny, nx), np.float32)
    step = max(1, _CHUNK // (nx * ny))
    for z0 in range(0, nz, step):
        z1 = min(nz, z0 + step)
        k = np.arange(z0, z1, dtype=np.float32)[:, None, None]
        q = np.empty((3, (z1 - z0) * ny * nx), np.float32)
        for r in range(3):
            row = np.float32(c[r]) + np.float32(A[r, 0]) * i + np.float32(A[r, 1]) * j + np.float32(A[r, 2]) * k
            q[r] = row.ravel()
        m, d = anatomy.materials(q)
        mat[z0:z1] = m.reshape(z1 - z0, ny, nx)
        dens[z0:z1] = d.reshape(z1 - z0, ny, nx)
    return mat, dens


def _pose(params: dict, center: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Affine map (M, b) from a physical micro-CT point to the specimen frame: the pose on the
    scanner bed (rotation, shift about the grid centre) and the size, undone."""
    R = _rotation(params["pose_rotation_deg"])
    t = np.asarray(center, float) + np.asarray(params["pose_shift_mm"], float)
    s = float(params["size_scale"])
    return R.T / s, -(R.T @ t) / s


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
    for key in ("microct_spacing_mm", "ct_spacing_mm", "phantom_fov_mm", "phantom_ct_psf_fwhm_mm"):
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


def make_specimen(name: str, preset="quick", seed: int = 0) -> Specimen:
    """One phantom specimen, deterministic per ``(name, seed)`` (and the preset's grids)."""
    if name not in SPECIMENS:
        raise MicroCTSynthError(f"Unknown specimen '{name}': the phantom has {', '.join(SPECIMENS)}.")
    cfg = load_preset(preset)
    _check_preset(cfg)
    params = draw_parameters(name, seed, cfg)
    params["preset"] = cfg.get("name", str(preset))
    anatomy = Anatomy(params)
    rng = np.random.default_rng([params["specimen_seed"], 1])

    # Micro-CT: the truth sampled at the voxel centres, blurred by a ~1 voxel PSF (partial volume).
    size, spacing, origin = _microct_geometry(cfg)
    center = np.asarray(origin) + (np.asarray(size) - 1) / 2.0 * np.asarray(spacing)
    M, b = _pose(params, center)
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

    # CT: the truth rendered at ct_spacing / k, Gaussian PSF, averaged over each CT voxel, noise.
    transform = true_transform_of(params, center)
    inverse = transform.GetInverse()
    A = np.asarray(inverse.GetMatrix(), float).reshape(3, 3)
    a0 = np.asarray(inverse.TransformPoint((0.0, 0.0, 0.0)), float)
    ct_size, ct_spacing, ct_origin = _ct_geometry(cfg)
    k = int(cfg["phantom_ct_supersampling"])
    fine_spacing = tuple(s / k for s in ct_spacing)
    fine_origin = tuple(o - (k - 1) / (2.0 * k) * s for o, s in zip(ct_origin, ct_spacing))
    fine_size = tuple(nn * k for nn in ct_size)
    # A CT point y is the micro-CT point A y + a0, hence the specimen point M (A y + a0) + b.
    mat, dens = _render(anatomy, M @ A, M @ a0 + b, fine_size, fine_spacing, fine_origin)
    hu = _ct_hu(mat, dens)
    del mat, dens
    sigma = params["ct_psf_fwhm_mm"] / (2 * math.sqrt(2 * math.log(2))) / fine_spacing[0]
    hu = ndimage.gaussian_filter(hu, sigma=sigma, output=np.float32)
    nz, ny, nx = ct_size[::-1]
    hu = hu.reshape(nz, k, ny, k, nx, k).mean(axis=(1, 3, 5))
    hu = hu * np.float32(params["ct_gain"]) + np.float32(params["ct_offset_hu"])
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(params["ct_noise_hu"])
    ct = Volume(np.clip(np.rint(hu), -1024, 3071).astype(np.int16), ct_spacing, ct_origin)
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
    fig.suptitle(f"{specimen.name}: {specimen.params['cochlea_turns']:.2f} turns, "
                 f"misaligned {specimen.params['ct_misalignment_deg']:.1f} deg", fontsize=10)
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


def _write_specimen(out_dir: Path, name: str, cfg: dict, seed: int, entry: dict) -> tuple[str, dict, dict, str]:
    """Make one specimen and write its files; returns (name, params, outputs, summary line)."""
    sp = make_specimen(name, cfg, seed)
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
                 workers: int | None = 1) -> Dataset:
    """Write the phantom dataset: one folder per specimen and ``cases.json`` with the thesis' groups.

    Specimens are made in ``workers`` processes (``None``: 2 when there are 2 cores and more than
    one specimen, as the command line does); each is deterministic, so the result does not
    depend on it. Several workers are spawned processes, so a calling script needs the usual
    ``if __name__ == "__main__":`` guard; the default (1) works in-process.
    """
    names = _specimen_list(specimens)
    cfg = load_preset(preset)
    out_dir = Path(out_dir)
    _check_preset(cfg)
    if out_dir.exists() and not out_dir.is_dir():
        raise MicroCTSynthError(f"'{out_dir}' exists and is not a folder: choose another --out.")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MicroCTSynthError(f"Cannot create the folder '{out_dir}' ({exc.strerror}): choose another --out.") from None
    ds = Dataset.create(out_dir, preset=cfg.get("name", str(preset)), phantom={"seed": int(seed), "specimens": {}})
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

        jobs = [(out_dir, name, cfg, int(seed), entries[name]) for name in names]
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
    progress = getattr(args, "progress", "bar")
    ds = make_phantom(args.out, preset=args.preset, seed=args.seed, specimens=args.specimens, progress=progress,
                      workers=None)
    log(f"Wrote {ds.root / 'cases.json'} with {len(ds.cases)} specimen(s) and groups {', '.join(ds.groups)}", progress if progress != "none" else "bar")
    return 0
