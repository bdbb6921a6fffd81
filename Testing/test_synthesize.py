"""Whole-volume synthesis: sliding-window blending, output geometry, chunking, uncertainty, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from MicroCTSynthLib.data import Normalization
from MicroCTSynthLib.errors import MicroCTSynthError
from MicroCTSynthLib.synthesize import (
    field_of_view,
    gaussian_importance_map,
    output_grid,
    parse_roi,
    patch_border_jump,
    sliding_window_synthesis,
    synthesize_on_grid,
)
from MicroCTSynthLib.tiling import patch_starts
from MicroCTSynthLib.volume import Volume

torch.set_num_threads(2)

#: PyTorch in float32: the reference every shortcut is compared with, and MONAI's arithmetic.
FP32 = {"precision": "fp32", "backend": "torch"}


def LinearNormalization():
    """The engine's normalization with the CT window and a [0, 1] micro-CT range."""
    return Normalization(ct_window=(-1000.0, 3000.0), microct_range=(0.0, 1.0))


class Identity(nn.Module):
    def forward(self, x):
        return x


class Constant(nn.Module):
    def __init__(self, value=0.3):
        super().__init__()
        self.value = value

    def forward(self, x):
        return torch.full_like(x, self.value)


def rotation(axis, degrees):
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def blob_ct(center_lps, sigma_mm=0.6, size=24, spacing=(0.3, 0.3, 0.3), direction=None, origin=None):
    """A CT (HU) with a bright Gaussian blob at ``center_lps`` on an oblique grid."""
    direction = rotation(2, 30) @ rotation(0, 20) if direction is None else direction
    grid = Volume(np.zeros((size, size, size), np.float32), spacing, (0, 0, 0), tuple(direction.ravel()))
    if origin is None:  # centre the CT near the blob, but not exactly on it
        origin = np.asarray(center_lps) + np.array([0.4, -0.3, 0.5]) - direction @ ((size - 1) / 2 * np.asarray(spacing))
    grid = Volume(grid.array, spacing, tuple(origin), tuple(direction.ravel()))
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in grid.size], indexing="ij"), -1).reshape(-1, 3)
    pts = grid.physical_points(idx)
    d2 = ((pts - np.asarray(center_lps)) ** 2).sum(1)
    values = -1000.0 + 3000.0 * np.exp(-d2 / (2 * sigma_mm**2))
    array = values.reshape(grid.size).transpose(2, 1, 0).astype(np.float32)  # (x,y,z) -> (z,y,x)
    return grid.with_array(array)


def physical_centroid(volume: Volume, background: float) -> np.ndarray:
    w = np.clip(volume.array.astype(np.float64) - background, 0, None)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij")
    idx = np.array([(w * xx).sum(), (w * yy).sum(), (w * zz).sum()]) / w.sum()
    return volume.physical_points(idx)[0]


BLOB = np.array([12.3, -40.7, 85.2])


# -- sliding window ----------------------------------------------------------------------------
def test_gaussian_importance_map_matches_monai():
    from monai.data.utils import compute_importance_map

    for size in [(16, 16, 16), (7, 10, 13), 32]:
        ours = gaussian_importance_map(size)
        theirs = compute_importance_map(size if isinstance(size, tuple) else (size,) * 3, mode="gaussian").numpy()
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)
        assert ours.dtype == np.float32


def test_patch_starts_tile_and_cover():
    assert patch_starts(48, 16, 0.0) == [0, 16, 32]
    assert patch_starts(40, 16, 0.0) == [0, 16, 24]  # the thesis' tiling, last patch shifted inward
    assert patch_starts(40, 16, 0.5) == [0, 8, 16, 24]
    assert patch_starts(10, 16, 0.5) == [0]


@pytest.mark.parametrize("overlap", [0.0, 0.5])
@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_constant_prediction_gives_a_constant_volume(overlap, mode):
    image = np.random.default_rng(0).normal(size=(37, 29, 41)).astype(np.float32)
    out = sliding_window_synthesis(image, Constant(0.37), 16, overlap=overlap, mode=mode, sw_batch_size=2)
    assert out.shape == (1, 37, 29, 41)
    assert np.abs(out - 0.37).max() < 1e-6
    # No seam either: the jump across patch borders is zero, as inside patches.
    jump = patch_border_jump(out[0], 16, overlap)
    assert jump["border"] < 1e-6 and jump["interior"] < 1e-6


@pytest.mark.parametrize("overlap,mode,shape", [(0.5, "gaussian", (1, 1, 37, 29, 41)), (0.25, "constant", (1, 1, 37, 29, 41)),
                                                (0.0, "gaussian", (1, 1, 40, 16, 20)), (0.5, "gaussian", (1, 1, 10, 40, 20))])
def test_matches_monai_sliding_window_inference(overlap, mode, shape):
    from monai.inferers import sliding_window_inference

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.InstanceNorm3d(4), nn.ReLU(), nn.Conv3d(4, 2, 3, padding=1)).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        theirs = sliding_window_inference(x, (16, 16, 16), 3, net, overlap=overlap, mode=mode)
    ours = sliding_window_synthesis(x, net, (16, 16, 16), overlap=overlap, mode=mode, sw_batch_size=3, **FP32)
    assert isinstance(ours, torch.Tensor) and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # numpy in, numpy out, several outputs kept apart
    two = sliding_window_synthesis(x[0].numpy(), lambda p: (net(p), -net(p)), 16, overlap=overlap, mode=mode, n_outputs=2,
                                    **FP32)
    np.testing.assert_allclose(two[0], theirs[0].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(two[1], -theirs[0].numpy(), rtol=1e-5, atol=1e-5)


def test_denominator_a_plane_at_a_time_gives_monais_result(monkeypatch):
    """The blend's weight sum is made a few planes at a time; one plane at a time changes nothing."""
    from monai.inferers import sliding_window_inference

    from MicroCTSynthLib import synthesize as synthesize_module

    monkeypatch.setattr(synthesize_module, "DENOMINATOR_VOXELS", 1)
    assert list(synthesize_module.plane_chunks(3, 7, (5, 5))) == [(3, 4), (4, 5), (5, 6), (6, 7)]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 1, 3, padding=1)).eval()
    x = torch.randn(1, 1, 37, 29, 41)
    with torch.no_grad():
        theirs = sliding_window_inference(x, (16, 16, 16), 3, net, overlap=0.5, mode="gaussian")
    ours = sliding_window_synthesis(x, net, (16, 16, 16), overlap=0.5, mode="gaussian", sw_batch_size=3, **FP32)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_progress_counts_windows():
    done = []
    sliding_window_synthesis(np.zeros((20, 20, 20), np.float32), Identity(), 16, overlap=0.5, progress=done.append,
                             sw_batch_size=3)
    assert sum(done) == len(patch_starts(20, 16, 0.5)) ** 3


def test_patch_border_jump_sees_seams():
    z = np.linspace(0, 1, 32, dtype=np.float32)
    ramp = np.broadcast_to(z[:, None, None], (32, 32, 32)).copy()
    smooth = patch_border_jump(ramp, 16, 0.0)
    assert smooth["ratio"] == pytest.approx(1.0, rel=0.05)  # a smooth ramp has no seam
    tiles = ramp.copy()
    tiles[:16, :16, :16] += 0.5  # one patch brighter than its neighbours
    seams = patch_border_jump(tiles, 16, 0.0)
    assert seams["ratio"] > 10 * smooth["ratio"]


# -- geometry ----------------------------------------------------------------------------------
def test_output_grid_roi_is_axis_aligned_and_centred():
    ct = blob_ct(BLOB)
    grid = output_grid(ct, 0.1, roi=((1.0, 2.0, 3.0), (2.0, 3.0, 1.6)))
    assert grid.shape == (16, 30, 20)
    assert np.allclose(grid.direction, np.eye(3).ravel())
    assert np.allclose(grid.spacing, 0.1)
    np.testing.assert_allclose(grid.center, (1.0, 2.0, 3.0), atol=1e-9)
    ref = Volume(np.zeros((5, 6, 7), np.int16), (0.2, 0.3, 0.4), (1, 2, 3), tuple(rotation(1, 10).ravel()))
    assert output_grid(ct, 0.1, reference=ref).same_geometry(ref)
    whole = output_grid(ct, 0.15)  # the CT's own field of view at the model's voxel size
    np.testing.assert_allclose(whole.center, ct.center, atol=1e-6)
    assert whole.shape == (48, 48, 48) and np.allclose(whole.direction, ct.direction)
    with pytest.raises(MicroCTSynthError, match="not both"):
        output_grid(ct, 0.1, roi=((0, 0, 0), 1), reference=ref)
    with pytest.raises(MicroCTSynthError, match="smaller region"):
        output_grid(ct, 0.001)


@pytest.mark.parametrize("variant", ["roi", "reference"])
def test_synthesis_lands_in_the_right_place(variant):
    ct = blob_ct(BLOB)
    if variant == "roi":
        grid = output_grid(ct, 0.12, roi=(BLOB + [0.5, -0.4, 0.3], (4.0, 4.4, 3.6)))  # blob off-centre
    else:
        direction = rotation(1, -25) @ rotation(2, 40)
        n = np.array([36, 30, 33])
        origin = BLOB + [-0.3, 0.2, 0.4] - direction @ ((n - 1) / 2 * 0.11)
        grid = Volume(np.zeros(n[::-1], np.uint8), (0.11, 0.11, 0.11), tuple(origin), tuple(direction.ravel()))
    result = synthesize_on_grid(ct, grid, Identity(), LinearNormalization(), 16, overlap=0.5, entropy=True)
    for out in (result.microct, result.tissue, result.entropy):
        assert out.same_geometry(grid)
    assert result.std is None  # one deterministic pass has no spread: nothing kept
    # The identity network returns the normalised CT: the micro-CT is (HU + 1000) / 4000.
    centroid = physical_centroid(result.microct, background=0.0)
    assert np.linalg.norm(centroid - BLOB) < min(grid.spacing), centroid - BLOB
    peak = np.unravel_index(np.argmax(result.microct.array), grid.shape)
    assert np.linalg.norm(grid.physical_points(peak[::-1])[0] - BLOB) < 2 * max(grid.spacing)
    assert result.microct.array.max() == pytest.approx(0.75, abs=0.06)  # 2000 HU, less interpolation blur


def test_reference_grid_finer_than_the_model():
    """The network runs at its own voxel size over the reference's field of view, then is resampled."""
    ct = blob_ct(BLOB)
    direction = rotation(0, 15)
    n = np.array([70, 76, 66])
    origin = BLOB + [0.2, -0.3, 0.1] - direction @ ((n - 1) / 2 * 0.06)
    reference = Volume(np.zeros(n[::-1], np.int16), (0.06,) * 3, tuple(origin), tuple(direction.ravel()))
    seen = []

    class Recording(nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape))
            return x

    result = synthesize_on_grid(ct, reference, Recording(), LinearNormalization(), 16, spacing_mm=0.12, sw_batch_size=1,
                                entropy=True, **FP32)
    assert result.entropy.same_geometry(reference) and result.std is None
    assert result.microct.same_geometry(reference) and result.tissue.same_geometry(reference)
    # 35 x 38 x 33 voxels at 0.12 mm: 4 x 4 x 4 windows (70 x 76 x 66 at 0.06 mm would need 8 x 9 x 8)
    assert [s[2:] for s in seen] == [(16, 16, 16)] * (4 * 4 * 4)
    assert np.linalg.norm(physical_centroid(result.microct, 0.0) - BLOB) < 0.06


def test_field_of_view_and_region_outside():
    ct = blob_ct(BLOB)
    # A region that hangs over the CT's edge: outside voxels get label 0 and the darkest value.
    face = ct.physical_points([(-0.5, 11.5, 11.5)])[0]
    grid = output_grid(ct, 0.25, roi=((face + BLOB) / 2, 7.5))
    fov = field_of_view(ct, grid)
    assert 0.2 < fov.mean() < 0.8
    class Brighter(nn.Module):
        def forward(self, x):
            return 0.5 * x + 0.2  # the darkest CT gives 0.35 in micro-CT units, not 0

    result = synthesize_on_grid(ct, grid, Brighter(), LinearNormalization(), 16, entropy=True)
    assert np.all(result.tissue.array[~fov] == 0) and np.all(result.tissue.array[fov] > 0)
    assert np.all(result.microct.array[~fov] == 0.0) and np.all(result.microct.array[fov] >= 0.35 - 1e-6)
    assert np.all(result.entropy.array[~fov] == 0.0)
    # A uniform synthetic micro-CT cannot be split by Otsu: say so instead of a wrong map.
    with pytest.raises(MicroCTSynthError, match="uniform"):
        synthesize_on_grid(ct, grid, Constant(0.5), LinearNormalization(), 16)
    # Nor are the passes a single-task entropy keeps on disk left behind: they are gone when the
    # error arrives, not when its traceback is let go.
    import tempfile

    before = set(Path(tempfile.gettempdir()).glob("microctsynth-passes-*"))
    with pytest.raises(MicroCTSynthError, match="uniform") as error:
        synthesize_on_grid(ct, grid, Constant(0.5), LinearNormalization(), 16, samples=2, entropy=True)
    assert set(Path(tempfile.gettempdir()).glob("microctsynth-passes-*")) == before and error.traceback
    with pytest.raises(MicroCTSynthError, match="outside the CT"):
        synthesize_on_grid(ct, output_grid(ct, 0.15, roi=(BLOB + 100, 2.0)), Identity(), LinearNormalization(), 16)


# -- chunks ------------------------------------------------------------------------------------
def test_chunked_equals_unchunked():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.InstanceNorm3d(4), nn.ReLU(), nn.Conv3d(4, 1, 3, padding=1), nn.Tanh())
    ct = blob_ct(BLOB)
    grid = output_grid(ct, 0.12, roi=(BLOB, (3.0, 2.6, 5.5)))
    args = dict(overlap=0.5, blend="gaussian", **FP32)
    whole = synthesize_on_grid(ct, grid, net, LinearNormalization(), 16, chunk_voxels=10**9, **args)
    slabs = synthesize_on_grid(ct, grid, net, LinearNormalization(), 16, chunk_voxels=1, **args)  # one patch row per slab
    np.testing.assert_allclose(slabs.microct.array, whole.microct.array, atol=1e-6)
    np.testing.assert_array_equal(slabs.tissue.array, whole.tissue.array)
    # ... and both equal one sliding window over the resampled, normalised CT.
    import SimpleITK as sitk

    hu = sitk.GetArrayFromImage(sitk.Resample(ct.to_sitk(), grid.to_sitk(), sitk.Transform(), sitk.sitkLinear, -1000.0, sitk.sitkFloat32))
    direct = sliding_window_synthesis(LinearNormalization().ct_to_net(hu), net, 16, overlap=0.5, mode="gaussian", **FP32)
    fov = field_of_view(ct, grid)
    assert 0.5 < fov.mean() < 1  # the region reaches out of the CT: the darkest value there
    np.testing.assert_allclose(whole.microct.array[fov], LinearNormalization().net_to_microct(direct[0])[fov], atol=1e-5)


# -- uncertainty and multitask ---------------------------------------------------------------
class DropoutNet(nn.Module):
    def __init__(self, p, multitask=False):
        super().__init__()
        self.multitask = multitask
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.norm = nn.InstanceNorm3d(4)
        self.drop = nn.Dropout(p)
        self.head = nn.Conv3d(4, 1, 1)
        self.tissue = nn.Conv3d(4, 3, 1)

    def forward(self, x):
        h = self.drop(torch.relu(self.norm(self.conv(x))))
        image = torch.tanh(self.head(h) + 2 * x)
        return (image, self.tissue(h)) if self.multitask else image


@pytest.mark.parametrize("multitask", [False, True])
def test_uncertainty_from_dropout(multitask):
    torch.manual_seed(2)
    ct = blob_ct(BLOB)
    grid = output_grid(ct, 0.15, roi=(BLOB, 3.6))
    norm = LinearNormalization()
    one = synthesize_on_grid(ct, grid, DropoutNet(0.5, multitask), norm, 16, multitask=multitask, samples=1)
    assert one.std is None and one.entropy is None  # only what is asked for is kept
    zero_p = synthesize_on_grid(ct, grid, DropoutNet(0.0, multitask), norm, 16, multitask=multitask, samples=3)
    assert np.abs(zero_p.std.array).max() < 1e-6
    net = DropoutNet(0.5, multitask)
    several = synthesize_on_grid(ct, grid, net, norm, 16, multitask=multitask, samples=4)
    fov = field_of_view(ct, grid)
    assert several.std.array[fov].mean() > 1e-3
    assert 0 <= several.entropy.array.min() and several.entropy.array.max() <= 1 + 1e-6
    assert several.entropy.array[fov].max() > 0
    assert not net.training and not net.norm.training  # only dropout was switched on, and only inside
    # The generator's dropout stays off for a single deterministic pass.
    again = [synthesize_on_grid(ct, grid, net, norm, 16, multitask=multitask, samples=1, **FP32) for _ in range(2)]
    np.testing.assert_array_equal(again[0].microct.array, again[1].microct.array)


def test_multitask_labels_come_from_the_head():
    class Head(nn.Module):
        """Tissue logits that say bone on the left half of each patch, air elsewhere (no Otsu could)."""

        def forward(self, x):
            logits = torch.zeros(x.shape[0], 3, *x.shape[2:])
            logits[:, 0] = 2.0
            logits[:, 2, :, :, : x.shape[-1] // 2] = 5.0
            return torch.zeros_like(x), logits

    ct = blob_ct(BLOB)
    grid = output_grid(ct, 0.15, roi=(BLOB, (4.8, 2.4, 2.4)))
    result = synthesize_on_grid(ct, grid, Head(), LinearNormalization(), 16, multitask=True, overlap=0.0, entropy=True)
    labels = result.tissue.array
    assert set(np.unique(labels)) == {1, 3}
    # overlap 0 tiles x = 32 voxels into two patches: bone on x 0-7 and 16-23
    assert np.all(labels[:, :, 0:8] == 3) and np.all(labels[:, :, 8:16] == 1) and np.all(labels[:, :, 16:24] == 3)
    p = np.exp([2.0, 0.0, 5.0]) / np.exp([2.0, 0.0, 5.0]).sum()  # softmax at a bone voxel
    expected = -(p * np.log(p)).sum() / np.log(3)
    assert result.entropy.array[0, 0, 0] == pytest.approx(expected, rel=1e-4)


# -- command-line helpers and bad input -----------------------------------------------------------
def test_parse_roi_and_bad_input():
    assert parse_roi("1,2,3", "4") == ((1.0, 2.0, 3.0), (4.0, 4.0, 4.0))
    assert parse_roi("1,2,3", "4,5,6") == ((1.0, 2.0, 3.0), (4.0, 5.0, 6.0))
    with pytest.raises(MicroCTSynthError, match="centre"):
        parse_roi("1,2", "4")
    with pytest.raises(MicroCTSynthError, match="numbers"):
        parse_roi("a,b,c", "4")
    ct = blob_ct(BLOB)
    grid = output_grid(ct, 0.15, roi=(BLOB, 2.4))
    with pytest.raises(MicroCTSynthError, match="overlap"):
        synthesize_on_grid(ct, grid, Identity(), LinearNormalization(), 16, overlap=1.0)
    with pytest.raises(MicroCTSynthError, match="blending"):
        synthesize_on_grid(ct, grid, Identity(), LinearNormalization(), 16, blend="hann")
    with pytest.raises(MicroCTSynthError, match="samples"):
        synthesize_on_grid(ct, grid, Identity(), LinearNormalization(), 16, samples=0)


# -- the thesis' generator ---------------------------------------------------------------------
def test_generator_dropout_and_multitask_head():
    from MicroCTSynthLib.networks import Generator

    torch.manual_seed(3)
    ct = blob_ct(BLOB)
    grid = output_grid(ct, 0.15, roi=(BLOB, 2.4))
    norm = LinearNormalization()
    with_dropout = Generator(1, ngf=4, n_blocks=1, dropout=0.5)
    stochastic = synthesize_on_grid(ct, grid, with_dropout, norm, 16, samples=3)
    assert stochastic.std.array.mean() > 1e-4
    assert not any(m.training for m in with_dropout.modules())  # dropout back off once done
    deterministic = synthesize_on_grid(ct, grid, Generator(1, ngf=4, n_blocks=1, dropout=0.0), norm, 16, samples=3)
    assert np.abs(deterministic.std.array).max() < 1e-6  # equal passes (round-off only)

    multitask = Generator(1, ngf=4, n_blocks=1, multitask=True)
    conv = multitask.tissue_head[-1]
    with torch.no_grad():  # a head that says soft tissue everywhere, whatever the image looks like
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([0.0, 4.0, 0.0]))
    result = synthesize_on_grid(ct, grid, multitask, norm, 16, multitask=True, samples=2)
    assert np.all(result.tissue.array == 2)
    p = np.exp([0.0, 4.0, 0.0]) / np.exp([0.0, 4.0, 0.0]).sum()
    np.testing.assert_allclose(result.entropy.array, -(p * np.log(p)).sum() / np.log(3), rtol=1e-4)
    assert result.std.array.mean() > 0  # the image head still varies with dropout


# -- end to end: checkpoint, synthesize, command line ---------------------------------------------
def make_checkpoint(path, multitask=False, downsample=1, head_bias=None, normalization=None):
    from MicroCTSynthLib.checkpoint import save_checkpoint
    from MicroCTSynthLib.networks import Generator
    from MicroCTSynthLib.presets import load_preset

    torch.manual_seed(4)
    generator = Generator(1, ngf=4, n_blocks=1, multitask=multitask)
    if head_bias is not None:
        conv = generator.tissue_head[-1]
        with torch.no_grad():
            conv.weight.zero_()
            conv.bias.copy_(torch.tensor(head_bias))
    preset = load_preset("tiny")
    return save_checkpoint(path, {
        "model": "multi" if multitask else "single", "epoch": 0, "generator": generator.state_dict(),
        "generator_args": generator.arguments,
        "normalization": (normalization or Normalization((-1000.0, 3000.0), (0.0, 1.0))).to_dict(),
        "preset": preset, "spacing_mm": [0.0752] * 3, "patch_size": 16, "downsample": downsample,
        "val_loss": None, "history": [],
    })


def test_synthesis_overlap_is_the_models_unless_given(tmp_path, monkeypatch):
    """The window overlap of synthesize is the model's preset's synthesis_overlap unless the caller
    gives one; a checkpoint without it takes the paper preset's."""
    from MicroCTSynthLib import synthesize as module
    from MicroCTSynthLib.presets import load_preset
    from MicroCTSynthLib.tiling import SYNTHESIS_OVERLAP

    assert load_preset("paper")["synthesis_overlap"] == SYNTHESIS_OVERLAP
    assert module.model_overlap({"preset": load_preset("quick")}) == 0.25 and module.model_overlap({}) == SYNTHESIS_OVERLAP
    used = []
    monkeypatch.setattr(module, "synthesize_on_grid", lambda *a, **kw: used.append(kw["overlap"]))
    model = make_checkpoint(tmp_path / "best.pt")  # the tiny preset: overlap 0
    module.synthesize(blob_ct(BLOB), model, roi=(BLOB, 1.8), device="cpu")
    module.synthesize(blob_ct(BLOB), model, roi=(BLOB, 1.8), overlap=0.5, device="cpu")
    assert used == [load_preset("tiny")["synthesis_overlap"], 0.5]


def test_synthesize_from_a_checkpoint(tmp_path):
    from MicroCTSynthLib.synthesize import synthesize

    ct = blob_ct(BLOB)
    single = make_checkpoint(tmp_path / "single.pt")
    result = synthesize(ct, single, roi=(BLOB, 1.8), device="cpu")
    assert result.microct.shape == (24, 24, 24) and np.allclose(result.microct.spacing, 0.0752)
    np.testing.assert_allclose(result.microct.center, BLOB, atol=1e-6)
    assert set(np.unique(result.tissue.array)) <= {1, 2, 3} and result.tissue.array.dtype == np.uint8
    # x2 downsampling: the model's voxel is twice the native micro-CT's
    coarse = synthesize(ct, make_checkpoint(tmp_path / "down.pt", downsample=2), roi=(BLOB, 1.8), device="cpu")
    assert coarse.microct.shape == (12, 12, 12) and np.allclose(coarse.microct.spacing, 0.1504)
    # a multitask model's labels come from its tissue head, not from Otsu
    multi = make_checkpoint(tmp_path / "multi.pt", multitask=True, head_bias=[0.0, 0.0, 3.0])
    labelled = synthesize(ct, multi, reference=output_grid(ct, 0.1, roi=(BLOB, 1.6)), samples=2, device="cpu")
    assert np.all(labelled.tissue.array == 3) and labelled.tissue.shape == (16, 16, 16)
    with pytest.raises(MicroCTSynthError, match="does not exist"):
        synthesize(ct, tmp_path / "missing.pt", roi=(BLOB, 1.8))


def test_only_the_part_of_the_ct_the_windows_reach_is_prepared(tmp_path, monkeypatch):
    """A region of a large oblique CT is synthesized from the CT cropped to what its windows reach
    (a view, calibrated with the whole CT's own levels, blurred as the model's CTs were): the same
    synthetic micro-CT and tissue map as from the whole CT."""
    from MicroCTSynthLib import synthesize as module

    ct = blob_ct(BLOB, size=64)
    ct = ct.with_array(ct.array + np.random.default_rng(1).normal(0.0, 40.0, ct.shape).astype(np.float32))
    grid = output_grid(ct, 0.0752, roi=(BLOB, 1.8))
    part = module.crop_to_grid(ct, grid, 16 * 0.0752)
    assert np.prod(part.shape) < np.prod(ct.shape) / 20 and np.shares_memory(part.array, ct.array)
    corner = np.array([[3.0, 5.0, 7.0]])
    inside = part.physical_points(corner)
    assert np.allclose(ct.continuous_indices(inside), np.rint(ct.continuous_indices(inside)), atol=1e-6)
    x, y, z = np.rint(ct.continuous_indices(inside)[0]).astype(int)
    assert part.array[7, 5, 3] == ct.array[z, y, x]
    models = {
        "single": make_checkpoint(tmp_path / "single.pt"),
        "calibrated, harmonized multitask": make_checkpoint(
            tmp_path / "multi.pt", multitask=True,
            normalization=Normalization((-1000.0, 3000.0), (0.0, 1.0), ct_levels=(-950.0, 1600.0), ct_harmonize_fwhm_mm=0.6)),
    }
    for name, model in models.items():
        cropped = module.synthesize(ct, model, roi=(BLOB, 1.8), device="cpu", backend="torch")
        with monkeypatch.context() as m:
            m.setattr(module, "crop_to_grid", lambda ct, grid, margin_mm: ct)
            whole = module.synthesize(ct, model, roi=(BLOB, 1.8), device="cpu", backend="torch")
        np.testing.assert_allclose(cropped.microct.array, whole.microct.array, atol=1e-5, err_msg=name)
        assert np.array_equal(cropped.tissue.array, whole.tissue.array), name


def test_command_line(tmp_path, capsys):
    from MicroCTSynthLib.cli import main
    from MicroCTSynthLib.volume import read_volume, write_volume

    ct_path = write_volume(blob_ct(BLOB), tmp_path / "ct.nrrd")
    model = make_checkpoint(tmp_path / "best.pt")
    out = {k: tmp_path / f"{k}.nrrd" for k in ("microct", "tissue", "std", "entropy")}
    center = ",".join(f"{v:.3f}" for v in BLOB)
    rc = main(["synthesize", "--model", str(model), "--ct", str(ct_path), "--out-microct", str(out["microct"]),
               "--out-tissue", str(out["tissue"]), f"--roi-center={center}", "--roi-size", "1.8", "--overlap", "0",
               "--blend", "constant",
               "--uncertainty", str(out["std"]), "--entropy", str(out["entropy"]), "--samples", "2",
               "--device", "cpu", "--progress", "json"])
    assert rc == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events[-1]["event"] == "result"
    assert set(events[-1]["outputs"]) == {"microct", "tissue", "uncertainty", "entropy"}
    steps = [e for e in events if e["event"] == "progress"]
    assert steps and steps[-1]["step"] == steps[-1]["total"] == 8  # 24^3 voxels, 16^3 tiles: 2 x 2 x 2
    microct, tissue = read_volume(out["microct"]), read_volume(out["tissue"])
    assert microct.same_geometry(tissue) and microct.shape == (24, 24, 24)
    np.testing.assert_allclose(microct.center, [round(v, 3) for v in BLOB], atol=1e-6)
    assert read_volume(out["std"]).array.max() > 0
    # Bad requests get a sentence and exit status 2, and nothing is written.
    rc = main(["synthesize", "--model", str(tmp_path / "nope.pt"), "--ct", str(ct_path), "--out-microct",
               str(tmp_path / "a.nrrd"), "--out-tissue", str(tmp_path / "b.nrrd"), "--progress", "json"])
    assert rc == 2 and "does not exist" in json.loads(capsys.readouterr().out.splitlines()[-1])["message"]
    rc = main(["synthesize", "--model", str(model), "--ct", str(ct_path), "--out-microct", str(tmp_path / "a.nrrd"),
               "--out-tissue", str(tmp_path / "b.nrrd"), "--uncertainty", str(tmp_path / "u.nrrd"), "--progress", "none"])
    assert rc == 2 and "--samples" in capsys.readouterr().err
    assert not (tmp_path / "a.nrrd").exists()
