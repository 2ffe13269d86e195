"""DeformableAttention2d (docs/ops/dat.rst; DAT's DAttentionBaseline, CVPR 2022): against a naive
loop reference, gradcheck of the input and every parameter, edge cases, validation messages,
and parity with a torch re-implementation of DAttentionBaseline loaded with the same weights.

The layer samples with grid_sample at learned positions; finite differences are wrong only at
the bilinear kinks (integer pixel coordinates), which random weights avoid with probability one
(the gradcheck step, 1e-6, is far below any distance to a kink for the seeds used).
"""

from __future__ import annotations

import numpy as np
import pytest
from reference.attention import dat_attention

import deformnp as dn
from deformnp.cases import check_cases
from deformnp.nn import DeformableAttention2d


def rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def make_layer(rng, channels=4, n_heads=2, scale=0.3, **kw):
    kw.setdefault("dtype", np.float64)
    layer = DeformableAttention2d(channels, n_heads, **kw)
    for p in layer.parameters():
        p.data = (p.data + scale * rng.standard_normal(p.shape)).astype(p.dtype)
    return layer


def params_of(layer):
    return {n: p.numpy() for n, p in layer.named_parameters()}


def test_parameter_names_shapes_and_init():
    layer = DeformableAttention2d(8, 4, n_groups=2, stride=2, kernel_size=3, q_size=(6, 5))
    shapes = {n: p.shape for n, p in layer.named_parameters()}
    assert shapes == {
        "rpe_table": (4, 11, 9),
        "conv_offset.0.weight": (4, 1, 3, 3),
        "conv_offset.0.bias": (4,),
        "conv_offset.1.norm.weight": (4,),
        "conv_offset.1.norm.bias": (4,),
        "conv_offset.3.weight": (2, 4, 1, 1),
        "proj_q.weight": (8, 8, 1, 1),
        "proj_q.bias": (8,),
        "proj_k.weight": (8, 8, 1, 1),
        "proj_k.bias": (8,),
        "proj_v.weight": (8, 8, 1, 1),
        "proj_v.bias": (8,),
        "proj_out.weight": (8, 8, 1, 1),
        "proj_out.bias": (8,),
    }
    table = layer.rpe_table.numpy()
    assert table.dtype == np.float32
    # timm's trunc_normal_(std=0.01) as DAT: bounds +-2 in absolute units, so barely truncated
    assert np.abs(table).max() < 0.1 and 0.005 < table.std() < 0.015
    no_pe = DeformableAttention2d(8, 4, use_pe=False)
    assert no_pe.rpe_table is None and "rpe_table" not in no_pe.state_dict()


@pytest.mark.parametrize(
    "cfg",
    [
        dict(n_groups=1, stride=1, offset_range_factor=2.0, kernel_size=3, use_pe=True),
        dict(n_groups=2, stride=2, offset_range_factor=3.0, kernel_size=5, use_pe=True),
        dict(n_groups=2, stride=2, offset_range_factor=0.0, kernel_size=3, use_pe=False),
        dict(n_groups=1, stride=3, offset_range_factor=-1.0, kernel_size=3, use_pe=True),
    ],
)
def test_matches_naive_reference(rng, cfg):
    H, W = 5, 6
    layer = make_layer(rng, 4, 2, q_size=(H, W), **cfg)
    x = rng.standard_normal((2, 4, H, W))
    y, pos, ref = layer(x)
    ry, rpos, rref = dat_attention(
        x,
        params_of(layer),
        2,
        cfg["n_groups"],
        cfg["stride"],
        cfg["offset_range_factor"],
        cfg["use_pe"],
    )
    assert y.shape == (2, 4, H, W)
    Hk = (H - 1) // cfg["stride"] + 1
    Wk = (W - 1) // cfg["stride"] + 1
    assert pos.shape == ref.shape == (2, cfg["n_groups"], Hk, Wk, 2)
    assert rel_err(y.numpy(), ry) < 1e-12
    assert rel_err(pos.numpy(), rpos) < 1e-12
    np.testing.assert_allclose(ref.numpy(), rref, rtol=0, atol=1e-15)


def test_float32(rng):
    layer = make_layer(rng, 4, 2, q_size=4, dtype=np.float32)
    x = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
    y, pos, ref = layer(x)
    assert y.dtype == pos.dtype == ref.dtype == np.float32
    ry, rpos, _ = dat_attention(x, params_of(layer), 2, 1, 1, 2.0, True)
    assert rel_err(y.numpy(), ry) < 1e-5 and rel_err(pos.numpy(), rpos) < 1e-5


def test_reference_points_and_offset_range(rng):
    # with the last offset conv zeroed the positions are the reference grid: cell centres
    layer = make_layer(rng, 4, 2, stride=2, q_size=8)
    layer.conv_offset[3].weight.data[...] = 0
    _, pos, ref = layer(rng.standard_normal((1, 4, 8, 8)))
    expected = (np.arange(4) + 0.5) / 4 * 2 - 1
    np.testing.assert_allclose(ref.numpy()[0, 0, :, 0, 0], expected, atol=1e-15)
    np.testing.assert_allclose(ref.numpy()[0, 0, 0, :, 1], expected, atol=1e-15)
    np.testing.assert_array_equal(pos.numpy(), ref.numpy())
    # large offsets saturate the tanh: |pos - ref| <= s / Hk (and s / Wk)
    layer.conv_offset[3].weight.data[...] = 50 * rng.standard_normal((2, 4, 1, 1))
    _, pos, ref = layer(rng.standard_normal((1, 4, 8, 8)))
    assert np.abs(pos.numpy() - ref.numpy()).max() <= 2.0 / 4 + 1e-12


@pytest.mark.parametrize("case", check_cases("nn.DeformableAttention2d"), ids=lambda c: c.label)
def test_gradcheck_input_and_parameters(case):
    # the check table's cases: the input and every parameter, with the relative position bias
    # (stride 2) and with two offset groups and no bias; y and the sampling positions
    assert dn.gradcheck(case.fn, case.inputs(), names=case.names)


def test_batch_zero_and_size_one_map(rng):
    layer = make_layer(rng, 4, 2, use_pe=False)
    y, pos, ref = layer(np.zeros((0, 4, 3, 3)))
    assert y.shape == (0, 4, 3, 3) and pos.shape == (0, 1, 3, 3, 2)
    layer = make_layer(rng, 4, 2, q_size=1)
    x = rng.standard_normal((2, 4, 1, 1))
    y, _, _ = layer(x)
    ry, _, _ = dat_attention(x, params_of(layer), 2, 1, 1, 2.0, True)
    assert rel_err(y.numpy(), ry) < 1e-12


def test_validation_messages(rng):
    name = "DeformableAttention2d"
    with pytest.raises(ValueError, match=rf"{name}: channels \(6\) must be divisible by n_heads"):
        DeformableAttention2d(6, 4, q_size=4)
    with pytest.raises(ValueError, match=rf"{name}: n_heads \(4\) must be divisible by n_groups"):
        DeformableAttention2d(8, 4, n_groups=3, q_size=4)
    with pytest.raises(ValueError, match=r"use_pe=True needs q_size=\(H, W\)"):
        DeformableAttention2d(8, 4)
    with pytest.raises(ValueError, match=r"stride must be >= 1, got 0"):
        DeformableAttention2d(8, 4, stride=0, q_size=4)
    layer = DeformableAttention2d(8, 4, q_size=4)
    with pytest.raises(ValueError, match=r"x must be \(B, 8, H, W\), got shape \(1, 4, 4, 4\)"):
        layer(np.zeros((1, 4, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"x is 5x4 but the relative position bias table"):
        layer(np.zeros((1, 8, 5, 4), np.float32))


# ---------------------------------------------------------------------------- torch parity


def _torch_dat(torch, nc, n_heads, n_groups, stride, offset_range_factor, ksize, use_pe, q_size):
    """DAttentionBaseline of LeapLabTHU/DAT (CVPR 2022 version), re-implemented with torch
    (no einops / timm); dropout omitted (0 in DAT's configurations)."""
    nn = torch.nn
    F = torch.nn.functional

    class LayerNormProxy(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.norm = nn.LayerNorm(dim)

        def forward(self, x):
            return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    class DAttentionBaseline(nn.Module):
        def __init__(self):
            super().__init__()
            self.n_head_channels = nc // n_heads
            self.scale = self.n_head_channels**-0.5
            self.n_heads, self.nc, self.n_groups = n_heads, nc, n_groups
            self.n_group_channels = nc // n_groups
            self.n_group_heads = n_heads // n_groups
            self.offset_range_factor = offset_range_factor
            Cg = self.n_group_channels
            self.conv_offset = nn.Sequential(
                nn.Conv2d(Cg, Cg, ksize, stride, ksize // 2, groups=Cg),
                LayerNormProxy(Cg),
                nn.GELU(),
                nn.Conv2d(Cg, 2, 1, 1, 0, bias=False),
            )
            self.proj_q = nn.Conv2d(nc, nc, 1)
            self.proj_k = nn.Conv2d(nc, nc, 1)
            self.proj_v = nn.Conv2d(nc, nc, 1)
            self.proj_out = nn.Conv2d(nc, nc, 1)
            self.use_pe = use_pe
            if use_pe:
                self.rpe_table = nn.Parameter(
                    torch.zeros(n_heads, q_size[0] * 2 - 1, q_size[1] * 2 - 1)
                )

        def _get_ref_points(self, H_key, W_key, B, dtype, device):
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, H_key - 0.5, H_key, dtype=dtype, device=device),
                torch.linspace(0.5, W_key - 0.5, W_key, dtype=dtype, device=device),
                indexing="ij",
            )
            ref = torch.stack((ref_y, ref_x), -1)
            ref[..., 1].div_(W_key).mul_(2).sub_(1)
            ref[..., 0].div_(H_key).mul_(2).sub_(1)
            return ref[None, ...].expand(B * self.n_groups, -1, -1, -1)

        def forward(self, x):
            B, C, H, W = x.size()
            dtype, device = x.dtype, x.device
            q = self.proj_q(x)
            q_off = q.reshape(B * self.n_groups, self.n_group_channels, H, W)
            offset = self.conv_offset(q_off)
            Hk, Wk = offset.size(2), offset.size(3)
            n_sample = Hk * Wk
            if self.offset_range_factor > 0:
                offset_range = torch.tensor([1.0 / Hk, 1.0 / Wk], device=device).reshape(1, 2, 1, 1)
                offset = offset.tanh().mul(offset_range).mul(self.offset_range_factor)
            offset = offset.permute(0, 2, 3, 1)
            reference = self._get_ref_points(Hk, Wk, B, dtype, device)
            if self.offset_range_factor >= 0:
                pos = offset + reference
            else:
                pos = (offset + reference).tanh()
            x_sampled = F.grid_sample(
                input=x.reshape(B * self.n_groups, self.n_group_channels, H, W),
                grid=pos[..., (1, 0)],
                mode="bilinear",
                align_corners=True,
            )
            x_sampled = x_sampled.reshape(B, C, 1, n_sample)
            q = q.reshape(B * self.n_heads, self.n_head_channels, H * W)
            k = self.proj_k(x_sampled).reshape(B * self.n_heads, self.n_head_channels, n_sample)
            v = self.proj_v(x_sampled).reshape(B * self.n_heads, self.n_head_channels, n_sample)
            attn = torch.einsum("b c m, b c n -> b m n", q, k).mul(self.scale)
            if self.use_pe:
                rpe_bias = self.rpe_table[None, ...].expand(B, -1, -1, -1)
                q_grid = self._get_ref_points(H, W, B, dtype, device)
                displacement = (
                    q_grid.reshape(B * self.n_groups, H * W, 2).unsqueeze(2)
                    - pos.reshape(B * self.n_groups, n_sample, 2).unsqueeze(1)
                ).mul(0.5)
                attn_bias = F.grid_sample(
                    input=rpe_bias.reshape(
                        B * self.n_groups, self.n_group_heads, 2 * H - 1, 2 * W - 1
                    ),
                    grid=displacement[..., (1, 0)],
                    mode="bilinear",
                    align_corners=True,
                )
                attn = attn + attn_bias.reshape(B * self.n_heads, H * W, n_sample)
            attn = F.softmax(attn, dim=2)
            out = torch.einsum("b m n, b c n -> b c m", attn, v).reshape(B, C, H, W)
            y = self.proj_out(out)
            return (
                y,
                pos.reshape(B, self.n_groups, Hk, Wk, 2),
                reference.reshape(B, self.n_groups, Hk, Wk, 2),
            )

    return DAttentionBaseline().double()


@pytest.mark.parametrize(
    "cfg",
    [
        dict(n_groups=1, stride=1, offset_range_factor=2.0, kernel_size=3, use_pe=True, H=4, W=8),
        dict(n_groups=2, stride=2, offset_range_factor=3.0, kernel_size=5, use_pe=True, H=8, W=8),
        dict(n_groups=2, stride=2, offset_range_factor=-1.0, kernel_size=3, use_pe=False, H=6, W=5),
    ],
)
def test_matches_torch_dattention_baseline(rng, cfg):
    # Hk, Wk are powers of two where the offset range is used: DAT builds 1/Hk, 1/Wk as a
    # float32 tensor, exact only then (deformnp computes them in the layer's dtype)
    torch = pytest.importorskip("torch")
    H, W = cfg.pop("H"), cfg.pop("W")
    theirs = _torch_dat(
        torch,
        8,
        4,
        cfg["n_groups"],
        cfg["stride"],
        cfg["offset_range_factor"],
        cfg["kernel_size"],
        cfg["use_pe"],
        (H, W),
    )
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.3 * torch.randn(p.shape, dtype=p.dtype))
    ours = DeformableAttention2d(8, 4, q_size=(H, W), dtype=np.float64, **cfg)
    ours.load_state_dict(theirs.state_dict())  # DAT's parameter names load as they are
    x = rng.standard_normal((2, 8, H, W))
    tx = torch.tensor(x, requires_grad=True)
    ty, tpos, tref = theirs(tx)
    g = rng.standard_normal(ty.shape)
    gp = rng.standard_normal(tpos.shape)
    (torch.sum(ty * torch.from_numpy(g)) + torch.sum(tpos * torch.from_numpy(gp))).backward()
    ox = dn.tensor(x, requires_grad=True)
    y, pos, ref = ours(ox)
    ((y * g).sum() + (pos * gp).sum()).backward()
    assert rel_err(y.numpy(), ty.detach().numpy()) < 1e-12
    assert rel_err(pos.numpy(), tpos.detach().numpy()) < 1e-12
    assert rel_err(ref.numpy(), tref.numpy()) < 1e-12
    assert rel_err(ox.grad, tx.grad.numpy()) < 1e-10
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        # proj_k.bias has a zero gradient (softmax ignores a shift shared by all keys): both
        # sides are rounding noise there, so compare on the scale max(1, |grad|)
        want = theirs_params[name].grad.numpy()
        assert np.abs(p.grad - want).max() < 1e-10 * max(1.0, np.abs(want).max()), name
