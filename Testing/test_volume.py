"""Volume I/O: formats keep geometry; every bad input gets one sentence, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from MicroCTSynthLib.errors import MicroCTSynthError
from MicroCTSynthLib.volume import Volume, read_volume, write_volume

OBLIQUE = tuple(
    sitk.VersorRigid3DTransform((0.1, -0.2, 0.15, np.sqrt(1 - 0.1**2 - 0.2**2 - 0.15**2))).GetMatrix()
)


def _volume(rng, dtype=np.int16) -> Volume:
    array = rng.integers(-1000, 2000, size=(7, 9, 11)).astype(dtype)
    return Volume(array, spacing=(0.3, 0.25, 0.5), origin=(-12.5, 30.25, 7.0), direction=OBLIQUE)


@pytest.mark.parametrize("suffix", [".nrrd", ".nii", ".nii.gz", ".mha"])
def test_round_trip_keeps_voxels_and_geometry(tmp_path, rng, suffix):
    vol = _volume(rng)
    path = write_volume(vol, tmp_path / f"v{suffix}")
    back = read_volume(path)
    np.testing.assert_array_equal(back.array, vol.array)
    # NIfTI stores its affine in float32: exact to ~1e-6 relative, not to the last bit.
    tol = 1e-5 if "nii" in suffix else 1e-12
    np.testing.assert_allclose(back.spacing, vol.spacing, atol=tol)
    np.testing.assert_allclose(back.origin, vol.origin, atol=tol * 100)
    np.testing.assert_allclose(back.direction, vol.direction, atol=tol)
    assert not list(tmp_path.glob(".*part*")), "no temporary file may remain"


def test_dicom_series_folder(tmp_path, rng):
    vol = Volume(rng.integers(-1000, 2000, size=(5, 8, 6)).astype(np.int16), spacing=(0.4, 0.4, 0.6), origin=(1.0, -2.0, 3.0))
    image = vol.to_sitk()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        sl = image[:, :, k]
        for tag, value in {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": "1.2.826.0.1.3680043.2.1125.2",
            "0020|0013": str(k),
            "0020|0032": "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|0030": "0.4\\0.4",
            "0018|0050": "0.6",
        }.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(tmp_path / f"slice{k:03d}.dcm"))
        writer.Execute(sl)
    back = read_volume(tmp_path)
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.spacing, vol.spacing, atol=1e-4)
    np.testing.assert_allclose(back.origin, vol.origin, atol=1e-4)


def test_real_head_ct_geometry(head_ct_path):
    vol = read_volume(head_ct_path)
    assert vol.shape == (93, 64, 64)
    np.testing.assert_allclose(vol.spacing, (3.2, 3.2, 1.5))
    centre = vol.center
    np.testing.assert_allclose(vol.continuous_indices(centre)[0], (np.array(vol.size) - 1) / 2)


def _write_nrrd(path, header_lines, data: bytes):
    path.write_bytes(("NRRD0004\n" + "\n".join(header_lines) + "\n\n").encode() + data)


def _bad_inputs(tmp_path, rng):
    cases = {}
    cases["missing"] = (tmp_path / "nope.nrrd", "does not exist")
    garbage = tmp_path / "garbage.nrrd"
    garbage.write_bytes(b"this is not an image at all" * 10)
    cases["unreadable"] = (garbage, "could not be read")
    flat = tmp_path / "flat.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(rng.random((8, 9)).astype(np.float32)), str(flat))
    cases["2d"] = (flat, "2D image")
    four = tmp_path / "four.nrrd"
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(rng.random((3, 4, 5)).astype(np.float32))] * 2), str(four))
    cases["4d"] = (four, "4D image")
    rgb = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(rng.random((3, 4, 5, 3)).astype(np.float32), isVector=True), str(rgb))
    cases["multi-component"] = (rgb, "components per voxel")
    nan = tmp_path / "nan.nrrd"
    arr = rng.random((3, 4, 5)).astype(np.float32)
    arr[1, 2, 3] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(nan))
    cases["non-finite"] = (nan, "NaN or infinite")
    for name, spacing in {"zero-spacing": "0 1 1", "negative-spacing": "1 -0.5 1"}.items():
        p = tmp_path / f"{name}.nrrd"
        _write_nrrd(p, ["type: uint8", "dimension: 3", "sizes: 2 2 2", f"spacings: {spacing}", "encoding: raw"], bytes(8))
        cases[name] = (p, "spacing")
    return cases


@pytest.mark.parametrize(
    "case", ["missing", "unreadable", "2d", "4d", "multi-component", "non-finite", "zero-spacing", "negative-spacing"]
)
def test_bad_input_is_one_sentence(tmp_path, rng, case):
    path, words = _bad_inputs(tmp_path, rng)[case]
    with pytest.raises(MicroCTSynthError) as info:
        read_volume(path)
    message = str(info.value)
    assert words in message
    assert "\n" not in message and "Traceback" not in message


@pytest.mark.parametrize("case", ["missing", "2d", "zero-spacing"])
def test_bad_input_on_the_command_line(tmp_path, rng, case):
    path, words = _bad_inputs(tmp_path, rng)[case]
    out = tmp_path / "t.nrrd"
    run = subprocess.run(
        [sys.executable, "-m", "MicroCTSynthLib", "tissue-map", "--microct", str(path), "--out", str(out)],
        capture_output=True, text=True,
    )
    assert run.returncode == 2
    assert words in run.stderr
    assert "Traceback" not in run.stderr
    assert not out.exists()


def test_volume_rejects_bad_geometry():
    with pytest.raises(MicroCTSynthError, match="spacing"):
        Volume(np.zeros((2, 2, 2)), spacing=(1, 0, 1))
    with pytest.raises(MicroCTSynthError, match="3D"):
        Volume(np.zeros((2, 2)))
    with pytest.raises(MicroCTSynthError, match="direction"):
        Volume(np.zeros((2, 2, 2)), direction=(1, 0, 0, 1, 0, 0, 0, 0, 1))


def test_failed_write_leaves_nothing(tmp_path, rng, monkeypatch):
    vol = _volume(rng)
    target = tmp_path / "out.nrrd"
    write_volume(vol, target)
    before = target.read_bytes()

    def dies_half_way(image, path, *args, **kwargs):  # a disk that fills up in the middle of a write
        with open(path, "wb") as f:
            f.write(b"NRRD0004\ntype: short\n")
        raise RuntimeError("No space left on device")

    monkeypatch.setattr(sitk, "WriteImage", dies_half_way)
    with pytest.raises(MicroCTSynthError, match="Cannot write .*out.nrrd"):  # a sentence, not a traceback
        write_volume(vol.with_array(vol.array + 1), target)
    monkeypatch.undo()
    assert target.read_bytes() == before, "a failed write must not touch the existing file"
    assert [p.name for p in tmp_path.iterdir()] == ["out.nrrd"]
    with pytest.raises(MicroCTSynthError, match="endings"):
        write_volume(vol, tmp_path / "out.png")


def test_written_files_get_ordinary_permissions(tmp_path, rng):
    import os

    umask = os.umask(0o022)
    try:
        path = write_volume(_volume(rng), tmp_path / "v.nrrd")
    finally:
        os.umask(umask)
    assert (path.stat().st_mode & 0o777) == 0o644
