"""How much memory a training run or a synthesis will take, estimated before anything is allocated.

A preset with 1024³ patches or a checkpoint that says ``ngf`` 2048 would otherwise grow until
the kernel kills the process (or the machine swaps for an hour). :func:`check_memory` compares
the estimate with what the device has free and refuses with both figures.

The estimate counts what dominates: the networks' parameters (built on PyTorch's ``meta``
device, which allocates nothing), for training their gradients and Adam's two moments, and the
activations a patch leaves for the backward pass (the generator's layers at full, half and
quarter resolution, the discriminator's three calls). :data:`ACTIVATION_FACTOR` covers what
the count leaves out (transient gradients, allocator slack); it was set from the peak resident
memory of one training step on the CPU .
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import MicroCTSynthError

#: Measured peak resident memory of a CPU training step over the counted activations: with 2.0
#: the estimate is within 5 % of the measurement at ngf 16-32 and 64³-96³ patches (1010 vs 963 MB,
#: 655 vs 626 MB); small networks have a fixed overhead of some 50 MB on top.
ACTIVATION_FACTOR = 2.0
GB = 1024 ** 3


def parameter_count(network_class, arguments: dict) -> int:
    """Parameters of ``network_class(**arguments)``, counted without allocating them."""
    import torch

    try:
        with torch.device("meta"):
            net = network_class(**arguments)
    except TypeError as exc:
        raise MicroCTSynthError(f"The network arguments {arguments} are not ones this version knows ({exc}).") from None
    return sum(p.numel() for p in net.parameters())


def generator_activations(ngf: int, n_blocks: int, voxels: int, multitask: bool) -> float:
    """Floats a generator's forward pass keeps for backward on a patch of ``voxels`` voxels."""
    full = 2 + 2 + 1          # stem conv + norm, last up-convolution + norm, the head's padded input
    half = 2 * 2 * 2 / 8      # down and up convolution + norm at 2 ngf, 1/8 of the voxels
    quarter = (2 + 8 * n_blocks) * 4 / 64  # 4 ngf at 1/64: the second down step, each block's tensors
    return ngf * voxels * (full + half + quarter) + voxels * (4 + (3 if multitask else 0))


def segmenter_activations(filters: int, levels: int, voxels: float) -> float:
    """Floats a DynUNet's forward pass keeps for backward: per level, encoder and decoder residual
    blocks (two convolutions, norms and activations each, about 12 tensors of the level's width)."""
    return sum(12.0 * filters * 2 ** level * voxels / 8 ** level for level in range(levels)) + 4 * voxels


def discriminator_activations(ndf: int, n_layers: int, voxels: int) -> float:
    """Floats of the three discriminator calls of a training step (features kept for backward)."""
    total, scale = 2.0 * voxels + ndf * voxels / 8, 8   # the input pair; the first stride-2 convolution
    for layer in range(1, n_layers + 1):
        scale = scale * 8 if layer < n_layers else scale  # the last block keeps the resolution
        total += 2 * ndf * min(2 ** layer, 8) * voxels / scale
    return 3 * total


def training_bytes(preset: dict, model: str, n_cases: int = 3) -> float:
    """Peak bytes of one training step of ``preset`` (batch ``batch_size``), data included."""
    from .networks import Discriminator, Generator, Segmenter, segmenter_levels

    p, ngf, ndf = int(preset["patch_size"]), int(preset["ngf"]), int(preset["ndf"])
    voxels = float(p) ** 3 * int(preset.get("batch_size", 1))
    data = n_cases * float(p) ** 3 * 9  # every case padded to at least a patch: CT, micro-CT (float32), labels
    if model == "segmenter":
        args = {"filters": int(preset["segmenter_filters"]), "levels": segmenter_levels(p)}
        params = parameter_count(Segmenter, args)
        return 16.0 * params + 4.0 * ACTIVATION_FACTOR * segmenter_activations(args["filters"], args["levels"], voxels) + data
    g = parameter_count(Generator, {"ngf": ngf, "n_blocks": int(preset["n_blocks"]), "multitask": model == "multi",
                                    "input_skip": bool(preset.get("input_skip", False))})
    d = parameter_count(Discriminator, {"in_channels": 2, "ndf": ndf, "n_layers": int(preset["n_layers_D"])})
    activations = (generator_activations(ngf, int(preset["n_blocks"]), voxels, model == "multi")
                   + discriminator_activations(ndf, int(preset["n_layers_D"]), voxels))
    return 16.0 * (g + d) + 4.0 * ACTIVATION_FACTOR * activations + data


def synthesis_bytes(generator_args: dict, patch_size: int, grid_voxels: float, samples: int = 1,
                    slab_voxels: float | None = None, model: str | None = None) -> float:
    """Peak bytes of a synthesis: the generator and one window's activations (the passes run one
    after another), the slab of blended sums (one channel per pass, 3 more for the tissue head)
    and the output volumes."""
    from .networks import network_class

    segmenter = model == "segmenter"
    params = parameter_count(network_class(model), generator_args)
    ngf, window = int(generator_args.get("ngf", generator_args.get("filters", 64))), float(patch_size) ** 3
    samples = max(int(samples), 1)
    multitask = bool(generator_args.get("multitask", False)) or segmenter
    slab = grid_voxels if slab_voxels is None else min(float(slab_voxels), grid_voxels)
    activations = 4.0 * ACTIVATION_FACTOR * (3 * ngf + 8) * window + 4.0 * samples * window
    blended = 4.0 * slab * (samples + (3 if multitask else 0) + 1)
    outputs = grid_voxels * (4 * 3 + (12 if multitask else 0) + 1)
    return 4.0 * params + activations + blended + outputs


def available_bytes(device=None) -> float | None:
    """Memory free for this process on ``device`` (a torch device or None for the CPU); None if unknown."""
    if device is not None and getattr(device, "type", str(device)).startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    values = [v for v in (_meminfo_available(), _cgroup_available(), _sysconf_total()) if v is not None]
    return min(values) if values else None


def _meminfo_available() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> float | None:
    """What a container's memory limit leaves (cgroup v2), if there is one."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        used = float(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        return float(limit) - used
    except (OSError, ValueError):
        return None


def _sysconf_total() -> float | None:
    if _meminfo_available() is not None:
        return None  # Linux: MemAvailable says more than the total
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(needed: float, what: str, advice: str, device=None) -> None:
    """Refuse ``what`` when its estimate ``needed`` (bytes) exceeds what ``device`` has free."""
    free = available_bytes(device)
    if free is not None and needed > free:
        where = "the GPU" if device is not None and str(device).startswith("cuda") else "this computer"
        raise MicroCTSynthError(f"{what} needs about {needed / GB:.1f} GB of memory but {where} has "
                                f"{free / GB:.1f} GB free; {advice}.")
