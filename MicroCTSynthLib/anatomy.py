"""The phantom's anatomy: an ex-vivo temporal-bone block as a micro-CT scanner sees it.

Each specimen is an analytic model, evaluated point by point (vectorised numpy) in its own frame
(mm; x lateral, y anterior, z superior, the origin near the labyrinth):

- the **block**: temporal bone cut by 4-6 of the usual saw cuts of a harvested block, each at the
  specimen's own angle and distance, lying in air; the block need not fill the field of view;
- **pneumatisation** from sclerotic to well pneumatised: the tympanic cavity with the ossicles,
  the mastoid antrum and its aditus as large air spaces; mastoid and perilabyrinthine cells
  (a Voronoi foam with thin bony septa) from sub-millimetre to several millimetres;
- **soft tissue**, a thin minority: the fluid spaces of the labyrinth (cochlear scalae, vestibule,
  semicircular canals), the cochlear and vestibular nerves in the internal auditory canal (drained
  of its cerebrospinal fluid, as ex-vivo specimens are), the facial nerve along its course, the
  stapedius and tensor tympani tendons, the round-window and tympanic membranes, the mucosa
  lining the cavities and, in some specimens, fluid filling part of the middle ear or of the air
  cells, as fixed cadaveric bones show;
- the **variation between specimens** of each structure on its own, drawn from the published
  ranges of :data:`PUBLISHED_RANGES` (cochlear duct length, basal-turn diameter, height, turns,
  the cochlea's orientation against the canals, canal radii and plane angles, the facial nerve's
  course, ...), not one template under a global scale.

Membranes are drawn at least 0.12 mm thick and mucosa at least 0.1 mm (real ones are 0.05-0.1 mm) so that the
75.2 um micro-CT of the ``quick`` preset resolves them, and bony septa between air cells at least
0.17 mm, so that the tissue map's 0.1 mm closing keeps them: the micro-CT's own tissue map must
stand for the truth.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial import cKDTree

# Materials; labels are AIR, SOFT_TISSUE (fluid and tissue), BONE (see phantom.py).
AIR, FLUID, BONE, TISSUE = 1, 2, 3, 4

#: Structure codes of :meth:`Anatomy.materials` (``structures=True``), with their material.
STRUCTURES = {
    0: ("temporal bone", BONE),
    1: ("surrounding air", AIR),
    2: ("tympanic cavity", AIR),
    3: ("mastoid antrum", AIR),
    4: ("air cells", AIR),
    5: ("external auditory canal", AIR),
    6: ("cochlear scalae", FLUID),
    7: ("vestibule", FLUID),
    8: ("semicircular canals", FLUID),
    9: ("internal auditory canal", AIR),  # drained of its fluid, as in ex-vivo specimens
    11: ("cochlear and vestibular nerves", TISSUE),
    12: ("facial nerve", TISSUE),
    13: ("tendons", TISSUE),
    14: ("round-window membrane", TISSUE),
    15: ("tympanic membrane", TISSUE),
    16: ("mucosa", TISSUE),
    17: ("effusion", FLUID),
    18: ("ossicles", BONE),
    19: ("osseous spiral lamina", BONE),
    20: ("oval window", TISSUE),
}
STRUCTURE_CODE = {name: code for code, (name, _) in STRUCTURES.items()}

#: Published ranges the specimens are drawn from (uniformly, each on its own), with sources.
PUBLISHED_RANGES = {
    "cochlea_turns": (2.2, 2.9, "Erixon et al. 2009, Otol Neurotol 30:14-22"),
    "cochlea_basal_diameter_mm": (8.0, 10.0, "A value; Escude et al. 2006, Audiol Neurootol 11 S1:27-33; Wurfel et al. 2014, Hear Res 316:65-72"),
    "cochlear_duct_length_mm": (32.0, 42.0, "lateral wall; Wurfel et al. 2014; Koch et al. 2017, Otol Neurotol"),
    "cochlea_height_mm": (3.2, 4.2, "Avci et al. 2014, J Comp Neurol 522:3245-3261; Erixon et al. 2009"),
    "canal_basal_radius_mm": (0.8, 1.0, "scala tympani + vestibuli, 2-3 mm^2 each near the base; Thorne et al. 1999, Laryngoscope 109:1661-1668"),
    "canal_apical_radius_mm": (0.35, 0.5, "Thorne et al. 1999; Avci et al. 2014"),
    "cochlea_tilt_deg": (-10.0, 10.0, "orientation against the canals, per axis; Jeffery & Spoor 2004, J Anat 204:71-92"),
    "scc_anterior_radius_mm": (2.9, 3.6, "arc radius; Jeffery & Spoor 2004"),
    "scc_posterior_radius_mm": (2.8, 3.5, "Jeffery & Spoor 2004"),
    "scc_lateral_radius_mm": (2.0, 2.6, "Jeffery & Spoor 2004"),
    "scc_lumen_radius_mm": (0.35, 0.5, "bony canal diameter 0.7-1 mm; Curthoys & Oman 1987, Acta Otolaryngol 103:254-261"),
    "scc_plane_tilt_deg": (-10.0, 10.0, "inter-canal angles 90 +- 10 deg; Bradshaw et al. 2010, JARO 11:145-159; Della Santina et al. 2005, JARO 6:191-206"),
    "iac_diameter_mm": (3.0, 6.0, "2-8 mm, mostly 4-5; Valvassori & Pierce 1964, AJR 92:1232-1241"),
    "cochlear_nerve_diameter_mm": (0.8, 1.3, "about 1 mm in MRI of the internal auditory canal (approximate)"),
    "facial_nerve_diameter_mm": (0.8, 1.4, "about 1 mm in its tympanic segment (approximate)"),
    "facial_nerve_height_over_oval_window_mm": (0.5, 2.0, "the tympanic segment lies just above the oval window (approximate)"),
    "air_cell_size_mm": (0.4, 6.0, "sub-millimetre to several millimetres (approximate)"),
}


# ---------------------------------------------------------------------------------------------
# Small geometry
# ---------------------------------------------------------------------------------------------
def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def rotation(angles_deg) -> np.ndarray:
    """Rotation matrix of Euler angles (deg) about x, then y, then z (as ``sitk.Euler3DTransform``)."""
    ax, ay, az = (math.radians(a) for a in angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ rx @ ry


def _tilt(rng, v, max_deg) -> list:
    return (rotation(rng.uniform(-max_deg, max_deg, 3)) @ unit(v)).tolist()


def _norm(v: np.ndarray) -> np.ndarray:
    """Euclidean norm of each column of ``v`` (3, N)."""
    return np.sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2])


def _col(v) -> np.ndarray:
    return np.asarray(v, np.float32).reshape(3, 1)


def _in_box(q: np.ndarray, lo, hi) -> np.ndarray:
    """Indices of the points (columns of ``q``) inside the axis-aligned box ``lo``-``hi``."""
    lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
    inside = (q[0] >= lo[0]) & (q[0] <= hi[0])
    inside &= (q[1] >= lo[1]) & (q[1] <= hi[1])
    inside &= (q[2] >= lo[2]) & (q[2] <= hi[2])
    return np.flatnonzero(inside)


def _polyline_distance(q: np.ndarray, points) -> np.ndarray:
    """Distance of points ``q`` (3, N) to the polyline through ``points``."""
    best = np.full(q.shape[1], np.inf, np.float32)
    for a, b in zip(points[:-1], points[1:]):
        a, b = np.asarray(a, np.float32)[:, None], np.asarray(b, np.float32)[:, None]
        ab = b - a
        d = q - a
        t = np.clip((ab * d).sum(axis=0) / max(float((ab * ab).sum()), 1e-12), 0.0, 1.0)
        best = np.minimum(best, _norm(d - ab * t))
    return best


def _polyline_box(q, points, radius) -> np.ndarray:
    pts = np.asarray(points, np.float32)
    return _in_box(q, pts.min(axis=0) - radius, pts.max(axis=0) + radius)


def _frame(normal) -> np.ndarray:
    """Rows: two unit vectors spanning the plane orthogonal to ``normal``, then ``normal``."""
    n = unit(normal)
    helper = np.array([1.0, 0.0, 0.0]) if abs(n[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = unit(np.cross(n, helper))
    return np.stack([e1, np.cross(n, e1), n]).astype(np.float32)


def _ellipsoid_depth(q: np.ndarray, center, radii) -> np.ndarray:
    """Approximate depth (mm) inside an ellipsoid: positive inside, exact on the axes."""
    return (1.0 - _norm((q - _col(center)) / _col(radii))) * float(np.min(radii))


# ---------------------------------------------------------------------------------------------
# The cochlear spiral
# ---------------------------------------------------------------------------------------------
def _spiral_radius(s, r0, r1, p):
    """Centre-line radius at the fraction ``s`` of the spiral: ``r1 + (r0 - r1)(1 - s)^p``."""
    return r1 + (r0 - r1) * (1.0 - s) ** p


def _canal_radius(s, R0, R1):
    return R1 + (R0 - R1) * (1.0 - s) ** 1.3


def solve_spiral(turns, basal_diameter, duct_length, height, R0, R1, r1) -> dict:
    """Basal radius ``r0`` and taper ``p`` of the spiral that give the drawn basal-turn diameter
    (A value: lateral wall to lateral wall through the modiolus) and, as closely as the taper
    allows, the drawn lateral-wall duct length. Returns the spiral and the length it has."""
    theta_max = 2 * math.pi * turns
    s = np.linspace(0.0, 1.0, 400)
    s_pi = math.pi / theta_max
    best = None
    for p in np.linspace(1.0, 6.0, 101):
        # A = (r(0) + R(0)) + (r(pi) + R(pi)), linear in r0.
        w = (1.0 - s_pi) ** p
        r0 = (basal_diameter - R0 - _canal_radius(s_pi, R0, R1) - r1 * (1.0 - w)) / (1.0 + w)
        lateral = _spiral_radius(s, r0, r1, p) + _canal_radius(s, R0, R1)
        ds_theta = theta_max * np.gradient(s)
        dz = height * np.gradient(s)
        dr = np.gradient(lateral)
        length = float(np.sum(np.sqrt((lateral * ds_theta) ** 2 + dr ** 2 + dz ** 2)))
        if best is None or abs(length - duct_length) < abs(best["duct_length_mm"] - duct_length):
            best = {"r0": float(r0), "p": float(p), "duct_length_mm": length}
    return best


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------
def _u(rng, key):
    lo, hi, _ = PUBLISHED_RANGES[key]
    return float(rng.uniform(lo, hi))


def draw_anatomy(rng: np.random.Generator) -> dict:
    """One specimen's anatomy (JSON-able): every structure drawn on its own.

    The parts are drawn in a fixed order from one stream, so a specimen is the same on every run.
    """
    a = _draw_spiral(rng)
    pneumatisation = float(rng.uniform(0.0, 1.0))  # 0 sclerotic, 1 well pneumatised
    effusion = bool(rng.uniform() < 0.35)
    fluid_cells = bool(rng.uniform() < 0.35)
    a.update(_draw_labyrinth(rng))
    a.update(_draw_nerves(rng))
    a.update(_draw_middle_ear(rng, effusion))
    a.update(_draw_pneumatisation(rng, pneumatisation, fluid_cells))
    a["saw_planes"] = _draw_saw_planes(rng)
    return a


def _draw_spiral(rng) -> dict:
    """The cochlear spiral: turns, calibre, A value, duct length and height, then the solved
    basal radius and taper."""
    turns = _u(rng, "cochlea_turns")
    R0, R1 = _u(rng, "canal_basal_radius_mm"), _u(rng, "canal_apical_radius_mm")
    r1 = float(rng.uniform(0.6, 0.9))
    A, cdl, H = _u(rng, "cochlea_basal_diameter_mm"), _u(rng, "cochlear_duct_length_mm"), _u(rng, "cochlea_height_mm")
    spiral = solve_spiral(turns, A, cdl, H, R0, R1, r1)
    return {
        "cochlea_turns": turns,
        "cochlea_basal_diameter_mm": A,
        "cochlear_duct_length_drawn_mm": cdl,
        "cochlear_duct_length_mm": spiral["duct_length_mm"],
        "cochlea_height_mm": H,
        "cochlea_basal_radius_mm": spiral["r0"],
        "cochlea_apical_radius_mm": r1,
        "cochlea_taper": spiral["p"],
        "canal_basal_radius_mm": R0,
        "canal_apical_radius_mm": R1,
    }


def _draw_labyrinth(rng) -> dict:
    """Lamina, the cochlea's orientation, modiolus, round window; vestibule and canals."""
    u = rng.uniform
    return {
        "lamina_thickness_mm": u(0.15, 0.22),
        "lamina_width_fraction": u(0.5, 0.65),
        "cochlea_tilt_deg": [_u(rng, "cochlea_tilt_deg") for _ in range(3)],
        "modiolus_nerve_radius_mm": u(0.6, 0.8),
        "round_window_radius_mm": u(0.5, 0.8),
        "round_window_membrane_mm": u(0.12, 0.18),
        "vestibule_center_mm": (np.array([0.0, -1.5, -0.5]) + rng.normal(0, 0.2, 3)).tolist(),
        "vestibule_radii_mm": [u(1.5, 2.0), u(1.1, 1.5), u(1.1, 1.5)],
        "scc_major_radius_mm": [_u(rng, "scc_lateral_radius_mm"), _u(rng, "scc_anterior_radius_mm"),
                                _u(rng, "scc_posterior_radius_mm")],
        "scc_lumen_radius_mm": [_u(rng, "scc_lumen_radius_mm") for _ in range(3)],
        "scc_normals": [
            _tilt(rng, (0.0, 0.0, 1.0), PUBLISHED_RANGES["scc_plane_tilt_deg"][1]),   # lateral
            _tilt(rng, (1.0, 1.0, 0.0), PUBLISHED_RANGES["scc_plane_tilt_deg"][1]),   # anterior (superior)
            _tilt(rng, (1.0, -1.0, 0.0), PUBLISHED_RANGES["scc_plane_tilt_deg"][1]),  # posterior
        ],
        "otic_capsule_mm": u(0.4, 0.7),
    }


def _draw_nerves(rng) -> dict:
    """The internal auditory canal and its nerves; the facial nerve's calibre and course."""
    u = rng.uniform
    return {
        "iac_radius_mm": _u(rng, "iac_diameter_mm") / 2,
        "cochlear_nerve_radius_mm": _u(rng, "cochlear_nerve_diameter_mm") / 2,
        "vestibular_nerve_radius_mm": u(0.35, 0.55),
        "facial_nerve_radius_mm": _u(rng, "facial_nerve_diameter_mm") / 2,
        "facial_canal_wall_mm": u(0.15, 0.3),
        "facial_nerve_height_mm": _u(rng, "facial_nerve_height_over_oval_window_mm"),
        "facial_nerve_jitter_mm": rng.normal(0, 0.5, (4, 3)).tolist(),
    }


def _draw_middle_ear(rng, effusion: bool) -> dict:
    """Tympanic cavity, membranes, mucosa, ossicles and tendons; the effusion's level."""
    u = rng.uniform
    return {
        "middle_ear_center_mm": (np.array([3.0, 0.5, 0.3]) + rng.normal(0, 0.3, 3)).tolist(),
        "middle_ear_radii_mm": (np.array([3.0, 6.0, 5.5]) * u(0.85, 1.15, 3)).tolist(),
        "mucosa_mm": u(0.1, 0.15),
        "tympanic_membrane_mm": u(0.12, 0.2),
        "tympanic_membrane_radius_mm": u(3.5, 4.5),
        "tympanic_membrane_normal": _tilt(rng, (1.0, 0.0, -0.4), 15),
        "stapes_crus_radius_mm": u(0.14, 0.18),
        "stapes_head_offset_mm": (np.array([1.3, -0.2, 0.1]) + rng.normal(0, 0.1, 3)).tolist(),
        "incus_offset_mm": (np.array([0.9, 0.6, 2.4]) + rng.normal(0, 0.2, 3)).tolist(),
        "malleus_offset_mm": (np.array([0.3, 1.6, 0.2]) + rng.normal(0, 0.25, 3)).tolist(),
        "stapedius_tendon_offset_mm": (np.array([-0.3, -2.2, -0.4]) + rng.normal(0, 0.2, 3)).tolist(),
        "stapedius_tendon_radius_mm": u(0.15, 0.25),
        "tensor_tympani_radius_mm": u(0.2, 0.35),
        "effusion": effusion,
        "effusion_level": u(0.1, 0.35) if effusion else 0.0,  # fraction of the cavity's height
    }


def _draw_pneumatisation(rng, pneumatisation: float, fluid_cells: bool) -> dict:
    """Antrum, aditus and air cells for the specimen's pneumatisation; bone density."""
    u = rng.uniform
    return {
        "pneumatisation": pneumatisation,
        "antrum_offset_mm": (np.array([-1.0, -6.5, 2.5]) + rng.normal(0, 0.4, 3)).tolist(),
        "antrum_radii_mm": (np.array([2.0, 2.6, 2.0]) * (0.7 + 0.5 * pneumatisation) * u(0.85, 1.15, 3)).tolist(),
        "aditus_radius_mm": u(0.7, 1.1),
        "mastoid_center_mm": (np.array([0.5, -6.0, 1.5]) + rng.normal(0, 0.4, 3)).tolist(),
        "mastoid_radii_mm": (np.array([6.0, 5.5, 6.5]) * (0.55 + 0.6 * pneumatisation) * u(0.9, 1.1, 3)).tolist(),
        "air_cell_min_mm": u(0.4, 0.6),
        "air_cell_max_mm": u(2.0, 3.0) + 3.0 * pneumatisation,
        "air_cell_fraction": 0.35 + 0.6 * pneumatisation,
        "perilabyrinthine_cells": pneumatisation > 0.55,
        "septum_min_mm": u(0.17, 0.2),
        "septum_max_mm": u(0.26, 0.34),
        "air_cell_seed": int(rng.integers(0, 2**31 - 1)),
        "fluid_cells": fluid_cells,
        "fluid_cell_fraction": u(0.1, 0.4) if fluid_cells else 0.0,
        "bone_density": u(0.85, 1.05),
        "bone_density_waves": [(unit(rng.normal(size=3)) * u(0.3, 0.9)).tolist() + [u(0, 2 * math.pi)] for _ in range(3)],
    }


#: The saw cuts of a temporal-bone block harvested for micro-CT: the face's outward normal in the
#: specimen frame and its usual distance (mm) from the labyrinth's centre. Each specimen has 4-6
#: of them, each turned up to SAW_TILT_DEG and moved up to SAW_SHIFT_MM.
SAW_CUTS = {
    "lateral": ((1.0, 0.0, 0.0), 5.0), "medial": ((-1.0, 0.0, 0.0), 4.0),
    "anterior": ((0.0, 1.0, 0.0), 4.5), "posterior": ((0.0, -1.0, 0.0), 5.5),
    "superior": ((0.0, 0.0, 1.0), 4.0), "inferior": ((0.0, 0.0, -1.0), 4.5),
}
SAW_TILT_DEG = 12.0
SAW_SHIFT_MM = 1.2


def _draw_saw_planes(rng) -> list:
    """4-6 of the block's usual cuts, each with its own angle and position: [nx, ny, nz, distance]."""
    names = sorted(SAW_CUTS)
    chosen = rng.choice(len(names), size=int(rng.integers(4, 7)), replace=False)
    planes = []
    for i in sorted(chosen):
        normal, distance = SAW_CUTS[names[i]]
        planes.append(_tilt(rng, normal, SAW_TILT_DEG) + [distance + float(rng.uniform(-SAW_SHIFT_MM, SAW_SHIFT_MM))])
    return planes


# ---------------------------------------------------------------------------------------------
# The anatomy
# ---------------------------------------------------------------------------------------------
class Anatomy:
    """Material, bone density and structure of a specimen at any point of its own frame (mm).

    Points are given as a ``(3, N)`` float32 array (rows x, y, z): row-wise arithmetic on
    contiguous rows is what keeps the evaluation of millions of points fast.
    """

    def __init__(self, params: dict):
        self.p = p = params
        self.capsule = p["otic_capsule_mm"]
        self.V = np.asarray(p["vestibule_center_mm"], np.float32)
        self.vest_radii = np.asarray(p["vestibule_radii_mm"], np.float32)
        self.me_c = np.asarray(p["middle_ear_center_mm"], np.float32)
        self.me_r = np.asarray(p["middle_ear_radii_mm"], np.float32)
        self._build_cochlea()
        self._build_canals()
        self._build_middle_ear()
        self._build_nerves()
        self._build_block()
        self._build_air_cells()
        w = np.asarray(p["bone_density_waves"], np.float32)
        self.waves_k, self.waves_phase = w[:, :3] * np.float32(2 * math.pi / 4.0), w[:, 3]

    # -- construction -------------------------------------------------------------------------
    def _build_cochlea(self) -> None:
        p = self.p
        a = rotation(p["cochlea_tilt_deg"]) @ unit((0.2, 0.3, 1.0))
        towards = np.array([-0.6, 1.0, 0.0])  # antero-medial of the vestibule
        u0 = unit(towards - a * (towards @ a))
        self.r0, self.r1, self.taper = p["cochlea_basal_radius_mm"], p["cochlea_apical_radius_mm"], p["cochlea_taper"]
        self.R0, self.R1 = p["canal_basal_radius_mm"], p["canal_apical_radius_mm"]
        self.turns = p["cochlea_turns"]
        self.theta_max = 2 * math.pi * self.turns
        self.H = p["cochlea_height_mm"]
        # The basal end (theta = 0) opens into the vestibule.
        self.B = (self.V + (self.r0 + 0.6) * u0).astype(np.float32)
        self.cochlea_frame = np.stack([-u0, np.cross(a, -u0), a]).astype(np.float32)
        self.axis = a.astype(np.float32)
        self.cochlea_center = self.B + 0.5 * self.H * self.axis
        self.cochlea_bound = math.hypot(self.r0 + self.R0 + self.capsule + 0.2, 0.5 * self.H + self.R0 + self.capsule + 0.2)
        # Round window: where the basal turn (a quarter turn in) comes nearest the tympanic cavity.
        theta = np.linspace(0.3, 2.0, 40)
        s = theta / self.theta_max
        r = _spiral_radius(s, self.r0, self.r1, self.taper)
        pts = self.B + (self.cochlea_frame.T @ np.stack([r * np.cos(theta), r * np.sin(theta), self.H * s]).astype(np.float32)).T
        k = int(np.argmin(np.linalg.norm(pts - self.me_c, axis=1)))
        self.rw_center = pts[k].astype(np.float32)
        self.rw_canal_radius = float(_canal_radius(s[k], self.R0, self.R1))
        self.rw_dir = unit(self.me_c - self.rw_center).astype(np.float32)

    def _build_canals(self) -> None:
        p = self.p
        self.sccs = []
        away = unit(self.V - self.B)
        for n, Rm, r in zip(p["scc_normals"], p["scc_major_radius_mm"], p["scc_lumen_radius_mm"]):
            f = _frame(n)
            inplane = away - f[2] * (away @ f[2])
            if np.linalg.norm(inplane) < 0.3:  # the plane holds little of "away": go up instead
                inplane = np.array([0.0, 0.0, 1.0]) - f[2] * f[2][2]
            c = self.V + (Rm + 0.35) * unit(inplane)
            self.sccs.append((c.astype(np.float32), f, float(Rm), float(r)))

    def _middle_ear_wall_x(self, y: float, z: float) -> float:
        q = ((y - self.me_c[1]) / self.me_r[1]) ** 2 + ((z - self.me_c[2]) / self.me_r[2]) ** 2
        return float(self.me_c[0] - self.me_r[0] * math.sqrt(max(1.0 - q, 0.05)))

    def _build_middle_ear(self) -> None:
        p = self.p
        wall_x = self._middle_ear_wall_x(self.V[1], self.V[2])
        self.wall_x = wall_x
        head = (np.array([wall_x, self.V[1], self.V[2]]) + np.asarray(p["stapes_head_offset_mm"])).astype(np.float32)
        self.window_x = (float(self.V[0]), float(wall_x))
        self.footplate = (float(wall_x) - 0.3, float(wall_x) - 0.05)
        self.stapes_head = head
        self.crura = [(np.array([wall_x - 0.05, self.V[1] + dy, self.V[2]], np.float32), head) for dy in (-0.55, 0.55)]
        incus_tip = head + np.asarray(p["incus_offset_mm"], np.float32)
        self.incus = (head, incus_tip)
        self.malleus = (incus_tip, incus_tip + np.asarray(p["malleus_offset_mm"], np.float32),
                        self.me_c + np.array([0.85 * self.me_r[0], 0.3, -1.2], np.float32))
        self.stapedius = (head, head + np.asarray(p["stapedius_tendon_offset_mm"], np.float32))
        # Tensor tympani: from the cochleariform process on the medial wall to the malleus' neck.
        self.tensor = (np.array([wall_x - 0.2, self.V[1] + 2.6, self.V[2] + 0.6], np.float32), self.malleus[1])
        # Tympanic membrane: a disc closing the cavity laterally; the external canal beyond it.
        n = unit(p["tympanic_membrane_normal"]).astype(np.float32)
        self.tm_normal = n
        self.tm_center = (self.me_c + 0.8 * self.me_r[0] * np.array([1.0, 0.0, 0.0], np.float32)).astype(np.float32)
        # Antrum (and the aditus leading to it from the epitympanum).
        self.antrum_c = (self.me_c + np.asarray(p["antrum_offset_mm"], np.float32)).astype(np.float32)
        self.antrum_r = np.asarray(p["antrum_radii_mm"], np.float32)
        epi = self.me_c + np.array([0.0, -0.4 * self.me_r[1], 0.6 * self.me_r[2]], np.float32)
        self.aditus = (epi.astype(np.float32), self.antrum_c)
        # Effusion: fluid below a level (specimen frame; fixed before the scan).
        self.effusion_z = float(self.me_c[2] - self.me_r[2] + 2 * self.me_r[2] * p["effusion_level"]) if p["effusion"] else -np.inf

    def _build_nerves(self) -> None:
        p = self.p
        a = self.axis
        # Internal auditory canal: from below the modiolus' base along -axis, out of the block.
        self.iac = (self.B - 0.6 * a, self.B - 16.0 * a)
        f = _frame(a)
        ri = p["iac_radius_mm"]
        rc, rv = p["cochlear_nerve_radius_mm"], p["vestibular_nerve_radius_mm"]
        # Cochlear nerve antero-inferior, two vestibular nerves posterior, in the canal's cross-section.
        offsets = [(f[0] * 0.35 - f[1] * 0.35) * (ri - rc), (-f[0] * 0.45 + f[1] * 0.3) * (ri - rv),
                   (-f[0] * 0.45 - f[1] * 0.35) * (ri - rv)]
        self.iac_nerves = [((self.iac[0] + o).astype(np.float32), (self.iac[1] + o).astype(np.float32), r)
                           for o, r in zip(offsets, (rc, rv, rv))]
        # Facial nerve: IAC fundus -> labyrinthine segment -> geniculate -> tympanic segment above
        # the oval window -> second genu -> mastoid segment going down.
        j = np.asarray(p["facial_nerve_jitter_mm"], np.float32)
        fn_z = float(self.V[2] + self.vest_radii[2] * 0.6 + p["facial_nerve_height_mm"] + p["facial_nerve_radius_mm"])
        fundus = self.iac[0] - a * 1.5 + (f[0] * 0.35 + f[1] * 0.45) * (ri - p["facial_nerve_radius_mm"])
        geniculate = np.array([self.wall_x - 0.8, self.V[1] + 3.2, fn_z + 0.4], np.float32) + j[0] * 0.6
        genu2 = np.array([self.wall_x - 0.3, self.V[1] - 2.6, fn_z], np.float32) + j[1] * 0.6
        mastoid = genu2 + np.array([0.4, -1.2, -8.0], np.float32) + j[2]
        self.facial = [fundus.astype(np.float32), geniculate, genu2, mastoid]

    def _build_block(self) -> None:
        planes = np.asarray(self.p["saw_planes"], np.float32)
        normals = planes[:, :3] / np.linalg.norm(planes[:, :3], axis=1, keepdims=True)
        center = (0.5 * (self.cochlea_center + self.V)).astype(np.float32)
        # A saw never goes through the cochlea or the vestibule: keep them whole inside the block.
        along = np.abs(normals @ self.axis)
        cochlea_reach = along * (0.5 * self.H + self.R0 + self.capsule) + np.sqrt(1 - along**2) * (self.r0 + self.R0 + self.capsule)
        keep = np.maximum(normals @ (self.cochlea_center - center) + cochlea_reach + 0.2,
                          normals @ (self.V - center) + float(self.vest_radii.max()) + self.capsule + 0.2)
        self.block_center, self.block_normals = center, normals
        self.block_offsets = np.maximum(planes[:, 3], keep).astype(np.float32)

    def _build_air_cells(self) -> None:
        """Voronoi seeds: small cells at the periphery, large ones near the antrum; a seed is air
        with the specimen's cell fraction (sclerotic bones keep most as bone), perilabyrinthine
        seeds only in well pneumatised specimens; some cells fluid-filled."""
        p = self.p
        rng = np.random.default_rng(p["air_cell_seed"])
        c = np.asarray(p["mastoid_center_mm"], float)
        radii = np.asarray(p["mastoid_radii_mm"], float)
        dmin, dmax = p["air_cell_min_mm"], p["air_cell_max_mm"]
        reach = np.maximum(radii, np.abs(self.V - c) + 4.0)  # perilabyrinthine cells reach the labyrinth
        lo, hi = c - reach - dmax, c + reach + dmax
        n_candidates = int(np.prod(hi - lo) / dmin**3 * 1.3)
        q = rng.uniform(lo, hi, size=(n_candidates, 3))
        rel = np.linalg.norm((q - c) / radii, axis=1)
        t = np.clip(np.linalg.norm((q - self.antrum_c) / radii, axis=1), 0.0, 1.0)
        d = dmax + (dmin - dmax) * t ** 0.5
        d = np.where(rel > 1.0, np.maximum(np.minimum(d, 1.5), dmin), d)  # perilabyrinthine: small
        keep = rng.uniform(size=len(q)) < (dmin / d) ** 3
        q, rel = q[keep], rel[keep]
        pairs = cKDTree(q).query_pairs(r=dmin / 3.0, output_type="ndarray")
        drop = np.zeros(len(q), bool)
        drop[pairs[:, 1]] = True
        q, rel = q[~drop], rel[~drop]
        near_labyrinth = np.linalg.norm(q - self.V, axis=1) < 6.0
        air = (rel <= 1.0) & (rng.uniform(size=len(q)) < p["air_cell_fraction"])
        if p["perilabyrinthine_cells"]:
            air |= (rel > 1.0) & near_labyrinth & (rng.uniform(size=len(q)) < 0.5 * p["air_cell_fraction"])
        self.cell_seeds = q.astype(np.float32)
        self.cell_is_air = air
        self.cell_is_fluid = air & (rng.uniform(size=len(q)) < p["fluid_cell_fraction"])
        self.cell_code = rng.uniform(size=len(q)).astype(np.float32)
        self.cell_tree = cKDTree(self.cell_seeds)
        self.cells_lo, self.cells_hi = lo.astype(np.float32), hi.astype(np.float32)

    # -- pieces -----------------------------------------------------------------------------
    def _cochlea(self, q: np.ndarray):
        """Canal SDF, lamina mask and modiolar nerve SDF of points ``q`` (3, N), in mm."""
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
            r = _spiral_radius(s, self.r0, self.r1, self.taper)
            R = _canal_radius(s, self.R0, self.R1)
            dr, dz = rho - r, z - self.H * s
            sdf = np.where(valid, np.sqrt(dr * dr + dz * dz) - R, np.inf)
            better = sdf < best
            best = np.where(better, sdf, best)
            best_dr = np.where(better, dr, best_dr)
            best_dz = np.where(better, dz, best_dz)
            best_R = np.where(better, R, best_R)
        # Helicotrema: the canal's blind apical end.
        ax, ay = self.r1 * math.cos(self.theta_max), self.r1 * math.sin(self.theta_max)
        best = np.minimum(best, np.sqrt((x - ax) ** 2 + (y - ay) ** 2 + (z - self.H) ** 2) - self.R1)
        # Osseous spiral lamina: a plate through the canal's middle from its modiolar wall.
        t = self.p["lamina_thickness_mm"] * 0.5
        reach = best_R * (2 * self.p["lamina_width_fraction"] - 1.0)
        lamina = (best < 0) & (np.abs(best_dz) < t) & (best_dr < reach)
        # Cochlear nerve fibres in the modiolus: a cone from the internal auditory canal up the axis.
        top = 0.75 * self.H
        frac = np.clip(z / top, 0.0, 1.0)
        nerve_r = self.p["modiolus_nerve_radius_mm"] * (1 - frac) + 0.15 * frac
        nerve = np.where((z <= top) & (z > -1.0), rho - nerve_r, np.inf)
        return best, lamina, nerve

    def _scc(self, q, c, f, Rm, r):
        x, y, z = f @ (q - _col(c))
        return np.hypot(np.hypot(x, y) - Rm, z) - r

    def bone_density(self, q: np.ndarray) -> np.ndarray:
        """Relative density of bone (1 = 1700 HU): the specimen's level with slow variation."""
        wave = np.zeros(q.shape[1], np.float32)
        for k, ph in zip(self.waves_k, self.waves_phase):
            wave += np.sin(k[0] * q[0] + k[1] * q[1] + k[2] * q[2] + ph)
        return (np.float32(self.p["bone_density"]) * (1.0 + 0.02 * wave)).astype(np.float32)

    def in_block(self, q: np.ndarray) -> np.ndarray:
        """Points inside the sawn block (every cut's half-space)."""
        d = self.block_normals @ (q - _col(self.block_center))
        return np.all(d <= self.block_offsets[:, None], axis=0)

    # -- evaluation -------------------------------------------------------------------------
    def materials(self, q: np.ndarray, structures: bool = False):
        """Material code (1 air, 2 fluid, 3 bone, 4 soft tissue) and bone density of points ``q``
        (3, N); with ``structures``, also each point's structure code (:data:`STRUCTURES`).

        Each structure is evaluated only on the points inside its bounding box, so a point far
        from everything costs a few comparisons. Later pieces paint over earlier ones.
        """
        q = np.ascontiguousarray(q, dtype=np.float32)
        n = q.shape[1]
        mat = np.full(n, BONE, np.uint8)
        code = np.zeros(n, np.uint8)
        density = self.bone_density(q)

        def paint(idx, structure, material=None):
            mat[idx] = STRUCTURES[structure][1] if material is None else material
            code[idx] = structure

        covered = np.zeros(n, bool)  # where no air cell may be
        self._paint_cavities(q, paint, covered)
        lumen, lamina, nerve, which = self._labyrinth(q)
        facial = np.full(n, np.inf, np.float32)
        fr, fw = self.p["facial_nerve_radius_mm"], self.p["facial_canal_wall_mm"]
        idx = _polyline_box(q, self.facial, fr + fw)
        facial[idx] = _polyline_distance(q[:, idx], self.facial) - fr
        iac = np.full(n, np.inf, np.float32)
        idx = _polyline_box(q, self.iac, self.p["iac_radius_mm"] + 0.4)
        iac[idx] = _polyline_distance(q[:, idx], self.iac) - self.p["iac_radius_mm"]
        cap = self.capsule
        walls = (lumen < cap) | (facial < fw) | (iac < 0.3) | (nerve < 0.25)
        covered |= walls

        self._paint_air_cells(q, covered, paint, density)
        self._paint_effusion(q, code, paint)
        # Bony walls, then the lumens inside them.
        capsule = lumen < cap
        paint(np.flatnonzero(walls & (code != 18)), 0)
        density[capsule] *= 1.1  # the otic capsule is the densest bone of the body
        inside_iac = np.flatnonzero(iac < 0)
        paint(inside_iac, 9)
        self._paint_iac_nerves(q, inside_iac, paint)
        paint(np.flatnonzero(nerve < 0), 11)
        paint(np.flatnonzero(facial < 0), 12)
        for k, structure in enumerate((6, 7, 8)):
            paint(np.flatnonzero((lumen < 0) & (which == k)), structure)
        paint(np.flatnonzero(lamina), 19)
        self._paint_windows(q, paint)
        self._paint_ossicles(q, mat, code, paint, density)
        paint(np.flatnonzero(~self.in_block(q)), 1)
        return (mat, density, code) if structures else (mat, density)

    def _labyrinth(self, q):
        """Lumen SDF of the labyrinth, lamina mask, modiolar nerve SDF and which part is nearest
        (0 cochlea, 1 vestibule, 2 canals)."""
        n = q.shape[1]
        lumen = np.full(n, np.inf, np.float32)
        which = np.zeros(n, np.uint8)
        nerve = np.full(n, np.inf, np.float32)
        lamina = np.zeros(n, bool)
        cap = self.capsule
        idx = _in_box(q, self.cochlea_center - self.cochlea_bound, self.cochlea_center + self.cochlea_bound)
        if idx.size:
            lumen[idx], lamina[idx], nerve[idx] = self._cochlea(q[:, idx])
        idx = _in_box(q, self.V - self.vest_radii - cap - 0.1, self.V + self.vest_radii + cap + 0.1)
        vest = -_ellipsoid_depth(q[:, idx], self.V, self.vest_radii)
        closer = vest < lumen[idx]
        lumen[idx[closer]], which[idx[closer]] = vest[closer], 1
        for c, f, Rm, r in self.sccs:
            reach = Rm + r + cap + 0.1
            idx = _in_box(q, c - reach, c + reach)
            d = self._scc(q[:, idx], c, f, Rm, r)
            closer = d < lumen[idx]
            lumen[idx[closer]], which[idx[closer]] = d[closer], 2
        return lumen, lamina, nerve, which

    def _paint_cavities(self, q, paint, covered) -> None:
        """Tympanic cavity, antrum and aditus (air) lined with mucosa; the tympanic membrane and
        the external canal beyond it."""
        lo = np.minimum(self.me_c - self.me_r, self.antrum_c - self.antrum_r) - 1.0
        hi = np.maximum(self.me_c + self.me_r, self.antrum_c + self.antrum_r) + 1.0
        idx = _in_box(q, lo, hi)
        qi = q[:, idx]
        d_me = _ellipsoid_depth(qi, self.me_c, self.me_r)
        d_an = np.maximum(_ellipsoid_depth(qi, self.antrum_c, self.antrum_r),
                          self.p["aditus_radius_mm"] - _polyline_distance(qi, self.aditus))
        depth = np.maximum(d_me, d_an)
        cavity = depth > 0
        covered[idx[depth > -0.15]] = True  # a cell wall at least 0.15 mm from a cavity
        paint(idx[cavity & (d_me >= d_an)], 2)
        paint(idx[cavity & (d_me < d_an)], 3)
        paint(idx[cavity & (depth < self.p["mucosa_mm"])], 16)
        # Tympanic membrane and external canal.
        rel = qi - _col(self.tm_center)
        along = (self.tm_normal[:, None] * rel).sum(axis=0)
        radial = _norm(rel - self.tm_normal[:, None] * along)
        r_tm, t_tm = self.p["tympanic_membrane_radius_mm"], self.p["tympanic_membrane_mm"]
        canal = (along > 0.5 * t_tm) & (radial < 0.85 * r_tm)
        paint(idx[canal], 5)
        covered[idx[canal]] = True
        paint(idx[(np.abs(along) <= 0.5 * t_tm) & (radial < r_tm)], 15)

    def _paint_air_cells(self, q, covered, paint, density) -> None:
        """Mastoid and perilabyrinthine cells (Voronoi foam): air (or fluid) where the point is
        deeper than half a septum inside an air cell; the distance to the bisector of the two
        nearest seeds is exact."""
        idx = _in_box(q, self.cells_lo, self.cells_hi)
        c, r = np.asarray(self.p["mastoid_center_mm"], np.float32), np.asarray(self.p["mastoid_radii_mm"], np.float32)
        rel = _norm((q[:, idx] - _col(c)) / _col(r))
        density[idx] *= 1.0 - 0.08 * np.clip(1.5 - rel, 0.0, 1.0)  # pneumatised bone is lighter
        idx = idx[~covered[idx]]
        if not idx.size:
            return
        dist, nn = self.cell_tree.query(q[:, idx].T, k=2, workers=2)
        s1, s2 = self.cell_seeds[nn[:, 0]], self.cell_seeds[nn[:, 1]]
        gap = np.linalg.norm(s2 - s1, axis=1)
        to_wall = (dist[:, 1] ** 2 - dist[:, 0] ** 2) / (2 * np.maximum(gap, 1e-6))
        # Each wall between two cells has its own thickness (a symmetric hash of the pair).
        h = np.mod(self.cell_code[nn[:, 0]] + self.cell_code[nn[:, 1]], 1.0)
        septum = self.p["septum_min_mm"] + (self.p["septum_max_mm"] - self.p["septum_min_mm"]) * h
        open_ = self.cell_is_air[nn[:, 0]] & (to_wall > 0.5 * septum)
        fluid = self.cell_is_fluid[nn[:, 0]]
        paint(idx[open_ & ~fluid], 4)
        paint(idx[open_ & fluid], 17)

    def _paint_effusion(self, q, code, paint) -> None:
        if not self.p["effusion"]:
            return
        cavity = np.flatnonzero((code == 2) | (code == 16))
        paint(cavity[q[2, cavity] < self.effusion_z], 17)

    def _paint_iac_nerves(self, q, inside, paint) -> None:
        qi = q[:, inside]
        for a, b, r in self.iac_nerves:
            paint(inside[_polyline_distance(qi, (a, b)) < r], 11)

    def _paint_windows(self, q, paint) -> None:
        """Oval window (a short fluid channel closed by the stapes footplate in its annular
        ligament) and round window (the scala tympani closed by its membrane, then the air niche)."""
        lo = np.array([self.window_x[0], self.V[1] - 0.9, self.V[2] - 0.5], np.float32)
        hi = np.array([self.window_x[1] + 0.1, self.V[1] + 0.9, self.V[2] + 0.5], np.float32)
        idx = _in_box(q, lo, hi)
        qi = q[:, idx]
        ring = ((qi[1] - self.V[1]) / 0.9) ** 2 + ((qi[2] - self.V[2]) / 0.5) ** 2
        in_fp = (qi[0] >= self.footplate[0]) & (qi[0] <= self.footplate[1])
        paint(idx[ring < 1.0], 7)
        paint(idx[in_fp & (ring < 1.0)], 20)
        paint(idx[in_fp & (ring < 0.72)], 18)
        # Round window niche: from the canal's centre towards the tympanic cavity.
        length = float(np.linalg.norm(self.me_c - self.rw_center))
        rr = self.p["round_window_radius_mm"]
        end = self.rw_center + self.rw_dir * length
        idx = _polyline_box(q, (self.rw_center, end), rr)
        rel = q[:, idx] - _col(self.rw_center)
        along = (self.rw_dir[:, None] * rel).sum(axis=0)
        radial = _norm(rel - self.rw_dir[:, None] * along)
        tube = (radial < rr) & (along > 0)
        R, m = self.rw_canal_radius, self.p["round_window_membrane_mm"]
        inner = _ellipsoid_depth(q[:, idx], self.me_c, self.me_r) < 0  # the niche ends in the cavity
        paint(idx[tube & (along >= R) & (along < R + m)], 14)
        paint(idx[tube & (along >= R + m) & inner], 2)

    def _paint_ossicles(self, q, mat, code, paint, density) -> None:
        """Stapes crura and head, incus' long process, malleus; the stapedius and tensor tympani
        tendons through the air."""
        crus = self.p["stapes_crus_radius_mm"]
        pieces = [
            (self.crura[0], crus, 18), (self.crura[1], crus, 18), (self.incus, 0.3, 18),
            ((self.stapes_head, self.stapes_head), 0.35, 18), (self.malleus, 0.35, 18),
            (self.stapedius, self.p["stapedius_tendon_radius_mm"], 13),
            (self.tensor, self.p["tensor_tympani_radius_mm"], 13),
        ]
        for points, radius, structure in pieces:
            idx = _polyline_box(q, points, radius)
            hit = idx[_polyline_distance(q[:, idx], points) < radius]
            if structure == 13:
                hit = hit[(mat[hit] == AIR) | (code[hit] == 17)]
            else:
                density[hit] *= 1.05
            paint(hit, structure)
