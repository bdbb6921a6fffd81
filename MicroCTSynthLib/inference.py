"""How a network runs on windows: device, precision, batch size and backend (PyTorch or OpenVINO).

Synthesis is a few hundred forward passes of the same network on windows of one size, so the
choices here decide what a user waits for. Each is picked automatically and can be forced:

* ``precision``: ``"auto"`` is bf16 autocast where the hardware computes in bf16 natively (a
  CUDA GPU that supports it; a CPU with AVX512-BF16 or AMX), else fp32. bf16 halves the
  activations' memory; on a CPU without native bf16 it would only be emulated, slower than fp32.
* ``sw_batch_size``: ``"auto"`` stacks small windows into one PyTorch call (about
  :data:`AUTO_BATCH_VOXELS` voxels), where per-call overheads otherwise dominate, and leaves a 96³
  window alone; OpenVINO, whose calls cost little, takes one window at a time.
* ``backend``: ``"auto"`` is OpenVINO (``pip install openvino``, the optional extra
  ``microctsynth[openvino]``) on a CPU when it is installed, the network is deterministic (no
  dropout left on) and the job repays its conversion: a network of a million parameters or more
  (:data:`AUTO_OPENVINO_PARAMETERS`), or a smaller one that PyTorch would run in fp32 over enough
  windows (:data:`AUTO_OPENVINO_WINDOW_VOXELS`); else PyTorch. The network is traced
  once per window shape and precision and the compiled model is kept with the network for later calls.
* PyTorch fp32 on a CPU runs the cGAN generators' heads the lean way (:meth:`Generator._forward_lean`:
  their 7³ convolutions to one or three channels as sums of depthwise ones, large windows slab by
  slab), 1.4-2x as fast per window (:data:`LEAN_CPU_FP32`), and OpenVINO converts them so
  (:data:`LEAN_OPENVINO`, 2.0-2.9x); bf16 PyTorch and CUDA run the plain network.
* CUDA: ``torch.backends.cudnn.benchmark`` (every window has the same shape, so the autotuned
  convolution is reused), pinned host memory and non-blocking copies; channels-last 3D only where
  :data:`CUDA_CHANNELS_LAST` says it pays.

:class:`WindowPredictor` hides all of it: ``predict(batch)`` takes a (B, C, D, H, W) float32
CPU tensor and returns the network's outputs as float32 numpy arrays.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from contextlib import contextmanager, nullcontext
from typing import Callable

import numpy as np
import torch
from torch import nn

from .choices import BACKENDS, PRECISIONS, check_backend
from .errors import MicroCTSynthError
from .networks import Generator


#: Voxels per forward call when ``sw_batch_size="auto"``: on a CPU 9 windows of 24³ (the quick
#: preset) or 32 of 16³, one of 96³; on a GPU four 96³ windows (about 2 GB of activations in bf16).
AUTO_BATCH_VOXELS = {"cpu": 2**17, "cuda": 2**22}
MAX_AUTO_BATCH = 32

#: Channels-last 3D (NDHWC) networks and activations on CUDA. Off: on an H200 (PyTorch 2.11, cuDNN
#: autotuned) the paper preset's training step took 0.093 s in fp32 and 0.061 s under bf16 autocast
#: with it, against 0.087 s and 0.056 s in the default NCDHW layout (README, "On a GPU").
CUDA_CHANNELS_LAST = False

#: PyTorch fp32 on a CPU runs the generators' lean forward (``Generator._forward_lean``): on a 2-core
#: Xeon without native bf16 (2 threads) the quick generator's 24³ window took 8.7 ms instead of 14.9,
#: the multitask one's 11.8 instead of 23.5, the thesis' 96³ one 7.9 s instead of 9.0. False runs the
#: plain network.
LEAN_CPU_FP32 = True

#: OpenVINO converts the generators' lean forward (depthwise heads), which its CPU plugin also runs
#: faster than the heads' plain convolutions (fp32, 2 threads, a Xeon without native bf16): the quick
#: generator's 24³ window in 4.0 ms instead of 11.7, the thesis' 96³ one in 3.4 s instead of 6.7, in
#: the same memory (the thesis' first 128³ call added 768 MB, 766 with the plain heads). False
#: converts the plain network.
LEAN_OPENVINO = True


# -- device, precision, batch ------------------------------------------------------------------
def resolve_device(device="auto", local_rank: int | None = None) -> torch.device:
    """``auto``: CUDA when present, else the CPU; ``cpu``, ``cuda`` or ``cuda:N`` as asked.

    ``local_rank``: a process of a distributed run (torchrun's ``LOCAL_RANK``) takes its own GPU
    for ``auto`` and ``cuda``; without it ``cuda`` is the current GPU.
    """
    name = str(device if device is not None else "auto").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise MicroCTSynthError(f"Unknown device '{device}': use auto, cpu, cuda or cuda:N.") from None
    if dev.type not in ("cpu", "cuda"):
        raise MicroCTSynthError(f"Unknown device '{device}': use auto, cpu, cuda or cuda:N.")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MicroCTSynthError("CUDA was asked for but no CUDA GPU is available here; use --device cpu or auto.")
    if dev.type == "cuda" and dev.index is None and local_rank is not None:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), so bf16 autocast pays off."""
    if not torch.backends.mkldnn.is_available():
        return False
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        probe = getattr(torch.cpu, name, None)
        try:
            if probe is not None and probe():
                return True
        except (RuntimeError, AttributeError):
            pass
    return False


def resolve_precision(precision, device) -> torch.dtype:
    """``auto``, ``fp32`` or ``bf16`` on ``device`` -> ``torch.float32`` or ``torch.bfloat16``."""
    name = "auto" if precision is None else str(precision).lower()
    name = {"float32": "fp32", "bfloat16": "bf16"}.get(name, name)
    if name not in PRECISIONS:
        raise MicroCTSynthError(f"The precision must be one of {', '.join(PRECISIONS)}, not {precision!r}.")
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def precision_name(dtype: torch.dtype) -> str:
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def resolve_batch_size(sw_batch_size, roi, device, backend="torch") -> int:
    """Windows per forward call: ``"auto"`` (or None) fills :data:`AUTO_BATCH_VOXELS` for PyTorch and
    is one window for OpenVINO, whose calls cost little (so no batch of activations is held); else
    the number given."""
    if sw_batch_size is None or sw_batch_size == "auto":
        if backend == "openvino":
            return 1
        budget = AUTO_BATCH_VOXELS.get(torch.device(device).type, AUTO_BATCH_VOXELS["cpu"])
        return int(max(1, min(MAX_AUTO_BATCH, budget // int(np.prod(roi)))))
    try:
        n = int(sw_batch_size)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise MicroCTSynthError(f"The window batch size must be 'auto' or a positive number, not {sw_batch_size!r}.")
    return n


def autocast(device, dtype: torch.dtype):
    """bf16 autocast on ``device`` for ``dtype`` bf16, nothing for fp32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def configure_cuda(device) -> None:
    """cuDNN autotuning: every window (and training patch) has one shape, so the fastest kernel is found once."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True


@contextmanager
def lean_generators(module, on: bool = True):
    """Within the block every :class:`Generator` in ``module`` runs its lean inference forward (``on``)."""
    generators = [m for m in module.modules() if isinstance(m, Generator)] if on and isinstance(module, nn.Module) else []
    before = [g.lean for g in generators]
    for g in generators:
        g.lean = True
    try:
        yield
    finally:
        for g, was in zip(generators, before):
            g.lean = was


# -- backends ---------------------------------------------------------------------------------
def _import_openvino():
    """``openvino``, imported with its usage statistics off.

    On import and on every conversion OpenVINO's converter sends usage statistics to Google
    Analytics (the ``openvino_telemetry`` package it installs, on unless its opt-out file says
    otherwise), from a process forked off a worker thread. Nothing a user synthesizes should
    leave the machine unasked, and a fork while another thread holds a lock can hang the child
    and with it the process at exit (offline, ``make demo`` once waited on it for minutes). So
    before OpenVINO is first imported the telemetry package is marked absent, and OpenVINO takes
    its own no-op stand-in, as where the package is not installed. Where something else has
    already imported it in this process, it is left alone.
    """
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # None: `import openvino_telemetry` raises ImportError
    import openvino

    return openvino


def openvino_available() -> bool:
    try:
        _import_openvino()
    except ImportError:
        return False
    return True


def _holds_generator(predictor) -> bool:
    """Whether ``predictor`` is or wraps a cGAN :class:`Generator` (whose heads can run lean)."""
    return isinstance(predictor, nn.Module) and any(isinstance(m, Generator) for m in predictor.modules())


def _deterministic(module: nn.Module) -> bool:
    """No dropout left in training mode (OpenVINO runs a traced, inference-only network)."""
    return not any(m.training for m in module.modules() if isinstance(m, nn.modules.dropout._DropoutNd))


#: ``backend="auto"`` runs OpenVINO for networks of at least this many parameters: the thesis'
#: generator (23.5 M) ran a 96³ window in 3.44 s in OpenVINO against 7.93 s in PyTorch (fp32, lean
#: heads in both, 2 threads of a CPU without native bf16).
AUTO_OPENVINO_PARAMETERS = 1_000_000

#: ... and for a smaller network that PyTorch would run in fp32 (a CPU without native bf16, or fp32
#: asked for), once the job holds this many window voxels (windows x voxels per window). OpenVINO
#: runs the quick-size generators' windows 1.6x as fast (lean heads in both, 2 threads of a CPU
#: without native bf16); importing, converting and compiling cost a fresh process about 0.3 s,
#: earned back over about 1.7e6 window voxels. Fresh processes there, the quick single-task
#: generator: 27 windows of 24³ (3.7e5 voxels) 0.43-0.45 s against PyTorch's 0.18-0.23 s, 125
#: (1.7e6) 0.84-0.98 s against 0.95-1.22 s, 343 (4.7e6) 1.72-1.98 s against 2.32-2.41 s; the
#: shipped models on a 160³ specimen (multitask 125 windows of 40³; single-task and segmenter 343
#: of 32³) 7.5-8.2 s, 6.6-7.2 s and 8.9-9.0 s against 10.1-10.8 s, 8.7-9.3 s and 10.2-11.5 s, for
#: 70-100 MB more. Where PyTorch runs bf16 natively (AMX) it was the faster for these networks (a
#: 160³ specimen in 5.4 s against 6.8 s, when converting took 1.5 s).
AUTO_OPENVINO_WINDOW_VOXELS = 2_000_000


def resolve_backend(backend, predictor, device, dtype=torch.float32, window_voxels=None) -> str:
    """``auto``: OpenVINO on the CPU when installed, for a deterministic ``nn.Module`` of at least
    :data:`AUTO_OPENVINO_PARAMETERS` parameters, or a smaller one run in ``dtype`` fp32 over
    ``window_voxels`` (windows x voxels per window, when known) of at least
    :data:`AUTO_OPENVINO_WINDOW_VOXELS`; else PyTorch."""
    name = check_backend("auto" if backend is None else str(backend).lower())
    device = torch.device(device)
    if name == "openvino":
        if not openvino_available():
            raise MicroCTSynthError("The OpenVINO backend needs the openvino package: pip install openvino "
                                    "(or microctsynth[openvino]), or use --backend torch.")
        if device.type != "cpu":
            raise MicroCTSynthError("The OpenVINO backend runs on the CPU; use --device cpu or --backend torch.")
        if not isinstance(predictor, nn.Module):
            raise MicroCTSynthError("The OpenVINO backend needs a network (a torch.nn.Module), not a plain function.")
        if not _deterministic(predictor):
            raise MicroCTSynthError("The OpenVINO backend runs the network without dropout; stochastic passes "
                                    "(--samples above 1) need --backend torch.")
        return "openvino"
    if name == "auto" and device.type == "cpu" and isinstance(predictor, nn.Module) and _deterministic(predictor):
        large = sum(p.numel() for p in predictor.parameters()) >= AUTO_OPENVINO_PARAMETERS
        many_windows = dtype == torch.float32 and (window_voxels or 0) >= AUTO_OPENVINO_WINDOW_VOXELS
        if (large or many_windows) and openvino_available():
            return "openvino"
    return "torch"


class WindowPredictor:
    """A network (or any callable on (B, C, *roi) tensors) run on batches of windows.

    ``predict(batch)`` takes a float32 CPU tensor (B, C, *roi) and returns a tuple of float32
    numpy arrays (B, C_out, *roi), one per output of the network.
    """

    def __init__(self, predictor: Callable, roi, device="cpu", precision="auto", backend="auto", channels_last=None,
                 windows=None):
        self.device = resolve_device(device)
        self.dtype = resolve_precision(precision, self.device)
        self.roi = tuple(int(r) for r in roi)
        # ``windows``: how many windows the job will run, when known (for ``backend="auto"``).
        self.backend = resolve_backend(backend, predictor, self.device, self.dtype,
                                       None if windows is None else int(windows) * int(np.prod(self.roi)))
        self.predictor = predictor
        # On the CPU oneDNN picks its own layout; on CUDA see CUDA_CHANNELS_LAST.
        if channels_last is None:
            channels_last = self.device.type == "cuda" and CUDA_CHANNELS_LAST
        self.channels_last = bool(channels_last)
        self._compiled = None
        self._request = None
        #: The generators' lean forward (PyTorch fp32 on the CPU, where it was measured to pay).
        self.lean = LEAN_CPU_FP32 and self.backend == "torch" and self.device.type == "cpu" and self.dtype == torch.float32
        #: Whether the windows run a generator's lean heads (said in :attr:`description`).
        self.lean_heads = _holds_generator(predictor) and (self.lean or (self.backend == "openvino" and LEAN_OPENVINO))
        if self.backend == "torch":
            configure_cuda(self.device)
            if self.channels_last and isinstance(predictor, nn.Module):
                predictor.to(memory_format=torch.channels_last_3d)

    @property
    def description(self) -> str:
        return f"{self.backend} {precision_name(self.dtype)} on {self.device}{', lean heads' if self.lean_heads else ''}"

    def predict(self, batch: torch.Tensor) -> tuple:
        if self.backend == "openvino":
            return self._predict_openvino(batch)
        return self._predict_torch(batch)

    def _predict_torch(self, batch: torch.Tensor) -> tuple:
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last_3d)
        with torch.inference_mode(), autocast(self.device, self.dtype), lean_generators(self.predictor, self.lean):
            outs = self.predictor(batch)
        outs = (outs,) if isinstance(outs, torch.Tensor) else outs
        if not isinstance(outs, (tuple, list)) or not all(isinstance(o, torch.Tensor) for o in outs):
            raise TypeError(f"The predictor must return a tensor or a tuple of tensors, not {type(outs).__name__}.")
        return tuple(o.detach().to("cpu", torch.float32).contiguous().numpy() for o in outs)

    def _predict_openvino(self, batch: torch.Tensor) -> tuple:
        if self._compiled is None:
            self._compiled = compiled_openvino_model(self.predictor, int(batch.shape[1]), self.roi, self.dtype)
        if self._request is None:
            self._request = self._compiled.create_infer_request()
        result = self._request.infer({0: np.ascontiguousarray(batch.numpy(), dtype=np.float32)})
        return tuple(np.asarray(result[o], dtype=np.float32).copy() for o in self._compiled.outputs)


#: Compiled OpenVINO models per network, keyed by window shape, precision and the weights' identity.
_OPENVINO_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _weights_key(module: nn.Module) -> tuple:
    # A parameter's _version grows with every in-place change (an optimizer step), so a network
    # trained further after it was compiled is compiled again.
    return tuple((p.data_ptr(), p._version) for p in module.parameters())


def compiled_openvino_model(module: nn.Module, channels: int, roi, dtype: torch.dtype):
    """``module`` traced on a small window, reshaped to (any batch, ``channels``, *roi), compiled for the CPU.

    Kept with the network (weakly) so that later calls with the same window shape, precision and
    weights reuse it.
    """
    ov = _import_openvino()

    key = (channels, tuple(roi), precision_name(dtype), torch.get_num_threads(), LEAN_OPENVINO, _weights_key(module))
    cache = _OPENVINO_CACHE.setdefault(module, {})
    if key in cache:
        return cache[key]
    cache.clear()  # older weights or shapes: free their compiled models
    was_training = module.training
    module.eval()
    try:
        # Tracing runs the network once: a small window (multiple of 4, as the generator needs) is enough.
        example = torch.zeros(1, channels, *[min(int(r), 16) for r in roi])
        with torch.no_grad(), warnings.catch_warnings(), lean_generators(module, LEAN_OPENVINO):
            warnings.simplefilter("ignore")  # the tracer's notes on shape checks, meant for developers
            # Traced here as OpenVINO traces (strict=False) but without torch.jit's checking pass, whose
            # comparison imports torch.distributed.tensor: 0.7 of the 0.95 s OpenVINO took to convert
            # the shipped multitask model (0.24 s so).
            traced = torch.jit.trace(module, example, strict=False, check_trace=False)
            model = ov.convert_model(traced, example_input=example)
        model.reshape([ov.Dimension(-1), channels, *[int(r) for r in roi]])
        config = {"INFERENCE_PRECISION_HINT": "bf16" if dtype == torch.bfloat16 else "f32",
                  "INFERENCE_NUM_THREADS": int(torch.get_num_threads())}
        compiled = ov.Core().compile_model(model, "CPU", config)
    except Exception as exc:  # noqa: BLE001 - any conversion failure becomes one sentence
        raise MicroCTSynthError(f"OpenVINO could not convert the network ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}); use --backend torch.") from None
    finally:
        module.train(was_training)
    cache[key] = compiled
    return compiled


__all__ = ["PRECISIONS", "BACKENDS", "resolve_device", "resolve_precision", "resolve_batch_size", "resolve_backend",
           "cpu_has_native_bf16", "openvino_available", "autocast", "configure_cuda", "WindowPredictor",
           "compiled_openvino_model", "precision_name", "AUTO_OPENVINO_PARAMETERS", "AUTO_OPENVINO_WINDOW_VOXELS",
           "lean_generators"]
