"""Files the engine ships inside its package: presets and (once there are any) trained models.

They live in ``MicroCTSynthLib/Resources/`` and are read through :mod:`importlib.resources`,
so the same code finds them in a source folder, in the built Slicer extension (where the
package is installed beside the module), in an installed wheel and in a zipped package::

    MicroCTSynthLib/Resources/presets/<name>.json          paper, quick, tiny
    MicroCTSynthLib/Resources/models/<name>/model.json     a shipped model's card
    MicroCTSynthLib/Resources/models/<name>/<checkpoint>   its weights (named by the card's "checkpoint")

``pyproject.toml`` declares both folders as package data and ``MicroCTSynth/CMakeLists.txt``
installs them with the engine's scripts.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

from .errors import MicroCTSynthError

#: What a model card must say (``model.json``).
CARD_KEYS = ("name", "model", "group", "summary", "checkpoint", "sha256", "preset", "command", "data", "steps",
             "training_seconds", "machine", "held_out")


def resource(*parts: str):
    """The package file or folder ``Resources/<parts...>`` (an :class:`importlib.resources.abc.Traversable`)."""
    node = resources.files(__package__).joinpath("Resources")
    for part in parts:
        node = node.joinpath(part)
    return node


def preset_file(name: str):
    """The shipped preset ``name`` (``paper``, ``quick``, ``tiny``) as a Traversable."""
    return resource("presets", f"{name}.json")


def shipped_models() -> dict:
    """Shipped model name -> its card (``model.json`` as a dict, with ``"folder"`` the Traversable).

    A model folder without ``model.json`` is not a shipped model and is left out.
    """
    folder = resource("models")
    if not folder.is_dir():
        return {}
    models = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        card = entry.joinpath("model.json")
        if not (entry.is_dir() and card.is_file()):
            continue
        try:
            data = json.loads(card.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise MicroCTSynthError(f"The card of the shipped model '{entry.name}' is not valid JSON: {exc}.") from None
        models[entry.name] = {**data, "folder": entry}
    return models


def shipped_checkpoint(card: dict) -> Path:
    """The file system path of a shipped model's checkpoint (the package is installed unzipped)."""
    return Path(str(card["folder"].joinpath(card["checkpoint"])))


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_shipped(card: dict) -> Path:
    """The checkpoint of a shipped model after checking that its card is whole and its sha256 matches."""
    missing = [k for k in CARD_KEYS if k not in card]
    if missing:
        raise MicroCTSynthError(f"The card of the shipped model '{card.get('name', '?')}' lacks {', '.join(missing)}.")
    path = shipped_checkpoint(card)
    if not path.is_file():
        raise MicroCTSynthError(f"The shipped model '{card['name']}' has lost its checkpoint '{path.name}'; reinstall MicroCTSynth.")
    if sha256(path) != card["sha256"]:
        raise MicroCTSynthError(f"The checkpoint of the shipped model '{card['name']}' does not match its sha256 "
                                "(a damaged or replaced file); reinstall MicroCTSynth.")
    return path


def find_shipped(group: str, model: str) -> dict | None:
    """The card of the shipped model for ``group`` and ``model`` (single, multi, segmenter), if any."""
    for card in shipped_models().values():
        if card.get("group") == group and card.get("model") == model:
            return card
    return None

