"""The thesis' losses: adversarial (Eq. 1), weighted L1 (Eq. 2), perceptual (Eq. 3), Dice (Eq. 4),
and the generator's totals, single-task (Eq. 5) and multitask (Eq. 6).

Tissue maps hold labels 0 outside the micro-CT field of view, 1 air, 2 soft tissue, 3 bone; the
tissue head's class index is label - 1. Label-0 voxels carry no target: weighted L1 gives them
weight 0 and Dice leaves them out.

Image tensors are (N, 1, D, H, W); tissue maps (N, 1, D, H, W) or (N, D, H, W), integer. Every
loss is reduced in float32, also when the networks run under bf16 autocast (``--amp``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MicroCTSynthError
from .labels import TISSUE_LABELS

__all__ = ["GANLoss", "tissue_class_weights", "weighted_l1", "perceptual_loss", "dice_loss",
           "generator_loss", "discriminator_loss", "validation_loss", "segmentation_loss", "loss_options", "PAIRINGS",
           "DICE_ABSENT"]

#: Which images the perceptual loss (Eq. 3) shows the discriminator, see :func:`perceptual_loss`.
PAIRINGS = ("thesis", "pix2pixhd")
#: How the Dice loss treats a class absent from a patch's target, see :func:`dice_loss`.
DICE_ABSENT = ("count", "skip")


class GANLoss(nn.Module):
    """The adversarial loss of Eq. 1, on the discriminator's patch logits.

    ``gan_mode="vanilla"``: binary cross-entropy with logits (the thesis' choice, as pix2pix);
    ``"lsgan"``: mean squared error to the target (least-squares GAN). The real and fake targets
    are buffers, so they follow the module to its device, and are broadcast to the prediction.
    """

    def __init__(self, gan_mode: str = "vanilla", target_real_label: float = 1.0, target_fake_label: float = 0.0):
        super().__init__()
        losses = {"vanilla": nn.BCEWithLogitsLoss, "lsgan": nn.MSELoss}
        if gan_mode not in losses:
            raise MicroCTSynthError(f"The adversarial loss must be 'vanilla' or 'lsgan', not {gan_mode!r}.")
        self.gan_mode = gan_mode
        self.register_buffer("real_label", torch.tensor(float(target_real_label)))
        self.register_buffer("fake_label", torch.tensor(float(target_fake_label)))
        self.loss = losses[gan_mode]()

    def forward(self, prediction: torch.Tensor, target_is_real: bool) -> torch.Tensor:
        target = self.real_label if target_is_real else self.fake_label
        # In float32 whatever the autocast dtype of D's logits: the loss is a mean over many patches.
        prediction = prediction.float()
        return self.loss(prediction, target.to(prediction.dtype).expand_as(prediction))


def _tissue_like(tissue: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """The tissue map as (N, 1, D, H, W), checked against the image's batch and grid."""
    if tissue.dim() == image.dim() - 1:
        tissue = tissue.unsqueeze(1)
    if tissue.dim() != image.dim() or tissue.shape[1] != 1 or tissue.shape[0] != image.shape[0] \
            or tissue.shape[2:] != image.shape[2:]:
        raise MicroCTSynthError(f"The tissue map {tuple(tissue.shape)} does not match the image {tuple(image.shape)}.")
    return tissue


def _check_labels(tissue: torch.Tensor, n_classes: int) -> None:
    if tissue.is_floating_point():
        raise MicroCTSynthError("The tissue map must hold integer labels (0 outside, 1 air, 2 soft tissue, 3 bone).")
    if bool(((tissue < 0) | (tissue > n_classes)).any()):
        raise MicroCTSynthError(f"The tissue map holds labels outside 0..{n_classes} "
                                "(0 outside, 1 air, 2 soft tissue, 3 bone).")


def tissue_class_weights(tissue: torch.Tensor) -> torch.Tensor:
    """The voxel weights of Eq. 2, counted per patch (each batch item on its own).

    A voxel of tissue class c weighs 1 / N_c, N_c the number of voxels of class c in its patch,
    so each class present counts as much as any other, however small (the cochlea's air and soft
    tissue against the bone). The weights are then rescaled so that the weights of the counted
    voxels (labels 1-3) average to 1: w = (M / K) / N_c with M counted voxels and K classes present,
    which keeps the loss on the scale of a plain L1 (a patch of one class gets w = 1 everywhere).
    An absent class has no voxel and so simply contributes nothing; label-0 voxels (outside the
    micro-CT field of view) weigh 0; a patch without any counted voxel gets all weights 0.

    Returns float weights of the tissue map's shape.
    """
    _check_labels(tissue, len(TISSUE_LABELS))
    batch = tissue.reshape(tissue.shape[0], -1)
    weights = torch.zeros(batch.shape, dtype=torch.float32, device=tissue.device)
    counts = torch.stack([(batch == label).sum(dim=1) for label in TISSUE_LABELS], dim=1).float()  # (N, classes)
    counted = counts.sum(dim=1, keepdim=True)                       # M per patch
    present = (counts > 0).sum(dim=1, keepdim=True).float()         # K per patch
    per_class = torch.where(counts > 0, counted / present.clamp(min=1) / counts.clamp(min=1), torch.zeros_like(counts))
    for i, label in enumerate(TISSUE_LABELS):
        weights = torch.where(batch == label, per_class[:, i:i + 1], weights)
    return weights.reshape(tissue.shape)


def weighted_l1(fake: torch.Tensor, real: torch.Tensor, tissue: torch.Tensor) -> torch.Tensor:
    """The tissue-weighted L1 loss of Eq. 2: sum_v w_v |fake_v - real_v| / (number of counted voxels).

    w from :func:`tissue_class_weights` (1 / N_c per present class, rescaled so that the counted
    voxels' weights average to 1; label 0 weighs 0). The sum runs over the whole batch and is
    divided by the batch's counted voxels, so with batch 1 this is the weighted mean over the
    patch's field of view. Without any counted voxel the loss is 0 (and still has a gradient path).
    """
    if fake.shape != real.shape:
        raise MicroCTSynthError(f"The synthetic {tuple(fake.shape)} and real {tuple(real.shape)} micro-CT differ in shape.")
    tissue = _tissue_like(tissue, fake)
    weights = tissue_class_weights(tissue)
    counted = (tissue > 0).sum()
    # Summed in float32: a bf16 sum over a 96³ patch keeps barely three digits.
    return (weights * (fake.float() - real.float()).abs()).sum() / counted.clamp(min=1).float()


def perceptual_loss(discriminator: nn.Module, fake_B: torch.Tensor, real_B: torch.Tensor,
                    real_A: torch.Tensor | None = None, pairing: str = "thesis") -> torch.Tensor:
    """The perceptual loss of Eq. 3: L1 distance between the discriminator's intermediate features.

    ``pairing="thesis"``: features of D(cat(real_B, real_B)) against D(cat(fake_B, fake_B)), the
    micro-CT shown to D beside itself, as the thesis writes Eq. 3. ``pairing="pix2pixhd"``: the
    feature-matching loss of pix2pixHD, D(cat(real_A, real_B)) against D(cat(real_A, fake_B)), the
    CT as condition (needs ``real_A``).

    The loss is the sum over D's ``n_layers + 1`` feature maps of each map's mean absolute
    difference (pix2pixHD's weighting 4 / (n_layers + 1) is 1 for the thesis' n_layers = 3; we
    keep 1 for every depth). The real features are computed without gradient: the term only pulls
    fake_B (and so G) towards them. Gradients still pass through D's layers to fake_B; D's own
    parameters are not stepped by G's optimiser (freeze them during G's step to save the work).
    """
    if pairing not in PAIRINGS:
        raise MicroCTSynthError(f"The perceptual loss pairing must be one of {', '.join(PAIRINGS)}, not {pairing!r}.")
    if pairing == "thesis":
        real_input, fake_input = torch.cat([real_B, real_B], 1), torch.cat([fake_B, fake_B], 1)
    else:
        if real_A is None:
            raise MicroCTSynthError("The pix2pixHD perceptual loss needs the CT (real_A) as the discriminator's condition.")
        real_input, fake_input = torch.cat([real_A, real_B], 1), torch.cat([real_A, fake_B], 1)
    with torch.no_grad():
        _, real_features = discriminator(real_input, return_features=True)
    _, fake_features = discriminator(fake_input, return_features=True)
    return _feature_l1(fake_features, real_features)


def _feature_l1(fake_features, real_features) -> torch.Tensor:
    return sum(F.l1_loss(f.float(), r.detach().float()) for f, r in zip(fake_features, real_features))


def dice_loss(logits: torch.Tensor, tissue: torch.Tensor, eps: float = 1e-5, absent: str = "count") -> torch.Tensor:
    """The soft multi-class Dice loss of Eq. 4 on the softmax of the tissue head.

    p = softmax(logits) over the classes, t the one-hot of (label - 1); voxels with label 0 are left
    out of every sum. For each patch n and class c:
    D_nc = (2 sum p t + eps) / (sum p + sum t + eps), and the loss is 1 - mean over n and c of D_nc.
    The same eps smooths numerator and denominator, so a class absent from the target and from
    the prediction scores D = 1; absent from the target but predicted, D is close to 0.

    ``absent="count"`` (the thesis' Eq. 4 as written) equals MONAI's ``DiceLoss(softmax=True,
    to_onehot_y=True, include_background=True, smooth_nr=eps, smooth_dr=eps, batch=False,
    reduction="mean")`` on the target label - 1 (with ``ignore_index=-1`` for label-0 voxels).
    ``absent="skip"`` averages only over the classes present in each patch's target. On small
    patches many lack a class (half of the quick preset's 24³ patches hold no soft tissue), and
    "count" then scores any prediction of that class in them as a Dice of 0, which teaches the
    tissue head to avoid the rarer classes everywhere; "skip" still penalises such a prediction
    through the Dice of the classes it takes voxels from. A patch with no counted voxel gives 0.
    """
    if absent not in DICE_ABSENT:
        raise MicroCTSynthError(f"The Dice loss' absent classes are 'count' or 'skip', not {absent!r}.")
    if logits.dim() != 5:
        raise MicroCTSynthError(f"The tissue logits must be (N, classes, D, H, W), not {tuple(logits.shape)}.")
    n_classes = logits.shape[1]
    tissue = _tissue_like(tissue, logits[:, :1])
    _check_labels(tissue, n_classes)
    inside = (tissue > 0).float()
    p = torch.softmax(logits.float(), dim=1) * inside
    t = F.one_hot((tissue[:, 0] - 1).clamp(min=0), n_classes).movedim(-1, 1).float() * inside
    axes = tuple(range(2, logits.dim()))
    dice = (2 * (p * t).sum(axes) + eps) / (p.sum(axes) + t.sum(axes) + eps)
    if absent == "count":
        return 1 - dice.mean()
    present = (t.sum(axes) > 0).float()
    # No class present anywhere (all label 0): 1 - 1, keeping the graph.
    return 1 - ((dice * present).sum() + (present.sum() == 0).float()) / present.sum().clamp(min=1)


def loss_options(preset: dict) -> dict:
    """The keyword options of :func:`generator_loss` and :func:`validation_loss` a preset sets:
    ``perceptual_pairing`` (default "thesis"), ``dice_epsilon`` (1e-5) and ``dice_absent_classes``
    ("count", the thesis' Eq. 4)."""
    options = {"pairing": str(preset.get("perceptual_pairing", "thesis")),
               "dice_eps": float(preset.get("dice_epsilon", 1e-5)),
               "dice_absent": str(preset.get("dice_absent_classes", "count"))}
    if options["pairing"] not in PAIRINGS:
        raise MicroCTSynthError(f"The preset's perceptual_pairing must be one of {', '.join(PAIRINGS)}, not {options['pairing']!r}.")
    if options["dice_absent"] not in DICE_ABSENT:
        raise MicroCTSynthError(f"The preset's dice_absent_classes must be 'count' or 'skip', not {options['dice_absent']!r}.")
    if not options["dice_eps"] > 0:
        raise MicroCTSynthError(f"The preset's dice_epsilon must be positive, not {options['dice_eps']}.")
    return options


def _weight(weights: dict, key: str) -> float:
    try:
        return float(weights[key])
    except KeyError:
        raise MicroCTSynthError(f"The loss weights lack {key!r} (the preset's lambda for that term).") from None


def generator_loss(discriminator: nn.Module, real_A: torch.Tensor, fake_B: torch.Tensor, real_B: torch.Tensor,
                   tissue: torch.Tensor, logits: torch.Tensor | None = None, *, gan_loss: GANLoss, weights: dict,
                   pairing: str = "thesis", dice_eps: float = 1e-5,
                   dice_absent: str = "count") -> tuple[torch.Tensor, dict[str, float]]:
    """The generator's objective: Eq. 5 (single-task) or, when ``logits`` is given, Eq. 6 (multitask).

    Eq. 5: L_G = L_GAN + lambda_L1 L_L1 + lambda_perceptual L_perceptual (thesis: 5 and 10).
    Eq. 6: L_G = L_GAN + lambda_L1 L_L1 + lambda_perceptual L_perceptual + lambda_dice L_Dice
    (thesis: 5, 5 and 10). L_GAN is Eq. 1 on D(cat(real_A, fake_B)) with the target "real".
    ``weights`` holds "L1", "perceptual" and (multitask) "dice". Returns the total and each
    unweighted term as floats: G_GAN, G_L1, G_perceptual (and G_dice). ``pairing`` is that of
    :func:`perceptual_loss`; ``dice_eps`` and ``dice_absent`` the ``eps`` and ``absent`` of
    :func:`dice_loss` (see :func:`loss_options` for the preset's keys).
    """
    fake_AB = torch.cat([real_A, fake_B], 1)
    if pairing == "pix2pixhd":
        # The fake features of the pix2pixHD pairing are those of the adversarial pass: one D pass saved.
        prediction, fake_features = discriminator(fake_AB, return_features=True)
        with torch.no_grad():
            _, real_features = discriminator(torch.cat([real_A, real_B], 1), return_features=True)
        perceptual = _feature_l1(fake_features, real_features)
    else:
        prediction = discriminator(fake_AB)
        perceptual = perceptual_loss(discriminator, fake_B, real_B, real_A, pairing=pairing)
    terms = {"G_GAN": gan_loss(prediction, True), "G_L1": weighted_l1(fake_B, real_B, tissue), "G_perceptual": perceptual}
    total = terms["G_GAN"] + _weight(weights, "L1") * terms["G_L1"] + _weight(weights, "perceptual") * perceptual
    if logits is not None:
        terms["G_dice"] = dice_loss(logits, tissue, eps=dice_eps, absent=dice_absent)
        total = total + _weight(weights, "dice") * terms["G_dice"]
    return total, {k: float(v.detach()) for k, v in terms.items()}


def discriminator_loss(discriminator: nn.Module, real_A: torch.Tensor, fake_B: torch.Tensor, real_B: torch.Tensor,
                       gan_loss: GANLoss) -> tuple[torch.Tensor, dict[str, float]]:
    """The discriminator's objective, Eq. 1: 0.5 (L_GAN(D(A, B), real) + L_GAN(D(A, G(A)), fake)).

    fake_B is detached, so D's step sends no gradient into G. The 0.5 halves D's pace against
    G's, as pix2pix does. Returns the total and the terms D_real and D_fake as floats.
    """
    loss_fake = gan_loss(discriminator(torch.cat([real_A, fake_B.detach()], 1)), False)
    loss_real = gan_loss(discriminator(torch.cat([real_A, real_B], 1)), True)
    total = 0.5 * (loss_real + loss_fake)
    return total, {"D_real": float(loss_real.detach()), "D_fake": float(loss_fake.detach())}


@torch.no_grad()
def validation_loss(discriminator: nn.Module, real_A: torch.Tensor, fake_B: torch.Tensor, real_B: torch.Tensor,
                    tissue: torch.Tensor, logits: torch.Tensor | None = None, *, weights: dict | None = None,
                    pairing: str = "thesis", dice_eps: float = 1e-5,
                    dice_absent: str = "count") -> tuple[torch.Tensor, dict[str, float]]:
    """The thesis' validation loss, which picks ``best.pt`` (Table 2).

    Single-task (``logits`` None): weighted L1 (Eq. 2) + perceptual (Eq. 3).
    Multitask: weighted L1 (Eq. 2) + Dice (Eq. 4).
    Each term is multiplied by its training lambda when ``weights`` is given ("L1", "perceptual",
    "dice", as for :func:`generator_loss`), otherwise the terms are added as they are.
    Returns the total and the unweighted terms val_L1 and val_perceptual or val_dice, as floats.
    """
    def lam(key: str) -> float:
        return 1.0 if weights is None else _weight(weights, key)

    terms = {"val_L1": weighted_l1(fake_B, real_B, tissue)}
    if logits is None:
        terms["val_perceptual"] = perceptual_loss(discriminator, fake_B, real_B, real_A, pairing=pairing)
        total = lam("L1") * terms["val_L1"] + lam("perceptual") * terms["val_perceptual"]
    else:
        terms["val_dice"] = dice_loss(logits, tissue, eps=dice_eps, absent=dice_absent)
        total = lam("L1") * terms["val_L1"] + lam("dice") * terms["val_dice"]
    return total, {k: float(v) for k, v in terms.items()}


def segmentation_loss(logits: torch.Tensor, tissue: torch.Tensor, *, dice_eps: float = 1e-5, dice_absent: str = "count",
                      **_ignored) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """nnU-Net's loss for the direct segmenter: the soft Dice of :func:`dice_loss` plus cross-entropy,
    both over the voxels inside the field of view (label > 0). Returns the sum and the terms."""
    tissue = _tissue_like(tissue, logits[:, :1])
    _check_labels(tissue, logits.shape[1])
    target = tissue[:, 0].long() - 1  # label 0 (outside) -> -1, ignored
    inside = target >= 0
    ce = F.cross_entropy(logits.float(), target.clamp(min=0), reduction="none")
    ce = (ce * inside).sum() / inside.sum().clamp(min=1)
    dice = dice_loss(logits, tissue, eps=dice_eps, absent=dice_absent)
    return dice + ce, {"dice": dice, "ce": ce}
