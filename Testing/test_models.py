"""The shipped models and what makes them: scanner randomisation (augment.py), the direct
segmenter (MONAI DynUNet), bf16 on the CPU, the cards in Resources/models/ and
``experiment --pretrained``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from MicroCTSynthLib.augment import randomize_ct
from MicroCTSynthLib.checkpoint import load_checkpoint
from MicroCTSynthLib.data import Normalization
from MicroCTSynthLib.errors import MicroCTSynthError
from MicroCTSynthLib.labels import TISSUE_NAMES
from MicroCTSynthLib.losses import segmentation_loss
from MicroCTSynthLib.metrics import dice_per_class
from MicroCTSynthLib.package_data import CARD_KEYS, sha256, shipped_checkpoint, shipped_models, verify_shipped
from MicroCTSynthLib.phantom import CT_SCANNERS, EDGE_SCANNERS, FAR_SCANNERS, SCANNER_SETS, UNSEEN_SCANNERS, draw_parameters
from MicroCTSynthLib.presets import load_preset
from MicroCTSynthLib.synthesize import synthesize
from MicroCTSynthLib.networks import segmenter_levels
from MicroCTSynthLib.train import build_networks, segmenter_step, train
from MicroCTSynthLib.volume import Volume

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_data import synthetic_case, write_synthetic_dataset  # noqa: E402

pytest.importorskip("monai")

WINDOW = (-1000.0, 3000.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- scanner randomisation ------------------------------------------------------------------------
def _ct_patch(size: int = 32) -> torch.Tensor:
    arrays = synthetic_case(size, seed=3)
    return torch.from_numpy(Normalization(WINDOW, (0.0, 1.0)).ct_to_net(arrays["ct_registered"]))[None, None]


def _hu(x: torch.Tensor) -> torch.Tensor:
    return (x + 1.0) / 2.0 * (WINDOW[1] - WINDOW[0]) + WINDOW[0]


def test_randomisation_off_leaves_the_patch_and_on_stays_in_the_window():
    patch = _ct_patch()
    assert randomize_ct(patch, load_preset("quick"), WINDOW, 0.0752) is patch  # probability 0 in quick
    preset = load_preset("pretrained")
    g = torch.Generator().manual_seed(0)
    batch = torch.cat([patch, patch, patch])
    out = randomize_ct(batch, {**preset, "augment_probability": 1.0}, WINDOW, 0.0752, generator=g)
    assert out.shape == batch.shape and out.dtype == batch.dtype
    assert float(out.min()) >= -1.0 and float(out.max()) <= 1.0
    # Each patch of a batch is its own scanner.
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[0], patch[0])
    again = randomize_ct(batch, {**preset, "augment_probability": 1.0}, WINDOW, 0.0752,
                         generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_randomised_calibration_is_the_drawn_gain_and_offset():
    patch = _ct_patch()
    preset = {**load_preset("pretrained"), "augment_probability": 1.0, "augment_gain": [1.299, 1.301],
              "augment_offset_hu": [99.9, 100.1], "augment_voxel_mm": [0.01, 0.02], "augment_blur_fwhm_mm": [0.0, 0.001],
              "augment_noise_hu": [0.0, 0.001]}
    out = randomize_ct(patch, preset, WINDOW, 0.0752, generator=torch.Generator().manual_seed(1))
    hu, hu_out = _hu(patch), _hu(out)
    inside = (hu > -600) & (hu * 1.3 + 100 < WINDOW[1] - 10)  # clear of the window's edges
    assert torch.allclose(hu_out[inside], hu[inside] * 1.3 + 100, atol=2.0)


def test_randomised_resolution_and_noise_change_sharpness_and_grain():
    patch = _ct_patch()
    base = {**load_preset("pretrained"), "augment_probability": 1.0, "augment_gain": [0.999, 1.001],
            "augment_offset_hu": [-0.1, 0.1], "augment_noise_hu": [0.0, 0.001]}
    blurry = randomize_ct(patch, {**base, "augment_voxel_mm": [0.5, 0.51], "augment_blur_fwhm_mm": [0.6, 0.61]},
                          WINDOW, 0.0752, generator=torch.Generator().manual_seed(2))
    gradient = lambda x: float(torch.diff(_hu(x), dim=-1).abs().mean())  # noqa: E731
    assert gradient(blurry) < 0.7 * gradient(patch)
    noisy = randomize_ct(patch, {**base, "augment_voxel_mm": [0.01, 0.02], "augment_blur_fwhm_mm": [0.0, 0.001],
                                 "augment_noise_hu": [100.0, 100.1]}, WINDOW, 0.0752,
                         generator=torch.Generator().manual_seed(3))
    residual = (_hu(noisy) - _hu(patch))[(_hu(patch) > -500) & (_hu(patch) < 2500)]
    assert 80.0 < float(residual.std()) < 120.0


@pytest.mark.parametrize("scanners", [UNSEEN_SCANNERS, FAR_SCANNERS], ids=["unseen", "far"])
def test_unseen_scanners_lie_outside_every_clinical_range_and_keep_the_anatomy(scanners):
    for kind in scanners.values():
        for key, (lo, hi) in kind.items():
            if key == "gain":
                assert all(hi < c[key][0] or lo > c[key][1] for c in CT_SCANNERS.values()), key
            elif key != "offset_hu":
                assert all(lo >= c[key][1] for c in CT_SCANNERS.values()), key
    offsets = sorted(k["offset_hu"] for k in scanners.values())
    assert offsets[0][1] <= min(c["offset_hu"][0] for c in CT_SCANNERS.values())
    assert offsets[1][0] >= max(c["offset_hu"][1] for c in CT_SCANNERS.values())
    cfg = load_preset("quick")
    seen, unseen = draw_parameters("S3_2", 4, cfg), draw_parameters("S3_2", 4, cfg, scanners="unseen")
    assert seen["anatomy"] == unseen["anatomy"] and seen["pose_rotation_deg"] == unseen["pose_rotation_deg"]
    assert unseen["ct_scanner"]["kind"] in UNSEEN_SCANNERS and seen["ct_scanner"] != unseen["ct_scanner"]
    with pytest.raises(MicroCTSynthError, match="clinical, edge, unseen, far"):
        draw_parameters("S3_2", 4, cfg, scanners="other")


def test_edge_scanners_lie_in_the_coarse_corner_of_the_cone_beam_ranges():
    """``--scanners edge`` stays inside every clinical cone-beam range, within its coarsest,
    noisiest eighth and its furthest eighth of calibration (one dark, one bright)."""
    cbct = CT_SCANNERS["CBCT"]
    for name, kind in EDGE_SCANNERS.items():
        for key, (lo, hi) in kind.items():
            c_lo, c_hi = cbct[key]
            assert c_lo <= lo < hi <= c_hi, (name, key)
            if key in ("gain", "offset_hu"):
                assert (hi - c_lo if name == "CBCT-dark" else c_hi - lo) <= 0.125 * (c_hi - c_lo), (name, key)
            else:
                assert lo >= c_hi - 0.125 * (c_hi - c_lo), (name, key)
    edge = draw_parameters("S3_2", 4, load_preset("quick"), scanners="edge")
    assert edge["ct_scanner"]["kind"] in EDGE_SCANNERS


def test_command_line_offers_every_scanner_set():
    from MicroCTSynthLib.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["phantom"]
    assert tuple(next(a for a in sub._actions if a.dest == "scanners").choices) == tuple(SCANNER_SETS)


# -- the direct segmenter -------------------------------------------------------------------------
def test_segmenter_is_nnunets_plan_for_the_patch():
    assert [segmenter_levels(p) for p in (16, 24, 32, 96)] == [3, 3, 4, 5]
    net, discriminator = build_networks(load_preset("tiny"), "segmenter")
    assert discriminator is None and type(net.net).__name__ == "DynUNet"
    assert net(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)
    with pytest.raises(MicroCTSynthError, match="multiples of 4"):
        net(torch.zeros(1, 1, 18, 16, 16))


def test_segmenter_overfits_one_tiny_case():
    torch.manual_seed(0)
    arrays = synthetic_case(16, seed=5)
    real_A = torch.from_numpy(Normalization(WINDOW, (0.0, 1.0)).ct_to_net(arrays["ct_registered"]))[None, None]
    tissue = torch.from_numpy(arrays["tissue"].astype("int64"))[None, None]
    net, _ = build_networks(load_preset("tiny"), "segmenter")
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    history = [segmenter_step(net, optimizer, real_A, tissue) for _ in range(120)]
    assert history[-1]["dice"] < 0.5 * history[0]["dice"] and history[-1]["ce"] < 0.5 * history[0]["ce"]
    with torch.no_grad():
        labels = net(real_A).argmax(1)[0].numpy() + 1
    dice = dice_per_class(arrays["tissue"], np.where(arrays["tissue"] > 0, labels, 0))
    assert min(dice.values()) > 0.9, dice


def test_segmentation_loss_leaves_out_what_lies_outside_the_field_of_view():
    tissue = torch.ones(1, 1, 4, 4, 4, dtype=torch.long)
    tissue[..., :2] = 0
    logits = torch.zeros(1, 3, 4, 4, 4)
    logits[:, 0, ..., 2:] = 10.0  # right (air) inside
    logits[:, 2, ..., :2] = 10.0  # anything outside
    total, terms = segmentation_loss(logits, tissue, dice_absent="skip")
    assert float(terms["ce"]) < 1e-3 and float(total) < 0.01


def test_segmenter_trains_resumes_and_makes_a_tissue_map_only(tmp_path):
    data = write_synthetic_dataset(tmp_path / "data").root
    best = train(data, model="segmenter", preset="tiny", out=tmp_path / "run", device="cpu", progress="none")
    ckpt = load_checkpoint(best)
    assert ckpt["model"] == "segmenter" and ckpt["discriminator"] is None and ckpt["generator_args"]["filters"] == 4
    assert {"dice", "ce", "val_loss", "val_dice", "val_ce"} <= set(ckpt["history"][-1])
    train(data, model="segmenter", preset="tiny", out=tmp_path / "run", device="cpu", progress="none",
          resume="last", epochs_constant=3)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 5
    ct = Volume(synthetic_case(32, seed=3)["ct_registered"], spacing=(0.0752,) * 3)
    result = synthesize(ct, best, reference=ct, device="cpu")
    assert result.microct is None and result.std is None
    assert set(np.unique(result.tissue.array)) <= {0, 1, 2, 3} and (result.tissue.array > 0).any()


# -- the shipped models ------------------------------------------------------------------------------
SHIPPED = shipped_models()


@pytest.fixture(scope="module")
def phantom_case(tmp_path_factory):
    """The registered CT of one tiny phantom specimen and its tissue map (prepared)."""
    from MicroCTSynthLib.dataset import Dataset
    from MicroCTSynthLib.phantom import make_phantom
    from MicroCTSynthLib.prepare import prepare
    from MicroCTSynthLib.volume import read_volume

    root = tmp_path_factory.mktemp("tiny_phantom")
    make_phantom(root, preset="tiny", seed=3, specimens="S3_7", progress="none")
    prepare(root, progress="none")
    ds = Dataset.load(root)
    return read_volume(ds.path("S3_7", "ct_registered")), read_volume(ds.path("S3_7", "tissue"))


def test_every_model_of_group_A_is_shipped():
    assert {(c["group"], c["model"]) for c in SHIPPED.values()} >= {("A", "single"), ("A", "multi"), ("A", "segmenter")}
    total = sum(shipped_checkpoint(c).stat().st_size for c in SHIPPED.values())
    assert total < 30 * 1024 ** 2


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_matches_its_card_and_synthesizes(name, phantom_case):
    card = SHIPPED[name]
    assert set(CARD_KEYS) <= set(card)
    path = verify_shipped(card)
    assert sha256(path) == card["sha256"]
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["model"] == card["model"] and state["group"] == card["group"]
    assert state["preset"]["name"] == card["preset"] and state["epoch"] == card["epoch"]
    assert "microctsynth train " in card["command"] and f"--model {card['model']}" in card["command"]
    assert set(card["held_out"]["specimens"]) == set(card["data"]["test"])
    assert set(card["held_out"]["median"]) == set(TISSUE_NAMES.values())
    ct, reference = phantom_case
    result = synthesize(ct, path, reference=ct, device="cpu", precision="fp32")
    assert (result.microct is None) == (card["model"] == "segmenter")
    dice = dice_per_class(reference.array, result.tissue.array)
    assert min(dice.values()) > 0.2, dice  # a trained model, not noise, on a specimen it never saw


def test_a_ct_coarser_than_the_training_says_so_and_is_still_synthesized(capsys):
    from MicroCTSynthLib.synthesize import coarser_than_training

    meta = {"preset": {"augment_probability": 0.9, "augment_voxel_mm": [0.3, 0.55]}}
    assert coarser_than_training((0.3, 0.3, 0.3), meta) is None
    assert coarser_than_training((0.3, 0.3, 0.55), meta) is None
    assert "up to 0.625 mm, coarser than any this model was trained on (up to 0.55 mm)" in coarser_than_training(
        (0.3, 0.3, 0.625), meta)
    assert coarser_than_training((0.3, 0.3, 0.625), {"preset": {**meta["preset"], "augment_probability": 0.0}}) is None
    assert coarser_than_training((0.3, 0.3, 0.625), {"preset": {}}) is None  # no randomisation: nothing known
    card = next(c for c in SHIPPED.values() if c["model"] == "multi")
    limit = card["preset_settings"]["augment_voxel_mm"][1]
    z = np.linspace(-1.0, 1.0, 8)[:, None, None]
    noise = np.random.default_rng(0).normal(0.0, 30.0, (8, 12, 12))
    ct = Volume((np.where(np.abs(z) < 0.5, 1500.0, -1000.0) + noise).astype(np.float32), (0.3, 0.3, 0.7), (-1.65, -1.65, -2.45))
    result = synthesize(ct, shipped_checkpoint(card), roi=((0.0, 0.0, 0.0), (1.2, 1.2, 1.2)), device="cpu", progress="none")
    assert result.tissue.array.any()
    assert f"up to 0.7 mm, coarser than any this model was trained on (up to {limit:.3g} mm)" in capsys.readouterr().err


def test_a_ct_not_in_hounsfield_units_says_so_where_the_model_does_not_calibrate(phantom_case, capsys):
    """Stored values without their rescale intercept (air at about 0, water at 1024): the
    uncalibrated models warn, the multitask model, which calibrates each CT, does not need to."""
    from MicroCTSynthLib.synthesize import air_above_training

    meta = {"preset": {"augment_probability": 0.8, "augment_gain": [0.6, 1.4], "augment_offset_hu": [-400.0, 300.0]}}
    assert air_above_training(-1000.0, meta) is None and air_above_training(-300.0, meta) is None
    assert "air lies at -250, brighter than in any CT this model was trained on (at most -300 HU)" in air_above_training(-250.0, meta)
    assert air_above_training(24.0, {"preset": {**meta["preset"], "augment_probability": 0.0}}) is None
    ct, _ = phantom_case
    raw = ct.with_array(ct.array + 1024.0)
    for model in ("single", "segmenter", "multi"):
        card = next(c for c in SHIPPED.values() if c["model"] == model)
        synthesize(ct, shipped_checkpoint(card), reference=ct, device="cpu", progress="none")
        assert "Hounsfield" not in capsys.readouterr().err, model
        synthesize(raw, shipped_checkpoint(card), reference=ct, device="cpu", progress="none")
        assert ("not be in Hounsfield units" in capsys.readouterr().err) == (model != "multi"), model


def test_shipped_model_with_a_damaged_file_is_refused(tmp_path):
    card = dict(next(iter(SHIPPED.values())))
    copy = tmp_path / card["checkpoint"]
    copy.write_bytes(shipped_checkpoint(card).read_bytes()[:-10] + b"0123456789")
    card["folder"] = tmp_path
    with pytest.raises(MicroCTSynthError, match="sha256"):
        verify_shipped(card)


@pytest.mark.parametrize("model", ["single", "multi"])
def test_bf16_tissue_map_agrees_with_fp32(phantom_case, model):
    card = next(c for c in SHIPPED.values() if c["model"] == model)
    ct, _ = phantom_case
    fp32 = synthesize(ct, shipped_checkpoint(card), reference=ct, device="cpu", precision="fp32")
    bf16 = synthesize(ct, shipped_checkpoint(card), reference=ct, device="cpu", precision="bf16")
    dice = dice_per_class(fp32.tissue.array, bf16.tissue.array)
    assert min(dice.values()) >= 0.99, dice


def test_segmenter_stays_in_fp32_where_auto_would_take_bf16(phantom_case, monkeypatch):
    import MicroCTSynthLib.inference as inference

    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: True)  # as on a CPU with AMX
    assert inference.resolve_precision("auto", torch.device("cpu")) == torch.bfloat16
    card = next(c for c in SHIPPED.values() if c["model"] == "segmenter")
    ct, _ = phantom_case
    auto = synthesize(ct, shipped_checkpoint(card), reference=ct, device="cpu")
    fp32 = synthesize(ct, shipped_checkpoint(card), reference=ct, device="cpu", precision="fp32")
    bf16 = synthesize(ct, shipped_checkpoint(card), reference=ct, device="cpu", precision="bf16")
    assert np.array_equal(auto.tissue.array, fp32.tissue.array)
    assert not np.array_equal(bf16.tissue.array, fp32.tissue.array)  # what "auto" avoids


def test_pretrained_experiment_without_the_model_says_so_in_one_sentence(tmp_path):
    from MicroCTSynthLib.experiment import run_experiment

    data = write_synthetic_dataset(tmp_path / "data", groups={"B": {"train": ["C0"], "val": ["C1"], "test": ["C2", "C3"]}})
    with pytest.raises(MicroCTSynthError) as err:
        run_experiment(data.root, tmp_path / "out", groups=["B"], models=["single", "multi"], pretrained=True,
                       progress="none")
    message = str(err.value)
    assert "group B single-task cGAN, group B multitask cGAN" in message and "--pretrained" in message and message.count(". ") == 0
    assert not (tmp_path / "out").exists()


def test_models_command_lists_every_card(capsys):
    from MicroCTSynthLib import cli

    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    for name, card in SHIPPED.items():
        assert name in out and card["summary"] in out
    assert cli.main(["models", "--progress", "json"]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["models"]
    assert set(listed) == set(SHIPPED)


# -- calibration to the training CTs' air and bone levels -------------------------------------------
def test_calibration_undoes_a_scanners_scale_and_offset(monkeypatch):
    from MicroCTSynthLib.data import calibrate_ct, ct_levels

    ct = synthetic_case(32, seed=4)["ct_registered"]
    air, bone = ct_levels(ct)
    assert bone - air > 300
    for gain, offset in ((0.72, -290.0), (1.3, 190.0)):
        assert np.allclose(calibrate_ct(ct * gain + offset, (air, bone)), ct, atol=0.5)
    with pytest.raises(MicroCTSynthError, match="no clear air and bone"):
        ct_levels(np.random.default_rng(0).normal(40.0, 10.0, (16, 16, 16)))
    # A fill outside the reconstructed field of view (Siemens' -3024) is not air; air clipped at
    # -1024, as many scanners store it, still is.
    z, y, x = np.indices(ct.shape)
    outside = np.hypot(y - 15.5, x - 15.5) > 15.0
    assert ct_levels(np.where(outside, -3024.0, ct)) == pytest.approx(ct_levels(ct[:, ~outside[0]]), abs=1.0)
    clipped = np.maximum(ct, np.percentile(ct, 5))
    kept = ct_levels(clipped)
    import MicroCTSynthLib.data as data

    monkeypatch.setattr(data, "FILL_SHARE", 2.0)  # no fill ever
    assert ct_levels(clipped) == kept
    monkeypatch.undo()
    with pytest.raises(MicroCTSynthError, match="fewer than three grey values.*label map"):
        ct_levels(np.where(np.arange(4096).reshape(16, 16, 16) % 2, 1500.0, -1000.0))  # a mask loaded as the CT


def test_calibrated_model_gives_the_same_map_for_a_recalibrated_ct(tmp_path):
    data = write_synthetic_dataset(tmp_path / "data").root
    preset = {**load_preset("tiny"), "ct_calibration": "air-bone"}
    best = train(data, model="multi", preset=preset, out=tmp_path / "run", device="cpu", progress="none")
    levels = load_checkpoint(best)["normalization"]["ct_levels"]
    assert len(levels) == 2 and levels[0] + 300 < levels[1]
    ct = Volume(synthetic_case(32, seed=3)["ct_registered"], spacing=(0.0752,) * 3)
    as_is = synthesize(ct, best, reference=ct, device="cpu", precision="fp32")
    other_scanner = synthesize(ct.with_array(ct.array * 0.72 - 290.0), best, reference=ct, device="cpu", precision="fp32")
    assert (as_is.tissue.array == other_scanner.tissue.array).mean() > 0.999


# -- the harmonising blur (ct_harmonize_fwhm_mm) -----------------------------------------------------
def test_harmonizing_blur_is_an_isotropic_gaussian_of_the_given_fwhm_in_mm():
    from MicroCTSynthLib.data import harmonize_ct
    from MicroCTSynthLib.volume import FWHM_PER_SIGMA

    impulse = np.zeros((41, 61, 61), np.float32)
    impulse[20, 30, 30] = 1.0
    assert harmonize_ct(impulse, (0.05, 0.05, 0.1), 0.0) is impulse
    blurred = harmonize_ct(impulse, (0.05, 0.05, 0.1), 0.6)  # x, y 0.05 mm; z 0.1 mm
    assert blurred.dtype == np.float32 and abs(float(blurred.sum()) - 1.0) < 1e-4
    z, y, x = (np.arange(n) - c for n, c in zip(blurred.shape, (20, 30, 30)))
    sd_mm = [float(np.sqrt((blurred.sum(axis=tuple(a for a in range(3) if a != axis)) * d ** 2).sum())) * step
             for axis, d, step in ((0, z, 0.1), (1, y, 0.05), (2, x, 0.05))]
    assert np.allclose(sd_mm, 0.6 / FWHM_PER_SIGMA, rtol=0.06), sd_mm
    with pytest.raises(MicroCTSynthError, match="harmonising blur"):
        Normalization(WINDOW, (0.0, 1.0), None, -0.1)


def test_harmonized_noise_of_the_randomisation_is_blurred_as_a_scanners_would_be():
    patch = _ct_patch()
    preset = {**load_preset("pretrained"), "augment_probability": 1.0, "augment_gain": [0.999, 1.001],
              "augment_offset_hu": [-0.1, 0.1], "augment_voxel_mm": [0.01, 0.02], "augment_blur_fwhm_mm": [0.0, 0.001],
              "augment_noise_hu": [100.0, 100.1], "augment_noise_correlation_mm": [0.1, 0.11]}
    residual_sd = {}
    for fwhm in (0.0, 0.6):
        out = randomize_ct(patch, preset, WINDOW, 0.0752, generator=torch.Generator().manual_seed(3), harmonize_fwhm_mm=fwhm)
        inside = (_hu(patch) > -500) & (_hu(patch) < 2500)
        residual_sd[fwhm] = float((_hu(out) - _hu(patch))[inside].std())
    assert 80.0 < residual_sd[0.0] < 120.0
    assert residual_sd[0.6] < 0.4 * residual_sd[0.0]  # 0.1 mm grain under 0.6 mm of blur


def test_harmonized_model_blurs_every_ct_at_synthesis_as_its_training_cts(tmp_path):
    from MicroCTSynthLib.checkpoint import save_checkpoint
    from MicroCTSynthLib.data import harmonize_ct

    data = write_synthetic_dataset(tmp_path / "data").root
    preset = {**load_preset("tiny"), "ct_harmonize_fwhm_mm": 0.3}
    best = train(data, model="multi", preset=preset, out=tmp_path / "run", device="cpu", progress="none")
    state = load_checkpoint(best)
    assert state["normalization"]["ct_harmonize_fwhm_mm"] == 0.3
    unblurred = {**state, "normalization": {k: v for k, v in state["normalization"].items() if k != "ct_harmonize_fwhm_mm"}}
    plain = save_checkpoint(tmp_path / "plain.pt", unblurred)
    ct = Volume(synthetic_case(32, seed=3)["ct_registered"], spacing=(0.0752,) * 3)
    harmonized = synthesize(ct, best, reference=ct, device="cpu", precision="fp32")
    by_hand = synthesize(ct.with_array(harmonize_ct(ct.array, ct.spacing, 0.3)), plain, reference=ct,
                         device="cpu", precision="fp32")
    as_is = synthesize(ct, plain, reference=ct, device="cpu", precision="fp32")
    assert np.allclose(harmonized.microct.array, by_hand.microct.array, atol=1e-5)
    assert np.array_equal(harmonized.tissue.array, by_hand.tissue.array)
    assert not np.allclose(harmonized.microct.array, as_is.microct.array, atol=1e-3)


def test_ship_model_chooses_the_checkpoint_best_on_the_validation_specimens(tmp_path, monkeypatch):
    """scripts/ship_model.py with a run folder: every epoch checkpoint scored on the group's
    validation specimens, the highest mean Dice over the classes shipped, every score on the card."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "scripts"))
    import ship_model

    run = tmp_path / "run"
    run.mkdir()
    for epoch in (10, 20, 30):
        (run / f"epoch_{epoch:03d}.pt").write_bytes(b"")
    (run / "last.pt").write_bytes(b"")  # not an epoch checkpoint: never a candidate
    scores = {"epoch_010.pt": (0.90, 0.30, 0.95), "epoch_020.pt": (0.91, 0.50, 0.92), "epoch_030.pt": (0.92, 0.40, 0.93)}

    class Data:
        @staticmethod
        def group(name):
            assert name == "A"
            return {"train": ["S3_1"], "val": ["S3_8"], "test": ["S3_2"]}

    monkeypatch.setattr(ship_model, "load_checkpoint", lambda path: {"group": "A"})
    monkeypatch.setattr(ship_model, "score", lambda path, dataset, specimens: {
        s: dict(zip(ship_model.CLASSES, scores[Path(path).name])) for s in specimens})
    chosen, selection = ship_model.select_by_validation(run, Data())
    assert chosen == run / "epoch_020.pt"  # mean 0.777 against 0.717 and 0.750
    assert selection["chosen"] == "epoch_020.pt" and selection["validation"] == ["S3_8"]
    assert set(selection["candidates"]) == set(scores)
    assert selection["candidates"]["epoch_030.pt"]["Air"] == 0.92
