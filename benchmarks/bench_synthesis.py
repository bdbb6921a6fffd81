"""Synthesis throughput and peak memory, ours against MONAI's sliding_window_inference.

For each preset's generator (untrained weights: speed does not depend on them) the same
network, patch size, overlap 0.5 and Gaussian blending run through

* ``ours``: :func:`MicroCTSynthLib.synthesize.sliding_window_synthesis` (image and accumulators
  on the CPU, windows on the device);
* ``monai``: ``monai.inferers.sliding_window_inference`` (``sw_device`` = the device, output on
  the CPU);
* ``ours_pipeline``: the whole :func:`synthesize_on_grid` (slab-wise resampling of a CT,
  normalisation, patches, tissue map), for what a user waits for end to end;

interleaved repeat by repeat, and prints the medians of output voxels per second, the peak
memory one call adds (CPU: peak resident set above the baseline, each in a fresh process;
CUDA: peak allocated) and the ratio ours / MONAI, of wall-clock throughput and of process CPU
time (the steadier of the two when other jobs share the cores).

Then the patch-border seams: a phantom CT is synthesized by a briefly trained ``quick``
generator with the thesis' tiling (overlap 0) and with overlapping patches (overlap 0.5,
constant and Gaussian blending), and :func:`patch_border_jump` compares the mean absolute
difference of neighbouring voxels across patch borders with that inside patches.

    python benchmarks/bench_synthesis.py [--preset all|paper|quick|tiny] [--size N] [--device cpu]
                                         [--repeats 3] [--threads 2] [--json out.json] [--no-seams] [--memory 400]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from MicroCTSynthLib.networks import Generator  # noqa: E402
from MicroCTSynthLib.presets import load_preset  # noqa: E402
from MicroCTSynthLib.synthesize import (  # noqa: E402
    output_grid,
    patch_border_jump,
    patch_starts,
    sliding_window_synthesis,
    synthesize_on_grid,
)
from MicroCTSynthLib.train import build_networks  # noqa: E402
from MicroCTSynthLib.volume import Volume  # noqa: E402

#: Output edge per preset when --size is not given: a few windows per axis, CPU-friendly.
DEFAULT_SIZE = {"tiny": 64, "quick": 96, "paper": 96}
DEFAULT_SIZE_CUDA = {"tiny": 128, "quick": 192, "paper": 192}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakMemory:
    """Peak memory a block adds: CUDA peak allocated, or the CPU's peak resident set of this process.

    On the CPU the kernel's high-water mark (VmHWM) is reset on entry (``/proc/self/clear_refs``)
    and read on exit; each CPU measurement runs in a fresh process
    (:func:`measure_memory_in_child`) so that memory freed by earlier runs and kept by the
    allocator cannot hide part of the peak.
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


class IdentityNormalization:
    """The network's own intensities in and out (the pipeline's cost does not depend on them)."""

    ct_window = (-1.0, 1.0)

    def ct_to_net(self, a):
        return np.clip(a, -1, 1).astype(np.float32)

    def net_to_microct(self, a):
        return np.asarray(a, dtype=np.float32)


def preset_methods(name: str, size: int, device: torch.device):
    """The three ways to synthesize a ``size``³ image with the preset's generator, as callables."""
    preset = load_preset(name)
    patch = int(preset["patch_size"])
    torch.manual_seed(0)
    net = build_networks(preset, "single")[0].to(device).eval()
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, size=(1, size, size, size)).astype(np.float32)
    image_t = torch.from_numpy(image)[None]
    ct = Volume(image[0], (0.1, 0.1, 0.1))

    def ours():
        return sliding_window_synthesis(image, net, patch, overlap=0.5, mode="gaussian", device=device)

    from monai.inferers import sliding_window_inference  # imported before any measurement

    def monai():
        with torch.inference_mode():
            return sliding_window_inference(image_t, patch, 1, net, overlap=0.5, mode="gaussian",
                                            sw_device=device, device=torch.device("cpu"))

    def pipeline():
        return synthesize_on_grid(ct, ct, net, IdentityNormalization(), patch, overlap=0.5, blend="gaussian",
                                  device=device, progress="none")

    return preset, {"ours": ours, "monai": monai, "ours_pipeline": pipeline}


def measure_memory_in_child(name: str, method: str, size: int, device: torch.device, threads: int) -> float:
    """Peak memory (MB) one call of ``method`` adds, measured in a fresh Python process."""
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-memory", name, method, str(size),
           "--device", str(device), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_added_mb"])


def child_memory(name: str, method: str, size: int, device: torch.device) -> None:
    if name.startswith("memory"):
        methods = memory_parts(int(name[len("memory"):]), device)
    else:
        _, methods = preset_methods(name, size, device)
    with PeakMemory(device) as mem:
        methods[method]()
    print(json.dumps({"peak_added_mb": mem.added / 2**20}))


def bench_preset(name: str, size: int, device: torch.device, repeats: int, threads: int) -> dict:
    preset, methods = preset_methods(name, size, device)
    patch = int(preset["patch_size"])
    times = {k: [] for k in methods}
    cpu_times = {k: [] for k in methods}  # process CPU time: steadier than wall time on a shared machine
    outputs = {}
    methods["ours"]()  # warm-up: allocator, cuDNN autotuning, first-call overheads
    for _ in range(repeats):
        for key, fn in methods.items():  # interleaved: drifts of a shared machine hit both alike
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
    difference = float(np.abs(outputs["ours"] - outputs["monai"][0].numpy()).max())
    del outputs
    voxels = size**3
    windows = len(patch_starts(size, patch, 0.5)) ** 3
    row = {"preset": name, "patch_size": patch, "ngf": preset["ngf"], "n_blocks": preset["n_blocks"], "size": size,
           "windows": windows, "device": str(device), "repeats": repeats, "max_abs_difference": difference}
    for key in methods:
        median = statistics.median(times[key])
        if device.type == "cuda":
            with PeakMemory(device) as mem:
                methods[key]()
            peak = mem.added / 2**20
        else:
            peak = measure_memory_in_child(name, key, size, device, threads)
        row[key] = {"seconds": median, "voxels_per_second": voxels / median, "peak_memory_mb": peak,
                    "all_seconds": times[key], "cpu_seconds": statistics.median(cpu_times[key]),
                    "all_cpu_seconds": cpu_times[key]}
    row["ratio_ours_over_monai"] = row["ours"]["voxels_per_second"] / row["monai"]["voxels_per_second"]
    row["cpu_time_ratio_ours_over_monai"] = row["monai"]["cpu_seconds"] / row["ours"]["cpu_seconds"]
    row["ratio_pipeline_over_monai"] = row["ours_pipeline"]["voxels_per_second"] / row["monai"]["voxels_per_second"]
    return row


# -- seams ---------------------------------------------------------------------------------------
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


def briefly_trained_generator(x: np.ndarray, y: np.ndarray, steps: int, patch: int, preset: dict) -> torch.nn.Module:
    """The preset's generator after ``steps`` L1 steps (Adam, the thesis' beta1) on random patches of (x, y)."""
    torch.manual_seed(0)
    net = build_networks(preset, "single")[0]
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.5, 0.999))
    rng = np.random.default_rng(1)
    net.train()
    for _ in range(steps):
        z0, y0, x0 = rng.integers(0, np.asarray(x.shape) - patch + 1)
        box = (slice(z0, z0 + patch), slice(y0, y0 + patch), slice(x0, x0 + patch))
        loss = torch.nn.functional.l1_loss(net(torch.from_numpy(x[box])[None, None]), torch.from_numpy(y[box])[None, None])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


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
            row[f"{part}_peak_added_mb"] = measure_memory_in_child(f"memory{size}", part, 0, device, threads)
        row[f"{part}_seconds"] = time.perf_counter() - t0
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="all", help="paper, quick, tiny or all")
    parser.add_argument("--size", type=int, default=None, help="output edge in voxels (default: per preset)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    parser.add_argument("--seam-steps", type=int, default=150, help="training steps of the seam network")
    parser.add_argument("--no-seams", action="store_true", help="skip the patch-border measurement")
    parser.add_argument("--memory", type=int, default=None, metavar="N",
                        help="also measure the peak memory of a whole N^3 synthesis at the paper's patch size (e.g. 400)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child-memory", nargs=3, metavar=("PRESET", "METHOD", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.child_memory:
        name, method, size = args.child_memory
        child_memory(name, method, int(size), device)
        return 0
    names = ("tiny", "quick", "paper") if args.preset == "all" else tuple(args.preset.split(","))
    sizes = DEFAULT_SIZE_CUDA if device.type == "cuda" else DEFAULT_SIZE
    report = {"device": str(device), "torch": torch.__version__, "threads": args.threads, "presets": []}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    print(f"Synthesis throughput on {report.get('gpu', 'CPU')} ({device}, {args.threads} CPU threads), "
          f"overlap 0.5, Gaussian blending, median of {args.repeats} interleaved repeats")
    print(f"{'preset':7} {'patch':>5} {'size':>5} {'win':>5} | {'ours vox/s':>11} {'MB':>7} | {'MONAI vox/s':>11} {'MB':>7} | "
          f"{'ours/MONAI':>10} {'(CPU time)':>10} | {'pipeline vox/s':>14} {'MB':>7} | {'max|diff|':>9}")
    for name in names:
        row = bench_preset(name, args.size or sizes[name], device, args.repeats, args.threads)
        report["presets"].append(row)
        o, m, p = row["ours"], row["monai"], row["ours_pipeline"]
        print(f"{name:7} {row['patch_size']:>5} {row['size']:>5} {row['windows']:>5} | {o['voxels_per_second']:>11.4g} "
              f"{o['peak_memory_mb']:>7.1f} | {m['voxels_per_second']:>11.4g} {m['peak_memory_mb']:>7.1f} | "
              f"{row['ratio_ours_over_monai']:>10.3f} {row['cpu_time_ratio_ours_over_monai']:>10.3f} | {p['voxels_per_second']:>14.4g} {p['peak_memory_mb']:>7.1f} | "
              f"{row['max_abs_difference']:>9.2g}", flush=True)
    if not args.no_seams:
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
