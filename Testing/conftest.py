"""Shared fixtures: paths to the real scans in ../shared/data and small synthetic volumes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("MICROCTSYNTH_SHARED_DATA", ROOT.parent / "shared" / "data"))
HEAD_CT = SHARED_DATA / "real_head_ct_vtk_headsq.nrrd"
TRABECULAR_MICROCT = SHARED_DATA / "real_trabecular_bone_microct_19.5um.nrrd"

# Two cores: keep torch from oversubscribing them when several tests spawn processes.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def head_ct_path() -> Path:
    if not HEAD_CT.exists():
        pytest.skip(f"real head CT not found at {HEAD_CT}")
    return HEAD_CT


@pytest.fixture(scope="session")
def trabecular_path() -> Path:
    if not TRABECULAR_MICROCT.exists():
        pytest.skip(f"real micro-CT not found at {TRABECULAR_MICROCT}")
    return TRABECULAR_MICROCT


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests: on two shared cores, OpenMP threads spinning
    against other processes cost far more than they give."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def scene():
    """A fresh MRML scene (Qt-free slicer-core) with the module logics the MRML bridge relies on."""
    slicer = pytest.importorskip("slicer")
    scene = slicer.vtkMRMLScene()
    logics = []  # kept alive for the test's duration
    for cls in (slicer.vtkSlicerSegmentationsModuleLogic, slicer.vtkSlicerTransformLogic, slicer.vtkSlicerTablesLogic):
        logic = cls()
        logic.SetMRMLScene(scene)
        logics.append(logic)
    yield scene
    scene.Clear(1)
