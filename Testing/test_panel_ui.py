"""The panel's .ui loaded by Qt (PySide6's QUiLoader) with plain stand-ins for the CTK/MRML
widgets, the way ``Testing/panel_picture.py`` renders the README's picture of the panel."""

from __future__ import annotations

import ast
import struct
from pathlib import Path

import pytest

pytest.importorskip("PySide6.QtUiTools", reason="PySide6 (test extras) is needed to load the .ui with Qt")

import panel_picture  # noqa: E402  (Testing/ is on the path: pytest's rootdir conftest)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def panel():
    widget = panel_picture.load_panel()
    yield widget
    widget.deleteLater()


def _used_ui_names() -> set[str]:
    tree = ast.parse(panel_picture.MODULE_PY.read_text())
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute)
            and n.value.attr == "ui" and isinstance(n.value.value, ast.Name) and n.value.value.id == "self"}


def test_qt_builds_every_widget_the_module_uses(panel):
    from PySide6.QtWidgets import QWidget

    built = {w.objectName(): type(w).__name__ for w in panel.findChildren(QWidget) if w.objectName()}
    missing = _used_ui_names() - set(built)
    assert not missing, f"widgets the module uses that Qt did not build: {sorted(missing)}"
    # Every CTK/MRML class became its stand-in, none fell back to a bare QWidget.
    classes = set(built.values())
    assert {"ctkCollapsibleButton", "ctkPathLineEdit", "ctkSliderWidget", "qMRMLNodeComboBox"} <= classes
    assert type(panel).__name__ == "qMRMLWidget" and panel.objectName() == "MicroCTSynth"
    assert built["ctSelector"] == "qMRMLNodeComboBox" and panel.findChild(QWidget, "ctSelector").currentText() == "None"


def test_bound_widgets_show_the_parameter_defaults_and_buttons_wait(panel):
    from PySide6.QtWidgets import QComboBox, QLineEdit, QPushButton, QWidget

    defaults = panel_picture.parameter_defaults()
    bound = {w.property("SlicerParameterName"): w for w in panel.findChildren(QWidget) if w.property("SlicerParameterName")}
    assert bound["preset"].currentText() == defaults["preset"] == "quick"
    assert isinstance(bound["caseName"], QLineEdit) and bound["caseName"].text() == defaults["caseName"]
    assert bound["overlap"].getValue() == pytest.approx(defaults["overlap"])
    for name, widget in bound.items():
        if isinstance(widget, QComboBox) and type(widget).__name__ == "QComboBox":
            assert widget.count() > 0 and widget.currentText() == str(defaults[name]), name
    buttons = panel.findChildren(QPushButton)
    assert len(buttons) >= 9 and not any(b.isEnabled() for b in buttons)
    titles = [w.getText() for w in panel.findChildren(QWidget) if type(w).__name__ == "ctkCollapsibleButton"]
    assert titles[0].startswith("1.") and titles[-1].startswith("7.") and len(titles) == 7


def test_the_panel_renders_and_the_readme_shows_its_picture(panel, tmp_path):
    picture = panel_picture.save_picture(tmp_path / "panel.png")
    head = picture.read_bytes()[:24]
    width, height = struct.unpack(">II", head[16:24])
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and width == panel_picture.PANEL_WIDTH and height > 800
    committed = ROOT / "docs" / "images" / "module_panel.png"
    assert struct.unpack(">II", committed.read_bytes()[16:24])[0] == panel_picture.PANEL_WIDTH
    assert "docs/images/module_panel.png" in (ROOT / "README.md").read_text()
