"""The thesis' losses against hand-computed values, MONAI's Dice, and the totals of Eq. 5 and Eq. 6."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from MicroCTSynthLib.errors import MicroCTSynthError
from MicroCTSynthLib.losses import (GANLoss, dice_loss, discriminator_loss, generator_loss, loss_options, perceptual_loss,
                                    tissue_class_weights, validation_loss, weighted_l1)
from MicroCTSynthLib.networks import Discriminator, Generator

torch.set_num_threads(1)

EPS = 1e-5


# -- Eq. 1 -------------------------------------------------------------------------------------
def test_vanilla_gan_loss_is_binary_cross_entropy_on_logits():
    x = torch.tensor([[0.0, 2.0, -1.0]])
    real = sum(math.log(1 + math.exp(-v)) for v in (0.0, 2.0, -1.0)) / 3
    fake = sum(math.log(1 + math.exp(v)) for v in (0.0, 2.0, -1.0)) / 3
    loss = GANLoss("vanilla")
    assert loss(x, True).item() == pytest.approx(real, rel=1e-6)
    assert loss(x, False).item() == pytest.approx(fake, rel=1e-6)
    # a smoothed real target of 0.9: -(0.9 log s + 0.1 log(1 - s))
    smooth = sum(-(0.9 * math.log(1 / (1 + math.exp(-v))) + 0.1 * math.log(1 - 1 / (1 + math.exp(-v))))
                 for v in (0.0, 2.0, -1.0)) / 3
    assert GANLoss("vanilla", target_real_label=0.9)(x, True).item() == pytest.approx(smooth, rel=1e-6)


def test_lsgan_loss_is_mean_squared_error():
    x = torch.tensor([0.5, 2.0, -1.0, 0.0]).reshape(1, 1, 1, 2, 2)
    loss = GANLoss("lsgan")
    assert loss(x, True).item() == pytest.approx((0.25 + 1 + 4 + 1) / 4)
    assert loss(x, False).item() == pytest.approx((0.25 + 4 + 1 + 0) / 4)


def test_gan_targets_are_buffers():
    loss = GANLoss("lsgan", 0.8, 0.1)
    assert set(dict(loss.named_buffers())) == {"real_label", "fake_label"}
    assert loss.real_label.item() == pytest.approx(0.8) and loss.fake_label.item() == pytest.approx(0.1)
    assert loss(torch.full((1, 1, 2, 2, 2), 0.8, dtype=torch.float64), True).item() == pytest.approx(0.0)
    with pytest.raises(MicroCTSynthError, match="vanilla"):
        GANLoss("wgan")


# -- Eq. 2 -------------------------------------------------------------------------------------
def test_tissue_class_weights_by_hand():
    # 5 counted voxels: air x3, bone x2, soft tissue absent, and 3 voxels outside the field of view.
    tissue = torch.tensor([0, 1, 1, 1, 3, 3, 0, 0]).reshape(1, 1, 1, 2, 4)
    w = tissue_class_weights(tissue).flatten()
    # w = (M / K) / N_c = (5 / 2) / 3 for air, (5 / 2) / 2 for bone
    expected = torch.tensor([0, 5 / 6, 5 / 6, 5 / 6, 5 / 4, 5 / 4, 0, 0])
    torch.testing.assert_close(w, expected)
    assert w[tissue.flatten() > 0].mean().item() == pytest.approx(1.0)
    # each present class carries the same total weight
    assert w[:4].sum().item() == pytest.approx(w[4:6].sum().item())


def test_tissue_class_weights_per_patch_of_the_batch():
    tissue = torch.stack([torch.tensor([1, 2, 2, 3]), torch.tensor([2, 2, 2, 2])]).reshape(2, 1, 1, 2, 2)
    w = tissue_class_weights(tissue).reshape(2, 4)
    torch.testing.assert_close(w[0], torch.tensor([4 / 3, 2 / 3, 2 / 3, 4 / 3]))
    torch.testing.assert_close(w[1], torch.ones(4))  # one class: plain weights
    assert tissue_class_weights(tissue[:, 0]).shape == (2, 1, 2, 2)  # (N, D, H, W) accepted too


def test_weighted_l1_by_hand_with_absent_class_and_outside_voxels():
    tissue = torch.tensor([0, 1, 1, 1, 3, 3, 0, 0]).reshape(1, 1, 1, 2, 4)
    real = torch.zeros(1, 1, 1, 2, 4)
    fake = torch.tensor([9.0, 0.1, -0.2, 0.3, 0.5, -1.0, 7.0, -7.0]).reshape(1, 1, 1, 2, 4)
    expected = (5 / 6 * (0.1 + 0.2 + 0.3) + 5 / 4 * (0.5 + 1.0)) / 5  # label-0 errors (9, 7, -7) count nothing
    assert weighted_l1(fake, real, tissue).item() == pytest.approx(expected, rel=1e-6)
    assert weighted_l1(fake, real, tissue[:, 0]).item() == pytest.approx(expected, rel=1e-6)


def test_weighted_l1_of_one_class_is_plain_l1():
    torch.manual_seed(1)
    fake, real = torch.randn(2, 1, 4, 4, 4), torch.randn(2, 1, 4, 4, 4)
    tissue = torch.full((2, 1, 4, 4, 4), 2)
    assert weighted_l1(fake, real, tissue).item() == pytest.approx(nn.functional.l1_loss(fake, real).item(), rel=1e-6)


def test_weighted_l1_outside_the_field_of_view_is_zero_with_a_gradient():
    fake = torch.randn(1, 1, 4, 4, 4, requires_grad=True)
    loss = weighted_l1(fake, torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(fake.grad) == 0


def test_tissue_maps_are_checked():
    image = torch.zeros(1, 1, 2, 2, 2)
    with pytest.raises(MicroCTSynthError, match="outside 0..3"):
        weighted_l1(image, image, torch.full((1, 1, 2, 2, 2), 4))
    with pytest.raises(MicroCTSynthError, match="integer"):
        weighted_l1(image, image, torch.ones(1, 1, 2, 2, 2))
    with pytest.raises(MicroCTSynthError, match="does not match"):
        weighted_l1(image, image, torch.ones(1, 1, 2, 2, 3, dtype=torch.long))


# -- Eq. 3 -------------------------------------------------------------------------------------
class KnownFeatures(nn.Module):
    """A stand-in discriminator whose features are known: [x, 3 * (second channel)] (+ a learnable scale)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x, return_features=False):
        features = [self.scale * x, 3 * x[:, 1:]]
        logits = x.mean(dim=1, keepdim=True)
        return (logits, features) if return_features else logits


def test_perceptual_loss_thesis_pairing_by_hand():
    torch.manual_seed(2)
    real_A, real_B = torch.randn(1, 1, 2, 2, 2), torch.randn(1, 1, 2, 2, 2)
    fake_B = torch.randn(1, 1, 2, 2, 2, requires_grad=True)
    d = (fake_B - real_B).abs().mean().item()
    # D(B, B) vs D(G, G): feature 1 differs on both channels (mean d), feature 2 by 3 d
    loss = perceptual_loss(KnownFeatures(), fake_B, real_B, real_A, pairing="thesis")
    assert loss.item() == pytest.approx(d + 3 * d, rel=1e-6)


def test_perceptual_loss_pix2pixhd_pairing_by_hand():
    torch.manual_seed(3)
    real_A, real_B = torch.randn(1, 1, 2, 2, 2), torch.randn(1, 1, 2, 2, 2)
    fake_B = torch.randn(1, 1, 2, 2, 2)
    d = (fake_B - real_B).abs().mean().item()
    # D(A, B) vs D(A, G): feature 1 differs on one channel of two (d / 2), feature 2 by 3 d
    loss = perceptual_loss(KnownFeatures(), fake_B, real_B, real_A, pairing="pix2pixhd")
    assert loss.item() == pytest.approx(d / 2 + 3 * d, rel=1e-6)
    with pytest.raises(MicroCTSynthError, match="real_A"):
        perceptual_loss(KnownFeatures(), fake_B, real_B, None, pairing="pix2pixhd")
    with pytest.raises(MicroCTSynthError, match="pairing"):
        perceptual_loss(KnownFeatures(), fake_B, real_B, real_A, pairing="vgg")


def test_perceptual_loss_detaches_the_real_features():
    disc = KnownFeatures()
    real_B = torch.randn(1, 1, 2, 2, 2, requires_grad=True)
    fake_B = torch.randn(1, 1, 2, 2, 2, requires_grad=True)
    perceptual_loss(disc, fake_B, real_B).backward()
    assert real_B.grad is None
    assert fake_B.grad is not None and fake_B.grad.abs().sum() > 0
    # only the fake branch reaches D's scale: d/ds mean|s F - s B| over feature 1 with B's features fixed
    f, b = torch.cat([fake_B, fake_B], 1).detach(), torch.cat([real_B, real_B], 1).detach()
    assert disc.scale.grad.item() == pytest.approx((torch.sign(f - b) * f).mean().item(), rel=1e-5)


# -- Eq. 4 -------------------------------------------------------------------------------------
def test_dice_loss_by_hand():
    # three voxels: air with uniform logits, bone with logits (ln 2, 0, 0), one outside the field of view
    logits = torch.tensor([[0.0, math.log(2.0), 5.0], [0.0, 0.0, -3.0], [0.0, 0.0, 1.0]]).reshape(1, 3, 1, 1, 3)
    tissue = torch.tensor([1, 3, 0]).reshape(1, 1, 1, 1, 3)
    for eps in (EPS, 0.5):
        d_air = (2 * (1 / 3) + eps) / ((1 / 3 + 1 / 2) + 1 + eps)
        d_soft = eps / ((1 / 3 + 1 / 4) + 0 + eps)
        d_bone = (2 * (1 / 4) + eps) / ((1 / 3 + 1 / 4) + 1 + eps)
        expected = 1 - (d_air + d_soft + d_bone) / 3
        assert dice_loss(logits, tissue, eps=eps).item() == pytest.approx(expected, rel=1e-6)


def test_dice_loss_perfect_and_absent_classes():
    tissue = torch.tensor([1, 1, 3, 3]).reshape(1, 1, 1, 2, 2)
    logits = 50 * nn.functional.one_hot(tissue[:, 0] - 1, 3).movedim(-1, 1).float()
    # air and bone exact; soft tissue absent from target and prediction scores 1
    assert dice_loss(logits, tissue).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_loss_equals_monai(seed):
    monai_losses = pytest.importorskip("monai.losses")
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(2, 3, 8, 6, 5, generator=g)
    tissue = torch.randint(1, 4, (2, 1, 8, 6, 5), generator=g)
    reference = monai_losses.DiceLoss(softmax=True, to_onehot_y=True, include_background=True,
                                      smooth_nr=EPS, smooth_dr=EPS, batch=False, reduction="mean")
    assert dice_loss(logits, tissue, eps=EPS).item() == pytest.approx(reference(logits, tissue - 1).item(), abs=1e-6)

    # label-0 voxels are left out, as MONAI's ignore_index does with label - 1 = -1
    tissue[:, :, :3] = 0
    ignoring = monai_losses.DiceLoss(softmax=True, to_onehot_y=True, include_background=True,
                                     smooth_nr=EPS, smooth_dr=EPS, batch=False, reduction="mean", ignore_index=-1)
    assert dice_loss(logits, tissue, eps=EPS).item() == pytest.approx(ignoring(logits, tissue - 1).item(), abs=1e-6)


def test_dice_loss_skip_averages_only_the_classes_present():
    # the by-hand case above, soft tissue absent from the target: "skip" leaves its near-zero Dice out
    logits = torch.tensor([[0.0, math.log(2.0), 5.0], [0.0, 0.0, -3.0], [0.0, 0.0, 1.0]]).reshape(1, 3, 1, 1, 3)
    tissue = torch.tensor([1, 3, 0]).reshape(1, 1, 1, 1, 3)
    d_air = (2 * (1 / 3) + EPS) / ((1 / 3 + 1 / 2) + 1 + EPS)
    d_bone = (2 * (1 / 4) + EPS) / ((1 / 3 + 1 / 4) + 1 + EPS)
    assert dice_loss(logits, tissue, eps=EPS, absent="skip").item() == pytest.approx(1 - (d_air + d_bone) / 2, rel=1e-6)
    assert dice_loss(logits, tissue, eps=EPS, absent="skip").item() < dice_loss(logits, tissue, eps=EPS).item()


def test_dice_loss_skip_counts_each_patch_own_classes_and_keeps_a_gradient():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 4, 4, 4, generator=g, requires_grad=True)
    tissue = torch.ones(2, 1, 4, 4, 4, dtype=torch.long)
    tissue[1, :, :2] = 3                      # patch 0: air only; patch 1: air and bone
    p = torch.softmax(logits, 1)
    t = nn.functional.one_hot(tissue[:, 0] - 1, 3).movedim(-1, 1).float()
    d = (2 * (p * t).sum((2, 3, 4)) + EPS) / (p.sum((2, 3, 4)) + t.sum((2, 3, 4)) + EPS)
    expected = 1 - (d[0, 0] + d[1, 0] + d[1, 2]) / 3
    loss = dice_loss(logits, tissue, eps=EPS, absent="skip")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert logits.grad.abs().sum() > 0
    # nothing inside the field of view: 0, still differentiable
    empty = dice_loss(logits, torch.zeros_like(tissue), absent="skip")
    assert empty.item() == 0.0 and empty.requires_grad


def test_loss_options_from_the_preset_and_their_errors():
    assert loss_options({}) == {"pairing": "thesis", "dice_eps": 1e-5, "dice_absent": "count"}
    assert loss_options({"dice_absent_classes": "skip", "dice_epsilon": 0.5, "perceptual_pairing": "pix2pixhd"}) == \
        {"pairing": "pix2pixhd", "dice_eps": 0.5, "dice_absent": "skip"}
    with pytest.raises(MicroCTSynthError, match="dice_absent_classes must be 'count' or 'skip'"):
        loss_options({"dice_absent_classes": "ignore"})
    with pytest.raises(MicroCTSynthError, match="perceptual_pairing"):
        loss_options({"perceptual_pairing": "vgg"})
    with pytest.raises(MicroCTSynthError, match="dice_epsilon must be positive"):
        loss_options({"dice_epsilon": 0})
    with pytest.raises(MicroCTSynthError, match="'count' or 'skip'"):
        dice_loss(torch.zeros(1, 3, 2, 2, 2), torch.ones(1, 1, 2, 2, 2, dtype=torch.long), absent="drop")


def test_dice_loss_checks_labels_against_classes():
    with pytest.raises(MicroCTSynthError, match="outside 0..2"):
        dice_loss(torch.zeros(1, 2, 2, 2, 2), torch.full((1, 1, 2, 2, 2), 3))


# -- Eq. 5, Eq. 6, the discriminator and validation --------------------------------------------
@pytest.fixture
def batch():
    torch.manual_seed(4)
    real_A = torch.randn(1, 1, 16, 16, 16)
    real_B = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    tissue = torch.randint(0, 4, (1, 1, 16, 16, 16))
    return real_A, real_B, tissue


SINGLE = {"L1": 5.0, "perceptual": 10.0}
MULTI = {"L1": 5.0, "perceptual": 5.0, "dice": 10.0}


@pytest.mark.parametrize("pairing", ["thesis", "pix2pixhd"])
def test_eq5_total_is_the_weighted_sum_of_its_terms(batch, pairing):
    real_A, real_B, tissue = batch
    gen, disc, gan = Generator(1, 4, 1), Discriminator(2, 4, 2), GANLoss("vanilla")
    fake_B = gen(real_A)
    total, terms = generator_loss(disc, real_A, fake_B, real_B, tissue, gan_loss=gan, weights=SINGLE, pairing=pairing)
    assert set(terms) == {"G_GAN", "G_L1", "G_perceptual"}
    with torch.no_grad():
        gan_term = gan(disc(torch.cat([real_A, fake_B], 1)), True).item()
        l1 = weighted_l1(fake_B, real_B, tissue).item()
        perc = perceptual_loss(disc, fake_B, real_B, real_A, pairing=pairing).item()
    assert terms["G_GAN"] == pytest.approx(gan_term, rel=1e-5)
    assert terms["G_L1"] == pytest.approx(l1, rel=1e-5)
    assert terms["G_perceptual"] == pytest.approx(perc, rel=1e-5)
    assert total.item() == pytest.approx(gan_term + 5 * l1 + 10 * perc, rel=1e-5)
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())


def test_eq6_total_is_the_weighted_sum_of_its_terms(batch):
    real_A, real_B, tissue = batch
    gen, disc, gan = Generator(1, 4, 1, multitask=True), Discriminator(2, 4, 2), GANLoss("lsgan")
    fake_B, logits = gen(real_A)
    total, terms = generator_loss(disc, real_A, fake_B, real_B, tissue, logits, gan_loss=gan, weights=MULTI)
    assert set(terms) == {"G_GAN", "G_L1", "G_perceptual", "G_dice"}
    assert terms["G_dice"] == pytest.approx(dice_loss(logits, tissue).item(), rel=1e-6)
    expected = terms["G_GAN"] + 5 * terms["G_L1"] + 5 * terms["G_perceptual"] + 10 * terms["G_dice"]
    assert total.item() == pytest.approx(expected, rel=1e-5)
    total.backward()
    assert gen.tissue_head[1].weight.grad.abs().sum() > 0
    _, loose = generator_loss(disc, real_A, fake_B, real_B, tissue, logits, gan_loss=gan, weights=MULTI, dice_eps=0.5)
    assert loose["G_dice"] == pytest.approx(dice_loss(logits, tissue, eps=0.5).item(), rel=1e-6)
    with pytest.raises(MicroCTSynthError, match="'dice'"):
        generator_loss(disc, real_A, fake_B, real_B, tissue, logits, gan_loss=gan, weights=SINGLE)


def test_discriminator_loss_is_half_real_plus_fake_and_spares_the_generator(batch):
    real_A, real_B, tissue = batch
    gen, disc, gan = Generator(1, 4, 1), Discriminator(2, 4, 2), GANLoss("vanilla")
    fake_B = gen(real_A)
    total, terms = discriminator_loss(disc, real_A, fake_B, real_B, gan)
    with torch.no_grad():
        real = gan(disc(torch.cat([real_A, real_B], 1)), True).item()
        fake = gan(disc(torch.cat([real_A, fake_B], 1)), False).item()
    assert terms == pytest.approx({"D_real": real, "D_fake": fake}, rel=1e-5)
    assert total.item() == pytest.approx(0.5 * (real + fake), rel=1e-5)
    total.backward()
    assert all(p.grad is None for p in gen.parameters())  # fake_B detached
    assert all(p.grad is not None for p in disc.parameters())


def test_validation_losses_of_the_thesis(batch):
    real_A, real_B, tissue = batch
    gen, disc = Generator(1, 4, 1, multitask=True).eval(), Discriminator(2, 4, 2)
    with torch.no_grad():
        fake_B, logits = gen(real_A)
    l1 = weighted_l1(fake_B, real_B, tissue).item()
    perc = perceptual_loss(disc, fake_B, real_B).item()
    dice = dice_loss(logits, tissue).item()

    total, terms = validation_loss(disc, real_A, fake_B, real_B, tissue)
    assert terms == pytest.approx({"val_L1": l1, "val_perceptual": perc}, rel=1e-5)
    assert total.item() == pytest.approx(l1 + perc, rel=1e-5)
    total, terms = validation_loss(disc, real_A, fake_B, real_B, tissue, logits, weights=MULTI)
    assert terms == pytest.approx({"val_L1": l1, "val_dice": dice}, rel=1e-5)
    assert total.item() == pytest.approx(5 * l1 + 10 * dice, rel=1e-5)
    assert not total.requires_grad


def test_losses_are_float32_under_bf16_autocast(batch):
    real_A, real_B, tissue = batch
    torch.manual_seed(5)
    gen, disc, gan = Generator(1, 4, 1, multitask=True), Discriminator(2, 4, 2), GANLoss("vanilla")
    with torch.no_grad():
        fake_B, logits = gen(real_A)
        reference, ref_terms = generator_loss(disc, real_A, fake_B, real_B, tissue, logits, gan_loss=gan, weights=MULTI)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            total, terms = generator_loss(disc, real_A, fake_B.bfloat16(), real_B, tissue, logits.bfloat16(),
                                          gan_loss=gan, weights=MULTI)
    assert total.dtype == torch.float32
    # bf16 keeps ~3 significant digits in D's features and the inputs; the reductions add no more error
    assert total.item() == pytest.approx(reference.item(), rel=2e-2)
    assert terms["G_L1"] == pytest.approx(ref_terms["G_L1"], rel=1e-2)
    assert terms["G_dice"] == pytest.approx(ref_terms["G_dice"], rel=1e-2)
