"""The engine under hostile files, full disks and concurrent jobs: one row of the table per bad input or fault.

Every row runs one command of the command line and asserts its exit status (2 unless stated),
one sentence on stderr and no traceback, and that no file changed or appeared except where the
row says so. Most rows run in this process (``cli.main``); the faults (full disk, SIGTERM,
kill -9, two jobs at once) run the command in a process of its own.

The full disk is a real one where this can mount a file system (root): a 128 KiB tmpfs filled
to the last block; elsewhere the stand-in is a file-size limit (RLIMIT_FSIZE of 200 bytes, with
SIGXFSZ ignored, so a write fails with EFBIG as it fails with ENOSPC on a full disk).
Read-only outputs are a tmpfs remounted read-only as root (root ignores permissions), else a
folder without write permission.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MicroCTSynthLib import cli
from MicroCTSynthLib.checkpoint import load_checkpoint, save_checkpoint
from MicroCTSynthLib.dataset import Dataset
from MicroCTSynthLib.safety import LOCK_NAME, part_tag
from MicroCTSynthLib.volume import Volume, write_volume

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_data import SPACING, synthetic_case, write_synthetic_dataset  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# -- the world the rows act on ------------------------------------------------------------------------
def _vol(array, spacing=SPACING) -> Volume:
    return Volume(np.asarray(array), spacing)


def _write_tfm(path: Path, name: str, params: str, fixed: str = "0 0 0") -> Path:
    path.write_text(f"#Insight Transform File V1.0\n#Transform 0\nTransform: {name}\nParameters: {params}\n"
                    f"FixedParameters: {fixed}\n")
    return path


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


class _Malicious:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def _make_files(d: Path) -> dict:
    case = synthetic_case(32, seed=0)
    w = {"dir": d}
    w["microct"] = write_volume(_vol(case["microct"]), d / "microct.nrrd")
    w["ct"] = write_volume(_vol(case["ct_registered"]), d / "ct.nrrd")
    w["tissue"] = write_volume(_vol(case["tissue"]), d / "tissue.nrrd")
    w["ct_int16"] = write_volume(_vol(case["ct_registered"].astype(np.int16)), d / "ct_int16.nrrd")
    w["float_labels"] = write_volume(_vol(case["tissue"].astype(np.float32) + 0.5), d / "float_labels.nrrd")
    labels7 = case["tissue"].copy()
    labels7[10, 10, 10] = 7
    w["labels7"] = write_volume(_vol(labels7), d / "labels7.nrrd")
    w["zeros"] = write_volume(_vol(np.zeros((32, 32, 32), np.uint8)), d / "zeros.nrrd")
    w["small_labels"] = write_volume(_vol(case["tissue"][:16, :16, :16]), d / "small_labels.nrrd")
    w["const"] = write_volume(_vol(np.full((32, 32, 32), 0.5, np.float32)), d / "const.nrrd")
    image2d = sitk.GetImageFromArray(np.zeros((32, 32), np.float32))
    sitk.WriteImage(image2d, str(d / "image2d.nrrd"))
    w["image2d"] = d / "image2d.nrrd"
    nan = case["microct"].copy()
    nan[5, 5, 5] = np.nan
    w["nan_voxels"] = write_volume(_vol(nan), d / "nan_voxels.nrrd")
    (d / "not_an_image.nrrd").write_text("hello, I am text\n")
    w["not_an_image"] = d / "not_an_image.nrrd"
    w["identity_tfm"] = _write_tfm(d / "identity.tfm", "Euler3DTransform_double_3_3", "0 0 0 0 0 0")
    w["nan_tfm"] = _write_tfm(d / "nan.tfm", "AffineTransform_double_3_3", "1 0 0 0 nan 0 0 0 1 0 0 0")
    w["singular_tfm"] = _write_tfm(d / "singular.tfm", "AffineTransform_double_3_3", "1 0 0 0 1 0 0 0 0 0 0 0")
    w["tfm2d"] = _write_tfm(d / "two_d.tfm", "AffineTransform_double_2_2", "1 0 0 1 0 0", "0 0")
    (d / "not_a_transform.tfm").write_text("this is not a transform\n")
    w["not_a_transform"] = d / "not_a_transform.tfm"
    (d / "line.csv").write_text("0,0,0\n1,1,1\n2,2,2\n3,3,3\n")
    w["landmarks_line"] = d / "line.csv"
    (d / "points.csv").write_text("0,0,0\n1,0,0\n0,1,0\n0,0,1\n")
    w["landmarks"] = d / "points.csv"
    (d / "text.pt").write_text("not a model")
    w["text_pt"] = d / "text.pt"
    (d / "a_folder").mkdir()
    w["folder"] = d / "a_folder"
    return w


def _make_presets(d: Path) -> dict:
    presets = {"lr_negative": {"lr": -0.001}, "lr_string": {"lr": "0.001"}, "patch_1024": {"patch_size": 1024},
               "ngf_fraction": {"ngf": 4.5}, "unknown_key": {"patchsize": 16}, "batch_zero": {"batch_size": 0},
               "fov_text": {"phantom_fov_mm": "big"}, "huge_lr": {"lr": 1e30}, "gan_mode": {"gan_mode": "wgan"}}
    out = {}
    for name, values in presets.items():
        out[name] = d / f"{name}.json"
        out[name].write_text(json.dumps({"base": "tiny", **values}))
    out["lr_nan"] = d / "lr_nan.json"
    out["lr_nan"].write_text('{"base": "tiny", "lr": NaN}')  # JSON as Python writes it
    return out


def _make_models(d: Path, run: Path) -> dict:
    state = load_checkpoint(run / "last.pt")
    wide = dict(state, generator_args={**state["generator_args"], "ngf": 8192})
    save_checkpoint(d / "wide.pt", {k: v for k, v in wide.items() if k not in ("format", "format_version")})
    evil = d / "evil.pt"
    torch.save({"format": "microctsynth-checkpoint", "format_version": 1, "payload": _Malicious(d / "pwned")}, evil)
    bomb = d / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("archive/data/0", "w", force_zip64=True) as member:
            chunk = bytes(1 << 20)
            for _ in range(64):  # 64 MB of zeros, 64 KB on disk
                member.write(chunk)
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    return {"wide": d / "wide.pt", "evil": evil, "bomb": bomb}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("world")
    w = _make_files(d)
    w["presets"] = _make_presets(d)
    groups = {"A": {"train": ["C0", "C1"], "val": ["C2"], "test": ["C3"]},
              "B": {"train": ["C1", "C2"], "val": ["C3"], "test": ["C0"]}}
    ds = write_synthetic_dataset(d / "ds", groups=groups)
    for name in ds.cases:  # complete it as prepare would: the CT, its transform, the naive map
        shutil.copy(ds.path(name, "ct_registered"), ds.path(name, "ct", must_exist=False))
        shutil.copy(w["identity_tfm"], ds.path(name, "transform", must_exist=False))
        shutil.copy(ds.path(name, "tissue"), ds.path(name, "naive_tissue", must_exist=False))
    w["ds"] = ds.root
    w["run"] = d / "run"
    assert cli.main(["train", "--data", str(w["ds"]), "--preset", "tiny", "--out", str(w["run"]), "--epochs-constant",
                     "1", "--epochs-decay", "0", "--progress", "none", "--device", "cpu"]) == 0
    w["model"] = w["run"] / "best.pt"
    w.update(_make_models(d, w["run"]))
    return SimpleNamespace(**w)


# -- disks ----------------------------------------------------------------------------------------------
def _mount(path: Path, options: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory):
    """(folder, kind): a full 128 KiB tmpfs, or a plain folder where writes are limited by RLIMIT_FSIZE."""
    path = tmp_path_factory.mktemp("disk") / "full"
    if _mount(path, "size=128k"):
        try:
            with open(path / "filler", "wb") as f:
                while True:
                    f.write(bytes(4096))
                    f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        yield path, "tmpfs"
        _umount(path)
    else:
        path.mkdir()
        yield path, "rlimit"


@pytest.fixture(scope="module")
def read_only(tmp_path_factory):
    """A folder that cannot be written to (read-only tmpfs for root, no write permission otherwise)."""
    path = tmp_path_factory.mktemp("ro") / "read_only"
    if os.geteuid() == 0:
        if not _mount(path, "size=64k"):
            pytest.skip("root cannot be kept from writing without mounting a read-only file system")
        (path / "old.txt").write_text("kept\n")
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
        _umount(path)
    else:
        path.mkdir()
        (path / "old.txt").write_text("kept\n")
        path.chmod(0o555)
        yield path
        path.chmod(0o755)


# -- running and checking ---------------------------------------------------------------------------------
def snapshot(*roots: Path) -> dict:
    """Every file and folder under ``roots`` with its content digest."""
    state = {}
    for root in roots:
        if not root.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames:
                state[os.path.join(dirpath, name)] = "dir"
            for name in filenames:
                p = os.path.join(dirpath, name)
                with open(p, "rb") as f:
                    state[p] = hashlib.sha1(f.read()).hexdigest()
    return state


def changes(before: dict, after: dict) -> set:
    return {p for p in set(before) | set(after) if before.get(p) != after.get(p)}


def run_in_process(argv: list, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def limit_file_size():  # the full-disk stand-in, in the child before it runs the command
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))


def run_process(argv: list, limited: bool = False, timeout: float = 300) -> tuple[int, str]:
    run = subprocess.run([sys.executable, "-m", "MicroCTSynthLib", *[str(a) for a in argv]], capture_output=True,
                         text=True, env=ENV, timeout=timeout, preexec_fn=limit_file_size if limited else None)
    return run.returncode, run.stderr


def assert_one_sentence(err: str, command: str, pattern: str) -> None:
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith(f"microctsynth {command}: ")]
    assert len(errors) == 1, err
    sentence = errors[0].split(": ", 1)[1].removeprefix("error: ")
    assert re.search(pattern, sentence), sentence
    assert sentence.rstrip().endswith((".", ")")), sentence


@dataclass
class Row:
    id: str
    command: str
    args: Callable = None                  # (world, scratch) -> the command's arguments
    match: str = ""                        # the sentence, as a regular expression
    code: int = 2
    setup: Callable = None                 # (world, scratch) -> None, before the snapshot
    allowed: Callable = None               # (world, scratch) -> paths (and folders) that may change
    flow: Callable = None                  # (world, scratch, disks) -> (code, stderr): the faults
    process: bool = False                  # run in a process of its own
    disk: str = ""                         # "full" or "read_only": outputs go there
    log: str = ""                          # what stderr must say besides (a row that succeeds)


def opts(base: dict, **over) -> list:
    """``{"fixed": a, ...}`` -> ``["--fixed", a, ...]``; ``over`` replaces (None drops, True is a flag)."""
    merged = {**base, **over}
    argv = []
    for key, value in merged.items():
        if value is None or value is False:
            continue
        argv.append("--" + key.replace("_", "-"))
        if value is not True:
            argv += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return argv


def ds_copy(W, S) -> Path:
    """The world's dataset, hard-linked into the scratch folder (an atomic write replaces, never edits, a link)."""
    target = S / "ds"
    if not target.exists():
        shutil.copytree(W.ds, target, copy_function=os.link)
    return target


def edit_cases(S, edit) -> None:
    path = S / "ds" / "cases.json"
    data = json.loads(path.read_text())
    edit(data)
    path.unlink()  # a hard link: write a new file, leave the world's alone
    path.write_text(json.dumps(data))


def lock(folder: Path, pid: int | None = None) -> None:
    import socket

    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"pid": pid or os.getpid(), "host": socket.gethostname(), "time": time.time()}))


def reg(W, S, **over):
    return opts({"fixed": W.microct, "moving": W.ct, "out_transform": S / "t.tfm", "out_resampled": S / "r.nrrd",
                 "progress": "none"}, **over)


def tis(W, S, **over):
    return opts({"microct": W.microct, "out": S / "map.nrrd"}, **over)


def ev(W, S, **over):
    return opts({"reference": W.tissue, "prediction": W.tissue, "json": S / "m.json"}, **over)


def prep(W, S, **over):
    return opts({"data": S / "ds", "progress": "none"}, **over)


def tr(W, S, **over):
    return opts({"data": W.ds, "preset": "tiny", "out": S / "run", "epochs_constant": 1, "epochs_decay": 0,
                 "progress": "none", "device": "cpu"}, **over)


def syn(W, S, **over):
    return opts({"model": W.model, "ct": W.ct, "out_microct": S / "s.nrrd", "out_tissue": S / "st.nrrd",
                 "reference_grid": W.microct, "progress": "none", "device": "cpu"}, **over)


def atl(W, S, **over):
    return opts({"ct": W.ct, "data": W.ds, "reference_grid": W.microct, "out": S / "atlas.nrrd", "progress": "none"},
                **over)


def exp(W, S, **over):
    return opts({"data": W.ds, "out": S / "exp", "preset": "tiny", "groups": "A", "progress": "none",
                 "device": "cpu"}, **over)


class Scratch(type(Path())):
    """The row's own folder; ``.ro`` and ``.full`` are the read-only and full disks when the row asks for them."""


def run_copy(W, S) -> Path:
    shutil.copytree(W.run, S / "run", copy_function=os.link)
    return S / "run"


def run_records(W, S):
    """How a run that started was made: its preset.json and command.txt."""
    return [str(S / "run" / "preset.json"), str(S / "run" / "command.txt")]


def tensorboard(W, S):
    return [str(S / "run" / "tensorboard") + os.sep, *run_records(W, S)]


def new_run_folder(W, S):
    return [str(S / "run"), str(S / "run" / "tensorboard"), str(S / "run" / "tensorboard") + os.sep, *run_records(W, S)]


def ct_in_unit_range(W, S):
    """A dataset whose registered CTs are scaled to [0, 1] instead of Hounsfield units."""
    ds = Dataset.load(ds_copy(W, S))
    for name in ds.cases:
        path = ds.path(name, "ct_registered")
        case = synthetic_case(32, seed=int(name[1:]))
        path.unlink()
        write_volume(_vol((case["ct_registered"] + 1000.0) / 4000.0), path)


def escape_transform(W, S):
    ds_copy(W, S)
    (S / "outside.tfm").write_text("precious\n")
    edit_cases(S, lambda d: d["cases"]["C0"].update(transform="../outside.tfm"))


def symlink_escape(W, S):
    ds_copy(W, S)
    (S / "elsewhere").mkdir()
    shutil.copytree(S / "ds" / "C0", S / "elsewhere" / "C0", copy_function=os.link)
    shutil.rmtree(S / "ds" / "C0")
    (S / "ds" / "C0").symlink_to(S / "elsewhere" / "C0")


ROWS = [
    # -- phantom ----------------------------------------------------------------------------------------
    Row("phantom-onto-a-dataset", "phantom", lambda W, S: opts({"out": W.ds, "preset": "tiny", "progress": "none"}),
        r"already holds a .*dataset.*--overwrite"),
    Row("phantom-out-is-a-file", "phantom", lambda W, S: opts({"out": W.microct, "preset": "tiny", "progress": "none"}),
        "is not a folder"),
    Row("phantom-preset-value-of-wrong-type", "phantom",
        lambda W, S: opts({"out": S / "ph", "preset": W.presets["fov_text"], "progress": "none"}),
        "sets phantom_fov_mm to 'big'; it must be a finite number"),
    Row("phantom-unknown-specimen", "phantom",
        lambda W, S: opts({"out": S / "ph", "preset": "tiny", "specimens": "S9_9", "progress": "none"}), "S9_9"),
    Row("phantom-folder-in-use", "phantom", lambda W, S: opts({"out": S / "ph", "preset": "tiny", "progress": "none"}),
        "in use by another microctsynth job", setup=lambda W, S: lock(S / "ph")),
    # -- register ---------------------------------------------------------------------------------------
    Row("register-missing-fixed", "register", lambda W, S: reg(W, S, fixed=S / "nope.nrrd"), "does not exist"),
    Row("register-moving-not-an-image", "register", lambda W, S: reg(W, S, moving=W.not_an_image), "could not be read"),
    Row("register-init-with-nan-parameters", "register", lambda W, S: reg(W, S, init=W.nan_tfm), "NaN or infinite"),
    Row("register-singular-init-affine", "register", lambda W, S: reg(W, S, init=W.singular_tfm), "is singular"),
    Row("register-2d-init", "register", lambda W, S: reg(W, S, init=W.tfm2d), "2D transform"),
    Row("register-init-not-a-transform", "register", lambda W, S: reg(W, S, init=W.not_a_transform),
        "could not be read as an ITK transform"),
    Row("register-out-resampled-is-moving", "register", lambda W, S: reg(W, S, out_resampled=W.ct),
        "--out-resampled .* same file as --moving"),
    Row("register-out-resampled-is-fixed", "register", lambda W, S: reg(W, S, out_resampled=W.microct),
        "same file as --fixed"),
    Row("register-out-transform-is-init", "register",
        lambda W, S: reg(W, S, init=W.identity_tfm, out_transform=W.identity_tfm), "same file as --init"),
    Row("register-constant-fixed", "register", lambda W, S: reg(W, S, fixed=W.const), "micro-CT .* one value"),
    Row("register-constant-moving", "register", lambda W, S: reg(W, S, moving=W.const), "CT .* one value"),
    Row("register-one-landmark-file", "register", lambda W, S: reg(W, S, landmarks_fixed=W.landmarks),
        "Landmarks come in pairs"),
    Row("register-landmarks-on-a-line", "register",
        lambda W, S: reg(W, S, landmarks_fixed=W.landmarks_line, landmarks_moving=W.landmarks_line), "on one line"),
    Row("register-transform-ending", "register", lambda W, S: reg(W, S, out_transform=S / "t.png"), r"ending \.tfm"),
    Row("register-resampled-ending", "register", lambda W, S: reg(W, S, out_resampled=S / "r.png"), "endings"),
    Row("register-resampled-is-a-folder", "register", lambda W, S: reg(W, S, out_resampled=W.folder), "is a folder"),
    Row("register-2d-fixed", "register", lambda W, S: reg(W, S, fixed=W.image2d), "2D image"),
    Row("register-moving-with-nan-voxels", "register", lambda W, S: reg(W, S, moving=W.nan_voxels), "NaN or infinite"),
    Row("register-read-only-output", "register", lambda W, S: reg(W, S, out_transform=S.ro / "t.tfm",
        out_resampled=S.ro / "r.nrrd"), "read-only|no permission", disk="read_only"),
    Row("register-full-disk", "register", lambda W, S: reg(W, S, out_transform=S.full / "t.tfm",
        out_resampled=S.full / "r.nrrd"), "disk is full", disk="full", process=True),
    # -- tissue-map -------------------------------------------------------------------------------------
    Row("tissue-map-out-is-the-micro-ct", "tissue-map", lambda W, S: tis(W, S, out=W.microct), "same file as --microct"),
    Row("tissue-map-closing-radius-nan", "tissue-map", lambda W, S: tis(W, S, closing_radius="nan"), "closing radius"),
    Row("tissue-map-closing-radius-huge", "tissue-map", lambda W, S: tis(W, S, closing_radius="1e6"), "at most 1 mm"),
    Row("tissue-map-closing-radius-negative", "tissue-map", lambda W, S: tis(W, S, closing_radius="-1"),
        "zero or positive"),
    Row("tissue-map-2d-image", "tissue-map", lambda W, S: tis(W, S, microct=W.image2d), "2D image"),
    Row("tissue-map-nan-voxels", "tissue-map", lambda W, S: tis(W, S, microct=W.nan_voxels), "NaN or infinite"),
    Row("tissue-map-constant-image", "tissue-map", lambda W, S: tis(W, S, microct=W.const), "distinct intensities"),
    Row("tissue-map-out-ending", "tissue-map", lambda W, S: tis(W, S, out=S / "map.png"), "endings"),
    Row("tissue-map-detached-header", "tissue-map", lambda W, S: tis(W, S, out=S / "map.nhdr"), "detached header"),
    Row("tissue-map-missing-input", "tissue-map", lambda W, S: tis(W, S, microct=S / "no.nrrd"), "does not exist"),
    Row("tissue-map-read-only-output", "tissue-map", lambda W, S: tis(W, S, out=S.ro / "map.nrrd"),
        "read-only|no permission", disk="read_only"),
    Row("tissue-map-full-disk", "tissue-map", lambda W, S: tis(W, S, out=S.full / "map.nrrd"), "disk is full",
        disk="full", process=True),
    # -- evaluate ---------------------------------------------------------------------------------------
    Row("evaluate-float-reference", "evaluate", lambda W, S: ev(W, S, reference=W.float_labels), "fractional"),
    Row("evaluate-out-of-range-prediction", "evaluate", lambda W, S: ev(W, S, prediction=W.labels7),
        "other than the tissue labels 0-3 \\(7"),
    Row("evaluate-intensity-image-as-reference", "evaluate", lambda W, S: ev(W, S, reference=W.ct_int16),
        "not an image"),
    Row("evaluate-json-is-the-reference", "evaluate", lambda W, S: ev(W, S, json=W.tissue), "same file as --reference"),
    Row("evaluate-json-is-a-folder", "evaluate", lambda W, S: ev(W, S, json=W.folder), "is a folder"),
    Row("evaluate-other-grid", "evaluate", lambda W, S: ev(W, S, prediction=W.small_labels), "reference's grid"),
    Row("evaluate-micro-ct-alone", "evaluate", lambda W, S: ev(W, S, microct=W.microct), "needs both"),
    Row("evaluate-empty-reference", "evaluate", lambda W, S: ev(W, S, reference=W.zeros), "nothing to score"),
    Row("evaluate-missing-prediction", "evaluate", lambda W, S: ev(W, S, prediction=S / "no.nrrd"), "does not exist"),
    Row("evaluate-read-only-json", "evaluate", lambda W, S: ev(W, S, json=S.ro / "m.json"), "read-only|no permission",
        disk="read_only"),
    Row("evaluate-full-disk", "evaluate", lambda W, S: ev(W, S, json=S.full / "m.json"), "disk is full", disk="full",
        process=True),
    # -- prepare (a copy of the dataset per row) --------------------------------------------------------------
    Row("prepare-no-cases-json", "prepare", lambda W, S: prep(W, S, data=W.folder), "no cases.json"),
    Row("prepare-cases-json-not-json", "prepare", prep, "not valid JSON",
        setup=lambda W, S: (ds_copy(W, S), (S / "ds" / "cases.json").unlink(),
                            (S / "ds" / "cases.json").write_text("{oops"))),
    Row("prepare-transform-outside-the-dataset", "prepare", prep, "leads outside the dataset folder",
        setup=escape_transform),
    Row("prepare-absolute-path", "prepare", prep, "absolute path",
        setup=lambda W, S: (ds_copy(W, S), edit_cases(S, lambda d: d["cases"]["C1"].update(tissue="/etc/passwd")))),
    Row("prepare-symlink-out-of-the-dataset", "prepare", prep, "leads outside the dataset folder",
        setup=symlink_escape),
    Row("prepare-case-is-a-list", "prepare", prep, "must be an object of file names",
        setup=lambda W, S: (ds_copy(W, S), edit_cases(S, lambda d: d["cases"].update(C1=["C1/ct.nrrd"])))),
    Row("prepare-path-is-a-number", "prepare", prep, "not a file name",
        setup=lambda W, S: (ds_copy(W, S), edit_cases(S, lambda d: d["cases"]["C1"].update(ct=42)))),
    Row("prepare-groups-is-a-list", "prepare", prep, '"groups" must be an object',
        setup=lambda W, S: (ds_copy(W, S), edit_cases(S, lambda d: d.update(groups=["A"])))),
    Row("prepare-unknown-file-role", "prepare", prep, "unknown file role 'secret'",
        setup=lambda W, S: (ds_copy(W, S), edit_cases(S, lambda d: d["cases"]["C1"].update(secret="x")))),
    Row("prepare-case-name-climbs", "prepare", prep, "not a plain folder name",
        setup=lambda W, S: (ds_copy(W, S), edit_cases(S, lambda d: d["cases"].update({"../up": {}})))),
    Row("prepare-cases-json-is-a-list", "prepare", prep, "must hold a JSON object",
        setup=lambda W, S: (ds_copy(W, S), (S / "ds" / "cases.json").unlink(),
                            (S / "ds" / "cases.json").write_text("[1, 2]"))),
    Row("prepare-output-is-an-input", "prepare", prep, "same file as The ct of case C0",
        setup=lambda W, S: (ds_copy(W, S), edit_cases(S, lambda d: d["cases"]["C0"].update(transform="C0/ct.nrrd")))),
    Row("prepare-dataset-in-use", "prepare", prep, "in use by another microctsynth job",
        setup=lambda W, S: (ds_copy(W, S), lock(S / "ds"))),
    Row("prepare-unknown-case", "prepare", lambda W, S: prep(W, S, cases="C9"), "Case 'C9' is not in",
        setup=lambda W, S: ds_copy(W, S)),
    # -- train ------------------------------------------------------------------------------------------
    Row("train-into-a-finished-run", "train", lambda W, S: tr(W, S), "already holds a run.*--resume.*--overwrite",
        setup=run_copy),
    Row("train-resume-under-another-group", "train", lambda W, S: tr(W, S, group="B", resume=True),
        "trained on group A, not B", setup=run_copy),
    Row("train-resume-under-another-model", "train", lambda W, S: tr(W, S, model="multi", resume=True),
        "resume it with --model single", setup=run_copy),
    Row("train-negative-learning-rate", "train", lambda W, S: tr(W, S, preset=W.presets["lr_negative"]),
        "sets lr to -0.001"),
    Row("train-nan-learning-rate", "train", lambda W, S: tr(W, S, preset=W.presets["lr_nan"]), "sets lr to nan"),
    Row("train-learning-rate-as-text", "train", lambda W, S: tr(W, S, preset=W.presets["lr_string"]),
        "sets lr to '0.001'"),
    Row("train-fractional-ngf", "train", lambda W, S: tr(W, S, preset=W.presets["ngf_fraction"]), "sets ngf to 4.5"),
    Row("train-zero-batch", "train", lambda W, S: tr(W, S, preset=W.presets["batch_zero"]), "sets batch_size to 0"),
    Row("train-unknown-gan-mode", "train", lambda W, S: tr(W, S, preset=W.presets["gan_mode"]), "vanilla, lsgan"),
    Row("train-unknown-preset-key", "train", lambda W, S: tr(W, S, preset=W.presets["unknown_key"]), "unknown key"),
    Row("train-patch-1024-memory", "train", lambda W, S: tr(W, S, preset=W.presets["patch_1024"]),
        r"needs about [\d.]+ GB of memory but this computer has [\d.]+ GB free"),
    Row("train-resume-a-text-file", "train", lambda W, S: tr(W, S, resume=W.text_pt), "not a MicroCTSynth checkpoint"),
    Row("train-resume-a-compression-bomb", "train", lambda W, S: tr(W, S, resume=W.bomb), "compression bomb"),
    Row("train-resume-a-malicious-pickle", "train", lambda W, S: tr(W, S, resume=W.evil), "would run code"),
    Row("train-run-folder-in-use", "train", lambda W, S: tr(W, S), "in use by another microctsynth job",
        setup=lambda W, S: lock(S / "run")),
    Row("train-diverges-on-resume", "train",
        lambda W, S: tr(W, S, preset=W.presets["huge_lr"], resume=True, epochs_constant=2),
        r"diverged at iteration \d+ \(epoch 2\): the loss term \w+ is nan; the last good checkpoint .*last.pt' is kept",
        setup=run_copy, allowed=tensorboard),
    Row("train-diverges-from-the-start", "train", lambda W, S: tr(W, S, preset=W.presets["huge_lr"]),
        r"diverged at iteration \d+ \(epoch 1\): the loss term \w+ is nan; no checkpoint was written",
        allowed=new_run_folder),
    Row("train-stale-lock-taken-over", "train", lambda W, S: tr(W, S), code=0, log="Took over the lock .* no longer runs",
        setup=lambda W, S: lock(S / "run", _dead_pid()), allowed=lambda W, S: [str(S / "run"), str(S / "run") + os.sep]),
    Row("train-run-folder-on-a-full-disk", "train", lambda W, S: tr(W, S, out=S.full / "run"), "disk is full",
        disk="full", process=True),
    Row("train-run-folder-read-only", "train", lambda W, S: tr(W, S, out=S.ro / "run"), "read-only|no permission",
        disk="read_only"),
    Row("train-ct-not-in-hounsfield-units", "train", lambda W, S: tr(W, S, data=S / "ds"), code=0,
        log="outside the CT window .* are the CTs in Hounsfield units", setup=ct_in_unit_range,
        allowed=lambda W, S: [str(S / "run"), str(S / "run") + os.sep]),
    Row("train-negative-epochs", "train", lambda W, S: tr(W, S, epochs_constant=-1), "at least one epoch"),
    Row("train-unknown-group", "train", lambda W, S: tr(W, S, group="Z"), "Group 'Z' is not defined"),
    Row("train-out-is-a-file", "train", lambda W, S: tr(W, S, out=W.microct), "is not a folder"),
    Row("train-data-escapes", "train", lambda W, S: tr(W, S, data=S / "ds"), "leads outside", setup=escape_transform),
    # -- synthesize ---------------------------------------------------------------------------------------
    Row("synthesize-two-outputs-one-file", "synthesize", lambda W, S: syn(W, S, out_tissue=S / "s.nrrd"),
        "name the same file"),
    Row("synthesize-output-is-the-ct", "synthesize", lambda W, S: syn(W, S, out_microct=W.ct), "same file as --ct"),
    Row("synthesize-uncertainty-is-the-grid", "synthesize",
        lambda W, S: syn(W, S, uncertainty=W.microct, samples=2), "same file as --reference-grid"),
    Row("synthesize-ngf-8192-memory", "synthesize", lambda W, S: syn(W, S, model=W.wide), r"needs about [\d.]+ GB"),
    Row("synthesize-samples-memory", "synthesize", lambda W, S: syn(W, S, samples=10 ** 6), r"needs about [\d.]+ GB"),
    Row("synthesize-compression-bomb", "synthesize", lambda W, S: syn(W, S, model=W.bomb), "compression bomb"),
    Row("synthesize-malicious-pickle", "synthesize", lambda W, S: syn(W, S, model=W.evil), "would run code"),
    Row("synthesize-missing-model", "synthesize", lambda W, S: syn(W, S, model=S / "no.pt"), "does not exist"),
    Row("synthesize-text-model", "synthesize", lambda W, S: syn(W, S, model=W.text_pt), "not a MicroCTSynth checkpoint"),
    Row("synthesize-overlap-above-1", "synthesize", lambda W, S: syn(W, S, overlap=1.5), "overlap"),
    Row("synthesize-roi-not-numbers", "synthesize",
        lambda W, S: syn(W, S, reference_grid=None, roi_center="a,b,c", roi_size="5"),
        "must be numbers"),
    Row("synthesize-roi-huge", "synthesize",
        lambda W, S: syn(W, S, reference_grid=None, roi_center="0,0,0", roi_size="1e5"),
        "output grid would have"),
    Row("synthesize-tissue-ending", "synthesize", lambda W, S: syn(W, S, out_tissue=S / "t.png"), "endings"),
    Row("synthesize-read-only-outputs", "synthesize",
        lambda W, S: syn(W, S, out_microct=S.ro / "s.nrrd", out_tissue=S.ro / "t.nrrd"), "read-only|no permission",
        disk="read_only"),
    Row("synthesize-full-disk", "synthesize",
        lambda W, S: syn(W, S, out_microct=S.full / "s.nrrd", out_tissue=S.full / "t.nrrd"), "disk is full",
        disk="full", process=True),
    # -- atlas ----------------------------------------------------------------------------------------------
    Row("atlas-out-is-the-ct", "atlas", lambda W, S: atl(W, S, out=W.ct), "same file as --ct"),
    Row("atlas-out-is-the-grid", "atlas", lambda W, S: atl(W, S, out=W.microct), "same file as --reference-grid"),
    Row("atlas-out-is-a-dataset-file", "atlas", lambda W, S: atl(W, S, out=W.ds / "C1" / "tissue.nrrd"),
        "same file as the tissue of case C1"),
    Row("atlas-target-transform-nan", "atlas", lambda W, S: atl(W, S, target_transform=W.nan_tfm), "NaN or infinite"),
    Row("atlas-data-escapes", "atlas", lambda W, S: atl(W, S, data=S / "ds"), "leads outside", setup=escape_transform),
    # -- experiment and demo ----------------------------------------------------------------------------------
    Row("experiment-folder-in-use", "experiment", lambda W, S: exp(W, S), "in use by another microctsynth job",
        setup=lambda W, S: lock(S / "exp")),
    Row("experiment-unknown-model", "experiment", lambda W, S: exp(W, S, models="huge"), "Unknown model 'huge'"),
    Row("experiment-unknown-group", "experiment", lambda W, S: exp(W, S, groups="Z"), "Group 'Z' is not defined"),
    Row("experiment-bad-preset", "experiment", lambda W, S: exp(W, S, preset=W.presets["lr_string"]), "sets lr"),
    Row("experiment-data-escapes", "experiment", lambda W, S: exp(W, S, data=S / "ds"), "leads outside",
        setup=escape_transform),
    Row("experiment-pretrained-not-shipped", "experiment", lambda W, S: exp(W, S, groups="B", pretrained=True),
        "No shipped model for group B single-task cGAN"),
    Row("models-bad-progress", "models", lambda W, S: ["--progress", "loud"], "invalid choice: 'loud'", process=True),
    Row("demo-bad-preset", "demo", lambda W, S: opts({"out": S / "demo", "preset": W.presets["lr_negative"],
                                                        "progress": "none"}), "sets lr to -0.001"),
]


# -- faults: signals, kill -9, two jobs at once ----------------------------------------------------------
def _python(argv) -> list:
    return [sys.executable, "-m", "MicroCTSynthLib", *[str(a) for a in argv]]


def interrupt(argv, stop_when: Callable, sig: int, timeout: float = 240) -> tuple[int, str, list]:
    """Start the command, send ``sig`` once ``stop_when(stdout lines)`` holds; SIGKILL goes to the whole job."""
    err_file = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"microctsynth-fault-{os.getpid()}.err", "w+")
    proc = subprocess.Popen(_python(argv), stdout=subprocess.PIPE, stderr=err_file, text=True, env=ENV,
                            start_new_session=True)
    lines: list = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not stop_when(lines) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the job ended before it could be interrupted"
    if sig == signal.SIGKILL:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        os.kill(proc.pid, sig)
    proc.wait(timeout=120)
    reader.join(timeout=10)
    err_file.seek(0)
    err = err_file.read()
    err_file.close()
    os.unlink(err_file.name)
    return proc.returncode, err, lines


def parts(folder: Path) -> list:
    return [p for p in folder.rglob("*") if ".part" in p.name]


def plant_part(folder: Path, name: str = "last", suffix: str = ".pt") -> Path:
    """A leftover of a writer killed mid-write (its process is gone)."""
    host = part_tag().split("@")[1]
    path = folder / f".{name}.{_dead_pid()}@{host}-abcd1234.part{suffix}"
    path.write_bytes(b"half a file")
    return path


def has(lines, text) -> bool:
    return any(text in ln for ln in lines)


def _train_argv(W, out, epochs=12, progress="json"):
    return ["train", "--data", W.ds, "--preset", "tiny", "--out", out, "--epochs-constant", epochs, "--epochs-decay", 0,
            "--progress", progress, "--device", "cpu"]


def flow_train_sigterm(W, S, P):
    out = S / "run"
    code, err, _ = interrupt(_train_argv(W, out), lambda _: (out / "last.pt").exists(), signal.SIGTERM)
    epoch = load_checkpoint(out / "last.pt")["epoch"]     # intact and loadable
    assert 1 <= epoch < 12 and not parts(out) and not (out / LOCK_NAME).exists()
    again, again_err = run_process(_train_argv(W, out, progress="none") + ["--resume"])
    assert again == 0, again_err
    assert load_checkpoint(out / "last.pt")["epoch"] == 12
    return code, err


def flow_train_kill(W, S, P):
    out = S / "run"
    code, _, _ = interrupt(_train_argv(W, out), lambda _: (out / "last.pt").exists(), signal.SIGKILL)
    assert code == -signal.SIGKILL and (out / LOCK_NAME).exists()
    leftover = plant_part(out)
    again, err = run_process(_train_argv(W, out, progress="none") + ["--resume"])
    assert again == 0, err
    assert re.search("Took over the lock .* no longer runs", err) and not leftover.exists() and not parts(out)
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 12 and [h["epoch"] for h in state["history"]] == list(range(1, 13))
    return again, err


def flow_two_trains_at_once(W, S, P):
    out = S / "run"
    first = subprocess.Popen(_python(_train_argv(W, out, progress="none")), env=ENV, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / LOCK_NAME).exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert first.poll() is None
        code, err = run_process(_train_argv(W, out, progress="none"))
        assert first.poll() is None, "the first job must still be running when the second is refused"
    finally:
        first.wait(timeout=240)
    assert first.returncode == 0 and load_checkpoint(out / "last.pt")["epoch"] == 12
    return code, err


def _syn_argv(W, S, size, overlap, progress="json"):
    return ["synthesize", "--model", W.model, "--ct", W.ct, "--out-microct", S / "s.nrrd", "--out-tissue", S / "t.nrrd",
            "--roi-center=1.2,1.2,1.2", "--roi-size", size, "--overlap", overlap, "--progress", progress,
            "--device", "cpu"]


def flow_synthesize_sigterm(W, S, P):
    code, err, _ = interrupt(_syn_argv(W, S, 8, 0.75), lambda lines: has(lines, '"synthesize"'), signal.SIGTERM)
    assert not (S / "s.nrrd").exists() and not (S / "t.nrrd").exists() and not parts(S)
    return code, err


def flow_synthesize_kill(W, S, P):
    code, _, _ = interrupt(_syn_argv(W, S, 4, 0.5), lambda lines: has(lines, '"synthesize"'), signal.SIGKILL)
    assert code == -signal.SIGKILL and not (S / "s.nrrd").exists()
    leftover = plant_part(S, "s", ".nrrd")
    again, err = run_process(_syn_argv(W, S, 4, 0.5, "none"))
    assert again == 0, err
    assert (S / "s.nrrd").exists() and (S / "t.nrrd").exists() and not leftover.exists() and not parts(S)
    return again, err


def flow_experiment_kill(W, S, P):
    ph = P()["prepared"]
    argv = ["experiment", "--data", ph, "--out", S / "exp", "--preset", "tiny", "--groups", "T", "--models",
            "single,multi", "--device", "cpu", "--progress"]
    code, _, _ = interrupt(argv + ["json"], lambda _: (S / "exp" / "runs" / "T_multi" / "last.pt").exists(),
                           signal.SIGKILL, timeout=400)
    assert code == -signal.SIGKILL and not (S / "exp" / "results.csv").exists()
    again, err = run_process(argv + ["bar"], timeout=400)
    assert again == 0, err
    assert "Reusing the finished run" in err and "Took over the lock" in err
    assert (S / "exp" / "results.csv").exists() and (S / "exp" / "report.html").exists() and not parts(S)
    assert load_checkpoint(S / "exp" / "runs" / "T_multi" / "last.pt")["epoch"] == 4
    return again, err


def flow_prepare_kill(W, S, P):
    ph = S / "ph"
    shutil.copytree(P()["raw"], ph)
    first = ph / "S3_1" / "naive_tissue.nrrd"
    code, _, _ = interrupt(["prepare", "--data", ph, "--progress", "json"], lambda _: first.exists(), signal.SIGKILL)
    assert code == -signal.SIGKILL and not (ph / "prepare.json").exists()
    again, err = run_process(["prepare", "--data", ph, "--progress", "bar"])
    assert again == 0, err
    assert "(already prepared)" in err and "Took over the lock" in err and (ph / "prepare.json").exists()
    assert len(json.loads((ph / "prepare.json").read_text())) == 2 and not parts(ph)
    return again, err


def flow_phantom_kill(W, S, P):
    ph = S / "ph"
    argv = ["phantom", "--out", ph, "--preset", "tiny", "--specimens", "S3_1,S3_2", "--progress"]
    code, _, _ = interrupt(argv + ["json"], lambda lines: has(lines, '"result"'), signal.SIGKILL)
    assert code == -signal.SIGKILL and not (ph / "cases.json").exists()
    again, err = run_process(argv + ["bar"])
    assert again == 0, err
    assert "Took over the lock" in err and Dataset.load(ph).cases == ["S3_1", "S3_2"] and not parts(ph)
    return again, err


def flow_register_kill(W, S, P):
    raw = P()["raw"]
    argv = ["register", "--fixed", raw / "S3_1" / "microct.nrrd", "--moving", raw / "S3_1" / "ct.nrrd",
            "--out-transform", S / "t.tfm", "--out-resampled", S / "r.nrrd", "--progress"]
    code, _, _ = interrupt(argv + ["json"], lambda lines: has(lines, '"register"'), signal.SIGKILL)
    assert code == -signal.SIGKILL and not (S / "t.tfm").exists()
    again, err = run_process(argv + ["none"])
    assert again == 0, err
    assert (S / "t.tfm").exists() and (S / "r.nrrd").exists() and not parts(S)
    return again, err


ROWS += [
    Row("train-sigterm", "train", code=143, match="stopped by SIGTERM", flow=flow_train_sigterm),
    Row("train-kill-9-then-resume", "train", code=0, log="Took over the lock", flow=flow_train_kill),
    Row("train-two-jobs-on-one-run-folder", "train", match="in use by another microctsynth job",
        flow=flow_two_trains_at_once),
    Row("synthesize-sigterm", "synthesize", code=143, match="stopped by SIGTERM", flow=flow_synthesize_sigterm),
    Row("synthesize-kill-9-then-again", "synthesize", code=0, flow=flow_synthesize_kill),
    Row("experiment-kill-9-then-continue", "experiment", code=0, log="Reusing the finished run",
        flow=flow_experiment_kill),
    Row("prepare-kill-9-then-continue", "prepare", code=0, log="already prepared", flow=flow_prepare_kill),
    Row("phantom-kill-9-then-again", "phantom", code=0, log="Took over the lock", flow=flow_phantom_kill),
    Row("register-kill-9-then-again", "register", code=0, flow=flow_register_kill),
]


@pytest.fixture(scope="module")
def phantom_world(tmp_path_factory):
    """A tiny phantom of two specimens, as made (``raw``) and prepared with one train / one test group (``prepared``)."""
    from MicroCTSynthLib.phantom import make_phantom
    from MicroCTSynthLib.prepare import prepare

    d = tmp_path_factory.mktemp("phantom")
    make_phantom(d / "raw", preset="tiny", specimens=["S3_1", "S3_2"], progress="none")
    shutil.copytree(d / "raw", d / "prepared")
    ds = Dataset.load(d / "prepared")
    ds.data["groups"] = {"T": {"train": ["S3_1"], "val": [], "test": ["S3_2"]}}
    ds.save()
    prepare(d / "prepared", progress="none")
    return {"raw": d / "raw", "prepared": d / "prepared"}


# -- the table ------------------------------------------------------------------------------------------
def _allowed(path: str, allowed) -> bool:
    return any(path == a or (a.endswith(os.sep) and path.startswith(a)) for a in allowed)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_hostile_input(row, world, tmp_path, capsys, request):
    S = Scratch(tmp_path)
    roots = [world.dir, tmp_path]
    limited = False
    if row.disk == "read_only":
        S.ro = request.getfixturevalue("read_only")
        roots.append(S.ro)
    if row.disk == "full":
        S.full, kind = request.getfixturevalue("full_disk")
        roots.append(S.full)
        limited = kind == "rlimit"
    if row.setup is not None:
        row.setup(world, S)
    before = snapshot(*roots)
    if row.flow is not None:
        code, err = row.flow(world, S, lambda: request.getfixturevalue("phantom_world"))
    else:
        argv = [row.command, *row.args(world, S)]
        code, err = run_process(argv, limited) if row.process else run_in_process(argv, capsys)
    assert code == row.code, err
    assert "Traceback" not in err, err
    if row.match:
        assert_one_sentence(err, row.command, row.match)
    if row.log:
        assert re.search(row.log, err), err
    if row.flow is None:
        allowed = row.allowed(world, S) if row.allowed else ()
        changed = sorted(p for p in changes(before, snapshot(*roots)) if not _allowed(p, allowed))
        assert not changed, f"files changed: {changed}"


def test_the_table_covers_every_command_and_the_faults():
    from MicroCTSynthLib.cli import COMMANDS

    assert len(ROWS) >= 60 and len({r.id for r in ROWS}) == len(ROWS)
    assert {r.command for r in ROWS} == set(COMMANDS)
    kills = {r.command for r in ROWS if "kill-9" in r.id}
    assert {"train", "experiment", "synthesize", "prepare", "phantom", "register"} <= kills
