"""Presets: ``paper`` (the thesis' numbers), ``quick`` (CPU demo), ``tiny`` (tests).

Each preset is one JSON file shipped in the package, ``MicroCTSynthLib/Resources/presets/``
(read with :mod:`importlib.resources`, see :mod:`package_data`, so an installed wheel has them
too). ``paper.json`` holds every number of the thesis under the name the thesis gives it;
``quick.json`` and ``tiny.json`` hold only what they change, and are read on top of
``paper.json``. A path to a JSON file of one's own works the same way, and may start from
another preset instead of ``paper`` with ``"base": "quick"`` (a preset name or the path of
another file), so that it holds only what it changes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import MicroCTSynthError
from .package_data import preset_file

#: The presets shipped in the package (the panel lists them in this order).
PRESET_NAMES = ("paper", "quick", "pretrained", "tiny")


INF = math.inf

#: Type and range of every preset key: (kind, low, high) with kind "int", "float", "bool", "str",
#: "window" (two increasing numbers) or a tuple of the allowed strings; None allowed where marked.
SCHEMA = {
    "name": ("str", None, None), "description": ("str", None, None),
    "microct_spacing_mm": ("float", 1e-4, 10.0), "ct_spacing_mm": ("float", 1e-3, 10.0),
    "phantom_fov_mm": ("float", 0.5, 100.0), "phantom_microct_psf_voxels": ("float", 0.0, 10.0),
    "phantom_ct_supersampling": ("int", 1, 8),
    "phantom_ct_margin_mm": ("float", 0.0, 50.0), "phantom_pose_sd_deg": ("float", 0.0, 90.0),
    "phantom_pose_max_deg": ("float", 0.0, 180.0), "phantom_pose_shift_sd_mm": ("float", 0.0, 50.0),
    "phantom_pose_shift_max_mm": ("float", 0.0, 50.0), "phantom_misalignment_max_deg": ("float", 0.0, 90.0),
    "phantom_misalignment_max_mm": ("float", 0.0, 50.0),
    "downsample": ("int", 1, 2), "patch_size": ("int", 8, 4096), "train_patch_overlap": ("float", 0.0, 0.99),
    "eval_patch_overlap": ("float", 0.0, 0.99), "synthesis_overlap": ("float", 0.0, 0.99),
    "ngf": ("int", 1, 4096), "n_blocks": ("int", 0, 64), "dropout": ("float", 0.0, 0.99), "input_skip": ("bool", None, None),
    "ndf": ("int", 1, 4096), "n_layers_D": ("int", 1, 6), "gan_mode": (("vanilla", "lsgan"), None, None),
    "lr": ("float", 1e-12, INF), "beta1": ("float", 0.0, 0.999), "batch_size": ("int", 1, 64),
    "n_epochs": ("int", 0, 100_000), "n_epochs_decay": ("int", 0, 100_000), "checkpoint_every": ("int", 1, 100_000),
    "validate_every": ("int", 1, 100_000), "max_patches_per_epoch": ("int?", 1, 10_000_000),
    "lambda_L1_single": ("float", 0.0, 1e6), "lambda_perceptual_single": ("float", 0.0, 1e6),
    "lambda_L1_multi": ("float", 0.0, 1e6), "lambda_perceptual_multi": ("float", 0.0, 1e6),
    "lambda_dice_multi": ("float", 0.0, 1e6), "dice_epsilon": ("float", 0.0, 1.0),
    "dice_absent_classes": (("count", "skip"), None, None), "perceptual_pairing": (("thesis", "pix2pixhd"), None, None),
    "ct_window_hu": ("window", -1e5, 1e5), "tissue_closing_radius_mm": ("float", 0.0, 1.0),
    "augment_probability": ("float", 0.0, 1.0), "augment_gain": ("window", 0.05, 20.0),
    "augment_offset_hu": ("window", -5000.0, 5000.0), "augment_voxel_mm": ("window", 0.0, 10.0),
    "augment_blur_fwhm_mm": ("window", 0.0, 10.0), "augment_noise_hu": ("window", 0.0, 5000.0),
    "augment_noise_correlation_mm": ("window", 0.0, 10.0), "cpu_bf16": ("bool", None, None),
    "segmenter_filters": ("int", 1, 1024), "ct_calibration": (("none", "air-bone"), None, None),
    "ct_harmonize_fwhm_mm": ("float", 0.0, 5.0),
}


def _problem(key: str, value, rule) -> str | None:
    kind, lo, hi = rule
    if isinstance(kind, tuple):
        return None if value in kind else f"one of {', '.join(kind)}"
    if kind == "int?" and value is None:
        return None
    if kind == "str":
        return None if isinstance(value, str) else "a text"
    if kind == "bool":
        return None if isinstance(value, bool) else "true or false"
    if kind == "window":
        ok = (isinstance(value, list) and len(value) == 2 and all(_number(v) for v in value)
              and lo <= value[0] < value[1] <= hi)
        return None if ok else f"two increasing numbers between {lo:g} and {hi:g}"
    whole = kind.startswith("int")
    if not _number(value) or (whole and float(value) != int(value)) or not lo <= value <= hi:
        upper = f" and {hi:g}" if hi != INF else ""
        return f"{'a whole number' if whole else 'a finite number'} between {lo:g}{upper or ' and above'}"
    return None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_preset(preset: dict, key: str = "") -> dict:
    """Raise one sentence for the first preset value of the wrong type or out of its range."""
    for name, rule in SCHEMA.items():
        if name in preset:
            want = _problem(name, preset[name], rule)
            if want is not None:
                where = f"The preset '{key}'" if key else "The preset"
                if name.endswith("_overlap"):
                    want += " (a fraction of the patch: 24 of 96 voxels is 0.25)"
                raise MicroCTSynthError(f"{where} sets {name} to {preset[name]!r}; it must be {want}.")
    if int(preset.get("patch_size", 8)) % 4:
        raise MicroCTSynthError(f"The preset's patch_size {preset['patch_size']} must be a multiple of 4.")
    return preset


def _read(source, label: str) -> dict:
    """The JSON object of a preset file (a Path or a package Traversable), without ``_comment`` keys."""
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MicroCTSynthError(
            f"The preset file '{label}' is missing; the MicroCTSynthLib package was installed without its data."
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MicroCTSynthError(f"The preset file '{label}' could not be read ({type(exc).__name__}).") from None
    except json.JSONDecodeError as exc:
        raise MicroCTSynthError(f"The preset file '{label}' is not valid JSON: {exc}.") from None
    if not isinstance(data, dict):
        raise MicroCTSynthError(f"The preset file '{label}' must hold a JSON object.")
    return {k: v for k, v in data.items() if not k.startswith("_")}


def load_preset(name_or_path: str | Path | dict, _chain: tuple = ()) -> dict:
    """The preset's settings: its base (``paper.json`` unless it names one) overlaid with it."""
    if isinstance(name_or_path, dict):
        return check_preset(dict(name_or_path))
    key = str(name_or_path)
    if key in PRESET_NAMES:
        source, identity, folder = preset_file(key), f"preset:{key}", None
    else:
        path = Path(key)
        if not path.is_file():
            raise MicroCTSynthError(
                f"Unknown preset '{key}': use {', '.join(PRESET_NAMES)} or the path of a preset JSON file."
            )
        path = path.resolve()
        source, identity, folder = path, str(path), path.parent
    if identity in _chain:
        names = [Path(c).name if not c.startswith("preset:") else c[7:] for c in _chain]
        raise MicroCTSynthError(f"The preset '{key}' is its own base, through {' -> '.join(names)}.")
    overrides = _read(source, key if folder is None else str(source))
    base_name = overrides.pop("base", None)
    if base_name is None:
        base = _read(preset_file("paper"), "paper")
    else:
        # A file named as base is looked for beside the preset that names it first.
        beside = folder / str(base_name) if folder is not None else None
        base = load_preset(beside if beside is not None and beside.is_file() else base_name, _chain + (identity,))
    unknown = sorted(set(overrides) - set(base) - {"name", "description"})
    if unknown:
        raise MicroCTSynthError(f"The preset '{key}' sets unknown key(s) {', '.join(unknown)}; "
                                "see MicroCTSynthLib/Resources/presets/paper.json.")
    return check_preset({**base, **overrides}, key)
