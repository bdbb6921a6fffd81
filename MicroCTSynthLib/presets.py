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
from pathlib import Path

from .errors import MicroCTSynthError
from .package_data import preset_file

PRESET_NAMES = ("paper", "quick", "tiny")


def _read(source, label: str) -> dict:
    """The JSON object of a preset file (a Path or a package Traversable), without ``_comment`` keys."""
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MicroCTSynthError(
            f"The preset file '{label}' is missing; the MicroCTSynthLib package was installed without its data."
        ) from None
    except json.JSONDecodeError as exc:
        raise MicroCTSynthError(f"The preset file '{label}' is not valid JSON: {exc}.") from None
    if not isinstance(data, dict):
        raise MicroCTSynthError(f"The preset file '{label}' must hold a JSON object.")
    return {k: v for k, v in data.items() if not k.startswith("_")}


def load_preset(name_or_path: str | Path | dict, _chain: tuple = ()) -> dict:
    """The preset's settings: its base (``paper.json`` unless it names one) overlaid with it."""
    if isinstance(name_or_path, dict):
        return dict(name_or_path)
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
    return {**base, **overrides}
