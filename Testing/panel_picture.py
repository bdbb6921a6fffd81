"""The module's panel rendered with Qt alone: ``MicroCTSynth.ui`` loaded by PySide6's QUiLoader.

The CTK and MRML widget classes of the .ui (``ctkCollapsibleButton``, ``ctkPathLineEdit``,
``ctkSliderWidget``, ``qMRMLNodeComboBox``, ``qMRMLWidget``) exist only inside 3D Slicer; here
plain Qt stand-ins of the same names take their place, drawn the way Slicer draws them with an
empty scene (a node selector shows "None"). The parameter node's defaults are put into the
widgets bound to them (``SlicerParameterName``), as ``connectGui`` does when the module opens.

Used by ``Testing/test_panel_ui.py`` and to make the README's picture::

    python Testing/panel_picture.py docs/images/module_panel.png

Qt needs no display for this: the ``offscreen`` platform plugin is used unless
``QT_QPA_PLATFORM`` says otherwise (e.g. ``xcb`` under Xvfb).
"""

from __future__ import annotations

import ast
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UI_FILE = ROOT / "MicroCTSynth" / "Resources" / "UI" / "MicroCTSynth.ui"
MODULE_PY = ROOT / "MicroCTSynth" / "MicroCTSynth.py"
#: The width of Slicer's module panel on a laptop screen, in pixels.
PANEL_WIDTH = 460


def parameter_defaults() -> dict:
    """Field -> default value of the module's ``@parameterNodeWrapper`` class (read, not imported)."""
    tree = ast.parse(MODULE_PY.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(ast.unparse(d).endswith("parameterNodeWrapper") for d in node.decorator_list):
            return {s.target.id: ast.literal_eval(s.value) for s in node.body
                    if isinstance(s, ast.AnnAssign) and s.value is not None}
    raise ValueError(f"{MODULE_PY} has no @parameterNodeWrapper class")


def ui_bytes() -> bytes:
    """The .ui without its signal connections, which name MRML signatures (``vtkMRMLScene*``)
    that only Slicer's widgets have; the widgets and their other properties are all kept."""
    root = ET.parse(UI_FILE).getroot()
    for connections in root.findall("connections"):
        root.remove(connections)
    # ctkPathLineEdit's "filters" is a set of CTK flags that only CTK can read.
    for widget in root.iter("widget"):
        if widget.get("class") == "ctkPathLineEdit":
            for prop in widget.findall("property"):
                if prop.get("name") == "filters":
                    widget.remove(prop)
    return ET.tostring(root, encoding="utf-8")


def _stand_ins():
    """The stand-in classes (``panel_stand_ins.py`` beside this file)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from panel_stand_ins import STAND_INS
    finally:
        sys.path.pop(0)
    return STAND_INS


def application():
    """The QApplication (made once; ``offscreen`` unless a platform is chosen)."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication(["MicroCTSynth panel"])
    app.setStyle("Fusion")
    return app


def load_panel():
    """The panel as a QWidget: the .ui through QUiLoader with the stand-ins, defaults applied."""
    from PySide6.QtCore import QBuffer, QByteArray
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QCheckBox, QComboBox, QLineEdit, QSpinBox, QWidget

    application()
    loader = QUiLoader()
    for cls in _stand_ins():
        loader.registerCustomWidget(cls)
    buffer = QBuffer()
    buffer.setData(QByteArray(ui_bytes()))
    panel = loader.load(buffer)
    if panel is None:
        raise RuntimeError(f"QUiLoader could not load {UI_FILE}: {loader.errorString()}")
    defaults = parameter_defaults()
    for widget in panel.findChildren(QWidget):
        name = widget.property("SlicerParameterName")
        if not name or name not in defaults:
            continue
        value = defaults[name]
        if isinstance(widget, QCheckBox):
            widget.setChecked(bool(value))
        elif isinstance(widget, QComboBox):
            widget.setCurrentText(str(value))
        elif isinstance(widget, QSpinBox):
            widget.setValue(int(value))
        elif isinstance(widget, QLineEdit):
            widget.setText(str(value))
        elif type(widget).__name__ == "ctkSliderWidget":
            widget.setValue(float(value))
    # A collapsed section shows its title only, as in Slicer.
    for section in panel.findChildren(QWidget):
        if type(section).__name__ == "ctkCollapsibleButton" and section.getCollapsed():
            for child in section.findChildren(QWidget):
                child.setVisible(False)
            section.setFlat(True)
            section.setFixedHeight(section.fontMetrics().height() + 8)
    # As the module's setup(): the progress bar shows only while a job runs.
    panel.findChild(QWidget, "progressBar").hide()
    panel.setFixedWidth(PANEL_WIDTH)
    panel.adjustSize()
    return panel


def save_picture(path) -> Path:
    """Render the panel into a PNG at ``path``."""
    panel = load_panel()
    panel.show()
    application().processEvents()
    pixmap = panel.grab()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not pixmap.save(str(path), "PNG"):
        raise RuntimeError(f"Could not write {path}.")
    return path


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "docs" / "images" / "module_panel.png")
    print(save_picture(target))
