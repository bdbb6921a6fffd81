"""Presets: ``paper`` (the thesis' numbers), ``quick`` (CPU demo), ``tiny`` (tests).

Each preset is one JSON file in ``Resources/presets/``. ``paper.json`` holds every number of
the thesis under the name the thesis gives it; ``quick.json`` and ``tiny.json`` hold only what
they change, and are read on top of ``paper.json``. A path to a JSON file of one's own works
the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import MicroCTSynthError

PRESET_DIR = Path(__file__).resolve().parent.parent / "Resources" / "presets"
PRESET_NAMES = ("paper", "quick", "tiny")


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MicroCTSynthError(f"The preset file '{path}' is not valid JSON: {exc}.") from None
    if not isinstance(data, dict):
        raise MicroCTSynthError(f"The preset file '{path}' must hold a JSON object.")
    return {k: v for k, v in data.items() if not k.startswith("_")}


def load_preset(name_or_path: str | Path | dict) -> dict:
    """The preset's settings: ``paper.json`` overlaid with the named preset (or a JSON file)."""
    if isinstance(name_or_path, dict):
        return dict(name_or_path)
    base = _read(PRESET_DIR / "paper.json")
    key = str(name_or_path)
    if key in PRESET_NAMES:
        path = PRESET_DIR / f"{key}.json"
    else:
        path = Path(key)
        if not path.is_file():
            raise MicroCTSynthError(
                f"Unknown preset '{key}': use {', '.join(PRESET_NAMES)} or the path of a preset JSON file."
            )
    overrides = _read(path)
    unknown = sorted(set(overrides) - set(base) - {"name", "description"})
    if unknown:
        raise MicroCTSynthError(f"The preset '{key}' sets unknown key(s) {', '.join(unknown)}; see Resources/presets/paper.json.")
    return {**base, **overrides}
