"""How windows run: device, precision, batch and backend choices, their agreement with fp32 PyTorch, window skipping."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

from MicroCTSynthLib import inference, networks
from MicroCTSynthLib.data import Normalization
from MicroCTSynthLib.errors import MicroCTSynthError
from MicroCTSynthLib.inference import (
    WindowPredictor,
    configure_cuda,
    resolve_backend,
    resolve_batch_size,
    resolve_device,
    resolve_precision,
)
from MicroCTSynthLib.labels import AIR, BONE, OUTSIDE, SOFT_TISSUE
from MicroCTSynthLib.metrics import dice_per_class
from MicroCTSynthLib.networks import Generator
from MicroCTSynthLib.synthesize import (
    field_of_view,
    output_grid,
    sliding_window_synthesis,
    synthesize_on_grid,
)
from MicroCTSynthLib.tiling import patch_starts
from MicroCTSynthLib.volume import Volume

torch.set_num_threads(2)

HAS_OPENVINO = inference.openvino_available()
COMBINATIONS = [("torch", "fp32"), ("torch", "bf16"), ("openvino", "fp32"), ("openvino", "bf16")]


def LinearNormalization():
    """The engine's normalization with the CT window and a [0, 1] micro-CT range."""
    return Normalization(ct_window=(-1000.0, 3000.0), microct_range=(0.0, 1.0))


# -- choices ---------------------------------------------------------------------------------------
def test_device_selection(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(MicroCTSynthError, match="no CUDA GPU"):
        resolve_device("cuda")
    for bad in ("tpu", "gpu0", "mps"):
        with pytest.raises(MicroCTSynthError, match="Unknown device"):
            resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    # A process of a distributed run takes its own GPU; an explicit index stays as asked.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", local_rank=3) == resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda:0", local_rank=1) == torch.device("cuda", 0)


def test_precision_follows_the_hardware(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("fp32", cpu) == torch.float32 and resolve_precision("float32", cuda) == torch.float32
    assert resolve_precision("bf16", cpu) == torch.bfloat16 and resolve_precision("BF16", cuda) == torch.bfloat16
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", cpu) == torch.float32  # emulated bf16 would be slower than fp32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision(None, cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", cuda) == torch.float32  # e.g. a pre-Ampere GPU
    with pytest.raises(MicroCTSynthError, match="precision"):
        resolve_precision("fp8", cpu)


def test_batch_size_by_window_and_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_batch_size("auto", (96,) * 3, cpu) == 1
    assert resolve_batch_size("auto", (24,) * 3, cpu) == 9
    assert resolve_batch_size(None, (16,) * 3, cpu) == 32
    assert resolve_batch_size("auto", (96,) * 3, cuda) == 4
    assert resolve_batch_size("3", (96,) * 3, cpu) == 3
    assert resolve_batch_size("auto", (24,) * 3, cpu, "openvino") == 1
    assert resolve_batch_size("4", (24,) * 3, cpu, "openvino") == 4
    for bad in (0, -2, "many"):
        with pytest.raises(MicroCTSynthError, match="batch size"):
            resolve_batch_size(bad, (16,) * 3, cpu)


def test_backend_choice(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    net = Generator(1, ngf=4, n_blocks=1).eval()
    assert resolve_backend("auto", net, cuda) == "torch"
    assert resolve_backend("auto", lambda x: x, cpu) == "torch"  # a plain function cannot be converted
    assert resolve_backend("torch", net, cpu) == "torch"
    net.train()  # dropout on: stochastic passes, which only PyTorch runs
    assert resolve_backend("auto", net, cpu) == "torch"
    monkeypatch.setattr(inference, "openvino_available", lambda: True)
    with pytest.raises(MicroCTSynthError, match="dropout"):
        resolve_backend("openvino", net, cpu)
    net.eval()
    assert resolve_backend("auto", net, cpu) == "torch"  # too small to repay OpenVINO's conversion
    # ... unless PyTorch would run it in fp32 over enough windows to repay it
    enough = inference.AUTO_OPENVINO_WINDOW_VOXELS
    assert resolve_backend("auto", net, cpu, torch.float32, enough - 1) == "torch"
    assert resolve_backend("auto", net, cpu, torch.float32, enough) == "openvino"
    assert resolve_backend("auto", net, cpu, torch.bfloat16, enough) == "torch"  # native bf16: PyTorch was faster
    assert resolve_backend("auto", net, cuda, torch.float32, enough) == "torch"
    assert resolve_backend("auto", nn.Conv3d(1, 1, 3), cpu, torch.float32, enough) == "openvino"  # any network
    net.train()
    assert resolve_backend("auto", net, cpu, torch.float32, enough) == "torch"
    net.eval()
    monkeypatch.setattr(inference, "AUTO_OPENVINO_PARAMETERS", sum(p.numel() for p in net.parameters()))
    assert resolve_backend("auto", net, cpu) == "openvino"
    with pytest.raises(MicroCTSynthError, match="CPU"):
        resolve_backend("openvino", net, cuda)
    with pytest.raises(MicroCTSynthError, match="plain function"):
        resolve_backend("openvino", lambda x: x, cpu)
    monkeypatch.setattr(inference, "openvino_available", lambda: False)
    assert resolve_backend("auto", net, cpu) == "torch"
    assert resolve_backend("auto", net, cpu, torch.float32, enough) == "torch"
    with pytest.raises(MicroCTSynthError, match="pip install openvino"):
        resolve_backend("openvino", net, cpu)
    with pytest.raises(MicroCTSynthError, match="backend"):
        resolve_backend("tensorrt", net, cpu)


def test_lean_forward_for_pytorch_fp32_on_the_cpu(monkeypatch):
    """PyTorch fp32 on a CPU runs every generator inside the predictor the lean way, during the call only."""
    net = Generator(1, ngf=4, n_blocks=1).eval()
    calls = []
    plain_lean = Generator._forward_lean
    monkeypatch.setattr(Generator, "_forward_lean", lambda self, x: calls.append(self) or plain_lean(self, x))
    wrapper = nn.Sequential(net)  # as synthesis wraps it (stochastic passes, outputs packed)
    runner = WindowPredictor(wrapper, (16,) * 3, "cpu", "fp32", "torch")
    assert runner.lean and "lean" in runner.description
    runner.predict(torch.rand(2, 1, 16, 16, 16))
    assert calls == [net] and net.lean is False  # turned on for the call, off again after
    assert not WindowPredictor(wrapper, (16,) * 3, "cpu", "bf16", "torch").lean  # bf16 runs the plain network
    assert WindowPredictor(nn.Conv3d(1, 1, 3), (16,) * 3, "cpu", "fp32", "torch").description == "torch fp32 on cpu"
    monkeypatch.setattr(inference, "LEAN_CPU_FP32", False)
    assert not WindowPredictor(wrapper, (16,) * 3, "cpu", "fp32", "torch").lean


def test_cuda_settings_without_a_gpu(monkeypatch):
    """The GPU path's choices (cuDNN autotuning, channels-last) are made before any CUDA call."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    configure_cuda(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    configure_cuda(torch.device("cuda"))
    assert torch.backends.cudnn.benchmark is True
    runner = WindowPredictor(Generator(1, ngf=4, n_blocks=1).eval(), (16,) * 3, "cpu", "fp32", "torch")
    assert not runner.channels_last and runner.description == "torch fp32 on cpu, lean heads"


# -- every backend and precision against fp32 PyTorch on a trained tiny model ---------------------
def _tissue_scene(seed=0, n=40, spacing=0.0752):
    """A CT (HU) and its micro-CT (0 air, 0.45 soft tissue, 1 bone) of smooth random anatomy, on one grid."""
    rng = np.random.default_rng(seed)
    field = gaussian_filter(rng.normal(size=(n, n, n)), 3.0)
    field = (field - field.mean()) / field.std()
    labels = np.digitize(field, [-0.4, 0.5]).astype(np.uint8) + AIR  # air, soft tissue, bone
    microct = np.choose(labels - AIR, [0.0, 0.45, 1.0]).astype(np.float32)
    hu = np.choose(labels - AIR, [-950.0, 40.0, 1600.0]).astype(np.float32)
    hu = gaussian_filter(hu, 1.2) + rng.normal(0, 30, hu.shape).astype(np.float32)
    ct = Volume(hu.astype(np.float32), (spacing,) * 3, (0.0, 0.0, 0.0))
    return ct, microct, labels


@pytest.fixture(scope="module")
def trained_tiny():
    """The tiny preset's single- and multitask generators after 120 steps on the scene."""
    ct, microct, labels = _tissue_scene()
    norm = LinearNormalization()
    x, y = norm.ct_to_net(ct.array), norm.microct_to_net(microct)
    nets = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 16³ patches: one thread is as fast, and steady on a busy machine
    for multitask in (False, True):
        torch.manual_seed(0)
        net = Generator(1, ngf=4, n_blocks=1, multitask=multitask, input_skip=True)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3, betas=(0.5, 0.999))
        rng = np.random.default_rng(1)
        for _ in range(120):
            z0, y0, x0 = rng.integers(0, 40 - 16 + 1, size=3)
            box = (slice(z0, z0 + 16), slice(y0, y0 + 16), slice(x0, x0 + 16))
            out = net(torch.from_numpy(x[box])[None, None])
            image, logits = out if multitask else (out, None)
            loss = nn.functional.l1_loss(image, torch.from_numpy(y[box])[None, None])
            if multitask:
                loss = loss + nn.functional.cross_entropy(logits, torch.from_numpy(labels[box].astype(np.int64) - AIR)[None])
            opt.zero_grad()
            loss.backward()
            opt.step()
        nets[multitask] = net.eval()
    torch.set_num_threads(threads)
    return ct, norm, nets


@pytest.mark.parametrize("multitask", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize("backend,precision", COMBINATIONS, ids=[f"{b}-{p}" for b, p in COMBINATIONS])
def test_shortcuts_agree_with_fp32_pytorch(monkeypatch, trained_tiny, backend, precision, multitask):
    """Tissue maps within Dice 0.99 per class and the image within 1 % of the micro-CT range on average
    (3 % at the 99th percentile) of the plain network in PyTorch fp32, for every backend and precision
    (PyTorch fp32 itself runs the generators' lean forward)."""
    if backend == "openvino" and not HAS_OPENVINO:
        pytest.skip("openvino is not installed (pip install openvino)")
    ct, norm, nets = trained_tiny
    net = nets[multitask]
    with monkeypatch.context() as plain:
        plain.setattr(inference, "LEAN_CPU_FP32", False)
        reference = synthesize_on_grid(ct, ct, net, norm, 16, multitask=multitask, precision="fp32", backend="torch")
    # the reference is a real tissue map, not one class everywhere
    assert min((reference.tissue.array == k).mean() for k in (AIR, SOFT_TISSUE, BONE)) > 0.1
    fast = synthesize_on_grid(ct, ct, net, norm, 16, multitask=multitask, precision=precision, backend=backend)
    for name, score in dice_per_class(reference.tissue.array, fast.tissue.array).items():
        assert score >= 0.99, (name, score)
    difference = np.abs(fast.microct.array - reference.microct.array)  # micro-CT range is [0, 1]
    assert difference.mean() <= 0.01 and np.percentile(difference, 99) <= 0.03, (difference.mean(), difference.max())
    assert fast.tissue.array.dtype == np.uint8
    if (backend, precision) == ("torch", "fp32"):  # the lean forward: the same function to float rounding
        assert difference.max() <= 1e-4, difference.max()


def test_defaults_agree_with_fp32_pytorch(monkeypatch, trained_tiny):
    ct, norm, nets = trained_tiny
    with monkeypatch.context() as plain:
        plain.setattr(inference, "LEAN_CPU_FP32", False)
        reference = synthesize_on_grid(ct, ct, nets[False], norm, 16, precision="fp32", backend="torch")
    default = synthesize_on_grid(ct, ct, nets[False], norm, 16)
    assert min(dice_per_class(reference.tissue.array, default.tissue.array).values()) >= 0.99


def test_the_backend_is_chosen_knowing_the_windows_to_run(monkeypatch, trained_tiny):
    """Both synthesis paths tell ``backend="auto"`` how many window voxels the job holds."""
    ct, norm, nets = trained_tiny
    seen = []
    choose = inference.resolve_backend
    monkeypatch.setattr(inference, "resolve_backend", lambda *a: seen.append(a[4]) or choose(*a))
    synthesize_on_grid(ct, ct, nets[False], norm, 16, overlap=0.5)  # 40³: windows every 8 voxels, 4 per axis
    sliding_window_synthesis(np.zeros((1, 24, 24, 40), np.float32), nets[False], 16, overlap=0.5)
    assert seen == [4**3 * 16**3, 2 * 2 * 4 * 16**3]


def test_openvino_sends_no_usage_statistics(tmp_path):
    """Converting a network leaves OpenVINO's telemetry package unimported: no process is forked to
    send usage statistics and no client id is written to the home folder (a fresh interpreter,
    since this one may have imported OpenVINO already)."""
    if not HAS_OPENVINO:
        pytest.skip("openvino is not installed")
    script = (
        "import multiprocessing, sys, torch\n"
        "from MicroCTSynthLib import inference\n"
        "from MicroCTSynthLib.networks import Generator\n"
        "inference.compiled_openvino_model(Generator(1, ngf=4, n_blocks=1).eval(), 1, (16,) * 3, torch.float32)\n"
        "print(sys.modules['openvino_telemetry'], len(multiprocessing.active_children()))\n")
    env = {**os.environ, "HOME": str(tmp_path), "USERPROFILE": str(tmp_path)}
    env.pop("CI", None)  # OpenVINO's telemetry stays silent in CI jobs on its own
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "0"]
    assert not any(tmp_path.iterdir())  # no ~/intel/openvino_ga_cid


def test_openvino_runs_the_segmenter_as_pytorch():
    """The direct segmenter (MONAI's DynUNet), which ``auto`` may run with OpenVINO too: its logits
    as PyTorch's to float rounding."""
    if not HAS_OPENVINO:
        pytest.skip("openvino is not installed")
    torch.manual_seed(0)
    net = networks.Segmenter(filters=4, levels=3).eval()
    x = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    ours = WindowPredictor(net, (16,) * 3, "cpu", "fp32", "openvino").predict(x)[0]
    with torch.no_grad():
        np.testing.assert_allclose(ours, net(x).numpy(), atol=1e-4)


def test_openvino_model_is_compiled_once_per_weights(trained_tiny):
    if not HAS_OPENVINO:
        pytest.skip("openvino is not installed")
    ct, norm, nets = trained_tiny
    net = Generator(1, ngf=4, n_blocks=1).eval()
    first = inference.compiled_openvino_model(net, 1, (16,) * 3, torch.float32)
    assert inference.compiled_openvino_model(net, 1, (16,) * 3, torch.float32) is first
    with torch.no_grad():
        net.image_head[1].bias.add_(0.5)  # weights changed in place (as an optimizer step does): compile again
    again = inference.compiled_openvino_model(net, 1, (16,) * 3, torch.float32)
    assert again is not first
    x = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    ours = WindowPredictor(net, (16,) * 3, "cpu", "fp32", "openvino").predict(x)[0]
    with torch.no_grad():
        np.testing.assert_allclose(ours, net(x).numpy(), atol=1e-4)


@pytest.mark.parametrize("head_channels", [16, 2], ids=["one-group", "groups"])
def test_openvino_runs_the_lean_heads_on_windows_larger_than_the_trace(monkeypatch, head_channels):
    """The lean forward traced on a 16³ window and reshaped to another window gives the plain network's
    outputs, also where PyTorch would take the heads' 5 input channels a few at a time (the paper
    generator's 65 go 16 at a time; in-place sums into slices of the output were mis-converted)."""
    if not HAS_OPENVINO:
        pytest.skip("openvino is not installed")
    monkeypatch.setattr(networks, "LEAN_HEAD_CHANNELS", head_channels)
    traced = []
    lean_forward = Generator._forward_lean
    monkeypatch.setattr(Generator, "_forward_lean", lambda self, x: traced.append(x.shape) or lean_forward(self, x))
    torch.manual_seed(0)
    net = Generator(1, ngf=4, n_blocks=1, multitask=True, input_skip=True).eval()
    for p in net.parameters():
        nn.init.normal_(p, 0.0, 0.2)
    roi = (24, 32, 20)
    x = torch.rand(2, 1, *roi) * 2 - 1
    image, logits = WindowPredictor(net, roi, "cpu", "fp32", "openvino").predict(x)
    assert traced and traced[0][2:] == (16, 16, 16)  # what OpenVINO converted was the lean forward
    with torch.no_grad():
        plain_image, plain_logits = net(x)
    np.testing.assert_allclose(image, plain_image.numpy(), atol=1e-4)
    np.testing.assert_allclose(logits, plain_logits.numpy(), atol=1e-4)


# -- windows outside the specimen ------------------------------------------------------------------
class Recording(nn.Module):
    """0.5 x + 0.2, remembering every window it is given."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.extend(w.clone() for w in x)
        return 0.5 * x + 0.2


def test_a_window_at_the_floor_is_never_run():
    image = np.full((40, 40, 40), -1.0, dtype=np.float32)
    image[:20, :20, :20] = np.random.default_rng(0).uniform(-1, 1, (20, 20, 20))  # the specimen, in one corner
    net = Recording()
    out = sliding_window_synthesis(image, net, 16, overlap=0.5, background=-1.0, precision="fp32", backend="torch",
                                   sw_batch_size=4)
    starts = patch_starts(40, 16, 0.5)
    specimen_windows = sum(1 for z in starts for y in starts for x in starts if z < 20 and y < 20 and x < 20)
    # the specimen's windows, plus one window of pure background run once for all the others
    assert len(net.seen) == specimen_windows + 1
    assert sum(bool((w == -1).all()) for w in net.seen) == 1
    # far from the specimen the output is the background's: 0.5 * -1 + 0.2
    np.testing.assert_allclose(out[0, 24:, 24:, 24:], -0.3, atol=1e-6)
    # and, the network being deterministic, everywhere the same as running every window
    every = sliding_window_synthesis(image, Recording(), 16, overlap=0.5, precision="fp32", backend="torch")
    np.testing.assert_allclose(out, every, atol=1e-6)


def test_pipeline_skips_windows_outside_the_ct():
    ct, _, _ = _tissue_scene(n=24, spacing=0.3)
    # a region reaching well beyond the CT's edge: its far windows hold no CT at all
    corner = ct.physical_points([(23.5, 12.0, 12.0)])[0]
    grid = output_grid(ct, 0.15, roi=(corner, (9.6, 4.8, 4.8)))
    fov = field_of_view(ct, grid)
    assert 0.2 < fov.mean() < 0.7
    net = Recording()
    result = synthesize_on_grid(ct, grid, net, LinearNormalization(), 16, precision="fp32", backend="torch",
                                sw_batch_size=1)
    n_windows = np.prod([len(patch_starts(n, 16, 0.5)) for n in grid.shape])
    assert len(net.seen) < n_windows  # windows wholly outside were not run ...
    assert sum(bool((w == -1).all()) for w in net.seen) == 1  # ... but one background window, once
    assert np.all(result.tissue.array[~fov] == OUTSIDE)
    every = synthesize_on_grid(ct, grid, Recording(), LinearNormalization(), 16, precision="fp32", backend="torch",
                               skip_background=False)
    np.testing.assert_allclose(result.microct.array, every.microct.array, atol=1e-6)
    np.testing.assert_array_equal(result.tissue.array, every.tissue.array)
