"""The DCNv3 and DCNv4 layers (deformnp.nn.dcn) against torch transcriptions of their anchors:
InternImage's ``DCNv3_pytorch`` (``classification/ops_dcnv3/modules/dcnv3.py``, with
``dcnv3_core_pytorch``) and DCNv4's ``DCNv4`` module (``DCNv4_op/DCNv4/modules/dcnv4.py``, its
CUDA core written as the same pure-torch sampling on the unpacked offsets and weights). The same
state dict is loaded into both by name (torch -> numpy); outputs, input gradients and parameter
gradients agree in float64. Also: gradcheck of the input, the state dict keys and shapes of the
anchors, the initialisation, the sampling locations, and the validation messages.

Sampling is bilinear: finite differences are wrong at the kinks (integer pixel coordinates and
the border lines -1, 0, H-1, H, all integers). ``off_kinks`` keeps every sampling coordinate's
fractional part in [0.15, 0.85]: the offset biases put each point of the regular grid at a
fractional part in [0.3, 0.7] and the offset weights are small (|W q| * offset_scale < 0.15).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import deformnp as dn
from deformnp.nn.dcn import DCNv3, DCNv4


def rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


# ---------------------------------------------------------------------------- torch transcriptions


def _torch_dcnv3_core(torch, *args, return_locations=False):
    """``dcnv3_core_pytorch`` of InternImage (classification/ops_dcnv3), the reference points and
    dilation grid built in the input's dtype (the anchor builds them in float32)."""
    F = torch.nn.functional
    (input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
     dilation_w, group, group_channels, offset_scale, remove_center) = args  # fmt: skip
    dtype = input.dtype
    if remove_center and (kernel_h % 2 == 0 or kernel_w % 2 == 0 or kernel_w != kernel_h):
        raise ValueError("remove_center is only compatible with square odd kernel size.")
    input = F.pad(input, [0, 0, pad_h, pad_h, pad_w, pad_w])
    N_, H_in, W_in, _ = input.shape
    _, H_out, W_out, _ = offset.shape

    # _get_reference_points
    H_o = (H_in - (dilation_h * (kernel_h - 1) + 1)) // stride_h + 1
    W_o = (W_in - (dilation_w * (kernel_w - 1) + 1)) // stride_w + 1
    ref_y, ref_x = torch.meshgrid(
        torch.linspace(
            (dilation_h * (kernel_h - 1)) // 2 + 0.5,
            (dilation_h * (kernel_h - 1)) // 2 + 0.5 + (H_o - 1) * stride_h,
            H_o,
            dtype=dtype,
        ),
        torch.linspace(
            (dilation_w * (kernel_w - 1)) // 2 + 0.5,
            (dilation_w * (kernel_w - 1)) // 2 + 0.5 + (W_o - 1) * stride_w,
            W_o,
            dtype=dtype,
        ),
        indexing="ij",
    )
    ref_y = ref_y.reshape(-1)[None] / H_in
    ref_x = ref_x.reshape(-1)[None] / W_in
    ref = torch.stack((ref_x, ref_y), -1).reshape(1, H_o, W_o, 1, 2)

    # _generate_dilation_grids
    x, y = torch.meshgrid(
        torch.linspace(
            -((dilation_w * (kernel_w - 1)) // 2),
            -((dilation_w * (kernel_w - 1)) // 2) + (kernel_w - 1) * dilation_w,
            kernel_w,
            dtype=dtype,
        ),
        torch.linspace(
            -((dilation_h * (kernel_h - 1)) // 2),
            -((dilation_h * (kernel_h - 1)) // 2) + (kernel_h - 1) * dilation_h,
            kernel_h,
            dtype=dtype,
        ),
        indexing="ij",
    )
    grid = torch.stack([x / W_in, y / H_in], -1).reshape(-1, 1, 2).repeat(1, group, 1)
    grid = grid.permute(1, 0, 2).reshape(1, 1, 1, group * kernel_h * kernel_w, 2)

    spatial_norm = (
        torch.tensor([W_in, H_in])
        .reshape(1, 1, 1, 2)
        .repeat(1, 1, 1, group * (kernel_h * kernel_w - remove_center))
    )
    sampling_locations = (ref + grid * offset_scale).repeat(N_, 1, 1, 1, 1)
    if remove_center:  # remove_center_sampling_locations
        C = (kernel_w * kernel_h - 1) // 2
        idx = [
            i for i in range(sampling_locations.shape[-2]) if i != C and (i - C) % (C * 2 + 1) != 0
        ]
        sampling_locations = sampling_locations[:, :, :, idx, :]
    sampling_locations = sampling_locations.flatten(3, 4)
    sampling_locations = sampling_locations + offset * offset_scale / spatial_norm

    P_ = kernel_h * kernel_w - remove_center
    if return_locations:  # (N, Ho, Wo, G, P, 2) in pixels of the unpadded input
        loc = sampling_locations.reshape(N_, H_out, W_out, group, P_, 2)
        size = torch.tensor([W_in, H_in], dtype=dtype)
        return loc * size - 0.5 - torch.tensor([pad_h, pad_w], dtype=dtype)
    sampling_grids = 2 * sampling_locations - 1
    input_ = (
        input.view(N_, H_in * W_in, group * group_channels)
        .transpose(1, 2)
        .reshape(N_ * group, group_channels, H_in, W_in)
    )
    sampling_grid_ = (
        sampling_grids.view(N_, H_out * W_out, group, P_, 2).transpose(1, 2).flatten(0, 1)
    )
    sampling_input_ = F.grid_sample(
        input_, sampling_grid_, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    mask = mask.view(N_, H_out * W_out, group, P_).transpose(1, 2)
    mask = mask.reshape(N_ * group, 1, H_out * W_out, P_)
    output = (sampling_input_ * mask).sum(-1).view(N_, group * group_channels, H_out * W_out)
    return output.transpose(1, 2).reshape(N_, H_out, W_out, -1).contiguous()


def _torch_dcnv4_core(torch, *args):
    """DCNv4's CUDA op (``DCNv4Function``) in pure torch: per group ``P`` offsets (x, y) then
    ``P`` weights (not softmaxed) in the packed last dim, the padding past ``3 * G * P`` unused,
    and the same sampling as DCNv3 (``dcnv4_im2col_cuda.cuh``)."""
    (input, offset_mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
     dilation_w, group, group_channels, offset_scale, im2col_step, remove_center) = args  # fmt: skip
    N, Ho, Wo, _ = offset_mask.shape
    P = kernel_h * kernel_w - remove_center
    om = offset_mask[..., : group * P * 3].reshape(N, Ho, Wo, group, P * 3)
    offset = om[..., : 2 * P].reshape(N, Ho, Wo, group * P * 2)
    mask = om[..., 2 * P :].reshape(N, Ho, Wo, group * P)
    return _torch_dcnv3_core(
        torch, input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
        dilation_h, dilation_w, group, group_channels, offset_scale, remove_center,
    )  # fmt: skip


def _torch_modules(torch):
    nn = torch.nn
    F = torch.nn.functional

    class to_channels_last(nn.Module):
        def forward(self, x):
            return x.permute(0, 2, 3, 1)

    def build_norm_layer(dim, norm_layer, in_format, out_format, eps=1e-6):
        assert norm_layer == "LN" and in_format == "channels_first"
        assert out_format == "channels_last"
        return nn.Sequential(to_channels_last(), nn.LayerNorm(dim, eps=eps))

    def build_act_layer(act_layer):
        return {"ReLU": nn.ReLU(inplace=True), "SiLU": nn.SiLU(inplace=True), "GELU": nn.GELU()}[
            act_layer
        ]

    class CenterFeatureScaleModule(nn.Module):
        def forward(self, query, weight, bias):
            return F.linear(query, weight=weight, bias=bias).sigmoid()

    class DCNv3_pytorch(nn.Module):
        def __init__(
            self, channels=64, kernel_size=3, dw_kernel_size=None, stride=1, pad=1,
            dilation=1, group=4, offset_scale=1.0, act_layer="GELU", norm_layer="LN",
            center_feature_scale=False, remove_center=False,
        ):  # fmt: skip
            super().__init__()
            if channels % group != 0:
                raise ValueError(
                    f"channels must be divisible by group, but got {channels} and {group}"
                )
            dw_kernel_size = dw_kernel_size if dw_kernel_size is not None else kernel_size
            self.offset_scale = offset_scale
            self.channels = channels
            self.kernel_size = kernel_size
            self.dw_kernel_size = dw_kernel_size
            self.stride = stride
            self.dilation = dilation
            self.pad = pad
            self.group = group
            self.group_channels = channels // group
            self.center_feature_scale = center_feature_scale
            self.remove_center = int(remove_center)
            self.dw_conv = nn.Sequential(
                nn.Conv2d(
                    channels, channels, kernel_size=dw_kernel_size, stride=1,
                    padding=(dw_kernel_size - 1) // 2, groups=channels,
                ),
                build_norm_layer(channels, norm_layer, "channels_first", "channels_last"),
                build_act_layer(act_layer),
            )  # fmt: skip
            self.offset = nn.Linear(
                channels, group * (kernel_size * kernel_size - remove_center) * 2
            )
            self.mask = nn.Linear(channels, group * (kernel_size * kernel_size - remove_center))
            self.input_proj = nn.Linear(channels, channels)
            self.output_proj = nn.Linear(channels, channels)
            if center_feature_scale:
                self.center_feature_scale_proj_weight = nn.Parameter(
                    torch.zeros((group, channels), dtype=torch.float)
                )
                self.center_feature_scale_proj_bias = nn.Parameter(
                    torch.tensor(0.0, dtype=torch.float).view((1,)).repeat(group)
                )
                self.center_feature_scale_module = CenterFeatureScaleModule()

        def forward(self, input, return_locations=False):
            N, H, W, _ = input.shape
            x = self.input_proj(input)
            x_proj = x
            x1 = input.permute(0, 3, 1, 2)
            x1 = self.dw_conv(x1)
            offset = self.offset(x1)
            mask = self.mask(x1).reshape(N, H, W, self.group, -1)
            mask = F.softmax(mask, -1).reshape(N, H, W, -1)
            x = _torch_dcnv3_core(
                torch, x, offset, mask, self.kernel_size, self.kernel_size, self.stride,
                self.stride, self.pad, self.pad, self.dilation, self.dilation, self.group,
                self.group_channels, self.offset_scale, self.remove_center,
                return_locations=return_locations,
            )  # fmt: skip
            if return_locations:
                return x, mask.reshape(N, H, W, self.group, -1)
            if self.center_feature_scale:
                s = self.center_feature_scale_module(
                    x1, self.center_feature_scale_proj_weight, self.center_feature_scale_proj_bias
                )
                s = s[..., None].repeat(1, 1, 1, 1, self.channels // self.group).flatten(-2)
                x = x * (1 - s) + x_proj * s
            return self.output_proj(x)

    class DCNv4_module(nn.Module):
        """DCNv4's module; its ``assert _d_per_group % 16 == 0`` (a CUDA requirement) left out."""

        def __init__(
            self, channels=64, kernel_size=3, stride=1, pad=1, dilation=1, group=4,
            offset_scale=1.0, dw_kernel_size=None, center_feature_scale=False,
            remove_center=False, output_bias=True, without_pointwise=False, **kwargs,
        ):  # fmt: skip
            super().__init__()
            if channels % group != 0:
                raise ValueError(
                    f"channels must be divisible by group, but got {channels} and {group}"
                )
            self.offset_scale = offset_scale
            self.channels = channels
            self.kernel_size = kernel_size
            self.stride = stride
            self.dilation = dilation
            self.pad = pad
            self.group = group
            self.group_channels = channels // group
            self.dw_kernel_size = dw_kernel_size
            self.center_feature_scale = center_feature_scale
            self.remove_center = int(remove_center)
            self.without_pointwise = without_pointwise
            self.K = group * (kernel_size * kernel_size - self.remove_center)
            if dw_kernel_size is not None:
                self.offset_mask_dw = nn.Conv2d(
                    channels, channels, dw_kernel_size, stride=1,
                    padding=(dw_kernel_size - 1) // 2, groups=channels,
                )  # fmt: skip
            self.offset_mask = nn.Linear(channels, int(math.ceil((self.K * 3) / 8) * 8))
            if not without_pointwise:
                self.value_proj = nn.Linear(channels, channels)
                self.output_proj = nn.Linear(channels, channels, bias=output_bias)
            if center_feature_scale:
                self.center_feature_scale_proj_weight = nn.Parameter(
                    torch.zeros((group, channels), dtype=torch.float)
                )
                self.center_feature_scale_proj_bias = nn.Parameter(
                    torch.tensor(0.0, dtype=torch.float).view((1,)).repeat(group)
                )
                self.center_feature_scale_module = CenterFeatureScaleModule()

        def forward(self, input, shape=None):
            N, L, C = input.shape
            if shape is not None:
                H, W = shape
            else:
                H, W = int(L**0.5), int(L**0.5)
            x = input
            if not self.without_pointwise:
                x = self.value_proj(x)
            x = x.reshape(N, H, W, -1)
            if self.dw_kernel_size is not None:
                q = self.offset_mask_dw(input.view(N, H, W, C).permute(0, 3, 1, 2))
                q = q.permute(0, 2, 3, 1).view(N, L, C)
            else:
                q = input
            offset_mask = self.offset_mask(q).reshape(N, H, W, -1)
            x_proj = x
            x = _torch_dcnv4_core(
                torch, x, offset_mask, self.kernel_size, self.kernel_size, self.stride,
                self.stride, self.pad, self.pad, self.dilation, self.dilation, self.group,
                self.group_channels, self.offset_scale, 256, self.remove_center,
            )  # fmt: skip
            if self.center_feature_scale:
                s = self.center_feature_scale_module(
                    x, self.center_feature_scale_proj_weight, self.center_feature_scale_proj_bias
                )
                s = s[..., None].repeat(1, 1, 1, 1, self.channels // self.group).flatten(-2)
                x = x * (1 - s) + x_proj * s
            x = x.view(N, L, -1)
            if not self.without_pointwise:
                x = self.output_proj(x)
            return x

    return DCNv3_pytorch, DCNv4_module


# ---------------------------------------------------------------------------- off-kink weights


def _taps(kernel_size, dilation, remove_center):
    """(P, 2) regular-grid taps (x, y) relative to the centre, in the anchors' point order."""
    k, d = kernel_size, dilation
    half = (d * (k - 1)) // 2
    return np.array(
        [
            (i * d - half, j * d - half)
            for i in range(k)
            for j in range(k)
            if not (remove_center and i == k // 2 and j == k // 2)
        ],
        np.float64,
    )


def _off_kink_bias(rng, layer):
    """Offset biases (G*P*2,) putting each point's coordinates at fractional parts in
    [0.3, 0.7], 0 or 1 pixel away from the rounded regular grid."""
    s = layer.offset_scale
    taps = _taps(layer.kernel_size, layer.dilation, layer.remove_center) * s
    taps = np.tile(taps[None], (layer.group, 1, 1))
    target = np.round(taps) + rng.integers(-1, 2, taps.shape) + rng.uniform(0.3, 0.7, taps.shape)
    return ((target - taps) / s).reshape(-1)


def off_kinks(layer, rng, scale=0.3):
    """Random parameters (float64) with sampling points off the kinks (see the module doc)."""
    for p in layer.parameters():
        p.data = p.data + scale * rng.standard_normal(p.shape)
    bias = _off_kink_bias(rng, layer)
    small = 0.004 / max(layer.offset_scale, 1.0)
    if isinstance(layer, DCNv3):
        layer.offset.weight.data = small * rng.standard_normal(layer.offset.weight.shape)
        layer.offset.bias.data = bias
    else:
        G, P3 = layer.group, layer.K // layer.group * 3
        w, b = layer.offset_mask.weight.data, layer.offset_mask.bias.data
        w3 = w[: G * P3].reshape(G, P3, -1)
        w3[:, : P3 * 2 // 3] = small * rng.standard_normal(w3[:, : P3 * 2 // 3].shape)
        b[: G * P3].reshape(G, P3)[:, : P3 * 2 // 3] = bias.reshape(G, -1)
        if layer.dw_kernel_size is not None:  # |q| stays the input's size
            layer.offset_mask_dw.weight.data = layer.offset_mask_dw.weight.data * 0.3
    return layer


# ---------------------------------------------------------------------------- parity


def _parity(torch, theirs, ours, x, rng, **kw):
    """Load ours' state dict into theirs by name (numpy -> torch), run both on x with the same cotangent; return the relative errors."""
    theirs.double()  # first: the anchors create center_feature_scale_proj_* in float32
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    assert list(ours.state_dict()) == list(theirs.state_dict())
    tx = torch.tensor(x, requires_grad=True)
    ty = theirs(tx, **kw)
    g = rng.standard_normal(tuple(ty.shape))
    torch.sum(ty * torch.from_numpy(g)).backward()
    ox = dn.tensor(x, requires_grad=True)
    y = ours(ox, **kw)
    (y * g).sum().backward()
    errs = {"y": rel_err(y.numpy(), ty.detach().numpy()), "x.grad": rel_err(ox.grad, tx.grad)}
    theirs_params = dict(theirs.named_parameters())
    worst = 0.0
    for name, p in ours.named_parameters():
        want = theirs_params[name].grad.numpy()
        assert p.grad is not None, name
        worst = max(worst, float(np.abs(p.grad - want).max() / max(1e-3, np.abs(want).max())))
    errs["params"] = worst
    return errs


DCNV3_CASES = {
    "default_g4": dict(cfg=dict(channels=8, group=4), hw=(5, 6)),
    "g1_k5_pad2": dict(cfg=dict(channels=6, group=1, kernel_size=5, pad=2), hw=(6, 5)),
    "dilation2": dict(cfg=dict(channels=8, group=2, dilation=2, pad=2), hw=(6, 6)),
    "offset_scale2_relu": dict(
        cfg=dict(channels=8, group=2, offset_scale=2.0, act_layer="ReLU"), hw=(5, 5)
    ),
    "offset_scale0.5_silu_dw5": dict(
        cfg=dict(channels=8, group=2, offset_scale=0.5, act_layer="SiLU", dw_kernel_size=5),
        hw=(4, 6),
    ),
    "remove_center": dict(cfg=dict(channels=8, group=2, remove_center=True), hw=(5, 5)),
    "center_feature_scale": dict(
        cfg=dict(channels=8, group=2, center_feature_scale=True), hw=(5, 4)
    ),
    "k1_pad0_all": dict(
        cfg=dict(
            channels=4, group=2, kernel_size=1, pad=0, center_feature_scale=True, dw_kernel_size=3
        ),
        hw=(3, 4),
    ),
    "k5_remove_center_cfs": dict(
        cfg=dict(
            channels=6,
            group=3,
            kernel_size=5,
            pad=2,
            remove_center=True,
            center_feature_scale=True,
            offset_scale=1.5,
        ),
        hw=(5, 5),
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(DCNV3_CASES), ids=str)
def test_dcnv3_matches_internimage(rng, case):
    torch = pytest.importorskip("torch")
    cfg, (H, W) = DCNV3_CASES[case]["cfg"], DCNV3_CASES[case]["hw"]
    theirs = _torch_modules(torch)[0](**cfg)
    ours = off_kinks(DCNv3(**cfg, dtype=np.float64), rng)
    x = rng.standard_normal((2, H, W, cfg["channels"]))
    errs = _parity(torch, theirs, ours, x, rng)
    assert errs["y"] < 1e-12 and errs["x.grad"] < 1e-12 and errs["params"] < 1e-11, errs


DCNV4_CASES = {
    "default_square": dict(cfg=dict(channels=8, group=2), hw=None, L=25),
    "g1_16_channels": dict(cfg=dict(channels=16, group=1), hw=None, L=16),
    "shape_dw3": dict(cfg=dict(channels=8, group=4, dw_kernel_size=3), hw=(4, 6), L=24),
    "k5_pad2_dilation1_offset_scale2": dict(
        cfg=dict(channels=6, group=3, kernel_size=5, pad=2, offset_scale=2.0), hw=(5, 4), L=20
    ),
    "dilation2_remove_center": dict(
        cfg=dict(channels=8, group=2, dilation=2, pad=2, remove_center=True), hw=(5, 6), L=30
    ),
    "center_feature_scale_no_output_bias": dict(
        cfg=dict(channels=8, group=2, center_feature_scale=True, output_bias=False),
        hw=(4, 5),
        L=20,
    ),
    "without_pointwise_cfs_dw": dict(
        cfg=dict(
            channels=8,
            group=2,
            without_pointwise=True,
            center_feature_scale=True,
            dw_kernel_size=5,
            offset_scale=0.5,
        ),
        hw=(5, 5),
        L=25,
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(DCNV4_CASES), ids=str)
def test_dcnv4_matches_dcnv4(rng, case):
    torch = pytest.importorskip("torch")
    c = DCNV4_CASES[case]
    cfg = c["cfg"]
    theirs = _torch_modules(torch)[1](**cfg)
    ours = off_kinks(DCNv4(**cfg, dtype=np.float64), rng)
    x = rng.standard_normal((2, c["L"], cfg["channels"]))
    kw = {} if c["hw"] is None else {"shape": c["hw"]}
    errs = _parity(torch, theirs, ours, x, rng, **kw)
    assert errs["y"] < 1e-12 and errs["x.grad"] < 1e-12 and errs["params"] < 1e-11, errs


def test_torch_state_dict_loads_into_ours(rng):
    torch = pytest.importorskip("torch")
    T3, T4 = _torch_modules(torch)
    for theirs, ours in (
        (T3(8, group=2, center_feature_scale=True).double(), DCNv3(8, group=2,
         center_feature_scale=True, dtype=np.float64)),
        (T4(8, group=2, dw_kernel_size=3).double(), DCNv4(8, group=2, dw_kernel_size=3,
         dtype=np.float64)),
    ):  # fmt: skip
        with torch.no_grad():
            for p in theirs.parameters():
                p.copy_(torch.randn(p.shape, dtype=p.dtype))
        ours.load_state_dict(theirs.state_dict())  # torch tensors converted
        for k, v in theirs.state_dict().items():
            np.testing.assert_array_equal(ours.state_dict()[k], v.numpy())


# ---------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize(
    "cfg",
    [
        dict(channels=4, group=2),
        dict(channels=4, group=1, remove_center=True, center_feature_scale=True, offset_scale=1.5),
        dict(channels=4, group=2, dilation=2, pad=2, act_layer="SiLU"),
    ],
    ids=["default", "remove_center_cfs", "dilation2"],
)
def test_gradcheck_input_dcnv3(rng, cfg):
    layer = off_kinks(DCNv3(**cfg, dtype=np.float64), rng)
    x = dn.tensor(rng.standard_normal((1, 3, 4, 4)), requires_grad=True)
    assert dn.gradcheck(layer, (x,), names=["input"])


@pytest.mark.parametrize(
    "cfg, shape",
    [
        (dict(channels=4, group=2), None),
        (dict(channels=4, group=2, dw_kernel_size=3, center_feature_scale=True), (3, 4)),
        (dict(channels=4, group=1, without_pointwise=True, remove_center=True), (4, 3)),
    ],
    ids=["default", "dw_cfs", "without_pointwise_remove_center"],
)
def test_gradcheck_input_dcnv4(rng, cfg, shape):
    layer = off_kinks(DCNv4(**cfg, dtype=np.float64), rng)
    x = dn.tensor(rng.standard_normal((1, 12 if shape else 9, 4)), requires_grad=True)
    assert dn.gradcheck(lambda t: layer(t, shape), (x,), names=["input"])


def test_gradcheck_parameters(rng):
    layer = off_kinks(DCNv3(4, group=2, center_feature_scale=True, dtype=np.float64), rng)
    x = rng.standard_normal((1, 3, 3, 4))
    names, params = zip(*layer.named_parameters())
    assert dn.gradcheck(lambda *ps: layer(x), params, names=list(names))
    layer = off_kinks(DCNv4(4, group=2, dw_kernel_size=3, dtype=np.float64), rng)
    x = rng.standard_normal((1, 9, 4))
    names, params = zip(*layer.named_parameters())
    assert dn.gradcheck(lambda *ps: layer(x), params, names=list(names))


# ---------------------------------------------------------------------------- layout and init


def test_state_dict_keys_and_shapes_are_the_anchors():
    torch = pytest.importorskip("torch")
    T3, T4 = _torch_modules(torch)
    configs3 = [
        dict(),
        dict(channels=8, group=2, kernel_size=5, dw_kernel_size=3, remove_center=True),
        dict(channels=8, group=2, center_feature_scale=True, act_layer="ReLU"),
    ]
    for cfg in configs3:
        want = {k: tuple(v.shape) for k, v in T3(**cfg).state_dict().items()}
        got = {k: v.shape for k, v in DCNv3(**cfg).state_dict().items()}
        assert list(got) == list(want) and got == want, cfg
    configs4 = [
        dict(),
        dict(channels=32, group=2, dw_kernel_size=3, remove_center=True),  # 3*K = 48
        dict(channels=16, group=1, center_feature_scale=True, output_bias=False),
        dict(channels=16, group=1, without_pointwise=True),
    ]
    for cfg in configs4:
        want = {k: tuple(v.shape) for k, v in T4(**cfg).state_dict().items()}
        got = {k: v.shape for k, v in DCNv4(**cfg).state_dict().items()}
        assert list(got) == list(want) and got == want, cfg
    assert DCNv3().state_dict()["dw_conv.1.1.weight"].shape == (64,)
    assert DCNv4().offset_mask.weight.shape == (112, 64)  # 3 * 4 * 9 = 108 -> 112


def test_initialisation():
    dn.nn.init.manual_seed(0)
    layer = DCNv3(16, group=4, center_feature_scale=True)
    for p in (
        layer.offset.weight,
        layer.offset.bias,
        layer.mask.weight,
        layer.mask.bias,
        layer.input_proj.bias,
        layer.output_proj.bias,
        layer.center_feature_scale_proj_weight,
        layer.center_feature_scale_proj_bias,
    ):
        assert p.dtype == np.float32 and not np.any(p.data)
    bound = math.sqrt(6 / 32)
    for p in (layer.input_proj.weight, layer.output_proj.weight):
        assert np.abs(p.data).max() <= bound and np.abs(p.data).max() > 0.8 * bound
    assert layer.dw_conv[1][1].eps == 1e-6 and layer.dw_conv[0].groups == 16
    v4 = DCNv4(16, group=4, dtype=np.float64, act_layer="GELU")  # **kwargs ignored, as DCNv4
    assert not np.any(v4.offset_mask.weight.data) and not np.any(v4.offset_mask.bias.data)
    assert v4.value_proj.weight.dtype == np.float64 and not np.any(v4.output_proj.bias.data)
    assert "without_pointwise" not in repr(v4) and "group=4" in repr(v4)


def test_fresh_dcnv3_samples_the_regular_grid(rng):
    # zero offsets and equal weights: each group averages its 3x3 window (zero padding)
    layer = DCNv3(4, group=2, dtype=np.float64)
    x = rng.standard_normal((1, 5, 6, 4))
    v = layer.input_proj(x).numpy()
    pad = np.pad(v, ((0, 0), (1, 1), (1, 1), (0, 0)))
    box = sum(pad[:, i : i + 5, j : j + 6] for i in range(3) for j in range(3)) / 9
    want = layer.output_proj(box).numpy()
    np.testing.assert_allclose(layer(x).numpy(), want, rtol=0, atol=1e-13)


def test_sampling_locations_match_the_anchor(rng):
    torch = pytest.importorskip("torch")
    for cfg in (
        dict(channels=8, group=2, offset_scale=1.5, remove_center=True),
        dict(channels=4, group=2, kernel_size=5, pad=4, dilation=2),
    ):
        ours = off_kinks(DCNv3(**cfg, dtype=np.float64), rng)
        theirs = _torch_modules(torch)[0](**cfg).double()
        theirs.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
        x = rng.standard_normal((2, 5, 4, cfg["channels"]))
        loc, w = ours.sampling_locations(x)
        tloc, tw = theirs(torch.from_numpy(x), return_locations=True)
        np.testing.assert_allclose(loc.numpy(), tloc.detach().numpy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(w.numpy(), tw.detach().numpy(), rtol=0, atol=1e-15)
        np.testing.assert_allclose(w.numpy().sum(-1), 1.0, rtol=0, atol=1e-14)


def test_float32(rng):
    for layer, x in (
        (DCNv3(8, group=2), rng.standard_normal((2, 4, 5, 8))),
        (DCNv4(8, group=2), rng.standard_normal((2, 16, 8))),
    ):
        off_kinks(layer.double(), rng)
        y64 = layer(x).numpy()
        y32 = layer.float()(x.astype(np.float32))
        assert y32.dtype == np.float32
        assert rel_err(y32.numpy(), y64) < 1e-5


def test_empty_batch(rng):
    layer = DCNv3(4, group=2, dtype=np.float64)
    x = dn.tensor(np.zeros((0, 3, 3, 4)), requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (0, 3, 3, 4) and x.grad.shape == (0, 3, 3, 4)
    assert DCNv4(4, group=2)(np.zeros((0, 9, 4), np.float32)).shape == (0, 9, 4)


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "cls, kw, err, msg",
    [
        (DCNv3, dict(channels=6, group=4), ValueError,
         "DCNv3: channels must be divisible by group, but got 6 and 4"),
        (DCNv4, dict(channels=6, group=4), ValueError,
         "DCNv4: channels must be divisible by group, but got 6 and 4"),
        (DCNv3, dict(channels=0), ValueError, "DCNv3: channels must be >= 1, got 0"),
        (DCNv3, dict(kernel_size=2.0), TypeError, "DCNv3: kernel_size must be an int, got 2.0"),
        (DCNv3, dict(dw_kernel_size=0), ValueError, "DCNv3: dw_kernel_size must be >= 1, got 0"),
        (DCNv4, dict(dw_kernel_size=0), ValueError, "DCNv4: dw_kernel_size must be >= 1, got 0"),
        (DCNv3, dict(stride=0), ValueError, "DCNv3: stride must be >= 1, got 0"),
        (DCNv4, dict(pad=-1), ValueError, "DCNv4: pad must be >= 0, got -1"),
        (DCNv3, dict(dilation=0), ValueError, "DCNv3: dilation must be >= 1, got 0"),
        (DCNv3, dict(group=0), ValueError, "DCNv3: group must be >= 1, got 0"),
        (DCNv4, dict(offset_scale="1"), TypeError,
         "DCNv4: offset_scale must be a real number, got '1'"),
        (DCNv3, dict(offset_scale=float("nan")), ValueError,
         "DCNv3: offset_scale must be finite, got nan"),
        (DCNv3, dict(act_layer="Tanh"), ValueError,
         "DCNv3: act_layer must be 'ReLU', 'SiLU' or 'GELU', got 'Tanh'"),
        (DCNv3, dict(norm_layer="BN"), ValueError,
         "DCNv3: norm_layer must be 'LN' (deformnp has no batch normalisation), got 'BN'"),
        (DCNv3, dict(norm_layer="GN"), ValueError, "DCNv3: norm_layer must be 'LN', got 'GN'"),
        (DCNv3, dict(kernel_size=4, pad=2, remove_center=True), ValueError,
         "DCNv3: remove_center is only compatible with an odd kernel_size, got 4"),
        (DCNv4, dict(kernel_size=2, remove_center=True), ValueError,
         "DCNv4: remove_center is only compatible with an odd kernel_size, got 2"),
        (DCNv4, dict(remove_center=2), TypeError,
         "DCNv4: remove_center must be a bool (or 0 or 1), got 2"),
        (DCNv3, dict(center_feature_scale=1), TypeError,
         "DCNv3: center_feature_scale must be a bool, got 1"),
        (DCNv4, dict(without_pointwise="yes"), TypeError,
         "DCNv4: without_pointwise must be a bool, got 'yes'"),
        (DCNv4, dict(output_bias=None), TypeError,
         "DCNv4: output_bias must be a bool, got None"),
        (DCNv3, dict(dtype=np.int32), TypeError,
         "layers: dtype must be float32 or float64, got int32"),
    ],
)  # fmt: skip
def test_constructor_messages(cls, kw, err, msg):
    with pytest.raises(err) as info:
        cls(**kw)
    assert str(info.value) == msg


def test_forward_messages():
    v3 = DCNv3(8, group=2)
    with pytest.raises(ValueError, match=r"^DCNv3: input must be \(N, H, W, 8\), got shape "
                       r"\(1, 8, 4, 4\)$"):  # fmt: skip
        v3(np.zeros((1, 8, 4, 4), np.float32))
    with pytest.raises(TypeError, match=r"^DCNv3: input must be float32 like the layer's "
                       r"parameters, got float64$"):  # fmt: skip
        v3(np.zeros((1, 4, 4, 8)))
    with pytest.raises(ValueError, match=r"kernel_size=3, stride=2, pad=1, dilation=1 give "
                       r"\(2, 2\); use stride=1 and pad=dilation\*\(kernel_size-1\)//2$"):  # fmt: skip
        DCNv3(8, group=2, stride=2)(np.zeros((1, 4, 4, 8), np.float32))
    with pytest.raises(ValueError, match=r"^DCNv3: the layer predicts offsets at each of the "
                       r"input's \(H, W\) = \(4, 5\) positions"):  # fmt: skip
        DCNv3(8, group=2, pad=0)(np.zeros((1, 4, 5, 8), np.float32))
    v4 = DCNv4(8, group=2)
    with pytest.raises(ValueError, match=r"^DCNv4: input must be \(N, L, 8\), got shape "
                       r"\(1, 3, 3, 8\)$"):  # fmt: skip
        v4(np.zeros((1, 3, 3, 8), np.float32))
    with pytest.raises(ValueError, match=r"^DCNv4: input has L = 12 positions, but \(H, W\) = "
                       r"\(3, 3\) \(a square map, as shape is None\)$"):  # fmt: skip
        v4(np.zeros((1, 12, 8), np.float32))
    with pytest.raises(ValueError, match=r"^DCNv4: input has L = 12 positions, but \(H, W\) = "
                       r"\(2, 5\)$"):  # fmt: skip
        v4(np.zeros((1, 12, 8), np.float32), shape=(2, 5))
    with pytest.raises(TypeError, match=r"^DCNv4: shape must be \(H, W\), got 12$"):
        v4(np.zeros((1, 12, 8), np.float32), shape=12)
    with pytest.raises(TypeError, match=r"^DCNv4: input must be float32 like"):
        v4(np.zeros((1, 9, 8)))
