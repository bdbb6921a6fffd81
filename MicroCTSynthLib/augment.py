"""Scanner randomisation of the training CTs: the tissue map follows the anatomy, not the scanner.

Clinical CTs of the same anatomy differ by scanner: calibration (a cone-beam CT's "HU" are off
by a scale and an offset), resolution (voxel size, point-spread function) and noise (level and
grain). SynthSeg (Billot et al., Medical Image Analysis 2023) showed that a network trained on
images whose contrast and resolution are drawn at random, wider than any one scanner, segments
scans of every one of them. :func:`randomize_ct` does that to each training patch of the CT
(``real_A``), in Hounsfield units, and leaves the micro-CT and the tissue map alone:

1. a coarser scanner: block-averaged onto a grid of a random voxel size, back by trilinear
   interpolation (partial volume);
2. its blur: a Gaussian of a random FWHM on top of the CT's own;
3. its calibration: ``HU * gain + offset``;
4. its noise: Gaussian, of a random level and a random grain (correlation length);

then, where the preset harmonises every CT by a fixed blur (``ct_harmonize_fwhm_mm``, applied
to the whole training CTs before their patches are cut), the noise is blurred by it too, as the
harmonising blur blurs a scanner's own noise at synthesis; then clipped into the network's CT
window as :class:`~MicroCTSynthLib.data.Normalization` does.
Each step is drawn from torch's generator (seeded and checkpointed with the run), per patch,
with probability ``augment_probability``; the ranges are the preset's ``augment_*`` windows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .volume import FWHM_PER_SIGMA

__all__ = ["AUGMENT_KEYS", "enabled", "randomize_ct"]

#: Preset keys of the ranges, each a window [low, high] drawn uniformly.
AUGMENT_KEYS = ("augment_gain", "augment_offset_hu", "augment_voxel_mm", "augment_blur_fwhm_mm",
                "augment_noise_hu", "augment_noise_correlation_mm")


def enabled(preset: dict) -> bool:
    return float(preset.get("augment_probability", 0.0)) > 0.0


def _uniform(window, generator=None) -> float:
    lo, hi = (float(v) for v in window)
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def _gaussian_blur(x: torch.Tensor, sigma_vox: float) -> torch.Tensor:
    """Separable Gaussian blur of a (1, 1, z, y, x) tensor, edges replicated."""
    if sigma_vox < 0.3:
        return x
    radius = max(1, int(math.ceil(3.0 * sigma_vox)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma_vox) ** 2)
    kernel = kernel / kernel.sum()
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        x = F.conv3d(F.pad(x, pad, mode="replicate"), kernel.view(shape))
    return x


def _coarser_grid(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Average onto a grid ``factor`` times coarser, then interpolate back (trilinear)."""
    if factor < 1.25:
        return x
    size = x.shape[2:]
    coarse = [max(2, int(round(s / factor))) for s in size]
    small = F.adaptive_avg_pool3d(x, coarse)
    return F.interpolate(small, size=size, mode="trilinear", align_corners=False)


def randomize_ct(real_A: torch.Tensor, preset: dict, ct_window, spacing_mm: float,
                 generator: torch.Generator | None = None, harmonize_fwhm_mm: float = 0.0) -> torch.Tensor:
    """``real_A`` (B, 1, z, y, x, network units of the CT window ``ct_window`` in HU) as if each patch
    came from another scanner; ``spacing_mm``: the patches' voxel size; ``harmonize_fwhm_mm``: the
    blur the CTs were harmonised with (the added noise gets it too). A new tensor."""
    probability = float(preset.get("augment_probability", 0.0))
    if probability <= 0.0:
        return real_A
    lo, hi = (float(v) for v in ct_window)
    out = []
    for patch in real_A.unbind(0):
        x = patch[None].float()
        if float(torch.rand((), generator=generator)) >= probability:
            out.append(x[0].to(real_A.dtype))
            continue
        hu = (x + 1.0) / 2.0 * (hi - lo) + lo
        hu = _coarser_grid(hu, _uniform(preset["augment_voxel_mm"], generator) / spacing_mm)
        fwhm = _uniform(preset["augment_blur_fwhm_mm"], generator)
        hu = _gaussian_blur(hu, fwhm / FWHM_PER_SIGMA / spacing_mm)
        hu = hu * _uniform(preset["augment_gain"], generator) + _uniform(preset["augment_offset_hu"], generator)
        level = _uniform(preset["augment_noise_hu"], generator)
        if level > 0.0:
            grain = _uniform(preset["augment_noise_correlation_mm"], generator) / FWHM_PER_SIGMA / spacing_mm
            noise = _gaussian_blur(torch.randn(hu.shape, generator=generator, dtype=hu.dtype, device=hu.device), grain)
            noise = noise * (level / noise.std().clamp_min(1e-6))
            hu = hu + _gaussian_blur(noise, float(harmonize_fwhm_mm) / FWHM_PER_SIGMA / spacing_mm)
        x = ((hu - lo) / (hi - lo) * 2.0 - 1.0).clamp(-1.0, 1.0)
        out.append(x[0].to(real_A.dtype))
    return torch.stack(out, 0)
