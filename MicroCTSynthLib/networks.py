"""The thesis' 3D conditional GAN: ResNet generator (single- or multitask) and PatchGAN discriminator.

A faithful 3D port of pix2pix's ``ResnetGenerator``, ``ResnetBlock`` and ``NLayerDiscriminator``
(junyanz/pytorch-CycleGAN-and-pix2pix, ``models/networks.py``), the code the thesis adapted:

- every 2D layer becomes its 3D twin (``Conv3d``, ``ConvTranspose3d``, ``ReflectionPad3d``);
- instance norm is ``InstanceNorm3d(affine=False, track_running_stats=False)``: statistics of the
  patch itself, in training and at inference alike, so a patch never depends on the batch;
- convolutions followed by instance norm keep their bias, as pix2pix decides with
  ``use_bias = norm_layer == InstanceNorm2d`` (in 3D the comparison must be with ``InstanceNorm3d``);
- the residual blocks keep dropout (p = 0.5): the thesis' noise z, as in pix2pix.

With ``ngf=64``, six blocks and one input channel the generator has 23,493,121 parameters
(about 23.5 M, as the thesis states).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import init

from .errors import MicroCTSynthError

__all__ = ["ResnetBlock3d", "Generator", "Discriminator", "Segmenter", "segmenter_levels", "network_class", "init_weights", "count_parameters"]


def _instance_norm(channels: int) -> nn.Module:
    # affine=False as pix2pix; no running statistics, so train and eval normalise identically.
    return nn.InstanceNorm3d(channels, affine=False, track_running_stats=False)


#: pix2pix: ``use_bias = norm_layer == nn.InstanceNorm2d``. Instance norm without affine has no
#: shift of its own, so the convolution before it keeps its bias.
USE_BIAS = True


class ResnetBlock3d(nn.Module):
    """pix2pix's ``ResnetBlock`` in 3D: x + [pad, conv 3³, norm, ReLU, dropout, pad, conv 3³, norm](x)."""

    def __init__(self, dim: int, dropout: float = 0.5, padding_type: str = "reflect"):
        super().__init__()
        pads = {"reflect": nn.ReflectionPad3d, "replicate": nn.ReplicationPad3d}
        if padding_type not in pads and padding_type != "zero":
            raise MicroCTSynthError(f"The residual block's padding must be reflect, replicate or zero, not {padding_type!r}.")
        p = 1 if padding_type == "zero" else 0

        def pad() -> list:
            return [] if padding_type == "zero" else [pads[padding_type](1)]

        block = pad() + [nn.Conv3d(dim, dim, kernel_size=3, padding=p, bias=USE_BIAS), _instance_norm(dim), nn.ReLU(True)]
        if dropout > 0:
            block += [nn.Dropout(dropout)]
        block += pad() + [nn.Conv3d(dim, dim, kernel_size=3, padding=p, bias=USE_BIAS), _instance_norm(dim)]
        self.conv_block = nn.Sequential(*block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class Generator(nn.Module):
    """The thesis' 3D ResNet generator G (pix2pix ``ResnetGenerator``), single-task or multitask.

    7³ stem to ``ngf`` channels, two stride-2 3³ convolutions (ngf → 2·ngf → 4·ngf), ``n_blocks``
    residual blocks at 4·ngf with dropout (the noise z), two stride-2 transposed convolutions back
    to ``ngf``, then the 7³ head and tanh: the synthetic micro-CT in [-1, 1].

    Multitask (the thesis' Fig. 4): the same trunk feeds a second 7³ head that outputs
    ``n_classes`` tissue logits (air, soft tissue, bone = class 0, 1, 2 = label - 1).

    ``input_skip`` (beyond the thesis): the heads also see the input CT itself, concatenated to the
    trunk's features. Every convolution of the trunk is followed by instance norm, which takes
    away each patch's mean and scale, so the trunk alone is blind to the CT's absolute intensity
    (its Hounsfield units): a patch wholly in middle-ear air and one wholly in bone give it the
    same features. On patches large against the anatomy (the thesis' 96³) the context makes up
    for it; on small ones (1.8 mm) it cannot, and the skip hands the heads the intensity back.

    ``forward(x)`` takes x of shape (N, in_channels, D, H, W) with D, H, W divisible by 4 and at
    least 8, and returns the image (N, 1, D, H, W), or ``(image, logits)`` when multitask.

    The weights are initialised as the thesis' pix2pix does (normal, std 0.02); call
    :func:`init_weights` for another scheme.
    """

    N_DOWNSAMPLING = 2

    def __init__(self, in_channels: int = 1, ngf: int = 64, n_blocks: int = 6, multitask: bool = False,
                 dropout: float = 0.5, n_classes: int = 3, input_skip: bool = False):
        super().__init__()
        if in_channels < 1 or ngf < 1 or n_blocks < 0 or n_classes < 1:
            raise MicroCTSynthError(
                f"The generator needs at least one input channel, one filter and one class, and no negative number "
                f"of residual blocks (got in_channels={in_channels}, ngf={ngf}, n_blocks={n_blocks}, n_classes={n_classes}).")
        if not 0.0 <= dropout < 1.0:
            raise MicroCTSynthError(f"The generator's dropout must lie in [0, 1), not {dropout}.")
        self._arguments = {"in_channels": int(in_channels), "ngf": int(ngf), "n_blocks": int(n_blocks),
                           "multitask": bool(multitask), "dropout": float(dropout), "n_classes": int(n_classes),
                           "input_skip": bool(input_skip)}
        self.multitask = bool(multitask)

        trunk = [nn.ReflectionPad3d(3), nn.Conv3d(in_channels, ngf, kernel_size=7, padding=0, bias=USE_BIAS),
                 _instance_norm(ngf), nn.ReLU(True)]
        for i in range(self.N_DOWNSAMPLING):
            mult = 2 ** i
            trunk += [nn.Conv3d(ngf * mult, ngf * mult * 2, kernel_size=3, stride=2, padding=1, bias=USE_BIAS),
                      _instance_norm(ngf * mult * 2), nn.ReLU(True)]
        mult = 2 ** self.N_DOWNSAMPLING
        trunk += [ResnetBlock3d(ngf * mult, dropout=dropout) for _ in range(n_blocks)]
        for i in range(self.N_DOWNSAMPLING):
            mult = 2 ** (self.N_DOWNSAMPLING - i)
            trunk += [nn.ConvTranspose3d(ngf * mult, ngf * mult // 2, kernel_size=3, stride=2, padding=1,
                                         output_padding=1, bias=USE_BIAS),
                      _instance_norm(ngf * mult // 2), nn.ReLU(True)]
        self.trunk = nn.Sequential(*trunk)
        self.input_skip = bool(input_skip)
        head_in = ngf + (in_channels if self.input_skip else 0)
        self.image_head = nn.Sequential(nn.ReflectionPad3d(3), nn.Conv3d(head_in, 1, kernel_size=7, padding=0), nn.Tanh())
        self.tissue_head = (nn.Sequential(nn.ReflectionPad3d(3), nn.Conv3d(head_in, n_classes, kernel_size=7, padding=0))
                            if self.multitask else None)
        init_weights(self)

    @property
    def arguments(self) -> dict:
        """The constructor's arguments (plain data), so a checkpoint can rebuild this network."""
        return dict(self._arguments)

    def forward(self, x: torch.Tensor):
        _check_input(x, self._arguments["in_channels"], "generator")
        size = tuple(x.shape[2:])
        factor = 2 ** self.N_DOWNSAMPLING
        if any(s % factor for s in size) or min(size) < 2 * factor:
            # Reflection padding at the bottleneck needs 2 voxels, and the upsampling restores only multiples of 4.
            raise MicroCTSynthError(f"The generator needs patches whose sides are multiples of {factor} and at least "
                                    f"{2 * factor} voxels, not {size}.")
        if self.lean and not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32:
            return self._forward_lean(x)
        features = self.trunk(x)
        if self.input_skip:
            features = torch.cat([features, x], 1)
        image = self.image_head(features)
        if self.tissue_head is None:
            return image
        return image, self.tissue_head(features)

    #: Run :meth:`forward` the lean way (see :meth:`_forward_lean`) when no gradient is recorded and
    #: the input is fp32 on the CPU. Off by default, so that the network is the plain pix2pix port for
    #: training and for anyone else's inferer; synthesis turns it on (``inference.lean_generators``).
    lean = False

    def _forward_lean(self, x: torch.Tensor):
        """The same function as the plain forward, computed faster on the CPU (and, for a batch of
        windows, in less memory).

        * The heads' 7³ convolutions to one (image) or three (tissue) channels are what oneDNN runs
          worst: with so few output channels it reaches a sixth of its speed on the 7³ stem (the
          quick generator's image head took 15 of a window's 25 ms on one core of a Xeon). Each
          output channel is the sum over input channels of a depthwise convolution, which oneDNN
          runs about 8x faster there.
        * A window larger than one slab (:data:`LEAN_HEAD_FLOATS`) never has the concatenation of
          features and CT nor its padded copy built whole: the heads work slab by slab, reflecting
          each slab's planes as ``ReflectionPad3d`` would. Each slab goes a few channels at a time
          (:data:`LEAN_HEAD_CHANNELS`), and both heads of the multitask generator share it.

        Dropout modules are called as they are, so stochastic passes (dropout on) stay stochastic.
        The result equals the plain forward's to float rounding (Testing/test_networks.py).
        """
        h = self.trunk(x)
        parts = [h, x] if self.input_skip else [h]
        heads = [self.image_head] + ([self.tissue_head] if self.tissue_head is not None else [])
        outputs = _lean_heads(heads, parts)
        image = torch.tanh_(outputs[0])
        return image if self.tissue_head is None else (image, outputs[1])


#: Floats of one slab of the heads' reflected input in :meth:`Generator._forward_lean` (1 MB): the
#: quick generator's 24³ windows go whole, the thesis' 96³ ones a plane at a time.
LEAN_HEAD_FLOATS = 2 ** 18

#: Input channels per depthwise convolution of a lean head in PyTorch, whose output holds that many
#: channels of the slab: the thesis' 65 go 16 at a time, the quick generator's 9 at once. A traced
#: forward (OpenVINO) takes them all at once (:func:`_traced_lean_heads`).
LEAN_HEAD_CHANNELS = 16


def _reflected(size: int, lo: int, hi: int, pad: int) -> torch.Tensor:
    """Indices of planes lo - pad .. hi + pad of an axis of ``size``, reflected at its ends (ReflectionPad)."""
    index = torch.arange(lo - pad, hi + pad)
    index = torch.where(index < 0, -index, index)
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def _lean_heads(heads, parts) -> list:
    """Each head ``Sequential(ReflectionPad3d(p), Conv3d(C, C_out, k), ...)`` applied to the channel-wise
    concatenation of ``parts`` (C channels in all).

    A window that fits one slab is concatenated and padded whole; a larger one slab by slab along
    D, the parts' planes reflected, concatenated and padded in H and W. Each output channel is the
    channel sum of depthwise convolutions of the slab, a group of channels at a time. A traced
    forward takes :func:`_traced_lean_heads` instead.
    Only the pad and the convolution of a head are applied; what follows them is the caller's.
    """
    first = parts[0]
    n, (d, h, w) = first.shape[0], first.shape[2:]
    pad = int(heads[0][0].padding[0])
    convs = [head[1] for head in heads]
    # Per head and output channel: the depthwise weights (C, 1, k, k, k).
    weights = [[conv.weight[o].unsqueeze(1) for o in range(conv.out_channels)] for conv in convs]
    if torch.jit.is_tracing():
        return _traced_lean_heads(convs, weights, pad, parts)
    channels = sum(part.shape[1] for part in parts)
    outputs = [first.new_empty(n, conv.out_channels, d, h, w) for conv in convs]
    planes = max(1, LEAN_HEAD_FLOATS // max(1, n * channels * (h + 2 * pad) * (w + 2 * pad)) - 2 * pad)
    groups = [(c, min(c + LEAN_HEAD_CHANNELS, channels)) for c in range(0, channels, LEAN_HEAD_CHANNELS)]

    def convolve(slab: torch.Tensor, where: slice) -> None:
        for out, conv, per_output in zip(outputs, convs, weights):
            for o, weight in enumerate(per_output):
                target = out[:, o, where]
                for i, (a, b) in enumerate(groups):  # a few channels at a time: C_group x the slab at most
                    part = torch.nn.functional.conv3d(slab[:, a:b], weight[a:b], groups=b - a)
                    if i == 0:
                        torch.sum(part, 1, out=target)
                    else:
                        target += part.sum(1)
            if conv.bias is not None:
                out[:, :, where] += conv.bias.view(1, -1, 1, 1, 1)

    if planes >= d:  # one slab: as ReflectionPad3d
        convolve(torch.nn.functional.pad(torch.cat(parts, 1), (pad,) * 6, mode="reflect"), slice(None))
        return outputs
    for z0 in range(0, d, planes):
        z1 = min(d, z0 + planes)
        index = _reflected(d, z0, z1, pad)
        slab = torch.cat([part.index_select(2, index) for part in parts], 1)
        convolve(torch.nn.functional.pad(slab, (pad, pad, pad, pad, 0, 0), mode="reflect"), slice(z0, z1))
    return outputs


def _traced_lean_heads(convs, weights, pad: int, parts) -> list:
    """The lean heads as a converter (OpenVINO) traces them: the whole window padded at once (a traced
    graph keeps no plane indices, so it reshapes to any window), each output channel one depthwise
    convolution of all channels and its channel sum, written without in-place updates of slices.

    OpenVINO's PyTorch front end mis-converts an in-place sum into a slice of a preallocated output
    (the paper generator's image came out up to 2 off in [-1, 1] with 16 channels at a time), and
    plans a buffer for each group of channels: the paper generator's first 128³ call added 768 MB
    so (2 threads; the plain heads 766 MB), and at one thread 807 MB so against 1,017 MB with 16
    channels per convolution.
    """
    x = torch.nn.functional.pad(torch.cat(parts, 1), (pad,) * 6, mode="reflect")
    outputs = []
    for conv, per_output in zip(convs, weights):
        sums = [torch.nn.functional.conv3d(x, weight, groups=x.shape[1]).sum(1, keepdim=True) for weight in per_output]
        out = torch.cat(sums, 1) if len(sums) > 1 else sums[0]
        outputs.append(out + conv.bias.view(1, -1, 1, 1, 1) if conv.bias is not None else out)
    return outputs


class Discriminator(nn.Module):
    """The conditional 3D PatchGAN D of the thesis (pix2pix ``NLayerDiscriminator``), fed cat(CT, micro-CT).

    4³ convolutions: one stride-2 convolution with LeakyReLU (no norm), ``n_layers - 1`` stride-2
    convolutions with instance norm and LeakyReLU (filters ndf·min(2^n, 8)), one stride-1 block,
    then a stride-1 convolution to one logit per patch. With ``n_layers=3`` that is the thesis'
    three strided blocks and a 70-voxel receptive field.

    ``forward(x, return_features=True)`` also returns the ``n_layers + 1`` intermediate feature maps
    (the output of each LeakyReLU block, before the final logit convolution) used by the perceptual
    loss (Eq. 3). Inputs need sides of at least 3·2^n_layers voxels.
    """

    def __init__(self, in_channels: int = 2, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        if in_channels < 1 or ndf < 1 or n_layers < 1:
            raise MicroCTSynthError(f"The discriminator needs at least one input channel, filter and strided layer "
                                    f"(got in_channels={in_channels}, ndf={ndf}, n_layers={n_layers}).")
        self._arguments = {"in_channels": int(in_channels), "ndf": int(ndf), "n_layers": int(n_layers)}
        kw, padw = 4, 1
        blocks = [nn.Sequential(nn.Conv3d(in_channels, ndf, kernel_size=kw, stride=2, padding=padw), nn.LeakyReLU(0.2, True))]
        nf_mult = 1
        for n in range(1, n_layers):
            nf_mult_prev, nf_mult = nf_mult, min(2 ** n, 8)
            blocks.append(nn.Sequential(
                nn.Conv3d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=kw, stride=2, padding=padw, bias=USE_BIAS),
                _instance_norm(ndf * nf_mult), nn.LeakyReLU(0.2, True)))
        nf_mult_prev, nf_mult = nf_mult, min(2 ** n_layers, 8)
        blocks.append(nn.Sequential(
            nn.Conv3d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=kw, stride=1, padding=padw, bias=USE_BIAS),
            _instance_norm(ndf * nf_mult), nn.LeakyReLU(0.2, True)))
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv3d(ndf * nf_mult, 1, kernel_size=kw, stride=1, padding=padw)
        init_weights(self)

    @property
    def arguments(self) -> dict:
        """The constructor's arguments (plain data), so a checkpoint can rebuild this network."""
        return dict(self._arguments)

    @property
    def min_size(self) -> int:
        """The smallest patch side that still leaves one logit (each strided conv halves, each 4³ stride-1 conv takes 1)."""
        return 3 * 2 ** self._arguments["n_layers"]

    def forward(self, x: torch.Tensor, return_features: bool = False):
        _check_input(x, self._arguments["in_channels"], "discriminator")
        if min(x.shape[2:]) < self.min_size:
            raise MicroCTSynthError(f"The discriminator with {self._arguments['n_layers']} strided layers needs patches of "
                                    f"at least {self.min_size} voxels a side, not {tuple(x.shape[2:])}.")
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        logits = self.head(x)
        return (logits, features) if return_features else logits


class Segmenter(nn.Module):
    """The peer a user would pick instead of a cGAN: a direct 3D segmenter of the CT into the tissue map.

    MONAI's ``DynUNet``, nnU-Net's U-Net, built as nnU-Net plans it for a cubic patch of isotropic
    voxels: 3x3x3 kernels at every level, the first at full resolution, then stride-2
    downsamplings while the feature map stays at least 4 voxels wide (``levels``: 4 for 32^3),
    ``filters`` doubling per level, instance norm and leaky ReLU. The output is ``n_classes``
    logits (air, soft tissue, bone = class 0, 1, 2 = label - 1), as the multitask generator's
    tissue head. Needs MONAI (``pip install monai``).
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 3, filters: int = 16, levels: int = 4):
        super().__init__()
        try:
            from monai.networks.nets import DynUNet
        except ImportError:
            raise MicroCTSynthError("The segmenter is MONAI's DynUNet: install MONAI (pip install monai).") from None
        if int(levels) < 2 or int(filters) < 1:
            raise MicroCTSynthError(f"The segmenter needs at least 2 levels and 1 filter, not {levels} and {filters}.")
        self._arguments = {"in_channels": int(in_channels), "n_classes": int(n_classes), "filters": int(filters),
                           "levels": int(levels)}
        strides = [1] + [2] * (int(levels) - 1)
        if torch.empty(0).is_meta:  # built on the meta device to be counted, as init_weights skips it
            DynUNet = type("DynUNet", (DynUNet,), {"initialize_weights": staticmethod(lambda module: None)})
        self.net = DynUNet(spatial_dims=3, in_channels=int(in_channels), out_channels=int(n_classes),
                           kernel_size=[3] * int(levels), strides=strides, upsample_kernel_size=strides[1:],
                           filters=[int(filters) * 2 ** i for i in range(int(levels))], norm_name="instance",
                           deep_supervision=False, res_block=True)

    @property
    def arguments(self) -> dict:
        return dict(self._arguments)

    @property
    def multiple(self) -> int:
        """Patch sides must be multiples of this."""
        return 2 ** (self._arguments["levels"] - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self._arguments["in_channels"], "segmenter")
        if any(s % self.multiple for s in x.shape[2:]):
            raise MicroCTSynthError(f"The segmenter needs patches whose sides are multiples of {self.multiple}, "
                                    f"not {tuple(x.shape[2:])}.")
        return self.net(x)


def segmenter_levels(patch_size: int) -> int:
    """nnU-Net's depth for a cubic patch: downsample by 2 while the feature map stays >= 4 voxels."""
    levels, side = 1, int(patch_size)
    while side % 2 == 0 and side // 2 >= 4 and levels < 6:
        levels, side = levels + 1, side // 2
    return levels


def network_class(model: str):
    """The class of a checkpoint's ``generator`` entry: the cGANs' Generator or the Segmenter."""
    return Segmenter if model == "segmenter" else Generator


def _check_input(x: torch.Tensor, channels: int, name: str) -> None:
    if x.dim() != 5 or x.shape[1] != channels:
        raise MicroCTSynthError(f"The {name} expects a batch of shape (N, {channels}, D, H, W), not {tuple(x.shape)}.")


def init_weights(net: nn.Module, init_type: str = "normal", init_gain: float = 0.02) -> nn.Module:
    """pix2pix's initialisation: every Conv3d / ConvTranspose3d (and Linear) weight drawn by ``init_type``
    ("normal": N(0, init_gain), "xavier", "kaiming", "orthogonal"), biases 0; batch-norm weights N(1, init_gain).

    Instance norm here has no affine weights, so it has nothing to initialise. Returns ``net``.
    """
    methods = {
        "normal": lambda w: init.normal_(w, 0.0, init_gain),
        "xavier": lambda w: init.xavier_normal_(w, gain=init_gain),
        "kaiming": lambda w: init.kaiming_normal_(w, a=0, mode="fan_in"),
        "orthogonal": lambda w: init.orthogonal_(w, gain=init_gain),
    }
    if init_type not in methods:
        raise MicroCTSynthError(f"The weight initialisation must be one of {', '.join(methods)}, not {init_type!r}.")

    def init_func(m: nn.Module) -> None:
        if any(p.is_meta for p in m.parameters(recurse=False)):
            # Built on the meta device to be counted (memory.parameter_count): no values to draw, and
            # drawing them there imports torch._dynamo, a second of every synthesis' and training's start.
            return
        classname = m.__class__.__name__
        # "Conv" matches Conv3d and ConvTranspose3d, as pix2pix matches Conv2d / ConvTranspose2d.
        if getattr(m, "weight", None) is not None and ("Conv" in classname or "Linear" in classname):
            methods[init_type](m.weight.data)
            if getattr(m, "bias", None) is not None:
                init.constant_(m.bias.data, 0.0)
        elif "BatchNorm" in classname and getattr(m, "weight", None) is not None:
            init.normal_(m.weight.data, 1.0, init_gain)
            init.constant_(m.bias.data, 0.0)

    net.apply(init_func)
    return net


def count_parameters(net: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)
