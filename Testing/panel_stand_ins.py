"""Plain Qt stand-ins for the CTK and MRML widget classes of ``MicroCTSynth.ui`` (PySide6).

Named as the .ui names them, so that QUiLoader creates them by name; see ``panel_picture.py``.
They are module-level classes: PySide6's QUiLoader cannot create classes defined in a function.
"""

from __future__ import annotations

from PySide6.QtCore import Property, Qt
from PySide6.QtWidgets import QComboBox, QDoubleSpinBox, QGroupBox, QHBoxLayout, QLineEdit, QSlider, QToolButton, QWidget


class ctkCollapsibleButton(QGroupBox):  # noqa: N801 - the CTK class name
    """A titled section; collapsed, only its title shows (as CTK's collapsible button)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._text, self._collapsed = "", False

    def _title(self) -> None:
        self.setTitle(("\u25b8 " if self._collapsed else "\u25be ") + self._text)

    def getText(self) -> str:
        return self._text

    def setText(self, text: str) -> None:
        self._text = text
        self._title()

    def getCollapsed(self) -> bool:
        return self._collapsed

    def setCollapsed(self, collapsed: bool) -> None:
        self._collapsed = bool(collapsed)
        self._title()

    text = Property(str, getText, setText)
    collapsed = Property(bool, getCollapsed, setCollapsed)

class ctkPathLineEdit(QWidget):  # noqa: N801
    """A path field and its browse button."""

    def __init__(self, parent=None):
        super().__init__(parent)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.lineEdit = QLineEdit(self)
        button = QToolButton(self)
        button.setText("...")
        layout.addWidget(self.lineEdit)
        layout.addWidget(button)

class ctkSliderWidget(QWidget):  # noqa: N801
    """A slider with its spin box, on one value."""

    STEPS = 1000

    def __init__(self, parent=None):
        super().__init__(parent)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.slider = QSlider(Qt.Horizontal, self)
        self.slider.setRange(0, self.STEPS)
        self.spinBox = QDoubleSpinBox(self)
        layout.addWidget(self.slider)
        layout.addWidget(self.spinBox)

    def _sync(self) -> None:
        low, high = self.spinBox.minimum(), self.spinBox.maximum()
        self.slider.setValue(round((self.spinBox.value() - low) / (high - low) * self.STEPS) if high > low else 0)

    def getMinimum(self) -> float:
        return self.spinBox.minimum()

    def setMinimum(self, value: float) -> None:
        self.spinBox.setMinimum(value)
        self._sync()

    def getMaximum(self) -> float:
        return self.spinBox.maximum()

    def setMaximum(self, value: float) -> None:
        self.spinBox.setMaximum(value)
        self._sync()

    def getValue(self) -> float:
        return self.spinBox.value()

    def setValue(self, value: float) -> None:
        self.spinBox.setValue(value)
        self._sync()

    def getSingleStep(self) -> float:
        return self.spinBox.singleStep()

    def setSingleStep(self, value: float) -> None:
        self.spinBox.setSingleStep(value)

    def getDecimals(self) -> int:
        return self.spinBox.decimals()

    def setDecimals(self, value: int) -> None:
        self.spinBox.setDecimals(value)

    minimum = Property(float, getMinimum, setMinimum)
    maximum = Property(float, getMaximum, setMaximum)
    value = Property(float, getValue, setValue)
    singleStep = Property(float, getSingleStep, setSingleStep)
    decimals = Property(int, getDecimals, setDecimals)

class qMRMLNodeComboBox(QComboBox):  # noqa: N801
    """A node selector of an empty scene: "None" when it allows none, else blank."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._noneEnabled = False

    def getNoneEnabled(self) -> bool:
        return self._noneEnabled

    def setNoneEnabled(self, enabled: bool) -> None:
        self._noneEnabled = bool(enabled)
        self.clear()
        if enabled:
            self.addItem("None")

    noneEnabled = Property(bool, getNoneEnabled, setNoneEnabled)

class qMRMLWidget(QWidget):  # noqa: N801
    """The panel's top widget (in Slicer it hands the MRML scene to its children)."""


STAND_INS = [ctkCollapsibleButton, ctkPathLineEdit, ctkSliderWidget, qMRMLNodeComboBox, qMRMLWidget]
