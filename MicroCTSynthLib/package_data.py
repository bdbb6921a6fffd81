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

import json
from importlib import resources

from .errors import MicroCTSynthError


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
