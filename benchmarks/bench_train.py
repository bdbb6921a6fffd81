"""Seconds per training iteration (one G step + one D step, batch 1) and peak memory, per preset.

Each preset runs in a fresh process (so peak memory is that preset's alone): its generator and
discriminator are built as ``train`` builds them, random patches of the preset's size stand in
for data (speed does not depend on the values), ``--warmup`` iterations are discarded and the
next ``--iterations`` are timed with :func:`MicroCTSynthLib.train.training_step`, the very step
training runs. Peak memory: CPU, the process' peak resident set (``resource.getrusage``) and its
rise above the resident set before the networks were built; CUDA,
``torch.cuda.max_memory_allocated``. Also the validation cost per patch (G forward + the
validation loss, no gradient).

    python benchmarks/bench_train.py [--preset all|paper|quick|tiny] [--model single|multi]
                                     [--device auto|cpu|cuda] [--amp] [--iterations 3] [--warmup 1]
                                     [--channels-last auto|on|off] [--threads N] [--set key=value ...]
                                     [--json out.json|-]

The paper preset at 96^3 on a CPU takes several seconds per iteration: the defaults time 3
iterations after 1 warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PRESETS = ("tiny", "quick", "pretrained", "paper")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def measure(preset_name: str, model: str, device: str, amp: bool, iterations: int, warmup: int,
            overrides: dict, channels_last: bool = False) -> dict:
    """Time ``iterations`` training steps of one preset in this process."""
    import torch

    from MicroCTSynthLib.losses import GANLoss, validation_loss
    from MicroCTSynthLib.presets import load_preset
    from MicroCTSynthLib.inference import resolve_device
    from MicroCTSynthLib.train import build_networks, loss_weights, training_step

    preset = {**load_preset(preset_name), **overrides}
    dev = resolve_device(device)
    if amp and dev.type != "cuda":
        from MicroCTSynthLib.inference import cpu_has_native_bf16

        amp = cpu_has_native_bf16()  # emulated bf16 is only slower: not measured
    baseline_rss = _rss_bytes()
    torch.manual_seed(0)
    generator, discriminator = build_networks(preset, model)
    generator.to(dev).train()
    discriminator.to(dev).train()
    if dev.type == "cuda":  # as train() runs on a GPU: cuDNN autotuning, channels-last 3D if asked
        from MicroCTSynthLib.inference import configure_cuda

        configure_cuda(dev)
        if channels_last:
            generator.to(memory_format=torch.channels_last_3d)
            discriminator.to(memory_format=torch.channels_last_3d)
    gan = GANLoss(preset["gan_mode"]).to(dev)
    weights = loss_weights(preset, model)
    lr = float(preset["lr"])
    opt_G = torch.optim.Adam(generator.parameters(), lr=lr, betas=(float(preset["beta1"]), 0.999))
    opt_D = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=(float(preset["beta1"]), 0.999))
    n = int(preset["patch_size"])
    shape = (int(preset.get("batch_size", 1)), 1, n, n, n)
    real_A = torch.rand(shape, device=dev) * 2 - 1
    real_B = torch.rand(shape, device=dev) * 2 - 1
    tissue = torch.randint(1, 4, shape, device=dev)

    def autocast():
        return torch.autocast(dev.type, dtype=torch.bfloat16) if amp else torch.autocast("cpu", enabled=False)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times, cpu_times = [], []
    for i in range(warmup + iterations):
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        training_step(generator, discriminator, discriminator, opt_G, opt_D, real_A, real_B, tissue, gan, weights,
                      model == "multi", autocast)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    # Validation: G forward and the thesis' validation loss, dropout off, no gradient.
    generator.eval()
    val_times = []
    with torch.no_grad():
        for i in range(1 + max(iterations, 1)):
            sync()
            start = time.perf_counter()
            with autocast():
                out = generator(real_A)
                fake, logits = (out if model == "multi" else (out, None))
                validation_loss(discriminator, real_A, fake.float(), real_B, tissue,
                                None if logits is None else logits.float())
            sync()
            if i:
                val_times.append(time.perf_counter() - start)
    row = {"preset": preset_name, "model": model, "device": str(dev), "amp": amp, "patch_size": n,
           "channels_last": bool(channels_last and dev.type == "cuda"),
           "ngf": preset["ngf"], "n_blocks": preset["n_blocks"], "ndf": preset["ndf"], "n_layers_D": preset["n_layers_D"],
           "threads": torch.get_num_threads() if dev.type == "cpu" else None,
           "generator_parameters": sum(p.numel() for p in generator.parameters()),
           "iterations": iterations, "seconds_per_iteration": statistics.median(times),
           "seconds_per_iteration_all": [round(t, 4) for t in times],
           "cpu_seconds_per_iteration": statistics.median(cpu_times),
           "validation_seconds_per_patch": statistics.median(val_times)}
    if dev.type == "cuda":
        row["peak_memory_mib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
        row["gpu"] = torch.cuda.get_device_name(dev)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # kB on Linux
        row["peak_rss_mib"] = peak / 2 ** 20
        row["peak_memory_mib"] = max(peak - baseline_rss, 0) / 2 ** 20     # what the networks and one step add
    if overrides:
        row["overrides"] = overrides
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="all", choices=("all",) + PRESETS)
    parser.add_argument("--model", default="single", choices=("single", "multi"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action="store_true",
                        help="bf16 autocast (CUDA, or a CPU with native bf16: AVX512-BF16 or AMX)")
    parser.add_argument("--compare-bf16", action="store_true",
                        help="time each preset in fp32 and under bf16 autocast, side by side, and print the ratio "
                             "beside the preset's cpu_bf16 choice")
    parser.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                        help="CUDA: channels-last 3D networks and patches (auto: as train runs, CUDA_CHANNELS_LAST)")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a preset key, e.g. --set patch_size=24 (repeatable)")
    parser.add_argument("--json", help="write the rows as JSON to this file ('-' = stdout)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = _value(value)

    if args.child:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        from MicroCTSynthLib.inference import CUDA_CHANNELS_LAST

        channels_last = CUDA_CHANNELS_LAST if args.channels_last == "auto" else args.channels_last == "on"
        row = measure(args.preset, args.model, args.device, args.amp, args.iterations, args.warmup, overrides,
                      channels_last=channels_last)
        print(json.dumps(row))
        return 0

    rows = []
    runs = [(p, amp) for p in (PRESETS if args.preset == "all" else (args.preset,))
            for amp in ((False, True) if args.compare_bf16 else (args.amp,))]
    for preset, amp in runs:
        cmd = [sys.executable, __file__, "--child", "--preset", preset, "--model", args.model, "--device", args.device,
               "--iterations", str(args.iterations), "--warmup", str(args.warmup)]
        cmd += ["--amp"] if amp else []
        cmd += ["--channels-last", args.channels_last]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        for item in args.set:
            cmd += ["--set", item]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        if args.json != "-":
            print(f"{row['preset']:>6} {row['model']:>6} {row['device']:>7} amp={str(row['amp']):<5} "
                  f"{'channels-last ' if row['channels_last'] else ''}"
                  f"patch {row['patch_size']:>3}^3 ngf {row['ngf']:>2}: {row['seconds_per_iteration']:8.3f} s/iteration "
                  f"(G + D), validation {row['validation_seconds_per_patch']:.3f} s/patch, "
                  f"peak memory {row['peak_memory_mib']:8.1f} MiB"
                  + (f" (process peak RSS {row['peak_rss_mib']:.0f} MiB, {row['threads']} thread(s))" if "peak_rss_mib" in row else ""),
                  flush=True)
    if args.compare_bf16 and args.json != "-":
        from MicroCTSynthLib.presets import load_preset

        for preset in dict.fromkeys(r["preset"] for r in rows):
            fp32 = next(r for r in rows if r["preset"] == preset and not r["amp"])
            bf16 = next((r for r in rows if r["preset"] == preset and r["amp"]), None)
            if bf16 is None:
                print(f"{preset:>6}: no native bf16 on this device, fp32 only")
                continue
            speed = fp32["seconds_per_iteration"] / bf16["seconds_per_iteration"]
            print(f"{preset:>6}: bf16 autocast trains {speed:.2f}x as fast as fp32; the preset's cpu_bf16 is "
                  f"{str(load_preset(preset).get('cpu_bf16', False)).lower()}")
    if args.json == "-":
        print(json.dumps(rows, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
