"""The names a user chooses from, each list spelled once: models, blending, precision, backend.

The command line (its ``choices``), the Slicer panel (its combo boxes) and the engine (its checks)
take them from here. This module imports nothing heavy, so ``microctsynth --help`` and the panel
need neither torch nor numpy. Two lists live with what they name: the presets
(:data:`~MicroCTSynthLib.presets.PRESET_NAMES`) and the parts of a leave-k-out group
(:data:`~MicroCTSynthLib.dataset.SPLITS`).
"""

from __future__ import annotations

from .errors import MicroCTSynthError

#: The models that train, synthesize and experiment know: the thesis' single-task cGAN (Eq. 5),
#: its multitask cGAN with a tissue head (Eq. 6) and, beyond the thesis, the direct segmenter
#: (MONAI's DynUNet), which has no discriminator and makes a tissue map but no micro-CT.
MODEL_KINDS = ("single", "multi", "segmenter")

#: Each model as a sentence names it.
MODEL_TITLES = {"single": "single-task cGAN", "multi": "multitask cGAN", "segmenter": "direct segmenter (DynUNet)"}

#: How overlapping synthesis windows are weighted (MONAI's ``mode``): a Gaussian or ones.
BLEND_MODES = ("gaussian", "constant")

#: The arithmetic of synthesis: ``auto`` is bf16 where the hardware computes it natively.
PRECISIONS = ("auto", "fp32", "bf16")

#: What runs the network on the windows: ``auto`` is OpenVINO on a CPU when installed.
BACKENDS = ("auto", "torch", "openvino")


def check_model_kind(kind: str) -> str:
    """``kind`` if it is one of :data:`MODEL_KINDS`, else one sentence naming them."""
    if kind not in MODEL_KINDS:
        raise MicroCTSynthError(f"Unknown model '{kind}': use {', '.join(MODEL_KINDS)}.")
    return kind


def check_backend(backend: str) -> str:
    """``backend`` if it is one of :data:`BACKENDS`, else one sentence naming them."""
    if backend not in BACKENDS:
        raise MicroCTSynthError(f"The backend must be one of {', '.join(BACKENDS)}, not {backend!r}.")
    return backend
