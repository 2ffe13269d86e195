"""DAT's layers with DAT's constructors (deformnp.nn.dat): DAttentionBaseline (DAT++) and
DAttentionBaselineCVPR2022, against torch transcriptions of DAT's two forwards loaded with the
same random state dict (float64 outputs, input and parameter gradients), gradcheck of the input
(and of every parameter for the position-encoding variants), the refusal of the other variant's
state dicts, dropout, and the validation messages.

Sampling is bilinear (grid_sample); finite differences are wrong only at the bilinear kinks
(integer pixel coordinates) and the clamp bounds, which random weights avoid with probability
one (the gradcheck step, 1e-6, is far below any distance to a kink for the seeds used).
"""

from __future__ import annotations

import numpy as np
import pytest

import deformnp as dn
from deformnp.nn import DeformableAttention2d
from deformnp.nn.dat import DAttentionBaseline, DAttentionBaselineCVPR2022


def rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


# the keyword form of DAT's positional constructors
DEFAULTS = dict(
    q_size=(6, 6),
    kv_size=(6, 6),
    n_heads=4,
    n_head_channels=2,
    n_groups=2,
    attn_drop=0.0,
    proj_drop=0.0,
    stride=1,
    offset_range_factor=2.0,
    use_pe=True,
    dwc_pe=False,
    no_off=False,
    fixed_pe=False,
)
PP_ORDER = (*DEFAULTS, "ksize", "log_cpb")
CVPR_ORDER = (*DEFAULTS, "stage_idx")


def pp_args(**kw):
    a = dict(DEFAULTS, ksize=3, log_cpb=False)
    a.update(kw)
    return [a[k] for k in PP_ORDER]


def cvpr_args(**kw):
    a = dict(DEFAULTS, stage_idx=3)
    a.update(kw)
    return [a[k] for k in CVPR_ORDER]


def perturb(layer, rng, scale=0.3):
    for p in layer.parameters():
        p.data = (p.data + scale * rng.standard_normal(p.shape)).astype(p.dtype)
    return layer


# ---------------------------------------------------------------------------- torch transcriptions


def _torch_layer_norm_proxy(torch):
    class LayerNormProxy(torch.nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.norm = torch.nn.LayerNorm(dim)

        def forward(self, x):
            return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    return LayerNormProxy


def _torch_dat_pp(torch, *args):
    """DAttentionBaseline of DAT's main branch (DAT++), transcribed with torch (einops written
    as reshape / permute, timm's trunc_normal_ as torch's)."""
    nn = torch.nn
    F = torch.nn.functional
    LayerNormProxy = _torch_layer_norm_proxy(torch)

    class DAttentionBaseline(nn.Module):
        def __init__(
            self,
            q_size,
            kv_size,
            n_heads,
            n_head_channels,
            n_groups,
            attn_drop,
            proj_drop,
            stride,
            offset_range_factor,
            use_pe,
            dwc_pe,
            no_off,
            fixed_pe,
            ksize,
            log_cpb,
        ):
            super().__init__()
            self.dwc_pe = dwc_pe
            self.n_head_channels = n_head_channels
            self.scale = self.n_head_channels**-0.5
            self.n_heads = n_heads
            self.q_h, self.q_w = q_size
            self.kv_h, self.kv_w = self.q_h // stride, self.q_w // stride
            self.nc = n_head_channels * n_heads
            self.n_groups = n_groups
            self.n_group_channels = self.nc // self.n_groups
            self.n_group_heads = self.n_heads // self.n_groups
            self.use_pe = use_pe
            self.fixed_pe = fixed_pe
            self.no_off = no_off
            self.offset_range_factor = offset_range_factor
            self.ksize = ksize
            self.log_cpb = log_cpb
            self.stride = stride
            kk = self.ksize
            pad_size = kk // 2 if kk != stride else 0
            Cg = self.n_group_channels
            self.conv_offset = nn.Sequential(
                nn.Conv2d(Cg, Cg, kk, stride, pad_size, groups=Cg),
                LayerNormProxy(Cg),
                nn.GELU(),
                nn.Conv2d(Cg, 2, 1, 1, 0, bias=False),
            )
            if self.no_off:
                for m in self.conv_offset.parameters():
                    m.requires_grad_(False)
            self.proj_q = nn.Conv2d(self.nc, self.nc, kernel_size=1, stride=1, padding=0)
            self.proj_k = nn.Conv2d(self.nc, self.nc, kernel_size=1, stride=1, padding=0)
            self.proj_v = nn.Conv2d(self.nc, self.nc, kernel_size=1, stride=1, padding=0)
            self.proj_out = nn.Conv2d(self.nc, self.nc, kernel_size=1, stride=1, padding=0)
            self.proj_drop = nn.Dropout(proj_drop, inplace=True)
            self.attn_drop = nn.Dropout(attn_drop, inplace=True)
            if self.use_pe and not self.no_off:
                if self.dwc_pe:
                    self.rpe_table = nn.Conv2d(
                        self.nc, self.nc, kernel_size=3, stride=1, padding=1, groups=self.nc
                    )
                elif self.fixed_pe:
                    self.rpe_table = nn.Parameter(
                        torch.zeros(self.n_heads, self.q_h * self.q_w, self.kv_h * self.kv_w)
                    )
                    nn.init.trunc_normal_(self.rpe_table, std=0.01)
                elif self.log_cpb:
                    self.rpe_table = nn.Sequential(
                        nn.Linear(2, 32, bias=True),
                        nn.ReLU(inplace=True),
                        nn.Linear(32, self.n_group_heads, bias=False),
                    )
                else:
                    self.rpe_table = nn.Parameter(
                        torch.zeros(self.n_heads, self.q_h * 2 - 1, self.q_w * 2 - 1)
                    )
                    nn.init.trunc_normal_(self.rpe_table, std=0.01)
            else:
                self.rpe_table = None

        @torch.no_grad()
        def _get_ref_points(self, H_key, W_key, B, dtype, device):
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, H_key - 0.5, H_key, dtype=dtype, device=device),
                torch.linspace(0.5, W_key - 0.5, W_key, dtype=dtype, device=device),
                indexing="ij",
            )
            ref = torch.stack((ref_y, ref_x), -1)
            ref[..., 1].div_(W_key - 1.0).mul_(2.0).sub_(1.0)
            ref[..., 0].div_(H_key - 1.0).mul_(2.0).sub_(1.0)
            return ref[None, ...].expand(B * self.n_groups, -1, -1, -1)

        @torch.no_grad()
        def _get_q_grid(self, H, W, B, dtype, device):
            ref_y, ref_x = torch.meshgrid(
                torch.arange(0, H, dtype=dtype, device=device),
                torch.arange(0, W, dtype=dtype, device=device),
                indexing="ij",
            )
            ref = torch.stack((ref_y, ref_x), -1)
            ref[..., 1].div_(W - 1.0).mul_(2.0).sub_(1.0)
            ref[..., 0].div_(H - 1.0).mul_(2.0).sub_(1.0)
            return ref[None, ...].expand(B * self.n_groups, -1, -1, -1)

        def forward(self, x):
            B, C, H, W = x.size()
            dtype, device = x.dtype, x.device
            q = self.proj_q(x)
            q_off = q.reshape(B * self.n_groups, self.n_group_channels, H, W)
            offset = self.conv_offset(q_off).contiguous()
            Hk, Wk = offset.size(2), offset.size(3)
            n_sample = Hk * Wk
            if self.offset_range_factor >= 0 and not self.no_off:
                offset_range = torch.tensor(
                    [1.0 / (Hk - 1.0), 1.0 / (Wk - 1.0)], device=device
                ).reshape(1, 2, 1, 1)
                offset = offset.tanh().mul(offset_range).mul(self.offset_range_factor)
            offset = offset.permute(0, 2, 3, 1)
            reference = self._get_ref_points(Hk, Wk, B, dtype, device)
            if self.no_off:
                offset = offset.fill_(0.0)
            if self.offset_range_factor >= 0:
                pos = offset + reference
            else:
                pos = (offset + reference).clamp(-1.0, +1.0)
            if self.no_off:
                x_sampled = F.avg_pool2d(x, kernel_size=self.stride, stride=self.stride)
                assert x_sampled.size(2) == Hk and x_sampled.size(3) == Wk
            else:
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
            attn = torch.einsum("b c m, b c n -> b m n", q, k)
            attn = attn.mul(self.scale)
            if self.use_pe and (not self.no_off):
                if self.dwc_pe:
                    residual_lepe = self.rpe_table(q.reshape(B, C, H, W)).reshape(
                        B * self.n_heads, self.n_head_channels, H * W
                    )
                elif self.fixed_pe:
                    attn_bias = self.rpe_table[None, ...].expand(B, -1, -1, -1)
                    attn = attn + attn_bias.reshape(B * self.n_heads, H * W, n_sample)
                elif self.log_cpb:
                    q_grid = self._get_q_grid(H, W, B, dtype, device)
                    displacement = (
                        q_grid.reshape(B * self.n_groups, H * W, 2).unsqueeze(2)
                        - pos.reshape(B * self.n_groups, n_sample, 2).unsqueeze(1)
                    ).mul(4.0)
                    displacement = (
                        torch.sign(displacement)
                        * torch.log2(torch.abs(displacement) + 1.0)
                        / np.log2(8.0)
                    )
                    attn_bias = self.rpe_table(displacement)  # B * g, H * W, n_sample, h_g
                    attn = attn + attn_bias.permute(0, 3, 1, 2).reshape(
                        B * self.n_heads, H * W, n_sample
                    )
                else:
                    rpe_bias = self.rpe_table[None, ...].expand(B, -1, -1, -1)
                    q_grid = self._get_q_grid(H, W, B, dtype, device)
                    displacement = (
                        q_grid.reshape(B * self.n_groups, H * W, 2).unsqueeze(2)
                        - pos.reshape(B * self.n_groups, n_sample, 2).unsqueeze(1)
                    ).mul(0.5)
                    attn_bias = F.grid_sample(
                        input=rpe_bias.reshape(
                            B * self.n_groups,
                            self.n_group_heads,
                            rpe_bias.shape[2],
                            rpe_bias.shape[3],
                        ),
                        grid=displacement[..., (1, 0)],
                        mode="bilinear",
                        align_corners=True,
                    )
                    attn = attn + attn_bias.reshape(B * self.n_heads, H * W, n_sample)
            attn = F.softmax(attn, dim=2)
            attn = self.attn_drop(attn)
            out = torch.einsum("b m n, b c n -> b c m", attn, v)
            if self.use_pe and self.dwc_pe:
                out = out + residual_lepe
            out = out.reshape(B, C, H, W)
            y = self.proj_drop(self.proj_out(out))
            return (
                y,
                pos.reshape(B, self.n_groups, Hk, Wk, 2),
                reference.reshape(B, self.n_groups, Hk, Wk, 2),
            )

    return DAttentionBaseline(*args).double()


def _torch_dat_cvpr(torch, *args):
    """DAttentionBaseline of DAT's CVPR2022 tag, transcribed with torch. Two lines of DAT fail
    in torch and are written as meant: ``offset.fill(0.0)`` (no_off) as zeros, and
    ``self.n_sample`` (fixed_pe, never set) as the sample count."""
    nn = torch.nn
    F = torch.nn.functional
    LayerNormProxy = _torch_layer_norm_proxy(torch)

    class DAttentionBaseline(nn.Module):
        def __init__(
            self,
            q_size,
            kv_size,
            n_heads,
            n_head_channels,
            n_groups,
            attn_drop,
            proj_drop,
            stride,
            offset_range_factor,
            use_pe,
            dwc_pe,
            no_off,
            fixed_pe,
            stage_idx,
        ):
            super().__init__()
            self.dwc_pe = dwc_pe
            self.n_head_channels = n_head_channels
            self.scale = self.n_head_channels**-0.5
            self.n_heads = n_heads
            self.q_h, self.q_w = q_size
            self.kv_h, self.kv_w = kv_size
            self.nc = n_head_channels * n_heads
            self.n_groups = n_groups
            self.n_group_channels = self.nc // self.n_groups
            self.n_group_heads = self.n_heads // self.n_groups
            self.use_pe = use_pe
            self.fixed_pe = fixed_pe
            self.no_off = no_off
            self.offset_range_factor = offset_range_factor
            kk = [9, 7, 5, 3][stage_idx]
            Cg = self.n_group_channels
            self.conv_offset = nn.Sequential(
                nn.Conv2d(Cg, Cg, kk, stride, kk // 2, groups=Cg),
                LayerNormProxy(Cg),
                nn.GELU(),
                nn.Conv2d(Cg, 2, 1, 1, 0, bias=False),
            )
            self.proj_q = nn.Conv2d(self.nc, self.nc, kernel_size=1, stride=1, padding=0)
            self.proj_k = nn.Conv2d(self.nc, self.nc, kernel_size=1, stride=1, padding=0)
            self.proj_v = nn.Conv2d(self.nc, self.nc, kernel_size=1, stride=1, padding=0)
            self.proj_out = nn.Conv2d(self.nc, self.nc, kernel_size=1, stride=1, padding=0)
            self.proj_drop = nn.Dropout(proj_drop, inplace=True)
            self.attn_drop = nn.Dropout(attn_drop, inplace=True)
            if self.use_pe:
                if self.dwc_pe:
                    self.rpe_table = nn.Conv2d(
                        self.nc, self.nc, kernel_size=3, stride=1, padding=1, groups=self.nc
                    )
                elif self.fixed_pe:
                    self.rpe_table = nn.Parameter(
                        torch.zeros(self.n_heads, self.q_h * self.q_w, self.kv_h * self.kv_w)
                    )
                else:
                    self.rpe_table = nn.Parameter(
                        torch.zeros(self.n_heads, self.kv_h * 2 - 1, self.kv_w * 2 - 1)
                    )
            else:
                self.rpe_table = None

        @torch.no_grad()
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
            if self.no_off:
                offset = torch.zeros_like(offset)  # DAT: offset.fill(0.0)
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
            attn = torch.einsum("b c m, b c n -> b m n", q, k)
            attn = attn.mul(self.scale)
            if self.use_pe:
                if self.dwc_pe:
                    residual_lepe = self.rpe_table(q.reshape(B, C, H, W)).reshape(
                        B * self.n_heads, self.n_head_channels, H * W
                    )
                elif self.fixed_pe:
                    attn_bias = self.rpe_table[None, ...].expand(B, -1, -1, -1)
                    attn = attn + attn_bias.reshape(B * self.n_heads, H * W, n_sample)
                else:
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
            attn = self.attn_drop(attn)
            out = torch.einsum("b m n, b c n -> b c m", attn, v)
            if self.use_pe and self.dwc_pe:
                out = out + residual_lepe
            out = out.reshape(B, C, H, W)
            y = self.proj_drop(self.proj_out(out))
            return (
                y,
                pos.reshape(B, self.n_groups, Hk, Wk, 2),
                reference.reshape(B, self.n_groups, Hk, Wk, 2),
            )

    return DAttentionBaseline(*args).double()


def _parity(torch, theirs, ours, x, rng):
    """Load theirs' (perturbed) state dict into ours, run both on x with the same cotangents;
    return the relative errors of y, pos, reference, x.grad and the worst parameter gradient."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.3 * torch.randn(p.shape, dtype=p.dtype))
    ours.load_state_dict(theirs.state_dict())  # by name, torch tensors converted
    assert set(ours.state_dict()) == set(theirs.state_dict())
    theirs.eval()
    ours.eval()
    tx = torch.tensor(x, requires_grad=True)
    ty, tpos, tref = theirs(tx)
    g = rng.standard_normal(ty.shape)
    gp = rng.standard_normal(tpos.shape)
    loss = torch.sum(ty * torch.from_numpy(g))
    if tpos.requires_grad:
        loss = loss + torch.sum(tpos * torch.from_numpy(gp))
    loss.backward()
    ox = dn.tensor(x, requires_grad=True)
    y, pos, ref = ours(ox)
    ((y * g).sum() + (pos * gp).sum()).backward()
    errs = {
        "y": rel_err(y.numpy(), ty.detach().numpy()),
        "pos": rel_err(pos.numpy(), tpos.detach().numpy()),
        "ref": rel_err(ref.numpy(), tref.numpy()),
        "x.grad": rel_err(ox.grad, tx.grad.numpy()),
    }
    theirs_params = dict(theirs.named_parameters())
    worst = 0.0
    for name, p in ours.named_parameters():
        want = theirs_params[name].grad
        if want is None:  # frozen (no_off) or unused: no gradient on either side
            assert p.grad is None or not np.any(p.grad), name
            continue
        want = want.numpy()
        assert p.grad is not None, name
        # proj_k.bias has a zero gradient (softmax ignores a shift shared by all keys): both
        # sides are rounding noise there, so compare on the scale max(1, |grad|)
        worst = max(worst, float(np.abs(p.grad - want).max() / max(1.0, np.abs(want).max())))
    errs["params"] = worst
    return errs


# Hk - 1 and Wk - 1 are powers of two wherever DAT++ scales the offsets (s >= 0): DAT builds the
# range 1/(Hk-1), 1/(Wk-1) as a float32 tensor, exact only then (deformnp uses the layer dtype)
PP_CASES = {
    "table_s2": dict(cfg=dict(offset_range_factor=2.0, n_groups=1, q_size=(5, 5)), hw=(5, 5)),
    "table_clamp_stride2_g2": dict(
        cfg=dict(offset_range_factor=-1.0, stride=2, q_size=(4, 4)), hw=(6, 9)
    ),
    "table_ksize_eq_stride": dict(
        cfg=dict(offset_range_factor=-1.0, stride=2, ksize=2, q_size=(6, 6)), hw=(6, 6)
    ),
    "log_cpb_s3_stride2": dict(
        cfg=dict(offset_range_factor=3.0, stride=2, log_cpb=True, q_size=(5, 5)), hw=(5, 5)
    ),
    "log_cpb_clamp": dict(
        cfg=dict(offset_range_factor=-1.0, log_cpb=True, n_groups=4, q_size=(4, 5)), hw=(4, 5)
    ),
    "dwc_pe_clamp_k5": dict(
        cfg=dict(offset_range_factor=-1.0, dwc_pe=True, ksize=5, n_groups=1), hw=(6, 5)
    ),
    "fixed_pe_stride2": dict(
        cfg=dict(offset_range_factor=2.0, fixed_pe=True, stride=2, q_size=(6, 6)), hw=(6, 6)
    ),
    "no_off_stride2": dict(cfg=dict(no_off=True, stride=2, q_size=(6, 6)), hw=(6, 6)),
    "no_off_clamp": dict(
        cfg=dict(no_off=True, offset_range_factor=-1.0, use_pe=False, q_size=(4, 4)), hw=(4, 4)
    ),
    "no_pe_s0_g2": dict(cfg=dict(use_pe=False, offset_range_factor=0.0), hw=(5, 7)),
    "dropout_eval": dict(
        cfg=dict(attn_drop=0.5, proj_drop=0.3, offset_range_factor=-2.0, log_cpb=True), hw=(5, 5)
    ),
}


@pytest.mark.parametrize("case", list(PP_CASES), ids=str)
def test_dat_pp_matches_torch(rng, case):
    torch = pytest.importorskip("torch")
    cfg, (H, W) = PP_CASES[case]["cfg"], PP_CASES[case]["hw"]
    args = pp_args(**cfg)
    theirs = _torch_dat_pp(torch, *args)
    ours = DAttentionBaseline(*args, dtype=np.float64)
    x = rng.standard_normal((2, ours.nc, H, W))
    errs = _parity(torch, theirs, ours, x, rng)
    assert errs["y"] < 1e-12 and errs["pos"] < 1e-13 and errs["ref"] == 0.0, errs
    assert errs["x.grad"] < 1e-12 and errs["params"] < 1e-11, errs


CVPR_CASES = {
    "table_s2": dict(cfg=dict(n_groups=1, q_size=(4, 4), kv_size=(4, 4)), hw=(4, 4)),
    "table_s3_stride2_g2_k5": dict(
        cfg=dict(offset_range_factor=3.0, stride=2, stage_idx=2, q_size=(8, 8), kv_size=(8, 8)),
        hw=(8, 8),
    ),
    "tanh_no_pe_stride2": dict(
        cfg=dict(offset_range_factor=-1.0, stride=2, use_pe=False), hw=(6, 5)
    ),
    "raw_dwc_pe": dict(cfg=dict(offset_range_factor=0.0, dwc_pe=True), hw=(5, 6)),
    "fixed_pe": dict(
        cfg=dict(fixed_pe=True, stride=2, q_size=(6, 6), kv_size=(3, 3), offset_range_factor=-1),
        hw=(6, 6),
    ),
    "no_off_table_tanh": dict(
        cfg=dict(no_off=True, offset_range_factor=-1.0, q_size=(5, 5), kv_size=(5, 5)),
        hw=(5, 5),
    ),
    "k7_stage1_g4": dict(
        cfg=dict(stage_idx=1, n_groups=4, offset_range_factor=-1.0, kv_size=(5, 6)), hw=(5, 6)
    ),
}


@pytest.mark.parametrize("case", list(CVPR_CASES), ids=str)
def test_dat_cvpr2022_matches_torch(rng, case):
    torch = pytest.importorskip("torch")
    cfg, (H, W) = CVPR_CASES[case]["cfg"], CVPR_CASES[case]["hw"]
    args = cvpr_args(**cfg)
    theirs = _torch_dat_cvpr(torch, *args)
    ours = DAttentionBaselineCVPR2022(*args, dtype=np.float64)
    x = rng.standard_normal((2, ours.nc, H, W))
    errs = _parity(torch, theirs, ours, x, rng)
    assert errs["y"] < 1e-12 and errs["pos"] < 1e-13 and errs["ref"] == 0.0, errs
    assert errs["x.grad"] < 1e-12 and errs["params"] < 1e-11, errs


def test_cvpr2022_is_deformable_attention2d(rng):
    # the CVPR 2022 layer with DeformableAttention2d's options computes the same thing
    ours = perturb(
        DAttentionBaselineCVPR2022(
            (6, 5), (6, 5), 4, 2, 2, 0.0, 0.0, 2, 3.0, True, False, False, False, 2,
            dtype=np.float64,
        ),
        rng,
    )  # fmt: skip
    ref = DeformableAttention2d(
        8, 4, n_groups=2, stride=2, offset_range_factor=3.0, kernel_size=5, q_size=(6, 5),
        dtype=np.float64,
    )  # fmt: skip
    ref.load_state_dict(ours.state_dict())
    x = rng.standard_normal((2, 8, 6, 5))
    for a, b in zip(ours(x), ref(x)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------- gradcheck


GRADCHECK_PP = [
    dict(offset_range_factor=2.0, q_size=(4, 4)),
    dict(offset_range_factor=-1.0, stride=2, q_size=(5, 5)),
    dict(offset_range_factor=3.0, log_cpb=True, q_size=(4, 4)),
    dict(offset_range_factor=-1.0, dwc_pe=True, n_groups=1),
    dict(fixed_pe=True, q_size=(4, 4)),
    dict(no_off=True, stride=2, q_size=(4, 4)),
]


def _small(kind, cfg):
    cfg = dict(dict(n_heads=2, n_head_channels=2, n_groups=2), **cfg)
    if kind == "pp":
        return DAttentionBaseline(*pp_args(**cfg), dtype=np.float64)
    return DAttentionBaselineCVPR2022(*cvpr_args(**cfg), dtype=np.float64)


@pytest.mark.parametrize(
    "cfg", GRADCHECK_PP, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items())
)
def test_gradcheck_input_dat_pp(rng, cfg):
    layer = perturb(_small("pp", cfg), rng)
    H, W = cfg.get("q_size", (4, 5))
    x = dn.tensor(rng.standard_normal((1, 4, H, W)), requires_grad=True)
    assert dn.gradcheck(lambda t: layer(t)[:2], (x,), names=["x"])


@pytest.mark.parametrize(
    "cfg",
    [
        dict(q_size=(4, 4), kv_size=(4, 4)),
        dict(offset_range_factor=-1.0, stride=2, q_size=(5, 5), kv_size=(5, 5)),
        dict(offset_range_factor=0.0, dwc_pe=True),
        dict(fixed_pe=True, q_size=(4, 4), kv_size=(4, 4)),
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_gradcheck_input_dat_cvpr2022(rng, cfg):
    layer = perturb(_small("cvpr", cfg), rng)
    H, W = cfg.get("kv_size", (4, 5))
    x = dn.tensor(rng.standard_normal((1, 4, H, W)), requires_grad=True)
    assert dn.gradcheck(lambda t: layer(t)[:2], (x,), names=["x"])


@pytest.mark.parametrize(
    "cfg",
    [
        dict(offset_range_factor=-1.0, log_cpb=True, q_size=(3, 3)),
        dict(offset_range_factor=2.0, q_size=(3, 3)),
        dict(offset_range_factor=2.0, dwc_pe=True, n_groups=1, q_size=(3, 3)),
    ],
    ids=["log_cpb", "table", "dwc_pe"],
)
def test_gradcheck_every_parameter_dat_pp(rng, cfg):
    layer = perturb(_small("pp", cfg), rng)
    x = rng.standard_normal((1, 4, 3, 3))
    names, params = zip(*layer.named_parameters())
    assert dn.gradcheck(lambda *ps: layer(x)[:2], params, names=list(names))


# ---------------------------------------------------------------------------- layout, state dicts


def test_parameter_names_shapes_and_frozen_offsets():
    layer = DAttentionBaseline(*pp_args(log_cpb=True, stride=2))
    shapes = {n: p.shape for n, p in layer.named_parameters()}
    assert shapes == {
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
        "rpe_table.0.weight": (32, 2),
        "rpe_table.0.bias": (32,),
        "rpe_table.2.weight": (2, 32),
    }
    assert all(p.dtype == np.float32 for p in layer.parameters())
    assert (layer.kv_h, layer.kv_w, layer.nc, layer.n_group_heads) == (3, 3, 8, 2)
    table = DAttentionBaseline(*pp_args(q_size=(5, 4))).rpe_table.numpy()
    assert table.shape == (4, 9, 7) and np.abs(table).max() < 0.1
    fixed = DAttentionBaseline(*pp_args(fixed_pe=True, stride=2)).rpe_table
    assert fixed.shape == (4, 36, 9)
    dwc = DAttentionBaseline(*pp_args(dwc_pe=True)).rpe_table
    assert dwc.weight.shape == (8, 1, 3, 3)
    no_off = DAttentionBaseline(*pp_args(no_off=True))
    assert no_off.rpe_table is None and "rpe_table" not in no_off.state_dict()
    assert not any(p.requires_grad for p in no_off.conv_offset.parameters())
    assert all(p.requires_grad for p in no_off.proj_q.parameters())
    cvpr = DAttentionBaselineCVPR2022(*cvpr_args(stage_idx=0, kv_size=(4, 5)))
    assert cvpr.conv_offset[0].weight.shape == (4, 1, 9, 9) and cvpr.ksize == 9
    assert cvpr.rpe_table.shape == (4, 7, 9)
    assert DAttentionBaselineCVPR2022(*cvpr_args(no_off=True)).rpe_table.shape == (4, 11, 11)


def test_cvpr_layer_refuses_dat_pp_log_cpb_state_dict():
    torch = pytest.importorskip("torch")
    pp = _torch_dat_pp(torch, *pp_args(log_cpb=True))
    cvpr = DAttentionBaselineCVPR2022(*cvpr_args())
    msg = r"DAttentionBaselineCVPR2022: refusing a state dict of DAT\+\+'s DAttentionBaseline"
    for strict in (True, False):
        with pytest.raises(ValueError, match=msg) as err:
            cvpr.load_state_dict(pp.state_dict(), strict=strict)
        for key in ("rpe_table.0.weight", "rpe_table.0.bias", "rpe_table.2.weight"):
            assert key in str(err.value)
        assert "log-CPB" in str(err.value) and "rpe_table (4, 11, 11)" in str(err.value)


def test_dat_pp_layer_refuses_cvpr_state_dicts():
    torch = pytest.importorskip("torch")
    msg = r"DAttentionBaseline: refusing a state dict of DAT's CVPR 2022 DAttentionBaseline"
    # the table sized by kv_size (CVPR 2022) rather than q_size (DAT++)
    cvpr = _torch_dat_cvpr(torch, *cvpr_args(kv_size=(4, 4)))
    pp = DAttentionBaseline(*pp_args(kv_size=(4, 4)))
    with pytest.raises(ValueError, match=msg + r".*rpe_table \(4, 7, 7\) \(sized by kv_size"):
        pp.load_state_dict(cvpr.state_dict(), strict=False)
    # a table where DAT++ has its log-CPB MLP
    cvpr = _torch_dat_cvpr(torch, *cvpr_args())
    with pytest.raises(ValueError, match=msg + r".*rpe_table \(4, 11, 11\).*expects rpe_table\.0"):
        DAttentionBaseline(*pp_args(log_cpb=True)).load_state_dict(cvpr.state_dict())
    # no_off: the CVPR 2022 layer keeps its table, DAT++ builds none
    cvpr = _torch_dat_cvpr(torch, *cvpr_args(no_off=True))
    with pytest.raises(ValueError, match=msg + r".*expects no rpe_table"):
        DAttentionBaseline(*pp_args(no_off=True)).load_state_dict(cvpr.state_dict())
    # fixed_pe: (n_heads, q_h*q_w, kv_h*kv_w) with CVPR's kv_size, not q_size // stride
    cvpr = _torch_dat_cvpr(torch, *cvpr_args(fixed_pe=True, stride=2))
    with pytest.raises(ValueError, match=msg + r".*rpe_table \(4, 36, 36\)"):
        DAttentionBaseline(*pp_args(fixed_pe=True, stride=2)).load_state_dict(cvpr.state_dict())


def test_cvpr_layer_refuses_dat_pp_no_off_and_sizes():
    torch = pytest.importorskip("torch")
    msg = r"DAttentionBaselineCVPR2022: refusing a state dict of DAT\+\+'s DAttentionBaseline"
    pp = _torch_dat_pp(torch, *pp_args(no_off=True))
    with pytest.raises(ValueError, match=msg + r".*: no rpe_table \(DAT\+\+ builds no position"):
        DAttentionBaselineCVPR2022(*cvpr_args(no_off=True)).load_state_dict(pp.state_dict())
    pp = _torch_dat_pp(torch, *pp_args(kv_size=(3, 3)))  # DAT++ ignores kv_size
    with pytest.raises(ValueError, match=msg + r".*: rpe_table \(4, 11, 11\) \(sized by q_size"):
        DAttentionBaselineCVPR2022(*cvpr_args(kv_size=(3, 3))).load_state_dict(pp.state_dict())


def test_same_layout_loads_and_other_mismatches_stay_errors():
    torch = pytest.importorskip("torch")
    # where both variants store the same keys and shapes the parameters mean the same thing
    cvpr = _torch_dat_cvpr(torch, *cvpr_args())
    pp = DAttentionBaseline(*pp_args(), dtype=np.float64)
    pp.load_state_dict(cvpr.state_dict())
    np.testing.assert_array_equal(pp.rpe_table.numpy(), cvpr.rpe_table.detach().numpy())
    # a mismatch that is not the other variant's layout keeps the generic errors
    with pytest.raises(ValueError, match=r"load_state_dict: conv_offset.0.weight has shape"):
        DAttentionBaseline(*pp_args(ksize=5)).load_state_dict(cvpr.state_dict())
    with pytest.raises(KeyError, match=r"missing keys \['rpe_table.weight'"):
        DAttentionBaseline(*pp_args(dwc_pe=True)).load_state_dict(cvpr.state_dict())


# ---------------------------------------------------------------------------- behaviour


def test_dropout_train_and_eval(rng):
    x = rng.standard_normal((2, 8, 5, 5))
    base = perturb(DAttentionBaseline(*pp_args(q_size=(5, 5)), dtype=np.float64), rng)
    sd = base.state_dict()

    def make(attn_drop, proj_drop):
        layer = DAttentionBaseline(
            *pp_args(q_size=(5, 5), attn_drop=attn_drop, proj_drop=proj_drop), dtype=np.float64
        )
        return layer.load_state_dict(sd)

    y0 = base(x)[0].numpy()
    # eval mode: identity dropouts; p = 0: identity in training mode too
    np.testing.assert_array_equal(make(0.5, 0.5).eval()(x)[0].numpy(), y0)
    np.testing.assert_array_equal(make(0.0, 0.0).train()(x)[0].numpy(), y0)
    # attn_drop = 1 zeroes the attention: y is proj_out's bias; proj_drop = 1 zeroes y
    y = make(1.0, 0.0).train()(x)[0].numpy()
    np.testing.assert_array_equal(y, np.broadcast_to(sd["proj_out.bias"][:, None, None], y.shape))
    xt = dn.tensor(x, requires_grad=True)
    y = make(0.0, 1.0).train()(xt)[0]
    assert not np.any(y.numpy())
    # proj_drop = 0.5: about half the outputs zeroed, the rest doubled
    dn.manual_seed(0)
    y = make(0.0, 0.5).train()(x)[0].numpy()
    kept = y != 0
    assert 0.3 < kept.mean() < 0.7
    np.testing.assert_allclose(y[kept], 2 * y0[kept], rtol=1e-13)


def test_positions_and_reference_grids(rng):
    # DAT++: reference (i + 0.5)/(Hk - 1)*2 - 1 (past 1 at the end); clamp with s < 0
    layer = DAttentionBaseline(*pp_args(no_off=True, use_pe=False, stride=2), dtype=np.float64)
    _, pos, ref = layer(rng.standard_normal((1, 8, 6, 6)))
    expected = (np.arange(3) + 0.5) / 2 * 2 - 1
    np.testing.assert_array_equal(ref.numpy()[0, 0, :, 0, 0], expected)
    np.testing.assert_array_equal(pos.numpy(), ref.numpy())
    layer.offset_range_factor = -1.0
    _, pos, _ = layer(rng.standard_normal((1, 8, 6, 6)))
    np.testing.assert_array_equal(pos.numpy(), np.clip(ref.numpy(), -1, 1))
    # s >= 0: |pos - ref| <= s / (Hk - 1); s = 0 zeroes the offsets
    layer = perturb(DAttentionBaseline(*pp_args(), dtype=np.float64), rng, scale=5.0)
    _, pos, ref = layer(rng.standard_normal((1, 8, 6, 6)))
    assert np.abs(pos.numpy() - ref.numpy()).max() <= 2.0 / 5 + 1e-12
    layer.offset_range_factor = 0.0
    _, pos, ref = layer(rng.standard_normal((1, 8, 6, 6)))
    np.testing.assert_array_equal(pos.numpy(), ref.numpy())
    # CVPR 2022: cell centres; tanh with s < 0
    cvpr = DAttentionBaselineCVPR2022(*cvpr_args(no_off=True, offset_range_factor=-1.0))
    _, pos, ref = cvpr(rng.standard_normal((1, 8, 6, 6)).astype(np.float32))
    np.testing.assert_allclose(ref.numpy()[0, 0, :, 0, 0], (np.arange(6) + 0.5) / 6 * 2 - 1)
    np.testing.assert_allclose(pos.numpy(), np.tanh(ref.numpy()), rtol=1e-6)


def test_default_table_interpolates_other_sizes(rng):
    # DAT++ samples its (2 q_h - 1, 2 q_w - 1) table, so other input sizes work
    layer = perturb(DAttentionBaseline(*pp_args(q_size=(3, 3)), dtype=np.float64), rng)
    y, pos, _ = layer(rng.standard_normal((1, 8, 7, 5)))
    assert y.shape == (1, 8, 7, 5) and pos.shape == (1, 2, 7, 5, 2)


def test_float32(rng):
    layer = perturb(DAttentionBaseline(*pp_args(log_cpb=True)), rng)
    x = rng.standard_normal((1, 8, 6, 6)).astype(np.float32)
    y, pos, ref = layer(x)
    assert y.dtype == pos.dtype == ref.dtype == np.float32
    ref64 = DAttentionBaseline(*pp_args(log_cpb=True), dtype=np.float64)
    ref64.load_state_dict(layer.state_dict())
    assert rel_err(y.numpy(), ref64(x.astype(np.float64))[0].numpy()) < 1e-5


def test_validation_messages():
    pp, cv = "DAttentionBaseline", "DAttentionBaselineCVPR2022"
    with pytest.raises(ValueError, match=rf"{pp}: n_heads \(4\) must be divisible by n_groups"):
        DAttentionBaseline(*pp_args(n_groups=3))
    with pytest.raises(ValueError, match=rf"{pp}: stride must be >= 1, got 0"):
        DAttentionBaseline(*pp_args(stride=0))
    with pytest.raises(TypeError, match=rf"{pp}: n_head_channels must be an int, got 2.0"):
        DAttentionBaseline(*pp_args(n_head_channels=2.0))
    with pytest.raises(ValueError, match=rf"{pp}: attn_drop must be in \[0, 1\], got 1.5"):
        DAttentionBaseline(*pp_args(attn_drop=1.5))
    with pytest.raises(TypeError, match=rf"{pp}: proj_drop must be a real number, got None"):
        DAttentionBaseline(*pp_args(proj_drop=None))
    with pytest.raises(TypeError, match=rf"{pp}: use_pe must be a bool, got 1"):
        DAttentionBaseline(*pp_args(use_pe=1))
    with pytest.raises(TypeError, match=rf"{pp}: q_size must be an int or a pair of ints"):
        DAttentionBaseline(*pp_args(q_size=None))
    with pytest.raises(ValueError, match=rf"{pp}: use_pe=True with dwc_pe=True and no_off=True"):
        DAttentionBaseline(*pp_args(dwc_pe=True, no_off=True))
    with pytest.raises(ValueError, match=rf"{cv}: stage_idx must be 0, 1, 2 or 3 .* got 4"):
        DAttentionBaselineCVPR2022(*cvpr_args(stage_idx=4))
    with pytest.raises(TypeError, match=rf"{cv}: kv_size must be an int or a pair of ints"):
        DAttentionBaselineCVPR2022(*cvpr_args(kv_size=None))
    DAttentionBaseline(*pp_args(kv_size=None))  # DAT++ ignores kv_size
    with pytest.raises(TypeError, match=r"takes 16 positional arguments but 17 were given"):
        DAttentionBaseline(*pp_args(), np.float64)  # dtype / device are keyword-only

    layer = DAttentionBaseline(*pp_args())
    with pytest.raises(ValueError, match=rf"{pp}: x must be .* \(B, 8, H, W\), got shape"):
        layer(np.zeros((1, 4, 6, 6), np.float32))
    with pytest.raises(ValueError, match=rf"{pp}: the offset grid is 1x3, but DAT\+\+"):
        layer(np.zeros((1, 8, 1, 3), np.float32))
    fixed = DAttentionBaseline(*pp_args(fixed_pe=True))
    with pytest.raises(ValueError, match=rf"{pp}: the fixed_pe table is .* H\*W = 30 queries"):
        fixed(np.zeros((1, 8, 5, 6), np.float32))
    no_off = DAttentionBaseline(*pp_args(no_off=True, stride=2, ksize=5))
    with pytest.raises(ValueError, match=rf"{pp}: no_off pools x by stride 2 to 3x3, but the"):
        no_off(np.zeros((1, 8, 7, 7), np.float32))
    cvpr = DAttentionBaselineCVPR2022(*cvpr_args())
    with pytest.raises(ValueError, match=rf"{cv}: x is 5x6 but the relative position bias"):
        cvpr(np.zeros((1, 8, 5, 6), np.float32))
