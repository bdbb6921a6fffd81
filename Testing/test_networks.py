"""The 3D cGAN networks: pix2pix's architecture in 3D, shapes, parameter counts, initialisation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from MicroCTSynthLib import networks
from MicroCTSynthLib.errors import MicroCTSynthError
from MicroCTSynthLib.networks import Discriminator, Generator, ResnetBlock3d, count_parameters, init_weights

torch.set_num_threads(1)


def conv_params(c_in: int, c_out: int, k: int, bias: bool = True) -> int:
    return c_in * c_out * k ** 3 + (c_out if bias else 0)


def generator_formula(in_channels: int, ngf: int, n_blocks: int, multitask: bool = False, n_classes: int = 3,
                      input_skip: bool = False) -> int:
    """The generator's parameter count written out layer by layer (instance norm has none)."""
    n = conv_params(in_channels, ngf, 7)                                # 7³ stem
    n += conv_params(ngf, 2 * ngf, 3) + conv_params(2 * ngf, 4 * ngf, 3)  # two stride-2 convolutions
    n += n_blocks * 2 * conv_params(4 * ngf, 4 * ngf, 3)                 # residual blocks, two 3³ convs each
    n += conv_params(4 * ngf, 2 * ngf, 3) + conv_params(2 * ngf, ngf, 3)  # two transposed convolutions
    head_in = ngf + (in_channels if input_skip else 0)                   # the heads also see the CT
    n += conv_params(head_in, 1, 7)                                      # 7³ image head
    if multitask:
        n += conv_params(head_in, n_classes, 7)                          # 7³ tissue head
    return n


def discriminator_formula(in_channels: int, ndf: int, n_layers: int) -> int:
    n = conv_params(in_channels, ndf, 4)
    mult = 1
    for i in range(1, n_layers + 1):
        prev, mult = mult, min(2 ** i, 8)
        n += conv_params(ndf * prev, ndf * mult, 4)
    return n + conv_params(ndf * mult, 1, 4)


def test_thesis_generator_has_23_5_million_parameters():
    net = Generator(1, 64, 6)
    n = count_parameters(net)
    assert n == generator_formula(1, 64, 6) == 23_493_121
    assert abs(n - 23.5e6) / 23.5e6 < 0.01


@pytest.mark.parametrize("in_channels,ngf,n_blocks,multitask,input_skip",
                         [(1, 4, 1, False, False), (2, 8, 3, True, False), (1, 4, 0, True, False), (2, 4, 1, True, True)])
def test_generator_parameter_count_matches_formula(in_channels, ngf, n_blocks, multitask, input_skip):
    net = Generator(in_channels, ngf, n_blocks, multitask=multitask, input_skip=input_skip)
    assert count_parameters(net) == generator_formula(in_channels, ngf, n_blocks, multitask, input_skip=input_skip)


@pytest.mark.parametrize("ndf,n_layers", [(64, 3), (4, 2), (8, 4), (4, 5)])
def test_discriminator_parameter_count_matches_formula(ndf, n_layers):
    assert count_parameters(Discriminator(2, ndf, n_layers)) == discriminator_formula(2, ndf, n_layers)


def test_single_task_output_shape_and_range():
    net = Generator(1, ngf=4, n_blocks=1).eval()
    x = torch.randn(2, 1, 16, 16, 24) * 3
    with torch.no_grad():
        y = net(x)
    assert isinstance(y, torch.Tensor)
    assert y.shape == (2, 1, 16, 16, 24)
    assert y.abs().max() <= 1.0
    assert y.std() > 0


def test_multitask_returns_image_and_tissue_logits():
    net = Generator(1, ngf=4, n_blocks=1, multitask=True, n_classes=3).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 1, 16, 16, 16))
    assert isinstance(out, tuple) and len(out) == 2
    image, logits = out
    assert image.shape == (1, 1, 16, 16, 16)
    assert logits.shape == (1, 3, 16, 16, 16)
    assert image.abs().max() <= 1.0
    assert logits.abs().max() > 1e-4  # logits are not squashed by the tanh of the image head


def test_multitask_trunk_is_shared_and_both_heads_learn():
    net = Generator(1, ngf=4, n_blocks=1, multitask=True)
    image, logits = net(torch.randn(1, 1, 16, 16, 16))
    logits.sum().backward()
    assert net.tissue_head[1].weight.grad.abs().sum() > 0
    assert net.trunk[1].weight.grad.abs().sum() > 0  # the stem learns from the tissue head too
    assert net.image_head[1].weight.grad is None


def test_discriminator_logits_and_feature_list():
    net = Discriminator(2, ndf=4, n_layers=2)
    x = torch.randn(2, 2, 16, 16, 16)
    logits, features = net(x, return_features=True)
    # 16 -> 8 -> 4 (stride 2), -> 3 (stride 1), logits -> 2
    assert logits.shape == (2, 1, 2, 2, 2)
    assert [tuple(f.shape) for f in features] == [(2, 4, 8, 8, 8), (2, 8, 4, 4, 4), (2, 16, 3, 3, 3)]
    assert torch.equal(net(x), logits)


def test_thesis_discriminator_has_three_strided_blocks():
    net = Discriminator(2, ndf=4, n_layers=3)
    strided = [m for m in net.modules() if isinstance(m, nn.Conv3d) and m.stride == (2, 2, 2)]
    assert len(strided) == 3
    logits, features = net(torch.randn(1, 2, 32, 32, 32), return_features=True)
    assert len(features) == 4
    assert [f.shape[1] for f in features] == [4, 8, 16, 32]
    assert logits.shape == (1, 1, 2, 2, 2)


def test_instance_norm_is_3d_without_running_statistics():
    for net in (Generator(1, 4, 1, multitask=True), Discriminator(2, 4, 2)):
        norms = [m for m in net.modules() if "Norm" in type(m).__name__]
        assert norms and all(isinstance(m, nn.InstanceNorm3d) for m in norms)
        assert all(not m.track_running_stats and not m.affine for m in norms)
        assert not list(net.buffers())


def test_convolutions_before_instance_norm_keep_their_bias():
    # pix2pix: use_bias = (norm == InstanceNorm); a 2D comparison in 3D code would silently drop them.
    for net in (Generator(1, 4, 2), Discriminator(2, 4, 3)):
        convs = [m for m in net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
        assert convs and all(m.bias is not None for m in convs)


def test_instance_norm_makes_each_patch_independent_of_the_batch():
    net = Generator(1, 4, 1).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        together = net(x)
        alone = net(x[:1])
    # float summation order differs with the batch size (~1e-6); batch statistics would move it by ~1e-1
    torch.testing.assert_close(together[:1], alone, rtol=1e-4, atol=2e-5)


def test_dropout_is_the_noise_in_training_and_off_in_eval():
    net = Generator(1, 4, 2, dropout=0.5)
    assert sum(isinstance(m, nn.Dropout) for m in net.modules()) == 2
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert not torch.equal(net.train()(x), net(x))
        net.eval()
        assert torch.equal(net(x), net(x))
    assert not any(isinstance(m, nn.Dropout) for m in Generator(1, 4, 2, dropout=0.0).modules())


def _lean_and_plain(net: Generator, x: torch.Tensor):
    with torch.inference_mode():
        net.lean = False
        plain = net(x)
        net.lean = True
        try:
            lean = net(x)
        finally:
            net.lean = False
    return plain, lean


@pytest.mark.parametrize("multitask,input_skip,shape,head_floats,head_channels", [
    (False, True, (1, 1, 16, 16, 16), networks.LEAN_HEAD_FLOATS, 16),  # one slab, all channels at once
    (True, True, (2, 1, 24, 16, 8), 1, 2),                             # a plane per slab: reflection at both ends
    (True, False, (1, 2, 12, 20, 16), 3000, 3),                        # a few planes per slab, two input channels
])
def test_lean_forward_is_the_plain_forward(monkeypatch, multitask, input_skip, shape, head_floats, head_channels):
    """The lean inference forward (depthwise heads slab by slab, a few channels at a time) computes what
    the plain network does."""
    monkeypatch.setattr(networks, "LEAN_HEAD_FLOATS", head_floats)
    monkeypatch.setattr(networks, "LEAN_HEAD_CHANNELS", head_channels)
    torch.manual_seed(0)
    net = Generator(shape[1], ngf=4, n_blocks=1, multitask=multitask, input_skip=input_skip).eval()
    for p in net.parameters():  # weights as large as a trained network's, so the heads matter
        nn.init.normal_(p, 0.0, 0.2)
    x = torch.rand(shape) * 2 - 1
    plain, lean = _lean_and_plain(net, x)
    for a, b in zip(plain if multitask else [plain], lean if multitask else [lean]):
        assert a.shape == b.shape
        assert a.abs().max() > 0.1  # not a constant
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_lean_forward_only_without_gradients_and_keeps_dropout():
    net = Generator(1, ngf=4, n_blocks=1, dropout=0.5)
    net.lean = True
    x = torch.rand(1, 1, 16, 16, 16)
    net(x).sum().backward()  # gradients recorded: the plain path, which trains
    assert net.image_head[1].weight.grad is not None
    with torch.inference_mode():
        assert not torch.equal(net(x), net(x))  # dropout on (training mode): stochastic passes stay stochastic
        net.eval()
        assert torch.equal(net(x), net(x))


def test_resnet_block_is_residual():
    block = ResnetBlock3d(4, dropout=0.0)
    for m in block.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
    x = torch.randn(1, 4, 6, 6, 6)
    torch.testing.assert_close(block(x), x)


def test_pix2pix_initialisation():
    torch.manual_seed(0)
    net = Generator(1, 16, 2)
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    assert {type(m).__name__ for m in convs} == {"Conv3d", "ConvTranspose3d"}
    weights = torch.cat([m.weight.flatten() for m in convs])
    assert abs(weights.mean().item()) < 1e-3
    assert abs(weights.std().item() - 0.02) < 1e-3
    assert all(torch.count_nonzero(m.bias) == 0 for m in convs)
    up = next(m for m in convs if isinstance(m, nn.ConvTranspose3d))
    assert abs(up.weight.std().item() - 0.02) < 2e-3  # the transposed convolutions are matched by name too

    assert init_weights(net, "normal", 0.1) is net
    assert abs(torch.cat([m.weight.flatten() for m in convs]).std().item() - 0.1) < 5e-3
    init_weights(net, "kaiming")
    assert abs(convs[2].weight.std().item() - (2 / convs[2].weight[0].numel()) ** 0.5) < 0.02
    with pytest.raises(MicroCTSynthError, match="initialisation"):
        init_weights(net, "uniform-ish")


def test_instance_norm_blinds_the_trunk_to_intensity_and_the_input_skip_restores_it():
    # The same texture in middle-ear air and in bone: the patches differ by an intensity
    # offset only. Instance norm after every trunk convolution takes the offset (and any scale)
    # away, so without the skip both heads answer alike; the skip hands them the CT back.
    texture = 0.3 * torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    air, bone = texture - 1.5, texture + 1.5
    for input_skip in (False, True):
        net = Generator(1, 4, 1, multitask=True, input_skip=input_skip).eval()
        with torch.no_grad():
            torch.testing.assert_close(net.trunk(air), net.trunk(bone), rtol=1e-3, atol=1e-3)
            torch.testing.assert_close(net.trunk(3 * air), net.trunk(air), rtol=1e-3, atol=1e-3)
            (image_air, logits_air), (image_bone, logits_bone) = net(air), net(bone)
        gap = max((image_air - image_bone).abs().max().item(), (logits_air - logits_bone).abs().max().item())
        assert (gap > 1e-2) == input_skip, gap


def test_arguments_rebuild_the_same_network():
    for net in (Generator(1, 4, 2, multitask=True, dropout=0.25, n_classes=3, input_skip=True), Discriminator(2, 8, 2)):
        args = net.arguments
        assert json.loads(json.dumps(args)) == args  # plain data, fit for a weights_only checkpoint
        twin = type(net)(**args)
        twin.load_state_dict(net.state_dict())  # strict: same keys and shapes
        assert twin.arguments == args
    assert Generator().arguments == {"in_channels": 1, "ngf": 64, "n_blocks": 6, "multitask": False,
                                     "dropout": 0.5, "n_classes": 3, "input_skip": False}
    assert Discriminator().arguments == {"in_channels": 2, "ndf": 64, "n_layers": 3}


def test_bad_inputs_are_told_clearly():
    g, d = Generator(1, 4, 1), Discriminator(2, 4, 2)
    with pytest.raises(MicroCTSynthError, match="multiples of 4"):
        g(torch.randn(1, 1, 16, 18, 16))
    with pytest.raises(MicroCTSynthError, match="at least 8"):
        g(torch.randn(1, 1, 4, 4, 4))
    with pytest.raises(MicroCTSynthError, match=r"\(N, 1, D, H, W\)"):
        g(torch.randn(1, 2, 16, 16, 16))
    with pytest.raises(MicroCTSynthError, match=r"\(N, 2, D, H, W\)"):
        d(torch.randn(1, 1, 16, 16, 16))
    with pytest.raises(MicroCTSynthError, match="at least 12"):
        d(torch.randn(1, 2, 8, 16, 16))
    with pytest.raises(MicroCTSynthError):
        Generator(1, 4, 1, dropout=1.0)
    with pytest.raises(MicroCTSynthError):
        Discriminator(2, 4, 0)


def test_networks_are_counted_on_the_meta_device_without_drawing_weights():
    """memory.parameter_count builds each network on the meta device, as every synthesis and
    training does first: the counts are the real ones and no weight is drawn there, which would
    import torch._dynamo (about a second of start-up; a fresh interpreter, as a job starts)."""
    script = (
        "import sys, torch\n"
        "from MicroCTSynthLib.memory import parameter_count\n"
        "from MicroCTSynthLib.networks import Discriminator, Generator, Segmenter\n"
        "cases = [(Generator, {'ngf': 8, 'n_blocks': 3, 'multitask': True, 'input_skip': True}),\n"
        "         (Discriminator, {'in_channels': 2, 'ndf': 8, 'n_layers': 2}), (Segmenter, {'filters': 8, 'levels': 3})]\n"
        "counted = [parameter_count(cls, args) for cls, args in cases]\n"
        "print('torch._dynamo' in sys.modules)\n"
        "print(counted == [sum(p.numel() for p in cls(**args).parameters()) for cls, args in cases])\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]
