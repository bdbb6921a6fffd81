"""MicroCTSynth engine: synthetic micro-CT and tissue maps of the inner ear from clinical CT.

Plain Python on numpy, SimpleITK, scikit-image and torch. It never imports Slicer or Qt;
only :mod:`MicroCTSynthLib.mrml` talks to MRML. Volumes are :class:`~MicroCTSynthLib.volume.Volume`
objects in LPS physical space, as SimpleITK uses them.
"""

__version__ = "0.1.0"

from .errors import MicroCTSynthError  # noqa: F401
