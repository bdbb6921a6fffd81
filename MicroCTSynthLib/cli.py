"""The command line: ``microctsynth <command> ...`` = ``python -m MicroCTSynthLib <command> ...``.

The same entry point serves a terminal, a headless server, ``torchrun`` and the Slicer
module's background process (``PythonSlicer -m MicroCTSynthLib ... --progress json``).

:data:`COMMANDS` is the table of subcommands. Each :class:`Command` holds its help line, the
function declaring its arguments (``_<name>_arguments``), the engine function running it
(``"module:command_<name>"``, imported only when that command runs, so that ``--help`` answers at
once), the files it reads and writes and any lock it holds.

A :class:`MicroCTSynthError` ends the run with its sentence on stderr (and as a JSON ``error``
event with ``--progress json``) and exit status 2; so does a failed write (full disk, read-only
folder) and a lack of memory. SIGTERM ends a job as Ctrl-C does: a message, every file written
so far complete (writes are atomic), exit status 143.

Before a command runs, its :class:`CommandFiles` name its inputs and outputs: an output that is
an input, another output or a folder is refused (:func:`~MicroCTSynthLib.safety.check_outputs`),
and a volume output's ending is checked, so no work is done for a file that cannot be written.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import signal
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

from . import __version__
from .choices import BACKENDS, BLEND_MODES, MODEL_KINDS, PRECISIONS
from .errors import MicroCTSynthError
from .presets import PRESET_NAMES
from .progress import MODES, emit_json


@dataclass(frozen=True)
class CommandFiles:
    """The options naming a command's files, by argparse dest: what it reads, what it writes, which
    of its outputs are volumes (their ending is checked), and a dataset option whose every file
    counts as an input."""

    inputs: tuple = ()
    outputs: tuple = ()
    volumes: tuple = ()
    dataset: Optional[str] = None


@dataclass(frozen=True)
class Command:
    """A subcommand: its help line, its arguments, the engine function running it, its files and
    the lock it holds."""

    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    #: ``"module:function"`` of the engine (as an entry point is written): the function that takes
    #: the parsed arguments and returns the exit status, imported only when the command runs.
    entry: str
    files: CommandFiles = CommandFiles()
    #: What the command holds while it runs (the phantom: its dataset folder's lock).
    guard: Optional[Callable[[argparse.Namespace], ContextManager]] = None

    def function(self) -> Callable[[argparse.Namespace], int]:
        """The engine function of :attr:`entry` (imports its module)."""
        module, _, name = self.entry.partition(":")
        return getattr(importlib.import_module(f".{module}", __package__), name)


#: Exit status of a job ended by SIGTERM (128 + 15), as a shell reports it.
EXIT_SIGTERM = 143


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM arrives: unwinds like Ctrl-C (atomic writes clean up)."""


def _option(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_files(args: argparse.Namespace) -> None:
    """Refuse outputs that would overwrite an input or each other, before any work."""
    from .safety import check_outputs
    from .volume import check_output_name

    files = COMMANDS[args.command].files
    ins = {_option(k): getattr(args, k) for k in files.inputs}
    if files.dataset:
        ins.update(_dataset_files(getattr(args, files.dataset)))
    check_outputs(ins, {_option(k): getattr(args, k) for k in files.outputs})
    for k in files.volumes:
        if getattr(args, k):
            check_output_name(getattr(args, k))


def _dataset_files(data) -> dict:
    """Every file a dataset names, as inputs (an atlas output must not replace one of them)."""
    from .dataset import CASE_FILES, CASES_FILE, Dataset

    try:
        ds = Dataset.load(data)
    except MicroCTSynthError:
        return {}
    files = {f"the dataset's {CASES_FILE}": ds.root / CASES_FILE}
    for case in ds.cases:
        for role in CASE_FILES:
            files[f"the {role.replace('_', ' ')} of case {case}"] = ds.path(case, role, must_exist=False)
    return files


def _phantom_guard(args: argparse.Namespace):
    """A phantom's dataset folder: refused if it holds a dataset (unless --overwrite), locked while written."""
    from .dataset import refuse_existing_dataset
    from .progress import warn
    from .safety import FolderLock

    refuse_existing_dataset(args.out, args.overwrite)
    return FolderLock(args.out, "dataset folder", log=lambda m: warn(m, args.progress))


def _on_sigterm(signum, frame):
    raise Terminated()


def _progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", choices=MODES, default="bar",
                   help="progress as a terminal bar (default), one JSON object per line, or none")


def _device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="microctsynth",
        description="Synthetic micro-CT and tissue maps of the inner ear from clinical CT (3D conditional GANs).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        command.arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


# -- phantom ---------------------------------------------------------------------------------------
def _phantom_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="dataset folder to write (one sub-folder per specimen, cases.json)")
    p.add_argument("--preset", default="quick", help="paper (37.6 um micro-CT), quick (75.2 um) or tiny")
    p.add_argument("--seed", type=int, default=0, help="base seed; each specimen derives its own from it")
    p.add_argument("--specimens", default=None, help="comma-separated study codes (default: all six, S3_1,...,S3_12)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out (its cases.json and images)")
    p.add_argument("--scanners", choices=("clinical", "edge", "unseen", "far"), default="clinical",
                   help="the CTs' scanners: clinical ranges (default); edge: their coarsest, noisiest corner; "
                        "unseen: just outside every clinical range; far: well outside (same anatomy), to test a "
                        "model on scanners it was not trained on")
    _progress(p)


# -- register --------------------------------------------------------------------------------------
def _register_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fixed", required=True, help="the micro-CT (fixed image)")
    p.add_argument("--moving", required=True, help="the CT (moving image)")
    init = p.add_mutually_exclusive_group()
    init.add_argument("--init", help="initial transform (.tfm, micro-CT point -> CT point)")
    init.add_argument("--landmarks-fixed", help="landmarks in the micro-CT (CSV x,y,z in mm LPS, Slicer .mrk.json or .fcsv)")
    p.add_argument("--landmarks-moving", help="the same landmarks in the CT, in the same order")
    p.add_argument("--affine", action="store_true", help="add an affine stage after the rigid one")
    p.add_argument("--out-transform", required=True, help="the estimated transform (.tfm)")
    p.add_argument("--out-resampled", required=True, help="the CT resampled onto the micro-CT grid")
    p.add_argument("--downsample", type=int, default=1, choices=(1, 2), help="resample onto the micro-CT grid x2 downsampled")
    _progress(p)


# -- tissue-map ------------------------------------------------------------------------------------
def _tissue_map_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--microct", required=True, help="micro-CT volume")
    p.add_argument("--out", required=True, help="tissue map to write (labels 0 outside, 1 air, 2 soft tissue, 3 bone)")
    p.add_argument("--closing-radius", type=float, default=None, help="radius of each class' binary closing in mm")


# -- prepare ---------------------------------------------------------------------------------------
def _prepare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset folder with cases.json")
    p.add_argument("--cases", default=None, help="comma-separated cases (default: all)")
    p.add_argument("--affine", action="store_true", help="add an affine stage after the rigid one")
    p.add_argument("--force", action="store_true", help="redo cases that already have their outputs")
    _progress(p)


# -- evaluate --------------------------------------------------------------------------------------
def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reference", required=True, help="reference tissue map")
    p.add_argument("--prediction", required=True, help="predicted tissue map (same grid)")
    p.add_argument("--microct", help="micro-CT, for the perceptual error (Eq. 8)")
    p.add_argument("--synthetic", help="synthetic micro-CT, for the perceptual error (Eq. 8)")
    p.add_argument("--json", help="write the metrics as JSON here")


# -- train -----------------------------------------------------------------------------------------
def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="prepared dataset folder")
    p.add_argument("--group", default="A", help="leave-2-out group of cases.json (A, B, C or your own)")
    p.add_argument("--model", choices=MODEL_KINDS, default="single",
                   help="single-task or multitask cGAN, or the direct segmenter (MONAI DynUNet)")
    p.add_argument("--preset", default="quick", help=f"{', '.join(PRESET_NAMES)} or a preset JSON file")
    p.add_argument("--out", required=True, help="run folder (checkpoints, TensorBoard events, pictures)")
    p.add_argument("--epochs-constant", type=int, default=None, help="epochs at the initial learning rate (preset: n_epochs)")
    p.add_argument("--epochs-decay", type=int, default=None, help="epochs of linear decay to 0 (preset: n_epochs_decay)")
    p.add_argument("--resume", nargs="?", const="last", default=None,
                   help="continue a run: a checkpoint path, or without value the run folder's last.pt")
    p.add_argument("--overwrite", action="store_true", help="delete a previous run in --out and start afresh")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="resume a checkpoint of another group or other cases (normally refused)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (--no-amp: fp32); default: bf16 on a GPU that supports it, the preset's cpu_bf16 on a CPU with native bf16")
    p.add_argument("--seed", type=int, default=0)
    _device(p)
    _progress(p)


#: What ``synthesize --roi CENTER SIZE`` (the older form of --roi-center and --roi-size) says.
DEPRECATED_ROI = ("--roi CENTER SIZE is deprecated and goes in the next release: write --roi-center=X,Y,Z "
                  "--roi-size=S (or SX,SY,SZ) instead.")

#: The volumes synthesize writes, by argparse dest.
SYNTHESIS_OUTPUTS = ("out_microct", "out_tissue", "uncertainty", "entropy")


# -- synthesize ------------------------------------------------------------------------------------
def _synthesize_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("A centre or size that starts with a minus sign goes after '=': --roi-center=-12.3,4,5. "
                f"{DEPRECATED_ROI}")
    p.add_argument("--model", required=True, help="checkpoint of a trained model (RUN/best.pt)")
    p.add_argument("--ct", required=True, help="the CT (any orientation and spacing)")
    p.add_argument("--out-microct", default=None, help="synthetic micro-CT to write (a cGAN; the segmenter makes none)")
    p.add_argument("--out-tissue", required=True, help="tissue map to write")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--roi-center", metavar="X,Y,Z", help="centre of the region of interest (LPS mm)")
    where.add_argument("--reference-grid", help="synthesize on this volume's grid (e.g. the registered micro-CT)")
    p.add_argument("--roi-size", metavar="S|SX,SY,SZ", help="size of the region of interest (mm): one edge or three")
    p.add_argument("--overlap", type=float, default=None,
                   help="window overlap, a fraction in [0, 1) (default: the model's preset's synthesis_overlap); "
                        "0 = the thesis' tiling")
    p.add_argument("--blend", choices=BLEND_MODES, default="gaussian", help="how overlapping patches are blended")
    p.add_argument("--uncertainty", help="write the voxel-wise standard deviation of N stochastic passes here")
    p.add_argument("--entropy", help="write the tissue map's entropy of N stochastic passes here")
    p.add_argument("--samples", type=int, default=1, help="stochastic passes with dropout on (uncertainty)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 where the CPU or GPU computes it natively, else fp32")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: OpenVINO on the CPU when installed (pip install openvino), else PyTorch")
    p.add_argument("--sw-batch-size", default="auto", metavar="N", help="windows per network call (auto: by window size)")
    _device(p)
    _progress(p)


# -- atlas -----------------------------------------------------------------------------------------
def _atlas_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ct", required=True, help="target CT")
    p.add_argument("--data", required=True, help="dataset folder holding the atlas cases")
    p.add_argument("--atlases", default=None, help="comma-separated atlas cases (default: the group's training cases)")
    p.add_argument("--group", default="A", help="leave-2-out group whose training cases are the atlases")
    p.add_argument("--reference-grid", required=True, help="grid of the output tissue map (e.g. the target's micro-CT)")
    p.add_argument("--target-transform", help="target's CT-to-micro-CT transform (.tfm) placing the CT on the grid")
    p.add_argument("--out", required=True, help="atlas tissue map to write")
    _progress(p)


# -- experiment ------------------------------------------------------------------------------------
def _experiment_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="prepared dataset folder")
    p.add_argument("--out", required=True, help="experiment folder (runs, results.csv, report)")
    p.add_argument("--preset", default="quick")
    p.add_argument("--groups", default="A,B,C")
    p.add_argument("--models", default="single,multi", help=f"comma-separated: {', '.join(MODEL_KINDS)}")
    p.add_argument("--pretrained", action="store_true",
                   help="score the shipped models (microctsynth models) instead of training; all asked for must be shipped")
    _device(p)
    _progress(p)


# -- demo ------------------------------------------------------------------------------------------
def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder for the phantom, the runs and the report")
    p.add_argument("--preset", default="quick", help="the phantom's preset, and with --train the training preset")
    p.add_argument("--seed", type=int, default=0, help="the phantom's seed")
    p.add_argument("--train", action="store_true",
                   help="train every model with the quick preset (about 5 minutes in all on 2 cores) instead of using the shipped ones")
    _device(p)
    _progress(p)


# -- models ----------------------------------------------------------------------------------------
def _models_arguments(p: argparse.ArgumentParser) -> None:
    _progress(p)


#: The subcommands, in the order ``--help`` lists them.
COMMANDS = {
    "phantom": Command(
        "make the inner-ear phantom: paired CT / micro-CT specimens with their true tissue maps",
        _phantom_arguments, "phantom:command_phantom", guard=_phantom_guard),
    "register": Command(
        "register a CT (moving) onto a micro-CT (fixed) with Mattes mutual information",
        _register_arguments, "registration:command_register",
        CommandFiles(inputs=("fixed", "moving", "init", "landmarks_fixed", "landmarks_moving"),
                     outputs=("out_transform", "out_resampled"), volumes=("out_resampled",))),
    "tissue-map": Command(
        "make the air / soft tissue / bone map of a micro-CT (multi-Otsu + closing)",
        _tissue_map_arguments, "tissue:command_tissue_map", CommandFiles(inputs=("microct",), outputs=("out",), volumes=("out",))),
    "prepare": Command(
        "the thesis' pre-processing of every case: registration, resampled CT, tissue maps",
        _prepare_arguments, "prepare:command_prepare"),
    "evaluate": Command(
        "Dice, HD95 per class and the perceptual error of a prediction",
        _evaluate_arguments, "metrics:command_evaluate",
        CommandFiles(inputs=("reference", "prediction", "microct", "synthetic"), outputs=("json",))),
    "train": Command(
        "train the single-task or multitask 3D cGAN (or the direct segmenter) on a leave-2-out group",
        _train_arguments, "train:command_train"),
    "synthesize": Command(
        "synthesize micro-CT and tissue map from a CT with a trained model",
        _synthesize_arguments, "synthesize:command_synthesize",
        CommandFiles(inputs=("model", "ct", "reference_grid"), outputs=SYNTHESIS_OUTPUTS, volumes=SYNTHESIS_OUTPUTS)),
    "atlas": Command(
        "the atlas baseline: register atlas CTs, warp their tissue maps, majority vote",
        _atlas_arguments, "atlas:command_atlas",
        CommandFiles(inputs=("ct", "reference_grid", "target_transform"), outputs=("out",), volumes=("out",),
                     dataset="data")),
    "experiment": Command(
        "the thesis' leave-2-out experiment: train, synthesize, baselines, report",
        _experiment_arguments, "experiment:command_experiment"),
    "demo": Command(
        "phantom -> prepare -> experiment on group A with the shipped models -> report",
        _demo_arguments, "experiment:command_demo"),
    "models": Command(
        "list the shipped trained models and what their cards say",
        _models_arguments, "experiment:command_models"),
}


def main(argv: list[str] | None = None) -> int:
    """Run ``microctsynth ARGV``; the command gets the parsed options and ``command_line``, the
    line itself (a training run keeps it in its ``command.txt``)."""
    parser = build_parser()
    argv, deprecated = _rewrite_deprecated_roi(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["microctsynth", *argv])
    command = COMMANDS[args.command]
    json_mode = getattr(args, "progress", None) == "json"  # tissue-map and evaluate have no --progress
    previous = _install(signal.SIGTERM, _on_sigterm)
    try:
        if deprecated:
            from .progress import warn

            warn(DEPRECATED_ROI, args.progress)
        check_files(args)
        with command.guard(args) if command.guard else nullcontext():
            return int(command.function()(args) or 0)
    except MicroCTSynthError as exc:
        return _fail(args.command, str(exc), json_mode)
    except OSError as exc:
        from .safety import write_error

        return _fail(args.command, str(write_error(exc, exc.filename or "a file")).replace("Cannot write", "Cannot use"),
                     json_mode)
    except MemoryError:
        return _fail(args.command, "This computer ran out of memory; use a smaller preset, region or patch size.", json_mode)
    except Terminated:
        message = "stopped by SIGTERM; every file written so far is complete (continue a training run with --resume)."
        return _fail(args.command, message, json_mode, EXIT_SIGTERM, "")
    except KeyboardInterrupt:
        print(f"microctsynth {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # An internal failure: the sentence reaches the GUI, the traceback stays on stderr.
        if json_mode:
            emit_json("error", message=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _rewrite_deprecated_roi(argv: list[str]) -> tuple[list[str], bool]:
    """``synthesize ... --roi CENTER SIZE`` (the form before --roi-center and --roi-size) as
    ``--roi-center=CENTER --roi-size=SIZE``, and whether it was there. Read before argparse, so a
    centre starting with a minus sign stays a value; this goes with the old form in the next release."""
    if not argv or argv[0] != "synthesize" or "--roi" not in argv[:-2]:
        return argv, False
    i = argv.index("--roi")
    return argv[:i] + [f"--roi-center={argv[i + 1]}", f"--roi-size={argv[i + 2]}"] + argv[i + 3:], True


def _install(signum, handler):
    """Install ``handler`` for ``signum`` (only the main thread may); returns the previous one or None."""
    try:
        return signal.signal(signum, handler)
    except (ValueError, OSError):  # not the main thread (e.g. called from a worker thread)
        return None


def _fail(command: str, message: str, json_mode: bool, code: int = 2, prefix: str = "error: ") -> int:
    if json_mode:
        emit_json("error", message=message)
    print(f"microctsynth {command}: {prefix}{message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
