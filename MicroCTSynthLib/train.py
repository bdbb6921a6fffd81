"""Training of the thesis' 3D conditional GANs (``microctsynth train``).

The thesis' schedule (pix2pix's, in 3D): batch 1; per iteration one step of the generator G
(Eq. 5, or Eq. 6 for the multitask model) and then one of the discriminator D (Eq. 1); Adam with
beta1 = 0.5, beta2 = 0.999; learning rate 2e-4 for ``n_epochs`` epochs, then linearly down to
exactly 0 over ``n_epochs_decay`` more (one ``LambdaLR`` lambda); a checkpoint every
``checkpoint_every`` epochs and at the end (``last.pt`` and ``epoch_NNN.pt``); the validation
loss (single: weighted L1 + perceptual; multitask: weighted L1 + Dice) every ``validate_every``
epochs and at the end; ``best.pt`` is the epoch with the lowest validation loss (Table 2).

The run folder holds the checkpoints, ``tensorboard/`` (every loss term, the learning rate and
mid-slices of real_A, fake_B, real_B, and for multitask the class maps), ``snapshots/`` (the same
pictures as PNG), ``validation_loss.png`` (the thesis' Fig. 6), ``history.json``, and how the run
was made (as pix2pix's ``opt.txt``): ``preset.json``, the resolved preset, and ``command.txt``, the
command line (or Python call) of each start, one a line.

Determinism: the seed fixes torch, numpy and Python's generators; each epoch's patch order comes
from seed + epoch; checkpoints keep the generators' states, so ``--resume`` continues the very run
(on CPU, 4 epochs straight equal 2 epochs and 2 resumed).

More than one process (``torchrun --nproc_per_node N -m MicroCTSynthLib train ...``, i.e.
``WORLD_SIZE`` > 1): DistributedDataParallel over NCCL (CUDA) or gloo (CPU); each rank trains on
its own patches; rank 0 validates and writes every file.
"""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from .choices import MODEL_TITLES, check_model_kind
from .checkpoint import (check_network_arguments, load_checkpoint, rng_state, save_checkpoint, set_rng_state)
from .data import Normalization, PatchDataset, build_datasets, patch_sampler
from .augment import randomize_ct
from . import inference
from .inference import configure_cuda, cpu_has_native_bf16, resolve_device
from .errors import MicroCTSynthError
from .losses import GANLoss, discriminator_loss, generator_loss, loss_options, segmentation_loss, validation_loss
from .networks import Discriminator, Generator, Segmenter, segmenter_levels
from .dataset import Dataset
from .memory import check_memory, training_bytes
from .presets import load_preset
from .progress import Progress, log, report_result, warn
from .safety import FolderLock
from .volume import atomic_path, write_json

__all__ = ["train", "command_train", "training_step", "lr_lambda", "make_scheduler", "loss_weights", "build_networks",
           "fingerprint", "RunFiles"]

#: What each model's validation loss adds up (Table 2; the segmenter's is its training loss).
VALIDATION_LOSS = {"single": "weighted L1 + perceptual", "multi": "weighted L1 + Dice", "segmenter": "Dice + cross-entropy"}
VALIDATION_TERMS = ("val_loss", "val_L1", "val_perceptual", "val_dice", "val_ce")


# -- the schedule ------------------------------------------------------------------------------
def lr_lambda(n_epochs: int, n_epochs_decay: int):
    """The thesis' learning-rate factor of epoch ``e`` (0-based): 1 for the first ``n_epochs`` epochs,
    then 1 - (e + 1 - n_epochs) / n_epochs_decay, reaching exactly 0 at the last epoch.

    pix2pix divides by ``n_epochs_decay + 1`` and so ends at lr / 101; the thesis decays to 0.
    """
    n_epochs, n_epochs_decay = int(n_epochs), int(n_epochs_decay)

    def factor(epoch: int) -> float:
        if epoch < n_epochs or n_epochs_decay <= 0:
            return 1.0
        return max(0.0, 1.0 - (epoch + 1 - n_epochs) / n_epochs_decay)

    return factor


def make_scheduler(optimizer: torch.optim.Optimizer, n_epochs: int, n_epochs_decay: int):
    """``LambdaLR`` with :func:`lr_lambda`; stepped once per epoch. Its state dict holds plain data only
    (a function lambda is not saved), so it loads with ``weights_only=True``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(n_epochs, n_epochs_decay))


def loss_weights(preset: dict, model: str) -> dict:
    """The lambdas of Eq. 5 (single) or Eq. 6 (multi) from the preset."""
    if model == "single":
        return {"L1": float(preset["lambda_L1_single"]), "perceptual": float(preset["lambda_perceptual_single"])}
    return {"L1": float(preset["lambda_L1_multi"]), "perceptual": float(preset["lambda_perceptual_multi"]),
            "dice": float(preset["lambda_dice_multi"])}


def build_networks(preset: dict, model: str) -> tuple:
    """G and D as the preset describes them (pix2pix initialisation, drawn from torch's generator);
    for ``segmenter`` the DynUNet and no discriminator."""
    if check_model_kind(model) == "segmenter":
        return Segmenter(filters=int(preset["segmenter_filters"]), levels=segmenter_levels(preset["patch_size"])), None
    generator = Generator(in_channels=1, ngf=int(preset["ngf"]), n_blocks=int(preset["n_blocks"]),
                          multitask=model == "multi", dropout=float(preset["dropout"]),
                          input_skip=bool(preset.get("input_skip", False)))
    discriminator = Discriminator(in_channels=2, ndf=int(preset["ndf"]), n_layers=int(preset["n_layers_D"]))
    return generator, discriminator


# -- distributed -----------------------------------------------------------------------------------
class _Distributed:
    """World size, rank and local rank from torchrun's environment; initialises the process group."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.rank = int(os.environ.get("RANK", "0") or 0)
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        self.owned = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def start(self, device: torch.device) -> None:
        if not self.enabled:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self.owned = True

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def gather(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def stop(self) -> None:
        if self.owned and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# -- run folder ----------------------------------------------------------------------------------
class RunFiles:
    """Paths of a run folder."""

    def __init__(self, out):
        self.root = Path(out)
        self.last = self.root / "last.pt"
        self.best = self.root / "best.pt"
        self.history = self.root / "history.json"
        self.curve = self.root / "validation_loss.png"
        self.snapshots = self.root / "snapshots"
        self.tensorboard = self.root / "tensorboard"
        self.preset = self.root / "preset.json"      # the resolved preset of the latest start
        self.command = self.root / "command.txt"     # each command that started or continued the run

    def epoch(self, epoch: int) -> Path:
        return self.root / f"epoch_{epoch:03d}.pt"


def _mid_slices(batch_images: dict) -> dict:
    """Axial mid-slices (H, W) in [0, 1] of each image (1, 1, D, H, W) or class map."""
    out = {}
    for name, value in batch_images.items():
        volume = value[0, 0].detach().float().cpu()
        mid = volume[volume.shape[0] // 2]
        if name in ("fake_tissue", "real_tissue"):
            out[name] = (mid / 3.0).clamp(0, 1).numpy()        # labels 0..3
        else:
            out[name] = ((mid + 1) / 2).clamp(0, 1).numpy()    # network units [-1, 1]
    return out


def _save_snapshot(path: Path, slices: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"real_A": "CT (real_A)", "fake_B": "synthetic micro-CT (fake_B)", "real_B": "micro-CT (real_B)",
             "fake_tissue": "predicted tissue", "real_tissue": "target tissue"}
    fig, axes = plt.subplots(1, len(slices), figsize=(3 * len(slices), 3.3))
    for ax, (name, image) in zip(np.atleast_1d(axes), slices.items()):
        cmap = "viridis" if "tissue" in name else "gray"
        ax.imshow(image, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(names.get(name, name), fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)


def _save_curve(path: Path, history: list[dict], model: str) -> None:
    """The validation loss against the epoch, best epoch marked (the thesis' Fig. 6)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(h["epoch"], h["val_loss"]) for h in history if h.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if points:
        x, y = zip(*points)
        ax.plot(x, y, "o-", label="validation loss")
        best = min(points, key=lambda p: p[1])
        ax.plot([best[0]], [best[1]], "r*", markersize=12, label=f"best: epoch {best[0]}")
        ax.legend()
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation loss ({VALIDATION_LOSS[model]})")
    ax.set_title(f"{MODEL_TITLES[model][0].upper()}{MODEL_TITLES[model][1:]}: validation loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


# -- one iteration -----------------------------------------------------------------------------------
def _set_requires_grad(net: torch.nn.Module, flag: bool) -> None:
    for p in net.parameters():
        p.requires_grad_(flag)


def _split(output, multitask: bool):
    return (output[0], output[1]) if multitask else (output, None)


def training_step(G, D, discriminator, optimizer_G, optimizer_D, real_A, real_B, tissue, gan_loss: GANLoss,
                  weights: dict, multitask: bool, autocast=nullcontext, options: dict | None = None) -> dict[str, float]:
    """One iteration of the thesis: a G step (Eq. 5, or Eq. 6 with the tissue head), then a D step (Eq. 1).

    ``G`` and ``D`` are the networks as trained (DDP-wrapped or not), ``discriminator`` D itself:
    during G's step D is frozen and called directly, so only G's gradients are made (and reduced
    across ranks). D's step sees the same fake, detached. ``options``: the keyword options of the
    loss (:func:`~MicroCTSynthLib.losses.loss_options`). Returns every loss term as a float.
    """
    _set_requires_grad(discriminator, False)
    with autocast():
        fake_B, logits = _split(G(real_A), multitask)
        loss_G, terms_G = generator_loss(discriminator, real_A, fake_B, real_B, tissue, logits,
                                         gan_loss=gan_loss, weights=weights, **(options or {}))
    optimizer_G.zero_grad(set_to_none=True)
    loss_G.backward()
    optimizer_G.step()
    _set_requires_grad(discriminator, True)
    with autocast():
        loss_D, terms_D = discriminator_loss(D, real_A, fake_B, real_B, gan_loss)
    optimizer_D.zero_grad(set_to_none=True)
    loss_D.backward()
    optimizer_D.step()
    return {**terms_G, **terms_D}


def segmenter_step(net, optimizer, real_A, tissue, autocast=nullcontext, options: dict | None = None) -> dict[str, float]:
    """One iteration of the direct segmenter: Dice + cross-entropy (nnU-Net's loss) on the patch."""
    with autocast():
        logits = net(real_A)
    loss, terms = segmentation_loss(logits.float(), tissue, **(options or {}))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {k: float(v.detach()) for k, v in terms.items()}


def fingerprint(*modules: torch.nn.Module) -> list[float]:
    """A few float64 numbers that change with any weight: sum, sum of squares and a position-weighted
    sum of every parameter. Ranks of a distributed run compare them to check they stayed in step."""
    values = []
    for module in modules:
        for p in module.parameters():
            flat = p.detach().double().flatten().cpu()
            ramp = torch.arange(1, flat.numel() + 1, dtype=torch.float64) / flat.numel()
            values += [float(flat.sum()), float((flat * flat).sum()), float((flat * ramp).sum())]
    return values


def _validate(generator, discriminator, dataset: PatchDataset, device, multitask: bool, autocast, options: dict) -> dict:
    """Mean over the validation patches of the thesis' validation loss (dropout off); for the
    segmenter (no ``discriminator``), its training loss."""
    generator.eval()
    totals: dict[str, float] = {}
    with torch.no_grad():
        for i in range(len(dataset)):
            item = dataset[i]
            real_A, real_B = item["real_A"][None].to(device), item["real_B"][None].to(device)
            tissue = item["tissue"][None].to(device)
            with autocast():
                if discriminator is None:
                    total, terms = segmentation_loss(generator(real_A).float(), tissue, **options)
                    terms = {f"val_{k}": float(v) for k, v in terms.items()}
                else:
                    fake_B, logits = _split(generator(real_A), multitask)
                    total, terms = validation_loss(discriminator, real_A, fake_B.float(), real_B, tissue,
                                                   None if logits is None else logits.float(), **options)
            for k, v in {"val_loss": float(total), **terms}.items():
                totals[k] = totals.get(k, 0.0) + v
    generator.train()
    return {k: v / max(len(dataset), 1) for k, v in totals.items()}


def _picture(generator, item: dict, device, multitask: bool, autocast) -> dict:
    """The generator's output on one fixed patch, for TensorBoard and the PNG snapshots."""
    generator.eval()
    with torch.no_grad(), autocast():
        real_A = item["real_A"][None].to(device)
        output = generator(real_A)
    generator.train()
    if isinstance(generator, Segmenter):
        fake_B, logits = None, output
    else:
        fake_B, logits = _split(output, multitask)
    images = {"real_A": real_A, "real_B": item["real_B"][None]}
    if fake_B is not None:
        images["fake_B"] = fake_B
    if logits is not None:
        inside = item["tissue"][None].to(device) > 0
        images["fake_tissue"] = (logits.argmax(1, keepdim=True) + 1) * inside
        images["real_tissue"] = item["tissue"][None]
    return images


def _snapshot_item(train: PatchDataset, val: PatchDataset | None) -> dict:
    """The validation patch with the most field of view (else a training patch): shown every time."""
    source = val if val is not None and len(val) else train
    best = max(range(len(source)), key=source.fov_fraction)
    return source[best]


# -- training ----------------------------------------------------------------------------------------
def train(data_dir, group: str = "A", model: str = "single", preset="quick", out=None, epochs_constant=None,
          epochs_decay=None, device="auto", amp: bool | None = None, resume=None, seed: int = 0, progress="bar",
          overwrite: bool = False, allow_mismatch: bool = False, command: str | None = None) -> Path:
    """Train the single-task (Eq. 5) or multitask (Eq. 6) 3D cGAN on ``group`` of ``data_dir``, or
    (``model="segmenter"``) the direct segmenter on the same patches with Dice + cross-entropy.

    ``preset``: "paper", "quick", "tiny", a JSON path or a dict; ``epochs_constant`` /
    ``epochs_decay`` replace its ``n_epochs`` / ``n_epochs_decay``; ``out``: the run folder
    (default DATA/runs/<group>_<model>); ``resume``: "last" (the run folder's last.pt) or a
    checkpoint path; ``amp``: bf16 autocast (None: the preset's ``cpu_bf16`` on a CPU that computes
    bf16 natively, fp32 on a GPU); ``progress``: "bar", "json" or "none".
    A run folder that holds a run is refused unless ``resume`` or ``overwrite`` (which deletes
    its checkpoints first); a checkpoint of another group or other cases is refused on resume
    unless ``allow_mismatch``. The run folder is locked while the run lasts.
    The run folder says how it was made: ``preset.json``, the resolved preset, and
    ``command.txt``, one line per start: ``command`` (the command line passes its own) or this call.
    Returns the path of ``best.pt``.
    """
    if command is None:
        command = _call(data_dir, group=group, model=model, preset=preset, out=out, epochs_constant=epochs_constant,
                        epochs_decay=epochs_decay, device=device, amp=amp, resume=resume, seed=seed,
                        overwrite=overwrite, allow_mismatch=allow_mismatch)
    check_model_kind(model)
    dist = _Distributed()
    dev = resolve_device(device, dist.local_rank)
    dist.start(dev)
    mode = progress if dist.main else "none"
    preset = _resolve_preset(preset, model, epochs_constant, epochs_decay, dev)
    files = RunFiles(out if out is not None else Path(data_dir) / "runs" / f"{group}_{model}")
    lock = FolderLock(files.root, "run folder", log=lambda m: warn(m, mode)) if dist.main else nullcontext()
    try:
        with lock:
            if dist.main:
                _claim_run_folder(files, resume, overwrite, mode)
            return _Trainer(data_dir, group, model, preset, files, dev, amp, resume, int(seed), mode, dist,
                            allow_mismatch, command).run()
    finally:
        dist.stop()


def _call(data_dir, **options) -> str:
    """This call of :func:`train`, for ``command.txt`` (a preset given as a dict is in ``preset.json``)."""
    shown = [repr(str(data_dir))]
    for key, value in options.items():
        value = "preset.json" if isinstance(value, dict) else str(value) if isinstance(value, Path) else value
        shown.append(f"{key}={value!r}")
    return f"MicroCTSynthLib.train.train({', '.join(shown)})"


def _claim_run_folder(files: "RunFiles", resume, overwrite: bool, mode: str) -> None:
    """Refuse a run folder holding a run unless resumed; ``overwrite`` deletes the old run's files first."""
    old = sorted(files.root.glob("*.pt"))
    if resume or not old:
        return
    if not overwrite:
        raise MicroCTSynthError(
            f"The run folder '{files.root}' already holds a run ({', '.join(p.name for p in old[:3])}"
            f"{', ...' if len(old) > 3 else ''}); continue it with --resume, choose another --out, "
            "or start afresh with --overwrite (which deletes its checkpoints).")
    import shutil

    for path in old + [files.history, files.curve, files.preset, files.command, files.root / "complete.json"]:
        path.unlink(missing_ok=True)
    for folder in (files.snapshots, files.tensorboard):
        shutil.rmtree(folder, ignore_errors=True)
    log(f"--overwrite: deleted the previous run in '{files.root}'.", mode)


def _check_resumed(checkpoint: dict, path, model: str, group: str, cases: dict, allow: bool) -> None:
    """Refuse to resume a checkpoint of another model, group or set of cases (unless ``allow``)."""
    if checkpoint.get("model") != model:
        saved = checkpoint.get("model")
        raise MicroCTSynthError(f"The checkpoint '{path}' holds a {MODEL_TITLES.get(saved, saved)}; "
                                f"resume it with --model {saved}.")
    if allow:
        return
    saved_group, saved_cases = checkpoint.get("group"), checkpoint.get("cases")
    if saved_group is not None and saved_group != group:
        raise MicroCTSynthError(f"The checkpoint '{path}' was trained on group {saved_group}, not {group}: resuming it "
                                f"would train on group {group}'s held-out cases; resume with --group {saved_group} "
                                "(or add --allow-mismatch if this is what you want).")
    if isinstance(saved_cases, dict) and saved_cases != cases:
        raise MicroCTSynthError(f"The checkpoint '{path}' was trained on other cases ({saved_cases}) than group {group} "
                                f"now names ({cases}); resume on the same data (or add --allow-mismatch).")


def _check_finite(terms: dict, iteration: int, epoch: int, files: "RunFiles") -> None:
    """Stop a diverged run: a loss term that is NaN or infinite ends it before anything is saved."""
    bad = [k for k, v in terms.items() if not math.isfinite(v)]
    if bad:
        kept = f"the last good checkpoint '{files.last}' is kept" if files.last.exists() else "no checkpoint was written"
        raise MicroCTSynthError(
            f"Training diverged at iteration {iteration} (epoch {epoch}): the loss term {bad[0]} is "
            f"{terms[bad[0]]}; {kept}; lower the learning rate (preset 'lr') and train again or --resume.")


def _check_weights(networks: dict, epoch: int, files: "RunFiles") -> None:
    """Stop before a checkpoint with non-finite weights is written."""
    for name, net in networks.items():
        for pname, p in net.named_parameters():
            if not torch.isfinite(p).all():
                kept = f"the last good checkpoint '{files.last}' is kept" if files.last.exists() else "no checkpoint was written"
                raise MicroCTSynthError(f"Training diverged in epoch {epoch}: the {name}'s weights {pname} hold NaN or "
                                        f"infinite values; {kept}; lower the learning rate (preset 'lr').")


def _resolve_preset(name, model: str, epochs_constant, epochs_decay, dev) -> dict:
    """The preset with the command line's epochs, checked, and its memory estimate against the device's."""
    preset = load_preset(name)
    if epochs_constant is not None:
        preset["n_epochs"] = int(epochs_constant)
    if epochs_decay is not None:
        preset["n_epochs_decay"] = int(epochs_decay)
    n_epochs, n_decay = int(preset["n_epochs"]), int(preset["n_epochs_decay"])
    if n_epochs < 0 or n_decay < 0 or n_epochs + n_decay < 1:
        raise MicroCTSynthError(f"Training needs at least one epoch (got {n_epochs} constant + {n_decay} decay).")
    check_memory(training_bytes(preset, model), f"Training the {MODEL_TITLES[model]} on {preset['patch_size']}^3 patches "
                 f"with ngf {preset['ngf']}", "use smaller patches (patch_size) or a narrower network (ngf, ndf)", dev)
    return preset


def _resolve_amp(amp, preset: dict, dev: torch.device, mode: str) -> bool:
    """bf16 autocast or not. ``None``: on a CUDA GPU bf16 where it supports it (the paper preset
    trains 1.55x (single-task) and 1.96x (multitask) as fast as in fp32 on an H200, README); on
    a CPU the preset's choice (``cpu_bf16``, measured per preset by ``benchmarks/bench_train.py``)
    where the CPU computes bf16 natively."""
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported() if amp is None else bool(amp)
    native = cpu_has_native_bf16()
    if amp is None:
        return bool(preset.get("cpu_bf16", False)) and native
    if amp and not native:
        warnings.warn("This CPU has no native bf16 (AVX512-BF16 or AMX): --amp would be emulated and slower; "
                      "training in float32.", stacklevel=3)
        log("--amp: this CPU has no native bf16; training in float32.", mode)
        return False
    return bool(amp)


class _Networks:
    """The networks of a run with their optimisers, schedules and losses (the segmenter has no
    discriminator): made as the preset says, restored from a checkpoint, placed on the device."""

    def __init__(self, preset: dict, model: str, patch_size: int):
        n_epochs, n_decay = int(preset["n_epochs"]), int(preset["n_epochs_decay"])
        self.model, self.multitask = model, model == "multi"
        self.generator, self.discriminator = build_networks(preset, model)
        self.gan = self.discriminator is not None
        if self.gan and patch_size < self.discriminator.min_size:
            raise MicroCTSynthError(f"Patches of {patch_size} voxels are too small for the discriminator with "
                                    f"{preset['n_layers_D']} strided layers (at least {self.discriminator.min_size}).")
        lr, beta1 = float(preset["lr"]), float(preset["beta1"])
        # The segmenter: Adam with its usual betas (nnU-Net's own SGD needs 1000 epochs), the same schedule.
        self.optimizer_G = torch.optim.Adam(self.generator.parameters(), lr=lr, betas=(beta1 if self.gan else 0.9, 0.999))
        self.optimizer_D = (torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=(beta1, 0.999))
                            if self.gan else None)
        self.scheduler_G = make_scheduler(self.optimizer_G, n_epochs, n_decay)
        self.scheduler_D = make_scheduler(self.optimizer_D, n_epochs, n_decay) if self.gan else None
        self.gan_loss = GANLoss(preset.get("gan_mode", "vanilla"))
        self.weights = loss_weights(preset, model)
        self.options = loss_options(preset)
        self.G, self.D = self.generator, self.discriminator  # as trained: DDP-wrapped in a distributed run

    @property
    def networks(self) -> dict:
        return {"generator": self.generator, **({"discriminator": self.discriminator} if self.gan else {})}

    @property
    def optimizers(self) -> list:
        return [o for o in (self.optimizer_G, self.optimizer_D) if o is not None]

    @property
    def schedulers(self) -> list:
        return [s for s in (self.scheduler_G, self.scheduler_D) if s is not None]

    def restore(self, checkpoint: dict, path, patch: dict, lr: float, mode: str) -> None:
        """Weights, optimisers and schedules of ``checkpoint`` (refused if its networks or ``patch``
        setting differ); the preset's learning rate where it changed."""
        check_network_arguments(checkpoint["generator_args"], self.generator.arguments, "generator", path)
        check_network_arguments({"patch_size": checkpoint["patch_size"], "downsample": checkpoint.get("downsample", 1)},
                                patch, "patch setting", path)
        self.generator.load_state_dict(checkpoint["generator"])
        self.optimizer_G.load_state_dict(checkpoint["optimizer_G"])
        self.scheduler_G.load_state_dict(checkpoint["scheduler_G"])
        if self.gan:
            check_network_arguments(checkpoint.get("discriminator_args", {}), self.discriminator.arguments,
                                    "discriminator", path)
            self.discriminator.load_state_dict(checkpoint["discriminator"])
            self.optimizer_D.load_state_dict(checkpoint["optimizer_D"])
            self.scheduler_D.load_state_dict(checkpoint["scheduler_D"])
        _apply_new_lr(checkpoint, lr, self.optimizers, self.schedulers, mode)

    def place(self, dev: torch.device, dist: _Distributed) -> None:
        """Networks, loss and optimiser states on ``dev`` in training mode; DDP-wrapped when distributed."""
        for net in self.networks.values():
            net.to(dev).train()
        self.gan_loss.to(dev)
        for optimizer in self.optimizers:
            _optimizer_to(optimizer, dev)
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [dev.index] if dev.type == "cuda" else None
            self.G = DDP(self.generator, device_ids=ids)
            self.D = DDP(self.discriminator, device_ids=ids) if self.gan else None
        if dev.type == "cuda":
            # Every patch has one shape: cuDNN autotunes each convolution once; pinned batches copy
            # to the GPU without blocking. Channels-last 3D only where it pays: the one switch,
            # read when used, that synthesis reads too.
            configure_cuda(dev)
            if inference.CUDA_CHANNELS_LAST:
                for net in self.networks.values():
                    net.to(memory_format=torch.channels_last_3d)

    def step(self, real_A, real_B, tissue, autocast) -> dict[str, float]:
        """One iteration: the thesis' G then D step, or the segmenter's step."""
        if self.gan:
            return training_step(self.G, self.D, self.discriminator, self.optimizer_G, self.optimizer_D, real_A, real_B,
                                 tissue, self.gan_loss, self.weights, self.multitask, autocast, self.options)
        return segmenter_step(self.G, self.optimizer_G, real_A, tissue, autocast, self.options)

    def state(self) -> dict:
        """The networks' part of a checkpoint."""
        gan = self.gan
        return {"model": self.model, "generator": self.generator.state_dict(),
                "discriminator": self.discriminator.state_dict() if gan else None,
                "optimizer_G": self.optimizer_G.state_dict(), "optimizer_D": self.optimizer_D.state_dict() if gan else None,
                "scheduler_G": self.scheduler_G.state_dict(), "scheduler_D": self.scheduler_D.state_dict() if gan else None,
                "generator_args": self.generator.arguments,
                "discriminator_args": self.discriminator.arguments if gan else {}}


class _Trainer:
    """One run of :func:`train` in its parts: made in the order the run needs them (resumed
    checkpoint, data, networks, device, loader), then :meth:`run` trains epoch by epoch; rank 0
    validates, monitors and writes every file."""

    def __init__(self, data_dir, group, model, preset, files, dev, amp, resume, seed, mode, dist: _Distributed,
                 allow_mismatch: bool = False, command: str = ""):
        self.group, self.model, self.preset, self.files, self.dev = group, model, preset, files, dev
        self.seed, self.mode, self.dist, self.command = seed, mode, dist, command
        self.total_epochs = int(preset["n_epochs"]) + int(preset["n_epochs_decay"])
        self.amp = _resolve_amp(amp, preset, dev, mode)
        self.checkpoint = self._checkpoint_to_resume(resume, data_dir, allow_mismatch)
        _seed_everything(seed)
        # A resumed run keeps the normalisation its networks learnt with, even if the cases changed since.
        self.data = build_datasets(data_dir, group, preset, normalization=None if self.checkpoint is None
                                   else Normalization.from_dict(self.checkpoint["normalization"]))
        self.train_set, self.val_set = self.data["train"], self.data["val"]
        if self.data.get("warning") and dist.main:
            warn(self.data["warning"], mode)
        self.nets = _Networks(preset, model, self.train_set.patch_size)
        self.start_epoch, self.history = 0, []
        if self.checkpoint is not None:
            self._resume()
        elif dist.rank > 0:
            # Same initial weights on every rank (DDP broadcasts rank 0's anyway), own dropout noise.
            torch.manual_seed(seed + 1_000_003 * dist.rank)
        self.nets.place(dev, dist)
        self.sampler = patch_sampler(self.train_set, shuffle=True, seed=seed, max_patches=preset.get("max_patches_per_epoch"))
        self.loader = DataLoader(self.train_set, batch_size=int(preset.get("batch_size", 1)), sampler=self.sampler,
                                 num_workers=0, pin_memory=dev.type == "cuda")
        self.steps_per_epoch = len(self.loader)
        self.best_val = min((h["val_loss"] for h in self.history if h.get("val_loss") is not None), default=math.inf)
        self.fingerprints = None
        self.writer = self.snapshot_item = None

    def autocast(self):
        return torch.autocast(self.dev.type, dtype=torch.bfloat16) if self.amp else nullcontext()

    def _checkpoint_to_resume(self, resume, data_dir, allow_mismatch: bool) -> dict | None:
        if not resume:
            return None
        files = self.files
        self.checkpoint_path = path = files.last if str(resume) == "last" else Path(resume)
        if str(resume) == "last" and not path.exists():
            raise MicroCTSynthError(f"There is no run to resume in '{files.root}' (no last.pt); start it without --resume.")
        checkpoint = load_checkpoint(path, map_location="cpu")
        _check_resumed(checkpoint, path, self.model, self.group, Dataset.load(data_dir).group(self.group), allow_mismatch)
        return checkpoint

    def _resume(self) -> None:
        checkpoint, dist = self.checkpoint, self.dist
        patch = {"patch_size": self.train_set.patch_size, "downsample": self.data["downsample"]}
        self.nets.restore(checkpoint, self.checkpoint_path, patch, float(self.preset["lr"]), self.mode)
        self.start_epoch, self.history = int(checkpoint["epoch"]), list(checkpoint.get("history") or [])
        rngs = checkpoint["rng"]
        ranks = rngs.get("ranks") or []
        set_rng_state(ranks[dist.rank] if dist.enabled and len(ranks) == dist.world else rngs)

    def state(self, epoch: int, val: float | None, rngs: list) -> dict:
        """Everything a checkpoint holds after ``epoch``."""
        data = self.data
        return {**self.nets.state(), "epoch": epoch, "rng": {**rngs[0], "ranks": rngs if len(rngs) > 1 else []},
                "normalization": data["normalization"].to_dict(), "preset": self.preset,
                "spacing_mm": list(data["spacing_mm"]), "patch_size": self.train_set.patch_size,
                "downsample": data["downsample"], "val_loss": val, "history": self.history, "group": self.group,
                "cases": data["cases"], "seed": self.seed, "world_size": self.dist.world,
                "rank_fingerprints": self.fingerprints or []}

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> Path:
        if self.dist.main:
            self._start_monitoring()
        bar = Progress(total=(self.total_epochs - self.start_epoch) * self.steps_per_epoch, task="train",
                       mode=self.mode, unit="it")
        try:
            for epoch in range(self.start_epoch, self.total_epochs):
                entry = self._train_epoch(epoch, bar)
                self._end_epoch(entry, bar)
            if (self.dist.main and self.start_epoch >= self.total_epochs and not self.files.best.exists()
                    and self.checkpoint is not None):
                save_checkpoint(self.files.best, self.checkpoint)
        finally:
            bar.close()
            if self.writer is not None:
                self.writer.close()
        return self.files.best

    def _start_monitoring(self) -> None:
        """Rank 0: the run folder and how it was made, TensorBoard, the patch shown every time, what the run is."""
        files, model, group = self.files, self.model, self.group
        files.root.mkdir(parents=True, exist_ok=True)
        write_json(files.preset, self.preset)
        before = files.command.read_text().splitlines() if files.command.exists() else []
        with atomic_path(files.command) as tmp:  # a new file: a hard-linked copy of the run keeps its own
            tmp.write_text("\n".join([*before, self.command]) + "\n")
        self.writer = _summary_writer(files, self.start_epoch * self.steps_per_epoch, self.mode)
        self.snapshot_item = _snapshot_item(self.train_set, self.val_set)
        if self.val_set is None or len(self.val_set) == 0:
            log(f"Group {group} has no validation case: best.pt will be the last epoch.", self.mode)
        log(f"Training the {MODEL_TITLES[model]} on group {group} ({len(self.train_set)} training patches of "
            f"{self.train_set.patch_size}^3, {self.steps_per_epoch} iterations per epoch, epochs "
            f"{self.start_epoch + 1}-{self.total_epochs}) on {self.dev}{' with bf16 autocast' if self.amp else ''}.",
            self.mode)

    def _train_epoch(self, epoch: int, bar: Progress) -> dict:
        """One epoch of iterations; returns its history entry (mean losses, time, no validation yet)."""
        dev, steps = self.dev, self.steps_per_epoch
        self.sampler.set_epoch(epoch)
        epoch_lr = self.nets.optimizer_G.param_groups[0]["lr"]
        patch_spacing = float(min(self.data["spacing_mm"])) * int(self.data["downsample"])
        window_ct = self.data["normalization"].ct_window
        harmonize = self.data["normalization"].ct_harmonize_fwhm_mm
        sums: dict[str, float] = {}
        # Losses since the last progress line: a line reports their mean, not one iteration's.
        window: dict[str, float] = {}
        window_steps = 0
        start = time.monotonic()
        for step, batch in enumerate(self.loader):
            real_A = randomize_ct(batch["real_A"].to(dev, non_blocking=True), self.preset, window_ct, patch_spacing,
                                  harmonize_fwhm_mm=harmonize)
            terms = self.nets.step(real_A, batch["real_B"].to(dev, non_blocking=True),
                                   batch["tissue"].to(dev, non_blocking=True), self.autocast)
            global_step = epoch * steps + step + 1
            _check_finite(terms, global_step, epoch + 1, self.files)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
                window[k] = window.get(k, 0.0) + v
                if self.writer is not None:
                    self.writer.add_scalar(f"loss/{k}", v, global_step)
            window_steps += 1
            end_of_epoch = step + 1 == steps
            if end_of_epoch or bar.due(window_steps):
                bar.update(window_steps, force=end_of_epoch, epoch=epoch + 1, lr=epoch_lr, iterations=window_steps,
                           **{k: round(v / window_steps, 5) for k, v in window.items()})
                window, window_steps = {}, 0
        for scheduler in self.nets.schedulers:
            scheduler.step()
        _check_weights(self.nets.networks, epoch + 1, self.files)
        seconds = time.monotonic() - start
        return {"epoch": epoch + 1, "lr": epoch_lr, **{k: v / max(steps, 1) for k, v in sums.items()},
                "seconds": round(seconds, 3), "seconds_per_iteration": round(seconds / max(steps, 1), 4),
                "val_loss": None}

    def _end_epoch(self, entry: dict, bar: Progress) -> None:
        """Validation, monitoring and history (rank 0), then the checkpoints of the epoch."""
        done = entry["epoch"]
        last_epoch = done == self.total_epochs
        validate = done % max(int(self.preset["validate_every"]), 1) == 0 or last_epoch
        is_best = self._validate_and_monitor(entry, validate, bar) if self.dist.main else False
        if not self.dist.main:
            self.history.append(entry)
        self._save_checkpoints(entry, is_best, last_epoch)

    def _validate_and_monitor(self, entry: dict, validate: bool, bar: Progress) -> bool:
        """Rank 0: the validation loss, TensorBoard, snapshot, curve and history of an epoch; whether it is the best."""
        done, nets, writer = entry["epoch"], self.nets, self.writer
        is_best = False
        if validate and self.val_set is not None and len(self.val_set):
            entry.update(_validate(nets.generator, nets.discriminator, self.val_set, self.dev, nets.multitask,
                                   self.autocast, nets.options))
            is_best = entry["val_loss"] < self.best_val
            self.best_val = min(self.best_val, entry["val_loss"])
        self.history.append(entry)
        # Every TensorBoard series counts iterations, so a resumed run's purge_step cleans them all.
        end_step = done * self.steps_per_epoch
        if writer is not None:
            writer.add_scalar("lr", entry["lr"], end_step)
            writer.add_scalar("epoch", done, end_step)
            for k in VALIDATION_TERMS:
                if entry.get(k) is not None:
                    writer.add_scalar(f"validation/{k}", entry[k], end_step)
        if validate:
            self._pictures(entry, end_step)
        write_json(self.files.history, self.history)
        bar.update(0, force=True, epoch=done, lr=entry["lr"], seconds_per_iteration=entry["seconds_per_iteration"],
                   **{k: entry[k] for k in VALIDATION_TERMS if entry.get(k) is not None})
        if entry["val_loss"] is not None:
            bar.log(f"epoch {done}: validation loss {entry['val_loss']:.4f}" + (" (best so far)" if is_best else ""))
        return is_best

    def _pictures(self, entry: dict, end_step: int) -> None:
        """Mid-slices of the fixed patch (TensorBoard and a PNG) and the validation curve (Fig. 6)."""
        done, nets = entry["epoch"], self.nets
        slices = _mid_slices(_picture(nets.generator, self.snapshot_item, self.dev, nets.multitask, self.autocast))
        if self.writer is not None:
            for name, image in slices.items():
                self.writer.add_image(f"images/{name}", image, end_step, dataformats="HW")
            self.writer.flush()
        title = f"epoch {done}" + (f", validation loss {entry['val_loss']:.4f}" if entry["val_loss"] is not None else "")
        _save_snapshot(self.files.snapshots / f"epoch_{done:03d}.png", slices, title)
        _save_curve(self.files.curve, self.history, self.model)

    def _save_checkpoints(self, entry: dict, is_best: bool, last_epoch: bool) -> None:
        """best.pt, epoch_NNN.pt and last.pt as the preset says (rank 0), every rank's generators kept."""
        files, dist, done = self.files, self.dist, entry["epoch"]
        checkpointing = done % max(int(self.preset["checkpoint_every"]), 1) == 0 or last_epoch
        rngs = dist.gather(rng_state())
        self.fingerprints = (dist.gather(fingerprint(*self.nets.networks.values()))
                             if dist.enabled and checkpointing else None)
        if self.fingerprints is not None and dist.main and any(f != self.fingerprints[0] for f in self.fingerprints):
            log("Warning: the ranks' weights differ; the distributed run lost step.", self.mode)
        if dist.main:
            if is_best:
                save_checkpoint(files.best, self.state(done, entry["val_loss"], rngs))
            if checkpointing:
                current = self.state(done, entry["val_loss"], rngs)
                save_checkpoint(files.epoch(done), current)
                save_checkpoint(files.last, current)
            if last_epoch and not files.best.exists():
                # No validation case (or none ran): the last epoch stands for the best.
                save_checkpoint(files.best, self.state(done, entry["val_loss"], rngs))
        dist.barrier()


def _apply_new_lr(checkpoint: dict, lr: float, optimizers, schedulers, mode: str) -> None:
    """A resumed run takes the preset's learning rate when it differs from the checkpoint's (e.g. lowered
    after a divergence); the schedule's factor stays where the run was."""
    old = float((checkpoint.get("preset") or {}).get("lr", lr))
    if old == lr:
        return
    for optimizer, scheduler in zip(optimizers, schedulers):
        factor = optimizer.param_groups[0]["lr"] / old if old > 0 else 1.0
        scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
        for group in optimizer.param_groups:
            group["initial_lr"] = lr
            group["lr"] = lr * factor
    log(f"Resuming with the learning rate {lr:g} instead of the checkpoint's {old:g}.", mode)


def _optimizer_to(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    for state in optimizer.state.values():
        for k, v in state.items():
            if torch.is_tensor(v) and k != "step":
                state[k] = v.to(device)


def _summary_writer(files: RunFiles, purge_step: int, mode: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra of torch
        log("TensorBoard is not installed: no event files (pip install tensorboard).", mode)
        return None
    # purge_step drops events an interrupted run wrote after the checkpoint it resumes from.
    return SummaryWriter(log_dir=str(files.tensorboard), purge_step=purge_step or None)


# -- command line ------------------------------------------------------------------------------------
def command_train(args) -> int:
    """``microctsynth train``: train and report the paths of ``best.pt`` and ``last.pt``."""
    best = train(args.data, group=args.group, model=args.model, preset=args.preset, out=args.out,
                 epochs_constant=args.epochs_constant, epochs_decay=args.epochs_decay, device=args.device,
                 amp=args.amp, resume=args.resume, seed=args.seed, progress=args.progress,
                 overwrite=args.overwrite, allow_mismatch=args.allow_mismatch, command=args.command_line)
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return 0
    report_result(args.progress, f"Trained: best model {best}",
                  outputs={"best": str(best), "last": str(Path(best).parent / "last.pt")})
    return 0
