"""Volumes: a numpy array with its physical geometry, read and written through SimpleITK.

A :class:`Volume` holds the voxels as ``array[z, y, x]`` (numpy order, as
``sitk.GetArrayFromImage`` returns them) and the geometry in SimpleITK's order and LPS
convention: ``spacing``, ``origin`` are ``(x, y, z)`` in mm and ``direction`` is the 3x3
direction-cosine matrix flattened row by row. Converting to and from ``sitk.Image`` keeps the
geometry exactly, so a volume written by the engine lands where its input was.

Every input problem a user can make (missing or unreadable file, 2D/4D or multi-component
image, non-finite voxels, zero or negative spacing) raises :class:`MicroCTSynthError` with one
sentence. Writing goes to a temporary name in the same folder and is renamed at the end, so a
failed run never leaves a half-written file.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import MicroCTSynthError

#: A Gaussian's full width at half maximum over its standard deviation: blurs are given in mm FWHM.
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))

#: File endings SimpleITK reads and writes for us; a folder is read as a DICOM series.
VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")


@dataclass
class Volume:
    """Voxels ``array[z, y, x]`` with spacing/origin ``(x, y, z)`` mm and direction (LPS)."""

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = field(default=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))

    def __post_init__(self):
        self.array = np.asarray(self.array)
        if self.array.ndim != 3:
            raise MicroCTSynthError(
                f"A volume must be 3D, but this array has {self.array.ndim} dimension(s) {self.array.shape}."
            )
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = tuple(float(d) for d in np.asarray(self.direction, dtype=float).ravel())
        if len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise MicroCTSynthError("A volume needs 3 spacings, 3 origin coordinates and a 3x3 direction matrix.")
        check_geometry(self.spacing, self.direction)

    # -- geometry -------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(z, y, x)``."""
        return tuple(self.array.shape)

    @property
    def size(self) -> tuple[int, int, int]:
        """Image size in SimpleITK order ``(x, y, z)``."""
        return tuple(int(n) for n in self.array.shape[::-1])

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def index_to_physical(self) -> np.ndarray:
        """4x4 matrix mapping a continuous index ``(i, j, k)`` = ``(x, y, z)`` to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def physical_points(self, indices_xyz) -> np.ndarray:
        """LPS points (N, 3) of continuous indices ``(N, 3)`` given as ``(x, y, z)``."""
        idx = np.atleast_2d(np.asarray(indices_xyz, dtype=float))
        return idx @ (self.direction_matrix @ np.diag(self.spacing)).T + np.asarray(self.origin)

    def continuous_indices(self, points_lps) -> np.ndarray:
        """Continuous indices ``(N, 3)`` ``(x, y, z)`` of LPS points ``(N, 3)``."""
        pts = np.atleast_2d(np.asarray(points_lps, dtype=float)) - np.asarray(self.origin)
        inv = np.linalg.inv(self.direction_matrix @ np.diag(self.spacing))
        return pts @ inv.T

    @property
    def center(self) -> np.ndarray:
        """Physical centre (LPS mm) of the voxel grid."""
        return self.physical_points((np.asarray(self.size, dtype=float) - 1.0) / 2.0)[0]

    @property
    def extent_mm(self) -> np.ndarray:
        """Field of view along each image axis ``(x, y, z)`` in mm."""
        return np.asarray(self.size, dtype=float) * np.asarray(self.spacing)

    def same_geometry(self, other: "Volume", tol: float = 1e-4) -> bool:
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def with_array(self, array: np.ndarray) -> "Volume":
        """A new volume with this geometry and other voxels (same shape)."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise MicroCTSynthError(f"Array shape {array.shape} does not match the volume's grid {self.array.shape}.")
        return Volume(array, self.spacing, self.origin, self.direction)

    # -- SimpleITK ------------------------------------------------------------------------
    def to_sitk(self) -> sitk.Image:
        image = sitk.GetImageFromArray(np.ascontiguousarray(self.array), isVector=False)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> "Volume":
        check_image(image)
        return cls(sitk.GetArrayFromImage(image), image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.4g}" for s in self.spacing)
        return f"Volume(shape(z,y,x)={self.shape}, dtype={self.array.dtype}, spacing(x,y,z)=({sp}) mm)"


def check_geometry(spacing, direction, what: str = "The volume") -> None:
    spacing = np.asarray(spacing, dtype=float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise MicroCTSynthError(
            f"{what} has zero, negative or undefined voxel spacing {tuple(spacing.round(6))}; fix the header (spacing must be positive)."
        )
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(d)) or abs(abs(np.linalg.det(d)) - 1.0) > 1e-3:
        raise MicroCTSynthError(f"{what} has a degenerate direction matrix; its axes must be orthonormal.")


def check_image(image: sitk.Image, what: str = "The image") -> None:
    """Raise :class:`MicroCTSynthError` unless ``image`` is a scalar 3D image with sane geometry."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise MicroCTSynthError(
            f"{what} has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour or vector image); "
            "a single-component grey-level volume is needed."
        )
    dim = image.GetDimension()
    if dim == 4 and image.GetSize()[3] == 1:
        pass  # handled by the caller (squeezed); kept for clarity
    elif dim != 3:
        kind = "2D image" if dim == 2 else f"{dim}D image"
        raise MicroCTSynthError(f"{what} is a {kind} of size {image.GetSize()}; a 3D volume is needed.")
    check_geometry(image.GetSpacing(), image.GetDirection(), what)


def _describe(path: Path) -> str:
    return f"'{path}'"


def _check_header_spacing(path: Path, what: str) -> None:
    """Refuse a negative spacing written in a text header (NRRD ``spacings``, MetaImage ``ElementSpacing``).

    ITK would read it as a flipped axis without a word, which can mirror left and right.
    """
    if path.is_dir() or not path.name.lower().endswith((".nrrd", ".nhdr", ".mha", ".mhd")):
        return
    with open(path, "rb") as f:
        head = f.read(8192)
    header = head.split(b"\n\n", 1)[0] if path.name.lower().endswith((".nrrd", ".nhdr")) else head
    for line in header.decode("latin-1").splitlines():
        key, sep, value = line.partition(":" if ":" in line and "=" not in line else "=")
        if sep and key.strip().lower() in ("spacings", "elementspacing", "elementsize"):
            try:
                values = [float(v) for v in value.split() if v.lower() != "nan"]
            except ValueError:
                continue
            if any(v <= 0 for v in values):
                raise MicroCTSynthError(
                    f"{what} has zero or negative voxel spacing ({value.strip()}) in its header; "
                    "fix the header (spacing must be positive, orientation belongs in the direction)."
                )


def read_image(path, what: str | None = None) -> sitk.Image:
    """Read a 3D scalar image (NRRD, NIfTI, MHA/MHD, or a DICOM series folder) as ``sitk.Image``.

    Validates what every pipeline step assumes: the file exists and is readable, it is 3D
    and single-component, its spacing is positive and its voxels are finite.
    """
    path = Path(path)
    what = what or f"The image {_describe(path)}"
    if not path.exists():
        raise MicroCTSynthError(f"{what} does not exist: check the path.")
    _check_header_spacing(path, what)
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise MicroCTSynthError(f"The folder {_describe(path)} holds no DICOM series.")
            # The largest series is the volume; localisers and dose reports are small.
            files = max((reader.GetGDCMSeriesFileNames(str(path), s) for s in series), key=len)
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except MicroCTSynthError:
        raise
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        hint = next((ln for ln in first if "ERROR" in ln or "Unable" in ln or "Could not" in ln), first[-1] if first else "")
        raise MicroCTSynthError(
            f"{what} could not be read as a volume (supported: NRRD, NIfTI, MHA/MHD, DICOM folder): "
            f"{hint.strip()[:200].rstrip('.')}."
        ) from None
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    check_image(image, what)
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise MicroCTSynthError(f"{what} has {bad} voxel(s) that are NaN or infinite; a volume must be finite everywhere.")
    return image


def read_volume(path, what: str | None = None) -> Volume:
    """Read a volume file or DICOM folder as a :class:`Volume` (see :func:`read_image`)."""
    return Volume.from_sitk(read_image(path, what))


def check_output_name(path) -> Path:
    """Refuse, before any work, a volume output name that cannot be written (ending, detached header)."""
    path = Path(path)
    _check_suffix(path)
    if path.name.lower().endswith((".mhd", ".nhdr")):
        raise MicroCTSynthError(f"Cannot write '{path}': write .mha or .nrrd (a single file) instead of a detached header.")
    return path


def _check_suffix(path: Path) -> None:
    name = path.name.lower()
    if not name.endswith(VOLUME_SUFFIXES):
        raise MicroCTSynthError(
            f"Cannot write '{path}': use one of the endings {', '.join(VOLUME_SUFFIXES)}."
        )


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix


def atomic_path(path) -> "AtomicWrite":
    """Context manager giving a temporary path beside ``path``; renamed onto it on success."""
    return AtomicWrite(Path(path))


class AtomicWrite:
    """``with AtomicWrite(p) as tmp: write(tmp)`` - ``tmp`` becomes ``p`` only if the block succeeds.

    The temporary name ``.<name>.<pid>@<host>-<random>.part<suffix>`` carries the writer's pid, so that
    the leftovers of a writer killed mid-write are removed by the next one (safety.clean_stale_parts).
    A failed write (full disk, read-only folder, no permission) ends in one sentence.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def __enter__(self) -> Path:
        from .safety import clean_stale_parts, part_tag, write_error

        if self.path.is_dir():
            raise MicroCTSynthError(f"Cannot write '{self.path}': it is a folder; give a file name.")
        suffix = _suffix(self.path) if self.path.name.lower().endswith(VOLUME_SUFFIXES) else self.path.suffix
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            clean_stale_parts(self.path.parent)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.{part_tag()}-", suffix=f".part{suffix}",
                                       dir=self.path.parent)
        except OSError as exc:
            raise write_error(exc, self.path) from None
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        from .safety import write_error

        if exc_type is None:
            try:
                _check_complete(self.tmp)
                # mkstemp makes the file private (0600); give it the permissions a plain open() would.
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(self.tmp, 0o666 & ~umask)
                os.replace(self.tmp, self.path)
                return False
            except OSError as error:
                exc_type, exc = OSError, error
        self.tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_error(exc, self.path) from None
        if isinstance(exc, RuntimeError) and _looks_like_write_failure(exc, self.path):
            raise MicroCTSynthError(f"Cannot write '{self.path}': {_write_failure_reason(self.path)}.") from None
        return False


def _check_complete(tmp: Path) -> None:
    """Raise ``OSError`` (full disk, size limit) when a write came out incomplete without saying so.

    SimpleITK's writers ignore a failing write: on a full disk they leave an empty or cut file and
    return. An empty file, a disk with no free block left, or a file as long as the process' file
    size limit is taken for a failed write.
    """
    import errno

    size = tmp.stat().st_size
    full = OSError(errno.ENOSPC, "No space left on device")
    if size == 0:
        raise full
    if hasattr(os, "statvfs"):
        st = os.statvfs(tmp.parent)
        if st.f_bavail == 0 and st.f_blocks > 0:
            raise full
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, ValueError, OSError):
        return
    if limit != resource.RLIM_INFINITY and size >= limit:
        raise OSError(errno.EFBIG, "File too large")


def _looks_like_write_failure(exc: Exception, path: Path) -> bool:
    """SimpleITK and torch report a failed write as RuntimeError ("file write failed", "Could not write")."""
    text = str(exc).lower()
    return any(k in text for k in ("write", "writing", "no space", "file too large", "errno"))


def _write_failure_reason(path: Path) -> str:
    import shutil

    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if free is not None and free < 1 << 20:
        return "the disk is full; free some space or write elsewhere"
    return "the write failed (full disk, file size limit or a file system error); free some space or write elsewhere"


def json_safe(obj):
    """``obj`` with NaN / infinite floats (numpy scalars too) replaced by ``None``, as JSON has no such numbers."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_json(path, data) -> Path:
    """Write ``data`` as indented JSON, atomically, non-finite numbers as ``null``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_safe(data), indent=2) + "\n")
    return path


def write_image(image: sitk.Image, path, compress: bool = True) -> Path:
    """Write ``image`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    _check_suffix(path)
    if path.name.lower().endswith((".mhd", ".nhdr")):
        # A detached header names its data file, which a rename would not follow.
        raise MicroCTSynthError(f"Cannot write '{path}': write .mha or .nrrd (a single file) instead of a detached header.")
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=compress)
    return path


def write_volume(volume: Volume, path, compress: bool = True) -> Path:
    """Write a :class:`Volume` atomically in the format given by the file ending."""
    return write_image(volume.to_sitk(), path, compress)
