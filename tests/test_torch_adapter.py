"""deformnp.torch: the PyTorch adapter (issue #18).

* every function under ``torch.autograd.gradcheck`` in float64, for every differentiable input,
  at inputs off the kinks of the sampling rules (``deformnp.cases.inputs``);
* outputs and gradients against torchvision's ops (float64 to rounding, float32 to float32
  rounding), Deformable-DETR's ``ms_deform_attn_core_pytorch`` (written out below from the
  anchor's source) and, for mmcv's deformable RoI pooling, torchvision's aligned ``roi_align``
  applied bin by bin to the shifted bins;
* the modules: the anchors' state dicts load with ``strict=True`` (torchvision's modules' own,
  hand-built ones with mmcv's and Deformable-DETR's key names), and module outputs equal the
  anchors' functional ops;
* the contract: dtypes, zero-copy hand-over on the CPU, tensors that require grad, autocast,
  error types, and ``import deformnp`` staying torch-free;
* the CUDA path on a real GPU only (``DEFORMNP_REAL_GPU=1`` and ``torch.cuda.is_available()``):
  the simulator's device arrays have no ``__cuda_array_interface__`` for torch to wrap.

Skipped without torch; the parity tests also need torchvision.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import deformnp.torch as dt  # noqa: E402
from deformnp.cases.inputs import (  # noqa: E402
    boxes_in,
    conv_offsets_off_kinks,
    deform_roi_offsets_off_kinks,
    level_layout,
    locations_off_kinks,
)

F = torch.nn.functional
gradcheck = torch.autograd.gradcheck

pytestmark = pytest.mark.torch


def _tv():
    return pytest.importorskip("torchvision.ops")


def t64(a, grad=True):
    return torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=grad)


def rel_err(a, b):
    a = a.detach().double() if isinstance(a, torch.Tensor) else torch.as_tensor(a).double()
    b = b.detach().double() if isinstance(b, torch.Tensor) else torch.as_tensor(b).double()
    if a.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-300))


def grads(out, inputs, seed=0):
    """The gradients of sum(out * r) with respect to ``inputs`` (None for those not needed)."""
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    live = [t for t in inputs if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(out, live, r))
    return [next(got) if t is not None and t.requires_grad else None for t in inputs]


# ============================================================================ inputs


def conv_inputs(
    rng, B, Cin, H, W, Cout, kh, kw, groups, G, stride, padding, dilation, mask=True, bias=True
):
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    Hout = (H + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    Wout = (W + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    return {
        "input": t64(rng.standard_normal((B, Cin, H, W))),
        "offset": t64(conv_offsets_off_kinks(rng, (B, 2 * G * kh * kw, Hout, Wout))),
        "weight": t64(rng.standard_normal((Cout, Cin // groups, kh, kw))),
        "bias": t64(rng.standard_normal(Cout)) if bias else None,
        "mask": t64(rng.uniform(0.2, 1.0, (B, G * kh * kw, Hout, Wout))) if mask else None,
        "geometry": (stride, padding, dilation),
    }


CONVS = {
    # B, Cin, H, W, Cout, kh, kw, groups, offset groups, stride, padding, dilation, mask, bias
    "v2": (1, 4, 5, 5, 4, 3, 3, 2, 2, (1, 1), (1, 1), (1, 1), True, True),
    "v2-strided": (2, 2, 6, 5, 2, 2, 3, 1, 1, (2, 1), (0, 1), (1, 2), True, False),
    "v1": (1, 2, 5, 4, 3, 3, 2, 1, 2, (1, 2), (1, 0), (2, 1), False, True),
}
CONV_NAMES = ("input", "offset", "weight", "bias", "mask")


def conv_call(fn, a):
    stride, padding, dilation = a["geometry"]
    return fn(a["input"], a["offset"], a["weight"], a["bias"], stride, padding, dilation, a["mask"])


def roi_boxes(rng, K, B, H, W, s, dtype=np.float64):
    return torch.tensor(boxes_in(rng, K, B, H, W, s), dtype=torch.float64).to(
        getattr(torch, np.dtype(dtype).name)
    )


def attention_inputs(rng, levels=((3, 4), (2, 2)), N=2, Lq=3, M=2, D=3, P=2):
    shapes, starts = level_layout(levels)
    S = int(shapes.prod(axis=1).sum())
    L = len(levels)
    return (
        t64(rng.standard_normal((N, S, M, D))),
        torch.from_numpy(shapes),
        torch.from_numpy(starts),
        t64(locations_off_kinks(rng, shapes, (N, Lq, M), P)),
        t64(rng.uniform(0.1, 1.0, (N, Lq, M, L, P))),
    )


def ms_deform_attn_core_pytorch(value, value_spatial_shapes, sampling_locations, attention_weights):
    """Deformable-DETR's pure-PyTorch core (models/ops/functions/ms_deform_attn_func.py)."""
    N_, S_, M_, D_ = value.shape
    _, Lq_, M_, L_, P_, _ = sampling_locations.shape
    value_list = value.split([int(H_) * int(W_) for H_, W_ in value_spatial_shapes], dim=1)
    sampling_grids = 2 * sampling_locations - 1
    sampling_value_list = []
    for lid_, (H_, W_) in enumerate(value_spatial_shapes):
        H_, W_ = int(H_), int(W_)
        value_l_ = value_list[lid_].flatten(2).transpose(1, 2).reshape(N_ * M_, D_, H_, W_)
        sampling_grid_l_ = sampling_grids[:, :, :, lid_].transpose(1, 2).flatten(0, 1)
        sampling_value_l_ = F.grid_sample(
            value_l_, sampling_grid_l_, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        sampling_value_list.append(sampling_value_l_)
    attention_weights = attention_weights.transpose(1, 2).reshape(N_ * M_, 1, Lq_, L_ * P_)
    output = (
        (torch.stack(sampling_value_list, dim=-2).flatten(-2) * attention_weights)
        .sum(-1)
        .view(N_, M_ * D_, Lq_)
    )
    return output.transpose(1, 2).contiguous()


def deform_roi_pool_reference(tvo, x, rois, offset, output_size, ratio, gamma):
    """mmcv's deform_roi_pool (spatial_scale 1) from torchvision's aligned roi_align: bin (ph,
    pw) of box k is a 1x1 aligned RoI Align of the bin's own box, shifted by gamma * roi size *
    offset (the adaptive grid ceil(bin size) is the same as the whole box's ceil(roi / PH))."""
    PH, PW = output_size
    K = rois.shape[0]
    offset = offset.detach() if offset is not None else None
    bins = []
    for k in range(K):
        b, x1, y1, x2, y2 = (float(v) for v in rois[k])
        rw, rh = x2 - x1, y2 - y1
        for ph in range(PH):
            for pw in range(PW):
                dx = gamma * rw * float(offset[k, 0, ph, pw]) if offset is not None else 0.0
                dy = gamma * rh * float(offset[k, 1, ph, pw]) if offset is not None else 0.0
                bx = x1 + pw * rw / PW + dx
                by = y1 + ph * rh / PH + dy
                bins.append([b, bx, by, bx + rw / PW, by + rh / PH])
    boxes = torch.tensor(bins, dtype=x.dtype)
    out = tvo.roi_align(x, boxes, 1, 1.0, ratio, aligned=True)  # (K*PH*PW, C, 1, 1)
    return out.view(K, PH, PW, -1).permute(0, 3, 1, 2)


# ============================================================================ gradcheck


@pytest.mark.parametrize("cfg", sorted(CONVS))
def test_gradcheck_deform_conv2d(rng, cfg):
    *shape, mask, bias = CONVS[cfg]
    a = conv_inputs(rng, *shape, mask=mask, bias=bias)
    stride, padding, dilation = a["geometry"]
    live = [n for n in CONV_NAMES if a[n] is not None]

    def fn(*ts):
        d = dict(zip(live, ts))
        return dt.deform_conv2d(
            d["input"],
            d["offset"],
            d["weight"],
            d.get("bias"),
            stride,
            padding,
            dilation,
            d.get("mask"),
        )

    assert gradcheck(fn, [a[n] for n in live])


def test_gradcheck_modulated_deform_conv2d(rng):
    a = conv_inputs(rng, 1, 4, 5, 4, 2, 3, 3, 2, 2, (1, 1), (1, 1), (1, 1))

    def fn(x, offset, mask, weight, bias):
        return dt.modulated_deform_conv2d(x, offset, mask, weight, bias, 1, 1, 1, 2, 2)

    assert gradcheck(fn, [a["input"], a["offset"], a["mask"], a["weight"], a["bias"]])


def test_gradcheck_deform_conv2d_each_input_alone(rng):
    # needs: one input at a time requires grad; the others get no gradient computed
    a = conv_inputs(rng, *CONVS["v2"][:-2])
    for name in CONV_NAMES:
        b = {
            n: (v.detach().requires_grad_(n == name) if isinstance(v, torch.Tensor) else v)
            for n, v in a.items()
        }

        def fn(t, name=name, b=b):
            return conv_call(dt.deform_conv2d, {**b, name: t})

        assert gradcheck(fn, [b[name]]), name


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("ratio", [-1, 2])
def test_gradcheck_roi_align(rng, aligned, ratio):
    x = t64(rng.standard_normal((2, 3, 6, 7)))
    boxes = roi_boxes(rng, 4, 2, 6, 7, 0.5)
    assert gradcheck(lambda t: dt.roi_align(t, boxes, (2, 3), 0.5, ratio, aligned), [x])


def test_gradcheck_roi_align_list_boxes(rng):
    x = t64(rng.standard_normal((2, 2, 6, 6)))
    boxes = [roi_boxes(rng, 3, 1, 6, 6, 1.0)[:, 1:], roi_boxes(rng, 2, 1, 6, 6, 1.0)[:, 1:]]
    assert gradcheck(lambda t: dt.roi_align(t, boxes, 2, 1.0, 2), [x])


def test_gradcheck_roi_pool(rng):
    x = t64(rng.standard_normal((2, 3, 7, 6)))
    boxes = roi_boxes(rng, 5, 2, 7, 6, 1.0)
    assert gradcheck(lambda t: dt.roi_pool(t, boxes, (3, 2), 1.0), [x])


def test_gradcheck_ps_roi_align(rng):
    x = t64(rng.standard_normal((2, 2 * 6, 6, 7)))
    boxes = roi_boxes(rng, 4, 2, 6, 7, 0.5)
    assert gradcheck(lambda t: dt.ps_roi_align(t, boxes, (2, 3), 0.5, 2), [x])


def test_gradcheck_ps_roi_pool(rng):
    x = t64(rng.standard_normal((2, 2 * 4, 7, 6)))
    boxes = roi_boxes(rng, 4, 2, 7, 6, 1.0)
    assert gradcheck(lambda t: dt.ps_roi_pool(t, boxes, 2, 1.0), [x])


@pytest.mark.parametrize("ratio", [2, 0])
def test_gradcheck_deform_roi_pool(rng, ratio):
    H, W, PH, PW, gamma = 7, 8, 2, 3, 0.1
    # boxes of 3.4 x 5.4 pixels: the adaptive grid (ratio 0) is ceil(3.4/2) x ceil(5.4/3) = 2x2,
    # the fixed one (ratio 2) too, so the offsets are drawn off the kinks for a 2x2 grid
    rois = np.array([[0, 0.3, 0.6, 5.7, 4.0], [1, 1.2, 2.1, 6.6, 5.5], [1, 2.6, 0.2, 8.0, 3.6]])
    x = t64(rng.standard_normal((2, 3, H, W)))
    offset = t64(deform_roi_offsets_off_kinks(rng, rois, PH, PW, H, W, 2, gamma))
    boxes = torch.tensor(rois)
    assert gradcheck(
        lambda t, o: dt.deform_roi_pool(t, boxes, o, (PH, PW), 1.0, ratio, gamma), [x, offset]
    )
    # without offsets: the input alone
    assert gradcheck(lambda t: dt.deform_roi_pool(t, boxes, None, (PH, PW), 1.0, ratio), [x])


def test_gradcheck_ms_deform_attn(rng):
    value, shapes, starts, loc, attn = attention_inputs(rng)
    assert gradcheck(lambda v, l, a: dt.ms_deform_attn(v, shapes, starts, l, a), [value, loc, attn])
    assert gradcheck(
        lambda v, l, a: dt.MSDeformAttnFunction.apply(v, shapes, starts, l, a, 64),
        [value, loc, attn],
    )


# ============================================================================ torchvision parity


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cfg", sorted(CONVS))
def test_deform_conv2d_matches_torchvision(rng, cfg, dtype):
    tvo = _tv()
    *shape, mask, bias = CONVS[cfg]
    a = conv_inputs(rng, *shape, mask=mask, bias=bias)
    ours = {
        n: (v.detach().to(dtype).requires_grad_() if isinstance(v, torch.Tensor) else v)
        for n, v in a.items()
    }
    theirs = {
        n: (v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) else v)
        for n, v in ours.items()
    }
    out = conv_call(dt.deform_conv2d, ours)
    expected = conv_call(tvo.deform_conv2d, theirs)
    assert out.dtype == dtype and out.shape == expected.shape
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert rel_err(out, expected) < tol
    for n, g, e in zip(
        CONV_NAMES,
        grads(out, [ours[n] for n in CONV_NAMES]),
        grads(expected, [theirs[n] for n in CONV_NAMES]),
    ):
        if g is not None or e is not None:
            assert g.dtype == dtype and rel_err(g, e) < tol * 5, n


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("ratio", [-1, 2])
def test_roi_align_matches_torchvision(rng, dtype, aligned, ratio):
    tvo = _tv()
    x = torch.tensor(rng.standard_normal((2, 3, 9, 11)), dtype=dtype, requires_grad=True)
    boxes = roi_boxes(rng, 6, 2, 9, 11, 0.5, dtype=np.dtype(str(dtype).split(".")[1]))
    out = dt.roi_align(x, boxes, (3, 2), 0.5, ratio, aligned)
    expected = tvo.roi_align(x, boxes, (3, 2), 0.5, ratio, aligned)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert out.dtype == dtype and rel_err(out, expected) < tol
    assert rel_err(grads(out, [x])[0], grads(expected, [x])[0]) < tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_roi_pool_matches_torchvision(rng, dtype):
    tvo = _tv()
    x = torch.tensor(rng.standard_normal((2, 3, 9, 8)), dtype=dtype, requires_grad=True)
    boxes = roi_boxes(rng, 6, 2, 9, 8, 0.5, dtype=np.dtype(str(dtype).split(".")[1]))
    out = dt.roi_pool(x, boxes, (3, 2), 0.5)
    expected = tvo.roi_pool(x, boxes, (3, 2), 0.5)
    assert out.dtype == dtype and rel_err(out, expected) == 0.0  # a max: exactly equal
    assert rel_err(grads(out, [x])[0], grads(expected, [x])[0]) < 1e-15


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("ratio", [-1, 2])
def test_ps_roi_align_matches_torchvision(rng, dtype, ratio):
    tvo = _tv()
    x = torch.tensor(rng.standard_normal((2, 2 * 6, 9, 11)), dtype=dtype, requires_grad=True)
    boxes = roi_boxes(rng, 6, 2, 9, 11, 0.5, dtype=np.dtype(str(dtype).split(".")[1]))
    out = dt.ps_roi_align(x, boxes, (2, 3), 0.5, ratio)
    expected = tvo.ps_roi_align(x, boxes, (2, 3), 0.5, ratio)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert out.dtype == dtype and rel_err(out, expected) < tol
    assert rel_err(grads(out, [x])[0], grads(expected, [x])[0]) < tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ps_roi_pool_matches_torchvision(rng, dtype):
    tvo = _tv()
    H, W, s, K = 11, 13, 0.5, 8
    x = torch.tensor(rng.standard_normal((2, 3 * 4, H, W)), dtype=dtype, requires_grad=True)
    # bins off the last row and column, where torchvision's forward never pools (documented)
    x1, y1 = rng.uniform(0, 10, K), rng.uniform(0, 8, K)
    x2, y2 = rng.uniform(x1 + 1, 2 * (W - 2) - 1), rng.uniform(y1 + 1, 2 * (H - 2) - 1)
    boxes = torch.tensor(np.stack([rng.integers(0, 2, K), x1, y1, x2, y2], 1), dtype=dtype)
    out = dt.ps_roi_pool(x, boxes, 2, s)
    expected = tvo.ps_roi_pool(x, boxes, 2, s)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert out.dtype == dtype and rel_err(out, expected) < tol
    assert rel_err(grads(out, [x])[0], grads(expected, [x])[0]) < tol


def test_list_boxes_equal_tensor_boxes(rng):
    tvo = _tv()
    x = t64(rng.standard_normal((2, 4, 8, 8)))
    b0, b1 = roi_boxes(rng, 3, 1, 8, 8, 1.0)[:, 1:], roi_boxes(rng, 2, 1, 8, 8, 1.0)[:, 1:]
    for fn, tv_fn, size in [
        (dt.roi_align, tvo.roi_align, 2),
        (dt.roi_pool, tvo.roi_pool, 2),
        (dt.ps_roi_align, tvo.ps_roi_align, 2),
    ]:
        out = fn(x, [b0, b1], size)
        assert rel_err(out, tv_fn(x, [b0, b1], size)) < 1e-12
        assert torch.equal(out, fn(x, tvo._utils.convert_boxes_to_roi_format([b0, b1]), size))


def test_deform_roi_pool_matches_bin_by_bin_roi_align(rng):
    tvo = _tv()
    H, W, PH, PW, gamma = 9, 10, 2, 3, 0.2
    x = t64(rng.standard_normal((2, 3, H, W)))
    rois = torch.tensor(boxes_in(rng, 4, 2, H, W, 1.0))
    offset = t64(rng.uniform(-1, 1, (4, 2, PH, PW)))
    for ratio in (2, 0):
        out = dt.deform_roi_pool(x, rois, offset, (PH, PW), 1.0, ratio, gamma)
        expected = deform_roi_pool_reference(tvo, x, rois, offset, (PH, PW), ratio, gamma)
        assert rel_err(out, expected) < 1e-12
        assert rel_err(grads(out, [x])[0], grads(expected, [x])[0]) < 1e-12
    # no offset: aligned RoI Align without the minimum box size
    out = dt.deform_roi_pool(x, rois, None, (PH, PW))
    assert rel_err(out, tvo.roi_align(x, rois, (PH, PW), 1.0, 0, aligned=True)) < 1e-12


# ============================================================================ Deformable-DETR


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ms_deform_attn_matches_core_pytorch(rng, dtype):
    value, shapes, starts, loc, attn = (
        t.detach().to(dtype).requires_grad_() if t.is_floating_point() else t
        for t in attention_inputs(rng, levels=((4, 5), (3, 3), (1, 2)), N=2, Lq=4, M=2, D=4, P=3)
    )
    out = dt.MSDeformAttnFunction.apply(value, shapes, starts, loc, attn, 64)
    expected = ms_deform_attn_core_pytorch(value, shapes, loc, attn)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert out.dtype == dtype and out.shape == expected.shape and rel_err(out, expected) < tol
    assert torch.equal(out, dt.ms_deform_attn(value, shapes, starts, loc, attn))
    for name, g, e in zip(
        ("value", "sampling_locations", "attention_weights"),
        grads(out, [value, loc, attn]),
        grads(expected, [value, loc, attn]),
    ):
        assert g.dtype == dtype and rel_err(g, e) < tol * 10, name


def test_ms_deform_attn_ignores_im2col_step(rng):
    # Deformable-DETR needs the batch to be a multiple of im2col_step; any batch works here
    value, shapes, starts, loc, attn = attention_inputs(rng, N=3)
    a = dt.MSDeformAttnFunction.apply(value, shapes, starts, loc, attn, 2)
    b = dt.MSDeformAttnFunction.apply(value, shapes, starts, loc, attn, 64)
    assert torch.equal(a, b)


# ============================================================================ modules


def test_deform_conv2d_module_loads_torchvision_state_dict(rng):
    tvo = _tv()
    torch.manual_seed(0)
    theirs = tvo.DeformConv2d(4, 6, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), groups=2)
    ours = dt.DeformConv2d(4, 6, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), groups=2)
    assert repr(ours) == repr(theirs)
    assert ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)  # and back
    x = torch.tensor(rng.standard_normal((2, 4, 7, 6)), dtype=torch.float32)
    off = torch.tensor(conv_offsets_off_kinks(rng, (2, 2 * 6, 4, 6)), dtype=torch.float32)
    mask = torch.tensor(rng.uniform(0, 1, (2, 6, 4, 6)), dtype=torch.float32)
    for m in (None, mask):
        out, expected = ours(x, off, m), theirs(x, off, m)
        assert out.dtype == torch.float32 and rel_err(out, expected) < 1e-5
    # no bias; float64 after .double()
    ours = dt.DeformConv2d(4, 6, 3, bias=False).double()
    theirs = tvo.DeformConv2d(4, 6, 3, bias=False).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert ours.bias is None and repr(ours) == repr(theirs)
    x = x.double()
    off = torch.tensor(conv_offsets_off_kinks(rng, (2, 18, 5, 4)))
    assert rel_err(ours(x, off), theirs(x, off)) < 1e-12


def test_deform_conv2d_module_init_is_torchvision_s(rng):
    m = dt.DeformConv2d(4, 6, (3, 2), groups=2)
    bound = 1 / np.sqrt(2 * 3 * 2)
    assert m.weight.shape == (6, 2, 3, 2) and m.bias.shape == (6,)
    assert (
        float(m.weight.detach().abs().max()) <= bound
        and float(m.bias.detach().abs().max()) <= bound
    )
    assert sorted(n for n, _ in m.named_parameters()) == ["bias", "weight"]
    with pytest.raises(ValueError, match="in_channels must be divisible by groups"):
        dt.DeformConv2d(5, 4, 3, groups=2)


@pytest.mark.parametrize(
    "ours, theirs, args",
    [
        ("RoIAlign", "RoIAlign", ((3, 2), 0.5, 2, True)),
        ("RoIAlign", "RoIAlign", (2, 0.5, -1)),
        ("RoIPool", "RoIPool", ((3, 2), 0.5)),
        ("PSRoIAlign", "PSRoIAlign", ((2, 3), 0.5, 2)),
        ("PSRoIPool", "PSRoIPool", (2, 0.5)),
    ],
)
def test_roi_modules_match_torchvision(rng, ours, theirs, args):
    tvo = _tv()
    a, b = getattr(dt, ours)(*args), getattr(tvo, theirs)(*args)
    assert repr(a) == repr(b)
    assert a.load_state_dict(b.state_dict(), strict=True)
    x = torch.tensor(rng.standard_normal((2, 12, 11, 13)))
    if ours == "PSRoIPool":  # bins off the last row and column (documented difference)
        boxes = torch.tensor([[0, 1.0, 2.0, 14.0, 12.0], [1, 3.0, 0.0, 20.0, 16.0]], dtype=x.dtype)
    else:
        boxes = roi_boxes(rng, 5, 2, 11, 13, 0.5)
    assert rel_err(a(x, boxes), b(x, boxes)) < 1e-12


def _mmcv_pack_state(rng, Cin, Cout, k, G, groups=1):
    return {
        "weight": torch.tensor(rng.standard_normal((Cout, Cin // groups, k, k)) * 0.3),
        "bias": torch.tensor(rng.standard_normal(Cout)),
        "conv_offset.weight": torch.tensor(rng.standard_normal((3 * G * k * k, Cin, k, k)) * 0.2),
        "conv_offset.bias": torch.tensor(rng.standard_normal(3 * G * k * k) * 0.5),
    }


def test_modulated_deform_conv2d_pack_loads_mmcv_keys_and_matches_torchvision(rng):
    tvo = _tv()
    layer = dt.ModulatedDeformConv2dPack(4, 6, 3, stride=1, padding=1, groups=2, deform_groups=2)
    # a fresh layer: conv_offset zeroed (regular grid, mask 0.5), mmcv's weight init, zero bias
    assert float(layer.conv_offset.weight.detach().abs().max()) == 0.0
    assert float(layer.conv_offset.bias.detach().abs().max()) == 0.0
    assert float(layer.weight.detach().abs().max()) <= 1 / np.sqrt(4 * 9)
    assert float(layer.bias.detach().abs().max()) == 0.0
    state = _mmcv_pack_state(rng, 4, 6, 3, 2, groups=2)
    assert sorted(layer.state_dict()) == sorted(state)
    layer.double().load_state_dict(state, strict=True)
    x = t64(rng.standard_normal((2, 4, 6, 5)))
    out = layer(x)
    # mmcv's forward recipe with torchvision's op: the offset layout is the same
    o = F.conv2d(x, state["conv_offset.weight"], state["conv_offset.bias"], 1, 1, 1)
    o1, o2, m = torch.chunk(o, 3, dim=1)
    expected = tvo.deform_conv2d(
        x, torch.cat((o1, o2), 1), state["weight"], state["bias"], 1, 1, 1, torch.sigmoid(m)
    )
    assert rel_err(out, expected) < 1e-12
    assert rel_err(grads(out, [x])[0], grads(expected, [x])[0]) < 1e-12
    # the functional form, mmcv's argument order
    offset, mask = torch.cat((o1, o2), 1), torch.sigmoid(m)
    direct = dt.modulated_deform_conv2d(
        x, offset, mask, state["weight"], state["bias"], 1, 1, 1, 2, 2
    )
    assert rel_err(direct, expected) < 1e-12


def test_modulated_deform_conv2d_checks_groups(rng):
    a = conv_inputs(rng, 1, 4, 5, 4, 2, 3, 3, 2, 2, (1, 1), (1, 1), (1, 1))
    args = (a["input"], a["offset"], a["mask"], a["weight"], a["bias"], 1, 1, 1)
    with pytest.raises(ValueError, match="expected groups \\* weight.shape\\[1\\]"):
        dt.modulated_deform_conv2d(*args, 1, 2)
    with pytest.raises(ValueError, match="expected 2\\*deform_groups\\*kh\\*kw = 18"):
        dt.modulated_deform_conv2d(*args, 2, 1)


def test_deform_roi_pool_pack_loads_mmcv_keys_and_matches_reference(rng):
    tvo = _tv()
    PH, PW, C, hidden = 2, 3, 3, 8
    layer = dt.DeformRoIPoolPack(
        (PH, PW), C, hidden, spatial_scale=1.0, sampling_ratio=2, gamma=0.1
    )
    assert (
        float(layer.offset_fc[-1].weight.detach().abs().max()) == 0.0
    )  # mmcv zeroes the last layer
    shapes = {0: (hidden, PH * PW * C), 2: (hidden, hidden), 4: (PH * PW * 2, hidden)}
    state = {}
    for i, shape in shapes.items():
        state[f"offset_fc.{i}.weight"] = torch.tensor(rng.standard_normal(shape) * 0.3)
        state[f"offset_fc.{i}.bias"] = torch.tensor(rng.standard_normal(shape[0]) * 0.3)
    assert sorted(layer.state_dict()) == sorted(state)
    layer.double().load_state_dict(state, strict=True)
    x = t64(rng.standard_normal((2, C, 9, 10)))
    rois = torch.tensor(boxes_in(rng, 4, 2, 9, 10, 1.0))
    out = layer(x, rois)
    # mmcv's recipe with the anchors: pooled = aligned RoI Align, offsets from offset_fc
    pooled = tvo.roi_align(x, rois, (PH, PW), 1.0, 2, aligned=True)
    offset = layer.offset_fc(pooled.reshape(4, -1)).view(4, 2, PH, PW)
    assert float(offset.detach().abs().max()) > 0.1
    expected = deform_roi_pool_reference(tvo, x, rois, offset, (PH, PW), 2, 0.1)
    assert out.shape == (4, C, PH, PW) and rel_err(out, expected) < 1e-12
    with pytest.raises(ValueError, match="output_channels = 3"):
        layer(x[:, :2], rois)


def test_modulated_deform_roi_pool_pack(rng):
    tvo = _tv()
    layer = dt.ModulatedDeformRoIPoolPack(2, 3, 8, sampling_ratio=2).double()
    keys = sorted(layer.state_dict())
    assert keys == sorted(
        [f"offset_fc.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
        + [f"mask_fc.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
    )
    x = t64(rng.standard_normal((1, 3, 8, 8)))
    rois = torch.tensor(boxes_in(rng, 3, 1, 8, 8, 1.0))
    # fresh: zero offsets and mask sigmoid(0) = 0.5
    expected = 0.5 * tvo.roi_align(x, rois, 2, 1.0, 2, aligned=True)
    assert rel_err(layer(x, rois), expected) < 1e-12


def _detr_state(rng, d, L, M, P):
    shapes = {
        "sampling_offsets": (M * L * P * 2, d),
        "attention_weights": (M * L * P, d),
        "value_proj": (d, d),
        "output_proj": (d, d),
    }
    state = {}
    for name, shape in shapes.items():
        state[f"{name}.weight"] = torch.tensor(rng.standard_normal(shape) * 0.2)
        state[f"{name}.bias"] = torch.tensor(rng.standard_normal(shape[0]) * 0.2)
    return state


def _detr_reference(state, d, L, M, P, query, ref, flat, shapes, padding_mask=None):
    """Deformable-DETR's MSDeformAttn.forward with ms_deform_attn_core_pytorch."""
    N, Lq, _ = query.shape
    S = flat.shape[1]
    value = F.linear(flat, state["value_proj.weight"], state["value_proj.bias"])
    if padding_mask is not None:
        value = value.masked_fill(padding_mask[..., None], 0.0)
    value = value.view(N, S, M, d // M)
    off = F.linear(query, state["sampling_offsets.weight"], state["sampling_offsets.bias"])
    off = off.view(N, Lq, M, L, P, 2)
    w = F.linear(query, state["attention_weights.weight"], state["attention_weights.bias"])
    w = F.softmax(w.view(N, Lq, M, L * P), -1).view(N, Lq, M, L, P)
    if ref.shape[-1] == 2:
        norm = torch.stack([shapes[..., 1], shapes[..., 0]], -1)
        loc = ref[:, :, None, :, None, :] + off / norm[None, None, None, :, None, :]
    else:
        loc = ref[:, :, None, :, None, :2] + off / P * ref[:, :, None, :, None, 2:] * 0.5
    out = ms_deform_attn_core_pytorch(value, shapes, loc, w)
    return F.linear(out, state["output_proj.weight"], state["output_proj.bias"])


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_ms_deform_attn_module_loads_detr_keys_and_matches_reference(rng, ref_dim):
    d, L, M, P = 8, 2, 2, 3
    layer = dt.MSDeformAttn(d_model=d, n_levels=L, n_heads=M, n_points=P)
    state = _detr_state(rng, d, L, M, P)
    assert sorted(layer.state_dict()) == sorted(state)
    layer.double().load_state_dict(state, strict=True)
    shapes, starts = (torch.from_numpy(a) for a in level_layout([(4, 5), (2, 3)]))
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    query = t64(rng.standard_normal((2, 5, d)))
    flat = t64(rng.standard_normal((2, S, d)))
    ref = t64(rng.uniform(0.1, 0.9, (2, 5, L, ref_dim)), grad=False)
    pad = torch.tensor(rng.uniform(size=(2, S)) < 0.2)
    for mask in (None, pad):
        out = layer(query, ref, flat, shapes, starts, mask)
        expected = _detr_reference(state, d, L, M, P, query, ref, flat, shapes, mask)
        assert out.shape == (2, 5, d) and rel_err(out, expected) < 1e-12
        g, e = grads(out, [query, flat]), grads(expected, [query, flat])
        assert rel_err(g[0], e[0]) < 1e-10 and rel_err(g[1], e[1]) < 1e-10
    g = grads(layer(query, ref, flat, shapes, starts), list(layer.parameters()))
    assert all(t is not None and t.abs().max() > 0 for t in g)


def test_ms_deform_attn_module_init_is_detr_s():
    layer = dt.MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3)
    assert layer.im2col_step == 64
    assert float(layer.sampling_offsets.weight.detach().abs().max()) == 0.0
    bias = layer.sampling_offsets.bias.view(4, 2, 3, 2)
    # head h points in direction 2*pi*h/4 (normalized to the max-norm), point p at distance p+1
    expected = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    for p in range(3):
        assert torch.allclose(bias[:, 0, p], expected * (p + 1), atol=1e-6)
    assert float(layer.attention_weights.weight.detach().abs().max()) == 0.0
    assert float(layer.value_proj.bias.detach().abs().max()) == 0.0
    with pytest.raises(ValueError, match="d_model must be divisible by n_heads"):
        dt.MSDeformAttn(d_model=10, n_heads=4)
    with pytest.warns(UserWarning, match="power of 2"):
        dt.MSDeformAttn(d_model=12, n_heads=4)


def test_ms_deform_attn_module_checks_sizes(rng):
    layer = dt.MSDeformAttn(d_model=8, n_levels=1, n_heads=2, n_points=1)
    shapes, starts = torch.tensor([[2, 3]]), torch.tensor([0])
    q = torch.zeros(1, 2, 8)
    with pytest.raises(ValueError, match="input_flatten has 5 positions"):
        layer(q, torch.zeros(1, 2, 1, 2), torch.zeros(1, 5, 8), shapes, starts)
    with pytest.raises(ValueError, match="Last dim of reference_points must be 2 or 4"):
        layer(q, torch.zeros(1, 2, 1, 3), torch.zeros(1, 6, 8), shapes, starts)


# ============================================================================ the contract


def test_outputs_share_memory_with_the_kernels_arrays(rng, monkeypatch):
    # CPU tensors go in as views and come back through torch.from_numpy: no copies
    seen = {}
    forward = dt._ops.deform_conv2d_forward

    def spy(input, offset, weight, *args, **kwargs):
        seen["input"] = input.__array_interface__["data"][0]
        seen["offset"] = offset.__array_interface__["data"][0]
        out = forward(input, offset, weight, *args, **kwargs)
        seen["out"] = out.__array_interface__["data"][0]
        return out

    monkeypatch.setattr(dt._ops, "deform_conv2d_forward", spy)
    a = conv_inputs(rng, *CONVS["v2"][:-2])
    out = conv_call(dt.deform_conv2d, a)
    assert seen["input"] == a["input"].data_ptr() and seen["offset"] == a["offset"].data_ptr()
    assert seen["out"] == out.data_ptr()
    # a non-contiguous tensor is made contiguous (a copy), with the same result
    x = a["input"].detach().transpose(2, 3).contiguous().transpose(2, 3)
    assert not x.is_contiguous()
    b = {**a, "input": x}
    assert torch.equal(conv_call(dt.deform_conv2d, b), out)
    assert seen["input"] != x.data_ptr()


def test_backward_computes_only_the_gradients_asked_for(rng, monkeypatch):
    # needs comes from ctx.needs_input_grad, in deformnp's order (input, offset, weight, bias,
    # mask for deform_conv2d; value, sampling_locations, attention_weights for attention)
    calls = []
    for name in ("deform_conv2d_backward", "ms_deform_attn_backward", "deform_roi_pool_backward"):
        real = getattr(dt._ops, name)

        def spy(*args, real=real, name=name, **kwargs):
            calls.append((name, tuple(kwargs["needs"])))
            return real(*args, **kwargs)

        monkeypatch.setattr(dt._ops, name, spy)
    a = conv_inputs(rng, *CONVS["v2"][:-2])
    for n in ("input", "weight", "bias"):
        a[n].requires_grad_(False)
    conv_call(dt.deform_conv2d, a).sum().backward()
    assert a["input"].grad is None and a["offset"].grad is not None and a["mask"].grad is not None
    value, shapes, starts, loc, attn = attention_inputs(rng)
    dt.ms_deform_attn(value.detach(), shapes, starts, loc, attn).sum().backward()
    x = t64(rng.standard_normal((1, 2, 6, 6)), grad=False)
    offset = t64(rng.uniform(-1, 1, (2, 2, 2, 2)))
    dt.deform_roi_pool(x, roi_boxes(rng, 2, 1, 6, 6, 1.0), offset, 2).sum().backward()
    assert calls == [
        ("deform_conv2d_backward", (False, True, False, False, True)),
        ("ms_deform_attn_backward", (False, True, True)),
        ("deform_roi_pool_backward", (False, True)),
    ]


def test_tensors_that_require_grad_are_accepted_everywhere(rng):
    # never torch's "Can't call numpy() on Tensor that requires grad": leaves, non-leaves, under
    # no_grad, and a module's parameters
    a = conv_inputs(rng, *CONVS["v2"][:-2])
    nonleaf = {n: (v * 1.0 if isinstance(v, torch.Tensor) else v) for n, v in a.items()}
    assert not nonleaf["input"].is_leaf and nonleaf["input"].requires_grad
    out = conv_call(dt.deform_conv2d, nonleaf)
    assert out.requires_grad
    with torch.no_grad():
        quiet = conv_call(dt.deform_conv2d, a)
    assert not quiet.requires_grad and torch.equal(quiet, out.detach())
    x = t64(rng.standard_normal((1, 4, 6, 6)))
    boxes = roi_boxes(rng, 2, 1, 6, 6, 1.0).requires_grad_()  # boxes get no gradient
    out = dt.roi_align(x, boxes, 2)
    gx, gb = torch.autograd.grad(out.sum(), [x, boxes], allow_unused=True)
    assert gx is not None and gb is None
    value, shapes, starts, loc, attn = attention_inputs(rng)
    dt.ms_deform_attn(value * 2, shapes, starts, loc * 1.0, attn + 0).sum().backward()
    assert value.grad is not None and loc.grad is not None and attn.grad is not None


def test_float32_everywhere(rng):
    x = torch.randn(2, 4, 8, 8)
    boxes = roi_boxes(rng, 3, 2, 8, 8, 1.0, dtype=np.float32)
    outs = [
        dt.roi_align(x, boxes, 2),
        dt.roi_pool(x, boxes, 2),
        dt.ps_roi_align(x, boxes, 2),
        dt.ps_roi_pool(x, boxes, 2),
        dt.deform_roi_pool(x, boxes, torch.zeros(3, 2, 2, 2), 2),
        dt.deform_conv2d(x, torch.zeros(2, 18, 6, 6), torch.randn(3, 4, 3, 3)),
        dt.modulated_deform_conv2d(
            x, torch.zeros(2, 18, 6, 6), torch.ones(2, 9, 6, 6), torch.randn(3, 4, 3, 3), None
        ),
    ]
    assert all(o.dtype == torch.float32 for o in outs)
    # zero offsets and unit masks: plain convolution
    w = torch.randn(3, 4, 3, 3)
    assert rel_err(dt.deform_conv2d(x, torch.zeros(2, 18, 6, 6), w), F.conv2d(x, w)) < 1e-5


def test_autocast_runs_in_float32(rng):
    x = torch.randn(1, 4, 6, 6)
    off = torch.tensor(conv_offsets_off_kinks(rng, (1, 18, 4, 4)), dtype=torch.float32)
    w = torch.randn(2, 4, 3, 3)
    expected = dt.deform_conv2d(x.bfloat16().float(), off.bfloat16().float(), w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dt.deform_conv2d(x.bfloat16(), off.bfloat16(), w)
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    # outside autocast, half precision is refused
    with pytest.raises(TypeError, match="torch.bfloat16 tensors are not supported"):
        dt.deform_conv2d(x.bfloat16(), off, w)
    with pytest.raises(TypeError, match="torch.float16 tensors are not supported"):
        dt.deform_conv2d(x, off.half(), w)


def test_errors_are_deformnp_s(rng):
    x = torch.randn(1, 4, 6, 6)
    with pytest.raises(TypeError, match="inputs must share one float dtype"):
        dt.deform_conv2d(x, torch.zeros(1, 18, 4, 4, dtype=torch.float64), torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="offset has 17 channels"):
        dt.deform_conv2d(x, torch.zeros(1, 17, 4, 4), torch.randn(2, 4, 3, 3))
    with pytest.raises(TypeError, match="boxes"):
        dt.roi_align(x, torch.zeros(1, 5, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="not a batch index"):
        dt.roi_pool(x, torch.tensor([[3.0, 0, 0, 2, 2]]), 2)
    with pytest.raises(ValueError, match="level_start_index"):
        value, shapes, starts, loc, attn = attention_inputs(rng)
        dt.ms_deform_attn(value, shapes, starts + 1, loc, attn)


def test_empty_boxes_and_empty_batch(rng):
    x = t64(rng.standard_normal((2, 3, 5, 5)))
    out = dt.roi_align(x, torch.zeros(0, 5, dtype=torch.float64), 2)
    assert out.shape == (0, 3, 2, 2)
    (g,) = torch.autograd.grad(out.sum(), x, allow_unused=True)
    assert g is None or float(g.abs().max()) == 0.0
    value, shapes, starts, loc, attn = attention_inputs(rng, N=1)
    out = dt.ms_deform_attn(value[:0], shapes, starts, loc[:0], attn[:0])
    assert out.shape == (0, 3, 2 * 3)


def test_import_deformnp_does_not_import_torch():
    code = (
        "import sys\n"
        "import deformnp, deformnp.ops, deformnp.nn, deformnp.functional\n"
        "assert 'torch' not in sys.modules, 'import deformnp imported torch'\n"
        "import deformnp.torch\n"
        "assert 'torch' in sys.modules\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr


# ============================================================================ CUDA (real GPU)


def _real_gpu() -> bool:
    return os.environ.get("DEFORMNP_REAL_GPU") == "1" and torch.cuda.is_available()


cuda_only = pytest.mark.skipif(
    not _real_gpu(),
    reason="the CUDA adapter needs a real GPU: set DEFORMNP_REAL_GPU=1 on a machine with CUDA "
    "(the simulator's arrays have no __cuda_array_interface__)",
)


def _cuda_cases(rng, dtype):
    """(name, function, CPU inputs): inputs requiring grad where differentiable."""
    tt = lambda a, g=True: torch.tensor(np.asarray(a), dtype=dtype, requires_grad=g)  # noqa: E731
    a = conv_inputs(rng, *CONVS["v2"][:-2])
    conv = [tt(a[n].detach()) for n in CONV_NAMES]
    x = tt(rng.standard_normal((2, 8, 9, 10)))
    boxes = tt(boxes_in(rng, 5, 2, 9, 10, 1.0), g=False)
    offset = tt(rng.uniform(-1, 1, (5, 2, 2, 2)))
    value, shapes, starts, loc, attn = attention_inputs(rng)
    return [
        ("deform_conv2d", lambda i, o, w, b, m: dt.deform_conv2d(i, o, w, b, 1, 1, 1, m), conv),
        ("roi_align", lambda t, b: dt.roi_align(t, b, 2, 1.0, 2, True), [x, boxes]),
        ("roi_pool", lambda t, b: dt.roi_pool(t, b, 2), [x, boxes]),
        ("ps_roi_align", lambda t, b: dt.ps_roi_align(t, b, 2, 1.0, 2), [x, boxes]),
        ("ps_roi_pool", lambda t, b: dt.ps_roi_pool(t, b, 2), [x, boxes]),
        (
            "deform_roi_pool",
            lambda t, b, o: dt.deform_roi_pool(t, b, o, 2, 1.0, 2),
            [x, boxes, offset],
        ),
        (
            "ms_deform_attn",
            dt.ms_deform_attn,
            [tt(value.detach()), shapes, starts, tt(loc.detach()), tt(attn.detach())],
        ),
    ]


def _to_cuda(t):
    if not isinstance(t, torch.Tensor):
        return t
    c = t.detach().cuda()
    return c.requires_grad_(t.requires_grad) if t.is_floating_point() else c


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_cpu(rng, dtype):
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for name, fn, inputs in _cuda_cases(rng, dtype):
        out = fn(*inputs)
        gpu_inputs = [_to_cuda(t) for t in inputs]
        gout = fn(*gpu_inputs)
        assert gout.is_cuda and gout.dtype == dtype, name
        assert rel_err(gout.cpu(), out) < tol, name
        live = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        glive = [t for t in gpu_inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        r = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
        expected = torch.autograd.grad(out, live, r)
        got = torch.autograd.grad(gout, glive, r.cuda())
        for g, e in zip(got, expected):
            assert g.is_cuda and g.dtype == dtype and rel_err(g.cpu(), e) < tol * 10, name


@cuda_only
def test_cuda_zero_copy_and_side_stream(rng, monkeypatch):
    seen = {}
    forward = dt._ops.deform_conv2d_forward

    def spy(input, *args, **kwargs):
        seen["input"] = input.__cuda_array_interface__["data"][0]
        out = forward(input, *args, **kwargs)
        seen["out"] = out.__cuda_array_interface__["data"][0]
        return out

    monkeypatch.setattr(dt._ops, "deform_conv2d_forward", spy)
    a = {
        n: _to_cuda(v) if isinstance(v, torch.Tensor) else v
        for n, v in conv_inputs(rng, *CONVS["v2"][:-2]).items()
    }
    out = conv_call(dt.deform_conv2d, a)
    assert seen["input"] == a["input"].data_ptr() and seen["out"] == out.data_ptr()
    # on a side stream: the adapter orders deformnp's default-stream launches with it
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        big = {n: (v.detach() * 1.0 if isinstance(v, torch.Tensor) else v) for n, v in a.items()}
        side = conv_call(dt.deform_conv2d, big)
        side2 = side * 2.0
    torch.cuda.synchronize()
    assert rel_err(side, out) < 1e-6 and rel_err(side2, 2.0 * out) < 1e-6
