"""Presets: ``paper`` (the thesis' numbers), ``quick`` (CPU demo), ``tiny`` (tests).

Each preset is one JSON file in ``Resources/presets/``. ``paper.json`` holds every number of
the thesis under the name the thesis gives it; ``quick.json`` and ``tiny.json`` hold only what
they change, and are read on top of ``paper.json``. A path to a JSON file of one's own works
the same way, and may start from another preset instead of ``paper`` with ``"base": "quick"``
(a preset name or the path of another file), so that it holds only what it changes.
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


def load_preset(name_or_path: str | Path | dict, _chain: tuple[Path, ...] = ()) -> dict:
    """The preset's settings: its base (``paper.json`` unless it names one) overlaid with it."""
    if isinstance(name_or_path, dict):
        return dict(name_or_path)
    key = str(name_or_path)
    if key in PRESET_NAMES:
        path = PRESET_DIR / f"{key}.json"
    else:
        path = Path(key)
        if not path.is_file():
            raise MicroCTSynthError(
                f"Unknown preset '{key}': use {', '.join(PRESET_NAMES)} or the path of a preset JSON file."
            )
    path = path.resolve()
    if path in _chain:
        raise MicroCTSynthError(f"The preset '{key}' is its own base, through {' -> '.join(p.name for p in _chain)}.")
    overrides = _read(path)
    base_name = overrides.pop("base", None)
    if base_name is None:
        base = _read(PRESET_DIR / "paper.json")
    else:
        # A file named as base is looked for beside the preset that names it first.
        beside = path.parent / str(base_name)
        base = load_preset(beside if beside.is_file() else base_name, _chain + (path,))
    unknown = sorted(set(overrides) - set(base) - {"name", "description"})
    if unknown:
        raise MicroCTSynthError(f"The preset '{key}' sets unknown key(s) {', '.join(unknown)}; see Resources/presets/paper.json.")
    return {**base, **overrides}
