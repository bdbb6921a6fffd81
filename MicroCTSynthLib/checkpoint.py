"""Checkpoints: tensors and plain data only, written atomically, read with ``weights_only=True``.

A checkpoint is one dict::

    {"format": "microctsynth-checkpoint", "format_version": 1,
     "model": "single" | "multi" | "segmenter", "epoch": epochs done, "generator": state_dict,
     "discriminator": state_dict (None for the segmenter),
     "optimizer_G", "optimizer_D", "scheduler_G", "scheduler_D": their state_dicts,
     "rng": {"torch": ByteTensor, "numpy": {...}, "python": [...], "cuda": [...], "ranks": [...]},
     "generator_args": Generator.arguments, "discriminator_args": Discriminator.arguments,
     "normalization": Normalization.to_dict(), "preset": dict,
     "spacing_mm": [x, y, z] (native micro-CT voxel size), "patch_size": int, "downsample": int,
     "val_loss": float | None, "history": [per-epoch dicts]}

``torch.load(..., weights_only=True)`` unpickles only tensors and plain containers, so a file
that would run code when loaded (a malicious pickle) is refused before anything of it runs; we
say so in one sentence instead of falling back to an unsafe load.
"""

from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from .errors import MicroCTSynthError
from .volume import atomic_path

FORMAT = "microctsynth-checkpoint"
FORMAT_VERSION = 1

#: Keys every checkpoint of ours has (``load_generator`` needs no more).
REQUIRED_KEYS = ("format", "format_version", "model", "epoch", "generator", "generator_args", "normalization",
                 "patch_size", "spacing_mm")

#: The state dicts, left out of the metadata ``load_generator`` returns.
STATE_KEYS = ("generator", "discriminator", "optimizer_G", "optimizer_D", "scheduler_G", "scheduler_D", "rng")

__all__ = ["FORMAT", "FORMAT_VERSION", "save_checkpoint", "load_checkpoint", "load_generator", "rng_state",
           "set_rng_state", "check_network_arguments"]


def save_checkpoint(path, state: dict) -> Path:
    """Write ``state`` (with the format tag added) to ``path`` atomically: temporary file, then rename."""
    path = Path(path)
    state = {"format": FORMAT, "format_version": FORMAT_VERSION, **state}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


#: A checkpoint is a zip archive whose members torch stores uncompressed; a member inflating to
#: more than this many times its stored size is a compression bomb, refused before it is inflated.
MAX_INFLATION = 20


def check_archive(path: Path) -> None:
    """Refuse a ``.pt`` archive whose members would inflate far beyond its size or beyond free memory."""
    from .memory import GB, available_bytes

    if not zipfile.is_zipfile(path):
        return  # the legacy (pickle) format: torch.load refuses it or reads it at its own size
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        raise MicroCTSynthError(f"The model file '{path}' is a damaged archive, not a MicroCTSynth checkpoint.") from None
    total = sum(m.file_size for m in members)
    packed = max(sum(m.compress_size for m in members), 1)
    free = available_bytes()
    if total > MAX_INFLATION * packed + (1 << 20) or (free is not None and total > free):
        raise MicroCTSynthError(f"The model file '{path}' is refused: its {packed / 2 ** 20:.1f} MB would inflate to "
                                f"{total / GB:.1f} GB, which no MicroCTSynth checkpoint does (a compression bomb).")


def load_checkpoint(path, map_location="cpu") -> dict:
    """A checkpoint of ours, loaded with ``weights_only=True``; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise MicroCTSynthError(f"The model file '{path}' does not exist: check the path.")
    check_archive(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc).lower()
        # A pickle naming a Python callable (GLOBAL) is what could run code; other failures are just foreign bytes.
        if "weights only load failed" in message and "global" in message:
            # The file holds Python objects beyond tensors and plain data: loading them could run
            # code, so it is refused and nothing of it is executed.
            raise MicroCTSynthError(
                f"The model file '{path}' is refused: it holds Python objects that would run code when loaded, "
                "which a MicroCTSynth checkpoint never does.") from None
        raise MicroCTSynthError(f"The model file '{path}' is not a MicroCTSynth checkpoint (not a PyTorch file).") from None
    except Exception as exc:  # torch.load fails in many ways on foreign bytes (KeyError, RuntimeError, EOFError...)
        raise MicroCTSynthError(f"The model file '{path}' is not a MicroCTSynth checkpoint or is damaged ({type(exc).__name__}).") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise MicroCTSynthError(f"The model file '{path}' is not a MicroCTSynth checkpoint (it was not written by 'microctsynth train').")
    version = state.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise MicroCTSynthError(f"The model file '{path}' was written by a newer MicroCTSynth (format {version}); update MicroCTSynth.")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise MicroCTSynthError(f"The model file '{path}' is an incomplete checkpoint: it lacks {', '.join(missing)}.")
    return state


def check_network_arguments(saved: dict, wanted: dict, what: str, path) -> None:
    """Error unless a checkpoint's network arguments equal the ones this run builds."""
    diff = {k: (saved.get(k), wanted.get(k)) for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)}
    if diff:
        detail = ", ".join(f"{k} {a} in the file but {b} here" for k, (a, b) in diff.items())
        raise MicroCTSynthError(f"The checkpoint '{path}' was built for another {what} ({detail}); "
                                "resume with the preset and model it was trained with.")


def load_generator(path, device="cpu"):
    """The trained generator in eval mode and the checkpoint's metadata (everything but the state dicts)."""
    from .networks import network_class

    from .memory import check_memory, parameter_count

    state = load_checkpoint(path, map_location="cpu")
    args = state["generator_args"]
    if not isinstance(args, dict):
        raise MicroCTSynthError(f"The model file '{path}' does not say how its generator was built.")
    network = network_class(state.get("model"))
    check_memory(4.0 * parameter_count(network, args), f"The network the model file '{path}' describes "
                 f"({', '.join(f'{k}={v}' for k, v in args.items())})", "this file was not made for this machine")
    try:
        generator = network(**args)
    except TypeError as exc:
        raise MicroCTSynthError(f"The model file '{path}' names generator arguments this version does not know ({exc}).") from None
    try:
        generator.load_state_dict(state["generator"], strict=True)
    except (RuntimeError, KeyError, TypeError, AttributeError):
        raise MicroCTSynthError(f"The weights in '{path}' do not fit the generator the file describes "
                                f"({', '.join(f'{k}={v}' for k, v in args.items())}).") from None
    generator.to(device).eval()
    meta = {k: v for k, v in state.items() if k not in STATE_KEYS}
    return generator, meta


# -- random number generators ------------------------------------------------------------------------
def rng_state() -> dict:
    """The states of torch's, numpy's and Python's generators as tensors and plain data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": [version, list(internal), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in states])

