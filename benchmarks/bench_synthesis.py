"""Synthesis throughput and peak memory, ours against MONAI's sliding_window_inference, and the times a user waits.

1. **Throughput and memory.** For each preset's generator (untrained weights: speed does not
   depend on them) the same network, patch size, overlap 0.5 and Gaussian blending run through

   * ``ours``: :func:`MicroCTSynthLib.synthesize.sliding_window_synthesis` at its defaults
     (precision, backend and window batch picked automatically, see :mod:`MicroCTSynthLib.inference`);
   * ``monai``: ``monai.inferers.sliding_window_inference`` at its defaults (fp32, one window per call);
   * ``monai_bf16``: the same inside ``torch.autocast(bfloat16)``;
   * ``ours_pipeline``: the whole :func:`synthesize_on_grid` (slab-wise resampling of a CT,
     normalisation, windows, tissue map) at its defaults, for what a user waits for;

   interleaved repeat by repeat. It prints the medians of output voxels per second (wall clock
   and process CPU time, the steadier of the two when other jobs share the cores), the peak
   memory one call adds, and the ratios ours / MONAI. Peak memory is measured in a fresh process
   per method, as the peak resident set a call adds above the process with the network built:
   the first call (everything a new process pays: libraries, kernels, OpenVINO's compilation
   and its planned activation memory) and the second (the network ready, as for the next case
   of a session), with ``MALLOC_MMAP_THRESHOLD_`` set so that memory the first call frees goes
   back to the system and cannot hide part of the second's peak; on CUDA, peak allocated.
2. **Agreement.** The preset's generator briefly trained (L1, Adam) on phantom S3_1 synthesizes
   a region of the phantom's CT with the plain network in PyTorch fp32 (the reference), with the
   generators' lean forward (PyTorch fp32's default on a CPU) and with every other backend and
   precision here: Dice of each tissue class against the reference and the image's mean and
   largest absolute difference, in % of the micro-CT range.
3. **Regions of interest.** End-to-end time (fresh process, everything included: network on the
   CPU, OpenVINO conversion, resampling, tissue map) of a 6 mm region at 37.6 µm (160³ voxels,
   27 windows of 96³) with the paper single-task generator, and at 75.2 µm (80³) with the paper
   multitask generator.
4. **Seams** (``--seams``): patch-border jumps of a briefly trained ``quick`` generator with the
   thesis' tiling and with overlapping windows.

    python benchmarks/bench_synthesis.py [--preset all|paper|quick|tiny] [--size N] [--device cpu]
                                         [--repeats 3] [--threads 2] [--json out.json] [--seams] [--no-roi]
                                         [--no-agreement] [--memory 400]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from MicroCTSynthLib import inference  # noqa: E402
from MicroCTSynthLib.inference import (  # noqa: E402
    WindowPredictor,
    openvino_available,
    resolve_batch_size,
    resolve_device,
)
from MicroCTSynthLib.networks import Generator  # noqa: E402
from MicroCTSynthLib.presets import load_preset  # noqa: E402
from MicroCTSynthLib.synthesize import (  # noqa: E402
    field_of_view,
    output_grid,
    patch_border_jump,
    sliding_window_synthesis,
    synthesize_on_grid,
)
from MicroCTSynthLib.tiling import patch_starts  # noqa: E402
from MicroCTSynthLib.train import build_networks  # noqa: E402
from MicroCTSynthLib.volume import Volume  # noqa: E402

#: Output edge per preset when --size is not given: a few windows per axis, CPU-friendly.
DEFAULT_SIZE = {"tiny": 64, "quick": 96, "paper": 96}
DEFAULT_SIZE_CUDA = {"tiny": 128, "quick": 192, "paper": 192}
METHODS = ("ours", "monai", "monai_bf16", "ours_pipeline")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakMemory:
    """Peak memory a block adds: CUDA peak allocated, or the CPU's peak resident set of this process.

    On the CPU the kernel's high-water mark (VmHWM) is reset on entry (``/proc/self/clear_refs``)
    and read on exit.
    """

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def high_water_mark() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM in /proc/self/status")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak resident set size to the current one
            self.base = rss_bytes()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.added = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.added = self.high_water_mark() - self.base
        return False


class WindowNormalization:
    """Fixed linear maps of the CT window and the micro-CT range to [-1, 1] (data.Normalization's contract)."""

    def __init__(self, ct_window, microct_range):
        self.ct_window, self.microct_range = tuple(ct_window), tuple(microct_range)

    @staticmethod
    def _to(a, lo, hi):
        return np.clip((np.asarray(a, np.float32) - lo) / (hi - lo) * 2 - 1, -1, 1).astype(np.float32)

    def ct_to_net(self, a):
        return self._to(a, *self.ct_window)

    def microct_to_net(self, a):
        return self._to(a, *self.microct_range)

    def net_to_microct(self, a):
        lo, hi = self.microct_range
        return ((np.asarray(a, np.float32) + 1) / 2 * (hi - lo) + lo).astype(np.float32)


def smooth_ct(n: int, spacing=0.3, seed=0) -> Volume:
    """A CT (HU) of smooth random structure, air to bone, ``n``³ voxels: a stand-in whose tissue map Otsu can split."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(np.random.default_rng(seed).normal(size=(n, n, n)), 2.0)
    field = (field - field.mean()) / field.std()
    return Volume((field * 900.0 + 300.0).astype(np.float32), (spacing,) * 3, (0.0, 0.0, 0.0))


def preset_methods(name: str, size: int, device: torch.device):
    """The four ways to synthesize a ``size``³ image with the preset's generator, as callables."""
    preset = load_preset(name)
    patch = int(preset["patch_size"])
    torch.manual_seed(0)
    net = build_networks(preset, "single")[0].to(device).eval()
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, size=(1, size, size, size)).astype(np.float32)
    image_t = torch.from_numpy(image)[None]
    ct = Volume(image[0], (0.1, 0.1, 0.1))
    normalization = WindowNormalization((-1.0, 1.0), (-1.0, 1.0))

    def ours():
        return sliding_window_synthesis(image, net, patch, overlap=0.5, mode="gaussian", device=device)

    from monai.inferers import sliding_window_inference  # imported before any measurement

    def monai():
        with torch.inference_mode():
            return sliding_window_inference(image_t, patch, 1, net, overlap=0.5, mode="gaussian",
                                            sw_device=device, device=torch.device("cpu"))

    def monai_bf16():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            return sliding_window_inference(image_t, patch, 1, net, overlap=0.5, mode="gaussian",
                                            sw_device=device, device=torch.device("cpu"))

    def pipeline():
        return synthesize_on_grid(ct, ct, net, normalization, patch, overlap=0.5, blend="gaussian",
                                  device=device, progress="none")

    return preset, {"ours": ours, "monai": monai, "monai_bf16": monai_bf16, "ours_pipeline": pipeline}


def measure_memory_in_child(name: str, method: str, size: int, device: torch.device, threads: int) -> dict:
    """Setup and peak memory (MB) of ``method``, measured in a fresh Python process."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-memory", name, method, str(size),
           "--device", str(device), "--threads", str(threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_memory(name: str, method: str, size: int, device: torch.device) -> None:
    """Two calls of ``method`` in this fresh process: the first with everything a new process pays
    (libraries, kernels, OpenVINO's compilation), the second with the network ready."""
    if name.startswith("memory"):
        methods = memory_parts(int(name[len("memory"):]), device)
    else:
        _, methods = preset_methods(name, size, device)
    peaks = []
    for _ in range(2):
        gc.collect()
        with PeakMemory(device) as mem:
            out = methods[method]()
        del out
        peaks.append(mem.added / 2**20)
    print(json.dumps({"first_call_mb": peaks[0], "peak_added_mb": peaks[1]}))


def bench_preset(name: str, size: int, device: torch.device, repeats: int, threads: int) -> dict:
    preset, methods = preset_methods(name, size, device)
    patch = int(preset["patch_size"])
    times = {k: [] for k in methods}
    cpu_times = {k: [] for k in methods}  # process CPU time: steadier than wall time on a shared machine
    outputs = {}
    for fn in methods.values():
        fn()  # warm-up: allocator, kernels, OpenVINO compilation (kept with the network), cuDNN autotuning
    for _ in range(repeats):
        for key, fn in methods.items():  # interleaved: drifts of a shared machine hit all alike
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[key].append(time.perf_counter() - t0)
            cpu_times[key].append(time.process_time() - c0)
            outputs[key] = out
            del out
    reference = outputs["monai"][0].numpy()
    ours = outputs["ours"]
    voxels = size**3
    windows = len(patch_starts(size, patch, 0.5)) ** 3
    runner = WindowPredictor(_net_of(methods), (patch,) * 3, device, windows=windows)
    row = {"preset": name, "patch_size": patch, "ngf": preset["ngf"], "n_blocks": preset["n_blocks"], "size": size,
           "windows": windows, "device": str(device), "repeats": repeats, "ours_runs": runner.description,
           "ours_batch": resolve_batch_size("auto", (patch,) * 3, device, runner.backend),
           "max_abs_difference": float(np.abs(ours - reference).max()),
           "mean_abs_difference": float(np.abs(ours - reference).mean()),
           "monai_bf16_mean_abs_difference": float(np.abs(outputs["monai_bf16"][0].numpy() - reference).mean())}
    del outputs
    for key in methods:
        median = statistics.median(times[key])
        if device.type == "cuda":
            with PeakMemory(device) as mem:
                methods[key]()
            memory = {"peak_added_mb": mem.added / 2**20, "first_call_mb": float("nan")}
        else:
            memory = measure_memory_in_child(name, key, size, device, threads)
        row[key] = {"seconds": median, "voxels_per_second": voxels / median, "peak_memory_mb": memory["peak_added_mb"],
                    "first_call_memory_mb": memory["first_call_mb"], "all_seconds": times[key],
                    "cpu_seconds": statistics.median(cpu_times[key]), "all_cpu_seconds": cpu_times[key]}
    for other in ("monai", "monai_bf16"):
        row[f"speed_ours_over_{other}"] = row["ours"]["voxels_per_second"] / row[other]["voxels_per_second"]
        row[f"cpu_speed_ours_over_{other}"] = row[other]["cpu_seconds"] / row["ours"]["cpu_seconds"]
        row[f"memory_ours_over_{other}"] = row["ours"]["peak_memory_mb"] / row[other]["peak_memory_mb"]
        row[f"first_call_memory_ours_over_{other}"] = (row["ours"]["first_call_memory_mb"]
                                                      / row[other]["first_call_memory_mb"])
    row["speed_pipeline_over_monai"] = row["ours_pipeline"]["voxels_per_second"] / row["monai"]["voxels_per_second"]
    return row


def _net_of(methods) -> torch.nn.Module:
    """The network inside the closures of :func:`preset_methods` (for describing how ours ran it)."""
    for cell in methods["ours"].__closure__:
        if isinstance(cell.cell_contents, torch.nn.Module):
            return cell.cell_contents
    raise RuntimeError("no network in the closure")


# -- agreement -------------------------------------------------------------------------------------
def briefly_trained_generator(x: np.ndarray, y: np.ndarray, steps: int, patch: int, preset: dict,
                              multitask: bool = False) -> torch.nn.Module:
    """The preset's generator after ``steps`` L1 steps (Adam, the thesis' beta1) on random patches of (x, y)."""
    torch.manual_seed(0)
    net = build_networks(preset, "multi" if multitask else "single")[0]
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.5, 0.999))
    rng = np.random.default_rng(1)
    net.train()
    for _ in range(steps):
        z0, y0, x0 = rng.integers(0, np.asarray(x.shape) - patch + 1)
        box = (slice(z0, z0 + patch), slice(y0, y0 + patch), slice(x0, x0 + patch))
        out = net(torch.from_numpy(x[box])[None, None])
        out = out[0] if isinstance(out, tuple) else out
        loss = torch.nn.functional.l1_loss(out, torch.from_numpy(y[box])[None, None])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def phantom_pair():
    """Phantom S3_1 (tiny preset's field of view): its CT, the CT on the micro-CT grid, the micro-CT, a normalisation."""
    from MicroCTSynthLib.phantom import ct_on_microct_grid, make_specimen

    specimen = make_specimen("S3_1", "tiny")
    ct_grid = ct_on_microct_grid(specimen)  # the CT registered onto the micro-CT grid, as the thesis trains
    inside = specimen.labels.array > 0
    norm = WindowNormalization(np.percentile(ct_grid.array[inside], [0.5, 99.5]),
                               np.percentile(specimen.microct.array[inside], [0.5, 99.5]))
    return specimen, ct_grid, norm


def combinations(device: torch.device) -> list:
    """(backend, precision, lean) to compare, the reference first: the plain network in PyTorch fp32."""
    combos = [("torch", "fp32", False)]
    if device.type == "cpu":
        combos += [("torch", "fp32", True)]  # the generators' lean forward, the CPU's fp32 default
    combos += [("torch", "bf16", False)]
    if device.type == "cpu" and openvino_available():
        combos += [("openvino", "fp32", False), ("openvino", "bf16", False)]
    return combos


def bench_agreement(name: str, steps: int, device: torch.device) -> dict:
    """Tissue maps and images of every backend and precision against the plain network in PyTorch fp32,
    briefly trained generator."""
    from MicroCTSynthLib.metrics import dice_per_class

    preset = load_preset(name)
    patch = int(preset["patch_size"])
    specimen, ct_grid, norm = phantom_pair()
    train_patch = min(patch, 32)  # the paper's 96³ would take minutes a step; the network is fully convolutional
    t0 = time.perf_counter()
    net = briefly_trained_generator(norm.ct_to_net(ct_grid.array), norm.microct_to_net(specimen.microct.array),
                                    steps, train_patch, preset)
    training_seconds = time.perf_counter() - t0
    # quick: the phantom's micro-CT grid (75.2 µm); paper: 128³ at its 37.6 µm (8 windows of 96³)
    grid = ct_grid if patch <= 32 else output_grid(specimen.ct, 0.0376, roi=(ct_grid.center, 128 * 0.0376))
    fov = field_of_view(specimen.ct, grid)
    results, reference, default_lean = {}, None, inference.LEAN_CPU_FP32
    for backend, precision, lean in combinations(device):
        inference.LEAN_CPU_FP32 = lean
        t0 = time.perf_counter()
        try:
            out = synthesize_on_grid(specimen.ct, grid, net, norm, patch, overlap=0.5, device=device,
                                     precision=precision, backend=backend)
        finally:
            inference.LEAN_CPU_FP32 = default_lean
        seconds = time.perf_counter() - t0
        if reference is None:
            reference = out
        span = float(np.subtract(*norm.microct_range[::-1]))
        diff = np.abs(out.microct.array[fov] - reference.microct.array[fov]) / span * 100
        label = f"{backend} {precision}"
        if (backend, precision) == ("torch", "fp32"):
            label += " lean" if lean else " plain"
        results[label] = {
            "seconds": seconds, "dice": dice_per_class(reference.tissue.array, out.tissue.array),
            "image_mean_abs_percent": float(diff.mean()), "image_max_abs_percent": float(diff.max()),
            "image_p99_abs_percent": float(np.percentile(diff, 99))}
    return {"preset": name, "grid": list(grid.shape), "patch_size": patch, "training_steps": steps,
            "training_patch": train_patch, "training_seconds": training_seconds, "results": results}


# -- regions of interest ---------------------------------------------------------------------------
def roi_run(model: str, spacing: float, size_mm: float, device: torch.device) -> dict:
    """One end-to-end synthesis of a ``size_mm`` region at ``spacing`` with the paper generator (this process)."""
    t0 = time.perf_counter()
    preset = load_preset("paper")
    torch.manual_seed(0)
    net = build_networks(preset, model)[0].eval()
    ct = smooth_ct(int(np.ceil(size_mm / 0.3)) + 6)
    grid = output_grid(ct, spacing, roi=(ct.center, size_mm))
    with PeakMemory(device) as mem:
        result = synthesize_on_grid(ct, grid, net, WindowNormalization((-1000.0, 3000.0), (0.0, 1.0)),
                                    int(preset["patch_size"]), multitask=model == "multi", overlap=0.5, device=device)
    seconds = time.perf_counter() - t0
    roi = (int(preset["patch_size"]),) * 3
    windows = int(np.prod([len(patch_starts(max(n, roi[0]), roi[0], 0.5)) for n in grid.shape]))
    return {"model": model, "spacing_mm": spacing, "size_mm": size_mm, "grid": list(grid.shape),
            "windows": windows, "seconds": seconds, "peak_added_mb": mem.added / 2**20,
            "runs": WindowPredictor(net, roi, device, windows=windows).description,
            "tissue_fractions": [float((result.tissue.array == k).mean()) for k in (1, 2, 3)]}


def bench_roi(device: torch.device, threads: int) -> list:
    rows = []
    for model, spacing in (("single", 0.0376), ("multi", 0.0752)):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child-roi", model, str(spacing), "--device", str(device),
               "--threads", str(threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


# -- seams ---------------------------------------------------------------------------------------
def bench_seams(steps: int, device: torch.device) -> dict:
    """Patch-border jumps of the quick generator on the phantom specimen S3_1 (tiny preset's field of view)."""
    from MicroCTSynthLib.phantom import ct_on_microct_grid, make_specimen

    preset = load_preset("quick")
    patch = int(preset["patch_size"])
    specimen = make_specimen("S3_1", "tiny")
    ct = ct_on_microct_grid(specimen)  # the CT registered onto the micro-CT grid, as the thesis synthesizes
    inside = specimen.labels.array > 0
    norm = WindowNormalization(np.percentile(ct.array[inside], [0.5, 99.5]),
                               np.percentile(specimen.microct.array[inside], [0.5, 99.5]))
    torch.manual_seed(0)
    nets = {"untrained": build_networks(preset, "single")[0].eval()}
    t0 = time.perf_counter()
    nets[f"trained {steps} steps"] = briefly_trained_generator(
        norm.ct_to_net(ct.array), norm.microct_to_net(specimen.microct.array), steps, patch, preset)
    results = {"specimen": "S3_1", "grid": list(ct.shape), "patch_size": patch, "training_steps": steps,
               "training_seconds": time.perf_counter() - t0, "networks": {}}
    for label, net in nets.items():
        rows = {}
        for name, overlap, blend in (("thesis tiling (overlap 0)", 0.0, "constant"),
                                     ("overlap 0.25, gaussian", 0.25, "gaussian"),
                                     ("overlap 0.5, constant", 0.5, "constant"),
                                     ("overlap 0.5, gaussian", 0.5, "gaussian")):
            out = synthesize_on_grid(ct, ct, net, norm, patch, overlap=overlap, blend=blend, device=device)
            a = out.microct.array
            # The same planes for every method (the thesis' tile borders) and each method's own.
            rows[name] = {"at_tiling_borders": patch_border_jump(a, patch, 0.0),
                          "at_own_borders": patch_border_jump(a, patch, overlap)}
        results["networks"][label] = rows
    return results


def memory_parts(size: int, device: torch.device) -> dict:
    """The two parts of a whole ``size``³ synthesis at the paper's patch size, as callables.

    The volume-sized arrays (resampled slabs, accumulators, outputs, tissue map) do not depend on
    the network, so ``pipeline`` runs with a one-convolution stand-in network; ``window`` is the
    paper generator's own peak for one 96³ window. Their sum bounds the real run's peak.
    """
    patch = int(load_preset("paper")["patch_size"])
    ct_n = int(np.ceil(size * 0.0376 / 0.3)) + 2
    rng = np.random.default_rng(0)
    ct = Volume(rng.normal(0, 500, (ct_n,) * 3).astype(np.float32), (0.3,) * 3, (0, 0, 0))
    grid = output_grid(ct, 0.0376, roi=(ct.center, size * 0.0376))

    def pipeline():
        stand_in = torch.nn.Conv3d(1, 1, 3, padding=1).to(device).eval()
        return synthesize_on_grid(ct, grid, stand_in, WindowNormalization((-1000.0, 2000.0), (0.0, 1.0)), patch,
                                  overlap=0.5, device=device)

    def window():
        net = Generator(1, ngf=64, n_blocks=6).to(device).eval()
        with torch.inference_mode():
            return net(torch.zeros(1, 1, patch, patch, patch, device=device))

    return {"pipeline": pipeline, "window": window}


def bench_memory(size: int, device: torch.device, threads: int) -> dict:
    row = {"size": size}
    for part in ("pipeline", "window"):
        t0 = time.perf_counter()
        if device.type == "cuda":
            with PeakMemory(device) as mem:
                memory_parts(size, device)[part]()
            row[f"{part}_peak_added_mb"] = mem.added / 2**20
        else:
            row[f"{part}_peak_added_mb"] = measure_memory_in_child(f"memory{size}", part, 0, device, threads)["peak_added_mb"]
        row[f"{part}_seconds"] = time.perf_counter() - t0
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="all", help="paper, quick, tiny or all (comma-separated)")
    parser.add_argument("--size", type=int, default=None, help="output edge in voxels (default: per preset)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    parser.add_argument("--agreement-steps", type=int, default=60, help="training steps of the agreement network")
    parser.add_argument("--no-agreement", action="store_true", help="skip the backend / precision agreement")
    parser.add_argument("--no-roi", action="store_true", help="skip the region-of-interest times")
    parser.add_argument("--seams", action="store_true", help="also measure the patch-border seams")
    parser.add_argument("--seam-steps", type=int, default=150, help="training steps of the seam network")
    parser.add_argument("--memory", type=int, default=None, metavar="N",
                        help="also measure the peak memory of a whole N^3 synthesis at the paper's patch size (e.g. 400)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child-memory", nargs=3, metavar=("PRESET", "METHOD", "SIZE"), help=argparse.SUPPRESS)
    parser.add_argument("--child-roi", nargs=2, metavar=("MODEL", "SPACING"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.child_memory:
        name, method, size = args.child_memory
        child_memory(name, method, int(size), device)
        return 0
    if args.child_roi:
        print(json.dumps(roi_run(args.child_roi[0], float(args.child_roi[1]), 6.0, device)))
        return 0
    names = ("tiny", "quick", "paper") if args.preset == "all" else tuple(args.preset.split(","))
    sizes = DEFAULT_SIZE_CUDA if device.type == "cuda" else DEFAULT_SIZE
    report = {"device": str(device), "torch": torch.__version__, "threads": args.threads, "presets": []}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    print(f"Synthesis on {report.get('gpu', 'CPU')} ({device}, {args.threads} CPU threads), overlap 0.5, Gaussian "
          f"blending, untrained generators on uniform noise, median of {args.repeats} interleaved repeats; "
          "vox/s = output voxels per second, MB = peak memory a call adds with the network ready (1st: the first call "
          "of a fresh process, libraries, kernels and OpenVINO's compilation included)")
    print(f"{'preset':7} {'patch':>5} {'size':>5} {'win':>4} | {'ours vox/s':>10} {'MB':>6} {'1st':>6} | "
          f"{'MONAI vox/s':>11} {'MB':>6} {'1st':>6} | {'MONAI bf16':>10} {'MB':>6} {'1st':>6} | {'pipeline':>9} {'MB':>6} | "
          "ours runs")
    for name in names:
        row = bench_preset(name, args.size or sizes[name], device, args.repeats, args.threads)
        report["presets"].append(row)
        o, m, b, p = row["ours"], row["monai"], row["monai_bf16"], row["ours_pipeline"]
        print(f"{name:7} {row['patch_size']:>5} {row['size']:>5} {row['windows']:>4} | {o['voxels_per_second']:>10.4g} "
              f"{o['peak_memory_mb']:>6.1f} {o['first_call_memory_mb']:>6.0f} | {m['voxels_per_second']:>11.4g} "
              f"{m['peak_memory_mb']:>6.1f} {m['first_call_memory_mb']:>6.0f} | {b['voxels_per_second']:>10.4g} "
              f"{b['peak_memory_mb']:>6.1f} {b['first_call_memory_mb']:>6.0f} | "
              f"{p['voxels_per_second']:>9.4g} {p['peak_memory_mb']:>6.1f} | {row['ours_runs']}, "
              f"{row['ours_batch']} window(s) per call", flush=True)
    print("\nRatios, ours at its defaults / MONAI (wall-clock throughput, process CPU time, peak memory):")
    for row in report["presets"]:
        print(f"  {row['preset']:6} vs MONAI fp32: speed {row['speed_ours_over_monai']:.2f}x "
              f"(CPU time {row['cpu_speed_ours_over_monai']:.2f}x), memory {row['memory_ours_over_monai']:.2f}x "
              f"(first call {row['first_call_memory_ours_over_monai']:.2f}x);  "
              f"vs MONAI bf16: speed {row['speed_ours_over_monai_bf16']:.2f}x (CPU time "
              f"{row['cpu_speed_ours_over_monai_bf16']:.2f}x), memory {row['memory_ours_over_monai_bf16']:.2f}x "
              f"(first call {row['first_call_memory_ours_over_monai_bf16']:.2f}x);  "
              f"|ours - MONAI fp32| mean {row['mean_abs_difference']:.2g} (MONAI bf16 {row['monai_bf16_mean_abs_difference']:.2g}), "
              f"max {row['max_abs_difference']:.2g} (net units, [-1, 1])", flush=True)
    if not args.no_agreement:
        print("\nAgreement with the plain network in PyTorch fp32, generator trained briefly on phantom S3_1 (Dice air / soft tissue / bone; "
              "image |difference| in % of the micro-CT range, mean / 99th percentile / max):")
        report["agreement"] = []
        for name in names:
            if name == "tiny":
                continue
            agreement = bench_agreement(name, args.agreement_steps, device)
            report["agreement"].append(agreement)
            print(f"  {name} ({agreement['training_steps']} steps on {agreement['training_patch']}^3 patches, "
                  f"grid {agreement['grid']}):")
            for label, r in agreement["results"].items():
                d = r["dice"]
                print(f"    {label:14} Dice {d['Air']:.4f} / {d['Soft tissue']:.4f} / {d['Bone']:.4f}   image "
                      f"{r['image_mean_abs_percent']:.3f} / {r['image_p99_abs_percent']:.3f} / {r['image_max_abs_percent']:.2f} %"
                      f"   ({r['seconds']:.1f} s)", flush=True)
    if not args.no_roi:
        report["roi"] = bench_roi(device, args.threads)
        print("\nA 6 mm region of interest end to end (fresh process: network, conversion, resampling, windows, tissue map):")
        for r in report["roi"]:
            print(f"  paper {r['model']:6}-task at {r['spacing_mm'] * 1000:.1f} um: {r['grid'][0]}^3 voxels, {r['windows']} windows "
                  f"of 96^3: {r['seconds']:.1f} s, +{r['peak_added_mb']:.0f} MB ({r['runs']})", flush=True)
    if args.seams:
        seams = bench_seams(args.seam_steps, device)
        report["seams"] = seams
        print(f"\nPatch-border jump, phantom S3_1 CT on its micro-CT grid {seams['grid']}, quick generator, "
              f"{seams['patch_size']}^3 patches: mean |neighbour difference| across patch borders / inside patches "
              "(micro-CT units) = ratio")
        for label, rows in seams["networks"].items():
            print(f"  {label}:")
            for name, r in rows.items():
                t, own = r["at_tiling_borders"], r["at_own_borders"]
                print(f"    {name:27} tiling borders {t['border']:8.2f} / {t['interior']:8.2f} = {t['ratio']:5.2f}   "
                      f"own borders {own['border']:8.2f} / {own['interior']:8.2f} = {own['ratio']:5.2f}")
    if args.memory:
        mem = bench_memory(args.memory, device, args.threads)
        report["memory"] = mem
        print(f"\nWhole {args.memory}^3 synthesis, 96^3 patches, overlap 0.5: volume arrays +{mem['pipeline_peak_added_mb']:.0f} MB "
              f"(pipeline with a stand-in network, {mem['pipeline_seconds']:.0f} s) + paper generator on one window "
              f"+{mem['window_peak_added_mb']:.0f} MB = {mem['pipeline_peak_added_mb'] + mem['window_peak_added_mb']:.0f} MB "
              "above the process' baseline", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
