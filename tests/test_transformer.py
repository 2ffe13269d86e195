"""deformnp.nn.transformer: MultiheadAttention against torch.nn.MultiheadAttention itself, and
Deformable-DETR's encoder / decoder layers, encoder and decoder against torch transcriptions of
models/deformable_transformer.py (their MSDeformAttn core in the pure-PyTorch grid_sample
formulation), with the same state dict loaded into both: float64 outputs and input gradients to
~1e-12. ``sampling_offsets.weight`` gets small random values so sampling points move with the
queries but stay off the zero-fade kinks; im2col_step is accepted and ignored.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

import deformnp as dn
from deformnp.cases.bench import torch_ms_deform_attn_core as torch_core
from deformnp.nn.transformer import (
    DeformableTransformerDecoder,
    DeformableTransformerDecoderLayer,
    DeformableTransformerEncoder,
    DeformableTransformerEncoderLayer,
    MultiheadAttention,
    inverse_sigmoid,
)
from deformnp.ops import ms_deform_attn, ms_deform_attn_backward, ms_deform_attn_forward
from deformnp.ops.attention import level_layout

LEVELS = [(4, 5), (2, 3)]
D_MODEL, D_FFN, N_HEADS, N_POINTS = 8, 12, 2, 2


def rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


# ------------------------------------------------------------------------------ im2col_step


def _msda_args(rng):
    shapes, starts = level_layout(LEVELS)
    S = int(shapes.prod(1).sum())
    value = rng.standard_normal((2, S, 2, 3))
    loc = rng.uniform(0.05, 0.95, (2, 3, 2, 2, 2, 2))
    attn = rng.uniform(0.1, 1.0, (2, 3, 2, 2, 2))
    return value, shapes, starts, loc, attn


def test_im2col_step_accepted_six_arguments(rng):
    value, shapes, starts, loc, attn = _msda_args(rng)
    ref = ms_deform_attn(value, shapes, starts, loc, attn).numpy()
    # Deformable-DETR: MSDeformAttnFunction.apply(value, shapes, starts, loc, attn, im2col_step)
    np.testing.assert_array_equal(ms_deform_attn(value, shapes, starts, loc, attn, 64).numpy(), ref)
    np.testing.assert_array_equal(ms_deform_attn(value, shapes, starts, loc, attn, 1).numpy(), ref)
    np.testing.assert_array_equal(ms_deform_attn_forward(value, shapes, starts, loc, attn, 3), ref)
    g = rng.standard_normal(ref.shape)
    a = ms_deform_attn_backward(g, value, shapes, starts, loc, attn)
    b = ms_deform_attn_backward(g, value, shapes, starts, loc, attn, (True, True, True), 64)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    ("step", "err", "match"),
    [
        (0, ValueError, "ms_deform_attn: im2col_step must be >= 1, got 0"),
        (-2, ValueError, "ms_deform_attn: im2col_step must be >= 1"),
        (1.5, TypeError, "ms_deform_attn: im2col_step must be an int, got 1.5"),
        (True, TypeError, "ms_deform_attn: im2col_step must be an int"),
    ],
)
def test_im2col_step_validated(rng, step, err, match):
    value, shapes, starts, loc, attn = _msda_args(rng)
    with pytest.raises(err, match=match):
        ms_deform_attn(value, shapes, starts, loc, attn, step)
    with pytest.raises(err, match=match):
        ms_deform_attn_forward(value, shapes, starts, loc, attn, step)
    g = np.zeros((2, 3, 6))
    with pytest.raises(err, match=match):
        ms_deform_attn_backward(g, value, shapes, starts, loc, attn, im2col_step=step)


def test_msdeformattn_layer_has_im2col_step_attribute(rng):
    m = dn.nn.MSDeformAttn(8, 2, 2, 2, dtype=np.float64)
    assert m.im2col_step == 64
    m.im2col_step = 0
    q = rng.standard_normal((1, 3, 8))
    ref = rng.uniform(0.1, 0.9, (1, 3, 2, 2))
    shapes, starts = level_layout(LEVELS)
    feats = rng.standard_normal((1, 26, 8))
    with pytest.raises(ValueError, match="im2col_step must be >= 1"):
        m(q, ref, feats, shapes, starts)


# ------------------------------------------------------------------------- MultiheadAttention


def _mha_pair(torch, rng, **kw):
    theirs = torch.nn.MultiheadAttention(**kw).double()
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.5)
    ours = MultiheadAttention(**kw, dtype=np.float64)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


MHA_CASES = {
    "default": {},
    "kdim_vdim": {"kdim": 5, "vdim": 6},
    "bias_kv_zero_attn": {"add_bias_kv": True, "add_zero_attn": True},
    "no_bias_batch_first": {"bias": False, "batch_first": True},
}


# the "head3d" call passes a bool key_padding_mask with a float attn_mask on purpose (a
# combination torch still accepts, with a deprecation warning of its own)
@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask:UserWarning")
@pytest.mark.parametrize("case", list(MHA_CASES))
@pytest.mark.parametrize(
    "call",
    [
        {},
        {"need_weights": False},
        {"average_attn_weights": False},
        {"masks": "bool"},
        {"masks": "float", "average_attn_weights": False},
        {"masks": "bool", "need_weights": False},
        {"masks": "causal", "is_causal": True, "need_weights": False},
        {"masks": "causal", "is_causal": True},
        {"batched": False, "masks": "bool"},
        {"batched": False, "masks": "head3d"},
        {"masks": "batch3d", "need_weights": False},
    ],
)
def test_mha_matches_torch(rng, case, call):
    torch = pytest.importorskip("torch")
    call = dict(call)
    kw = {"embed_dim": 8, "num_heads": 2, **MHA_CASES[case]}
    theirs, ours = _mha_pair(torch, rng, **kw)
    L, S, N, H = 3, 4, 2, 2
    batched = call.pop("batched", True)
    masks = call.pop("masks", None)
    bf = kw.get("batch_first", False)

    def shape(n, d):
        if not batched:
            return (n, d)
        return (N, n, d) if bf else (n, N, d)

    q = rng.standard_normal(shape(L, 8))
    k = rng.standard_normal(shape(S, kw.get("kdim", 8)))
    v = rng.standard_normal(shape(S, kw.get("vdim", 8)))
    kpm = am = None
    if masks == "bool":
        kpm = np.array([[False, True, False, False], [False, False, False, True]])
        am = np.triu(np.ones((L, S), bool), 2)
    elif masks == "float":
        kpm = rng.standard_normal((N, S))
        am = rng.standard_normal((L, S))
    elif masks == "causal":
        am = np.triu(np.ones((L, S), bool), 1)
    elif masks == "head3d":
        kpm = np.array([False, True, False, False])
        am = rng.standard_normal((H, L, S))
    elif masks == "batch3d":
        am = rng.standard_normal((N * H, L, S))
    if not batched and kpm is not None and kpm.ndim == 2:
        kpm = kpm[0]
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    t_out, t_w = theirs(
        tq,
        tk,
        tv,
        key_padding_mask=None if kpm is None else torch.tensor(kpm),
        attn_mask=None if am is None else torch.tensor(am),
        **call,
    )
    g = rng.standard_normal(t_out.shape)
    t_out.backward(torch.tensor(g))
    dq, dk, dv = (dn.tensor(x, requires_grad=True) for x in (q, k, v))
    out, w = ours(dq, dk, dv, key_padding_mask=kpm, attn_mask=am, **call)
    out.backward(g)
    assert out.shape == tuple(t_out.shape)
    assert rel_err(out.numpy(), t_out.detach().numpy()) < 1e-12
    if t_w is None:
        assert w is None
    else:
        assert w.shape == tuple(t_w.shape)
        assert rel_err(w.numpy(), t_w.detach().numpy()) < 1e-12
    for a, b in ((dq, tq), (dk, tk), (dv, tv)):
        assert rel_err(a.grad, b.grad.numpy()) < 1e-12
    t_params = dict(theirs.named_parameters())
    names = [n for n, _ in ours.named_parameters()]
    assert sorted(names) == sorted(t_params)
    for name, p in ours.named_parameters():
        assert rel_err(p.grad, t_params[name].grad.numpy()) < 1e-12, name


def test_mha_fully_masked_rows_as_torch(rng):
    torch = pytest.importorskip("torch")
    theirs, ours = _mha_pair(torch, rng, embed_dim=8, num_heads=2)
    q = rng.standard_normal((3, 2, 8))
    kpm = np.array([[True, True, True], [False, True, False]])
    for need in (True, False):
        t_out, _ = theirs(
            *(torch.tensor(q),) * 3, key_padding_mask=torch.tensor(kpm), need_weights=need
        )
        out, _ = ours(q, q, q, key_padding_mask=kpm, need_weights=need)
        np.testing.assert_array_equal(np.isnan(out.numpy()), np.isnan(t_out.detach().numpy()))
        ok = ~np.isnan(out.numpy())
        assert rel_err(out.numpy()[ok], t_out.detach().numpy()[ok]) < 1e-12


def test_mha_parameters_and_init():
    m = MultiheadAttention(8, 2)
    assert m.in_proj_weight.shape == (24, 8) and m.in_proj_weight.dtype == np.float32
    assert m.q_proj_weight is None and m.bias_k is None
    np.testing.assert_array_equal(m.in_proj_bias.numpy(), 0)
    np.testing.assert_array_equal(m.out_proj.bias.numpy(), 0)
    bound = math.sqrt(6 / (8 + 24))  # Xavier-uniform of a (24, 8) weight
    assert np.abs(m.in_proj_weight.numpy()).max() <= bound
    m = MultiheadAttention(8, 2, kdim=3, vdim=5, bias=False, add_bias_kv=True)
    assert m.in_proj_weight is None and m.in_proj_bias is None and m.out_proj.bias is None
    assert (m.q_proj_weight.shape, m.k_proj_weight.shape, m.v_proj_weight.shape) == (
        (8, 8),
        (8, 3),
        (8, 5),
    )
    assert m.bias_k.shape == (1, 1, 8)
    assert set(m.state_dict()) == {
        "q_proj_weight",
        "k_proj_weight",
        "v_proj_weight",
        "bias_k",
        "bias_v",
        "out_proj.weight",
    }


def test_mha_gradcheck(rng):
    m = MultiheadAttention(
        4, 2, kdim=3, vdim=5, add_bias_kv=True, add_zero_attn=True, dtype=np.float64
    )
    q = dn.tensor(rng.standard_normal((3, 2, 4)), requires_grad=True)
    k = dn.tensor(rng.standard_normal((4, 2, 3)), requires_grad=True)
    v = dn.tensor(rng.standard_normal((4, 2, 5)), requires_grad=True)
    am = dn.tensor(rng.standard_normal((3, 4)), requires_grad=True)
    kpm = np.array([[False, True, False, False], [False, False, False, False]])

    def f(q, k, v, am):
        out, w = m(q, k, v, key_padding_mask=kpm, attn_mask=am, average_attn_weights=False)
        return out, w

    assert dn.gradcheck(f, (q, k, v, am))
    assert dn.gradcheck(lambda w: m(q, k, v)[0], (m.k_proj_weight,))


def test_mha_train_mode_dropout_on_weights(rng):
    m = MultiheadAttention(4, 2, dropout=0.5, dtype=np.float64)
    q = rng.standard_normal((3, 2, 4))
    dn.manual_seed(0)
    _, w = m(q, q, q, average_attn_weights=False)
    assert np.any(w.numpy() == 0) and np.any(np.isclose(w.numpy().sum(-1), 1.0) == 0)
    m.eval()
    _, w = m(q, q, q, average_attn_weights=False)
    np.testing.assert_allclose(w.numpy().sum(-1), 1.0)


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        (
            {"embed_dim": 0, "num_heads": 1},
            ValueError,
            "MultiheadAttention: embed_dim must be >= 1",
        ),
        (
            {"embed_dim": 6, "num_heads": 4},
            ValueError,
            "embed_dim must be divisible by num_heads, got 6 and 4",
        ),
        (
            {"embed_dim": 4, "num_heads": 2.0},
            TypeError,
            "MultiheadAttention: num_heads must be an int",
        ),
        (
            {"embed_dim": 4, "num_heads": 2, "dropout": 1.5},
            ValueError,
            "dropout must be in \\[0, 1\\], got 1.5",
        ),
        ({"embed_dim": 4, "num_heads": 2, "kdim": 0}, ValueError, "kdim must be >= 1"),
        (
            {"embed_dim": 4, "num_heads": 2, "dtype": np.int32},
            TypeError,
            "dtype must be float32 or float64",
        ),
    ],
)
def test_mha_constructor_errors(kwargs, err, match):
    with pytest.raises(err, match=match):
        MultiheadAttention(**kwargs)


def test_mha_forward_errors(rng):
    m = MultiheadAttention(4, 2, dtype=np.float64)
    x = rng.standard_normal((3, 2, 4))
    with pytest.raises(ValueError, match="query must be 2-d \\(L, E\\) unbatched or 3-d batched"):
        m(x[None], x[None], x[None])
    with pytest.raises(ValueError, match="for a 3-d query, key and value must be 3-d"):
        m(x, x[0], x)
    with pytest.raises(ValueError, match="query must be \\(L, N, E\\) with E = 4, got width 3"):
        m(x[..., :3], x, x)
    with pytest.raises(ValueError, match="key and value must have widths kdim = 4 and vdim = 4"):
        m(x, x[..., :3], x)
    with pytest.raises(ValueError, match="key and value must have the query's batch size 2"):
        m(x, x[:, :1], x[:, :1])
    with pytest.raises(TypeError, match="MultiheadAttention: key must be float64 like"):
        m(x, x.astype(np.float32), x)
    with pytest.raises(ValueError, match="key_padding_mask must have shape \\(2, 3\\)"):
        m(x, x, x, key_padding_mask=np.zeros((2, 4), bool))
    with pytest.raises(ValueError, match="attn_mask must have shape \\(L, S\\) = \\(3, 3\\)"):
        m(x, x, x, attn_mask=np.zeros((3, 4), bool))
    with pytest.raises(TypeError, match="only bool and floating types of attn_mask"):
        m(x, x, x, attn_mask=np.zeros((3, 3), np.int64))
    with pytest.raises(TypeError, match="a float key_padding_mask must be float64"):
        m(x, x, x, key_padding_mask=np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="is_causal=True needs attn_mask"):
        m(x, x, x, is_causal=True)


# ---------------------------------------------------------- Deformable-DETR transcriptions


class _TorchMSDeformAttn:
    """Deformable-DETR's MSDeformAttn forward, transcribed with torch (pure-PyTorch core)."""

    @staticmethod
    def module(torch, d_model, n_levels, n_heads, n_points):
        nn = torch.nn
        return nn.ModuleDict(
            {
                "sampling_offsets": nn.Linear(d_model, n_heads * n_levels * n_points * 2),
                "attention_weights": nn.Linear(d_model, n_heads * n_levels * n_points),
                "value_proj": nn.Linear(d_model, d_model),
                "output_proj": nn.Linear(d_model, d_model),
            }
        )

    @staticmethod
    def forward(torch, mod, M, L, P, query, reference_points, input_flatten, shapes, starts, mask):
        F = torch.nn.functional
        N, Len_q, C = query.shape
        Len_in = input_flatten.shape[1]
        value = mod["value_proj"](input_flatten)
        if mask is not None:
            value = value.masked_fill(mask[..., None], float(0))
        value = value.view(N, Len_in, M, C // M)
        offsets = mod["sampling_offsets"](query).view(N, Len_q, M, L, P, 2)
        weights = mod["attention_weights"](query).view(N, Len_q, M, L * P)
        weights = F.softmax(weights, -1).view(N, Len_q, M, L, P)
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([shapes[..., 1], shapes[..., 0]], -1)
            loc = (
                reference_points[:, :, None, :, None, :]
                + offsets / normalizer[None, None, None, :, None, :]
            )
        else:
            loc = (
                reference_points[:, :, None, :, None, :2]
                + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        out = torch_core(value, [tuple(s) for s in shapes.tolist()], loc, weights)
        return mod["output_proj"](out)


def _torch_classes(torch):
    """Deformable-DETR's deformable_transformer.py classes, transcribed (MSDeformAttn above)."""
    nn = torch.nn
    F = torch.nn.functional

    class MSDA(nn.Module):
        def __init__(self, d_model, n_levels, n_heads, n_points):
            super().__init__()
            self.args = (n_heads, n_levels, n_points)
            for k, v in _TorchMSDeformAttn.module(
                torch, d_model, n_levels, n_heads, n_points
            ).items():
                setattr(self, k, v)

        def forward(self, *args):
            mod = {
                k: getattr(self, k)
                for k in ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
            }
            return _TorchMSDeformAttn.forward(torch, mod, *self.args, *args)

    class EncoderLayer(nn.Module):
        def __init__(self, d_model, d_ffn, dropout, activation, n_levels, n_heads, n_points):
            super().__init__()
            self.self_attn = MSDA(d_model, n_levels, n_heads, n_points)
            self.dropout1 = nn.Dropout(dropout)
            self.norm1 = nn.LayerNorm(d_model)
            self.linear1 = nn.Linear(d_model, d_ffn)
            self.activation = getattr(F, activation)
            self.dropout2 = nn.Dropout(dropout)
            self.linear2 = nn.Linear(d_ffn, d_model)
            self.dropout3 = nn.Dropout(dropout)
            self.norm2 = nn.LayerNorm(d_model)

        def forward(
            self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None
        ):
            q = src if pos is None else src + pos
            src2 = self.self_attn(
                q, reference_points, src, spatial_shapes, level_start_index, padding_mask
            )
            src = self.norm1(src + self.dropout1(src2))
            src2 = self.linear2(self.dropout2(self.activation(self.linear1(src))))
            return self.norm2(src + self.dropout3(src2))

    class Encoder(nn.Module):
        def __init__(self, layer, num_layers):
            super().__init__()
            self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])
            self.num_layers = num_layers

        @staticmethod
        def get_reference_points(spatial_shapes, valid_ratios):
            refs = []
            for lvl, (H_, W_) in enumerate(spatial_shapes):
                ref_y, ref_x = torch.meshgrid(
                    torch.linspace(0.5, H_ - 0.5, H_, dtype=torch.float32),
                    torch.linspace(0.5, W_ - 0.5, W_, dtype=torch.float32),
                    indexing="ij",
                )
                ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * H_)
                ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * W_)
                refs.append(torch.stack((ref_x, ref_y), -1))
            return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]

        def forward(
            self, src, spatial_shapes, level_start_index, valid_ratios, pos=None, padding_mask=None
        ):
            output = src
            ref = self.get_reference_points(spatial_shapes, valid_ratios)
            for layer in self.layers:
                output = layer(output, pos, ref, spatial_shapes, level_start_index, padding_mask)
            return output

    class DecoderLayer(nn.Module):
        def __init__(self, d_model, d_ffn, dropout, activation, n_levels, n_heads, n_points):
            super().__init__()
            self.cross_attn = MSDA(d_model, n_levels, n_heads, n_points)
            self.dropout1 = nn.Dropout(dropout)
            self.norm1 = nn.LayerNorm(d_model)
            self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout)
            self.dropout2 = nn.Dropout(dropout)
            self.norm2 = nn.LayerNorm(d_model)
            self.linear1 = nn.Linear(d_model, d_ffn)
            self.activation = getattr(F, activation)
            self.dropout3 = nn.Dropout(dropout)
            self.linear2 = nn.Linear(d_ffn, d_model)
            self.dropout4 = nn.Dropout(dropout)
            self.norm3 = nn.LayerNorm(d_model)

        def forward(self, tgt, query_pos, reference_points, src, shapes, starts, mask=None):
            q = k = tgt if query_pos is None else tgt + query_pos
            tgt2 = self.self_attn(q.transpose(0, 1), k.transpose(0, 1), tgt.transpose(0, 1))[
                0
            ].transpose(0, 1)
            tgt = self.norm2(tgt + self.dropout2(tgt2))
            tgt2 = self.cross_attn(
                tgt if query_pos is None else tgt + query_pos,
                reference_points,
                src,
                shapes,
                starts,
                mask,
            )
            tgt = self.norm1(tgt + self.dropout1(tgt2))
            tgt2 = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
            return self.norm3(tgt + self.dropout4(tgt2))

    def inverse_sigmoid_t(x, eps=1e-5):
        x = x.clamp(min=0, max=1)
        return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))

    class Decoder(nn.Module):
        def __init__(self, layer, num_layers, return_intermediate=False):
            super().__init__()
            self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])
            self.num_layers = num_layers
            self.return_intermediate = return_intermediate
            self.bbox_embed = None
            self.class_embed = None

        def forward(
            self,
            tgt,
            reference_points,
            src,
            shapes,
            starts,
            valid_ratios,
            query_pos=None,
            mask=None,
        ):
            output = tgt
            inter, inter_ref = [], []
            for lid, layer in enumerate(self.layers):
                if reference_points.shape[-1] == 4:
                    ref_in = (
                        reference_points[:, :, None]
                        * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
                    )
                else:
                    ref_in = reference_points[:, :, None] * valid_ratios[:, None]
                output = layer(output, query_pos, ref_in, src, shapes, starts, mask)
                if self.bbox_embed is not None:
                    tmp = self.bbox_embed[lid](output)
                    if reference_points.shape[-1] == 4:
                        new = (tmp + inverse_sigmoid_t(reference_points)).sigmoid()
                    else:
                        new = tmp
                        new[..., :2] = tmp[..., :2] + inverse_sigmoid_t(reference_points)
                        new = new.sigmoid()
                    reference_points = new.detach()
                if self.return_intermediate:
                    inter.append(output)
                    inter_ref.append(reference_points)
            if self.return_intermediate:
                return torch.stack(inter), torch.stack(inter_ref)
            return output, reference_points

    return EncoderLayer, Encoder, DecoderLayer, Decoder


LAYER_ARGS = (D_MODEL, D_FFN, 0.0, "relu", len(LEVELS), N_HEADS, N_POINTS)


def _randomise(torch, module):
    """Random weights, with small sampling_offsets weights (points move, stay off the kinks)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            std = 0.02 if name.endswith("sampling_offsets.weight") else 0.3
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
    module.eval()
    return module


def _memory_inputs(rng, N=2):
    shapes, starts = level_layout(LEVELS)
    S = int(shapes.prod(1).sum())
    src = rng.standard_normal((N, S, D_MODEL))
    pos = rng.standard_normal((N, S, D_MODEL))
    valid = rng.uniform(0.6, 1.0, (N, len(LEVELS), 2))
    mask = np.zeros((N, S), bool)
    mask[-1, -3:] = True
    return shapes, starts, src, pos, valid, mask


def _compare(torch, ours, theirs, t_inputs, d_inputs, call_t, call_d, tol=1e-12):
    t_out = call_t(*t_inputs)
    t_out = t_out if isinstance(t_out, tuple) else (t_out,)
    d_out = call_d(*d_inputs)
    d_out = d_out if isinstance(d_out, tuple) else (d_out,)
    grads = [rng_grad(o.shape, i) for i, o in enumerate(t_out)]
    sum(
        ((o * torch.tensor(g)).sum() for o, g in zip(t_out, grads, strict=True) if o.requires_grad)
    ).backward()
    total = None
    for o, g in zip(d_out, grads, strict=True):
        if o.requires_grad:
            term = (o * g).sum()
            total = term if total is None else total + term
    total.backward()
    errs = {}
    for i, (a, b) in enumerate(zip(d_out, t_out, strict=True)):
        errs[f"out{i}"] = rel_err(a.numpy(), b.detach().numpy())
    for i, (a, b) in enumerate(zip(d_inputs, t_inputs, strict=True)):
        if isinstance(b, torch.Tensor) and b.requires_grad:
            errs[f"grad_in{i}"] = rel_err(a.grad, b.grad.numpy())
    t_params = dict(theirs.named_parameters())
    assert sorted(n for n, _ in ours.named_parameters()) == sorted(t_params)
    for name, p in ours.named_parameters():
        if t_params[name].grad is not None:
            errs[name] = rel_err(p.grad, t_params[name].grad.numpy())
    worst = max(errs.values())
    assert worst < tol, errs
    return worst


def rng_grad(shape, i):
    return np.random.default_rng(100 + i).standard_normal(tuple(shape))


def _pair(torch, cls_t, cls_d, *args, **kw):
    theirs = _randomise(torch, cls_t(*args, **kw).double())
    ours = cls_d(*args, **kw, dtype=np.float64)
    ours.load_state_dict(theirs.state_dict())
    ours.eval()
    return theirs, ours


def test_encoder_layer_matches_deformable_detr(rng):
    torch = pytest.importorskip("torch")
    EncoderLayer, _, _, _ = _torch_classes(torch)
    theirs, ours = _pair(torch, EncoderLayer, DeformableTransformerEncoderLayer, *LAYER_ARGS)
    shapes, starts, src, pos, valid, mask = _memory_inputs(rng)
    ref = rng.uniform(0.1, 0.9, (2, src.shape[1], len(LEVELS), 2))
    arrays = (src, pos, ref)
    t_in = [torch.tensor(x, requires_grad=True) for x in arrays]
    d_in = [dn.tensor(x, requires_grad=True) for x in arrays]
    ts, tst, tm = torch.from_numpy(shapes), torch.from_numpy(starts), torch.from_numpy(mask)
    worst = _compare(
        torch,
        ours,
        theirs,
        t_in,
        d_in,
        lambda s, p, r: theirs(s, p, r, ts, tst, tm),
        lambda s, p, r: ours(s, p, r, shapes, starts, mask),
    )
    print(f"encoder layer worst rel err {worst:.2e}")


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_decoder_layer_matches_deformable_detr(rng, ref_dim):
    torch = pytest.importorskip("torch")
    _, _, DecoderLayer, _ = _torch_classes(torch)
    theirs, ours = _pair(torch, DecoderLayer, DeformableTransformerDecoderLayer, *LAYER_ARGS)
    shapes, starts, src, _, _, mask = _memory_inputs(rng)
    tgt = rng.standard_normal((2, 5, D_MODEL))
    qpos = rng.standard_normal((2, 5, D_MODEL))
    ref = rng.uniform(0.2, 0.8, (2, 5, len(LEVELS), ref_dim))
    if ref_dim == 4:
        ref[..., 2:] = rng.uniform(0.1, 0.3, ref[..., 2:].shape)
    arrays = (tgt, qpos, ref, src)
    t_in = [torch.tensor(x, requires_grad=True) for x in arrays]
    d_in = [dn.tensor(x, requires_grad=True) for x in arrays]
    ts, tst, tm = torch.from_numpy(shapes), torch.from_numpy(starts), torch.from_numpy(mask)
    worst = _compare(
        torch,
        ours,
        theirs,
        t_in,
        d_in,
        lambda t, q, r, s: theirs(t, q, r, s, ts, tst, tm),
        lambda t, q, r, s: ours(t, q, r, s, shapes, starts, mask),
    )
    print(f"decoder layer (ref {ref_dim}) worst rel err {worst:.2e}")


def test_encoder_matches_deformable_detr(rng):
    torch = pytest.importorskip("torch")
    EncoderLayer, Encoder, _, _ = _torch_classes(torch)
    theirs = _randomise(torch, Encoder(EncoderLayer(*LAYER_ARGS), 2).double())
    ours = DeformableTransformerEncoder(
        DeformableTransformerEncoderLayer(*LAYER_ARGS, dtype=np.float64), 2
    ).eval()
    ours.load_state_dict(theirs.state_dict())
    assert set(ours.state_dict()) == set(theirs.state_dict())
    shapes, starts, src, pos, valid, mask = _memory_inputs(rng)
    arrays = (src, valid, pos)
    t_in = [torch.tensor(x, requires_grad=True) for x in arrays]
    d_in = [dn.tensor(x, requires_grad=True) for x in arrays]
    ts, tst, tm = torch.from_numpy(shapes), torch.from_numpy(starts), torch.from_numpy(mask)
    worst = _compare(
        torch,
        ours,
        theirs,
        t_in,
        d_in,
        lambda s, v, p: theirs(s, ts, tst, v, p, tm),
        lambda s, v, p: ours(s, shapes, starts, v, p, mask),
    )
    print(f"encoder worst rel err {worst:.2e}")


def test_encoder_reference_points(rng):
    torch = pytest.importorskip("torch")
    _, Encoder, _, _ = _torch_classes(torch)
    shapes, _, _, _, valid, _ = _memory_inputs(rng)
    ours = DeformableTransformerEncoder.get_reference_points(shapes, valid, device="cpu")
    theirs = Encoder.get_reference_points(torch.from_numpy(shapes), torch.from_numpy(valid))
    assert ours.shape == (2, 26, 2, 2)
    assert rel_err(ours.numpy(), theirs.numpy()) < 1e-15
    with pytest.raises(
        ValueError, match="DeformableTransformerEncoder: spatial_shapes must be \\(L, 2\\)"
    ):
        DeformableTransformerEncoder.get_reference_points(shapes, valid[:, :1])


@pytest.mark.parametrize(
    ("ref_dim", "return_intermediate", "refine"),
    [(2, False, False), (4, True, False), (2, True, True), (4, False, True)],
)
def test_decoder_matches_deformable_detr(rng, ref_dim, return_intermediate, refine):
    torch = pytest.importorskip("torch")
    _, _, DecoderLayer, Decoder = _torch_classes(torch)
    theirs = Decoder(DecoderLayer(*LAYER_ARGS), 2, return_intermediate).double()
    ours = DeformableTransformerDecoder(
        DeformableTransformerDecoderLayer(*LAYER_ARGS, dtype=np.float64), 2, return_intermediate
    )
    assert ours.bbox_embed is None and ours.class_embed is None
    if refine:  # Deformable-DETR's hook: per-layer box heads
        theirs.bbox_embed = torch.nn.ModuleList(
            [torch.nn.Linear(D_MODEL, 4) for _ in range(2)]
        ).double()
        ours.bbox_embed = dn.nn.ModuleList(
            [dn.nn.Linear(D_MODEL, 4, dtype=np.float64) for _ in range(2)]
        )
    _randomise(torch, theirs)
    ours.load_state_dict(theirs.state_dict())
    ours.eval()
    shapes, starts, src, _, valid, mask = _memory_inputs(rng)
    tgt = rng.standard_normal((2, 5, D_MODEL))
    qpos = rng.standard_normal((2, 5, D_MODEL))
    ref = rng.uniform(0.2, 0.8, (2, 5, ref_dim))
    if ref_dim == 4:
        ref[..., 2:] = rng.uniform(0.1, 0.3, ref[..., 2:].shape)
    arrays = (tgt, ref, src, valid, qpos)
    t_in = [torch.tensor(x, requires_grad=True) for x in arrays]
    d_in = [dn.tensor(x, requires_grad=True) for x in arrays]
    ts, tst, tm = torch.from_numpy(shapes), torch.from_numpy(starts), torch.from_numpy(mask)
    worst = _compare(
        torch,
        ours,
        theirs,
        t_in,
        d_in,
        lambda t, r, s, v, q: theirs(t, r, s, ts, tst, v, q, tm),
        lambda t, r, s, v, q: ours(t, r, s, shapes, starts, v, q, mask),
    )
    print(f"decoder ({ref_dim}, {return_intermediate}, {refine}) worst rel err {worst:.2e}")


def test_layers_gradcheck(rng):
    layer = DeformableTransformerDecoderLayer(8, 12, 0.0, "gelu", 2, 2, 2, dtype=np.float64)
    dn.nn.init.normal_(layer.cross_attn.sampling_offsets.weight, std=0.02)
    shapes, starts, src, _, _, mask = _memory_inputs(rng, N=1)
    tgt = dn.tensor(rng.standard_normal((1, 3, 8)), requires_grad=True)
    qpos = dn.tensor(rng.standard_normal((1, 3, 8)), requires_grad=True)
    ref = dn.tensor(rng.uniform(0.3, 0.7, (1, 3, 2, 2)), requires_grad=True)
    s = dn.tensor(src[:1], requires_grad=True)
    assert dn.gradcheck(
        lambda t, q, s: layer(t, q, ref, s, shapes, starts, mask[:1]), (tgt, qpos, s)
    )
    enc = DeformableTransformerEncoder(
        DeformableTransformerEncoderLayer(8, 12, 0.0, "relu", 2, 2, 2, dtype=np.float64), 1
    )
    valid = dn.tensor(rng.uniform(0.6, 1.0, (1, 2, 2)), requires_grad=True)
    assert dn.gradcheck(
        lambda v: enc.layers[0].norm1(
            enc.get_reference_points(shapes, v).sum(-1).sum(-1)[..., None] * np.ones(8)
        ),
        (valid,),
    )


def test_clones_are_independent():
    layer = DeformableTransformerEncoderLayer(8, 12, 0.0, "relu", 2, 2, 2)
    enc = DeformableTransformerEncoder(layer, 3)
    assert len(enc.layers) == 3 and enc.num_layers == 3
    enc.layers[0].linear1.weight.data[...] = 0
    assert not np.all(enc.layers[1].linear1.weight.numpy() == 0)
    assert "layers.2.self_attn.sampling_offsets.weight" in enc.state_dict()


def test_defaults_and_names():
    layer = DeformableTransformerDecoderLayer()
    assert layer.self_attn.embed_dim == 256 and layer.self_attn.num_heads == 8
    assert layer.self_attn.dropout == 0.1 and layer.dropout4.p == 0.1
    assert layer.cross_attn.n_levels == 4 and layer.cross_attn.n_points == 4
    assert layer.linear1.out_features == 1024 and layer.activation is dn.functional.relu
    names = {n.split(".")[0] for n in layer.state_dict()}
    assert names == {"cross_attn", "norm1", "self_attn", "norm2", "linear1", "linear2", "norm3"}
    assert DeformableTransformerEncoderLayer(activation="gelu").activation is dn.functional.gelu


@pytest.mark.parametrize(
    ("make", "err", "match"),
    [
        (
            lambda: DeformableTransformerEncoderLayer(activation="glu"),
            ValueError,
            "DeformableTransformerEncoderLayer: activation should be relu/gelu, not 'glu'",
        ),
        (
            lambda: DeformableTransformerDecoderLayer(dropout=-0.1),
            ValueError,
            "DeformableTransformerDecoderLayer: dropout must be in \\[0, 1\\]",
        ),
        (
            lambda: DeformableTransformerEncoder(
                DeformableTransformerEncoderLayer(8, 8, 0.0, "relu", 1, 2, 1), -1
            ),
            ValueError,
            "DeformableTransformerEncoder: num_layers must be >= 0",
        ),
        (
            lambda: DeformableTransformerDecoder("layer", 2),
            TypeError,
            "DeformableTransformerDecoder: decoder_layer must be a Module, got str",
        ),
    ],
)
def test_constructor_errors(make, err, match):
    with pytest.raises(err, match=match):
        make()


def test_decoder_reference_points_error(rng):
    dec = DeformableTransformerDecoder(
        DeformableTransformerDecoderLayer(8, 8, 0.0, "relu", 2, 2, 1, dtype=np.float64), 1
    )
    shapes, starts, src, _, valid, _ = _memory_inputs(rng)
    with pytest.raises(
        ValueError,
        match="reference_points must be \\(N, Lq, 2\\) or \\(N, Lq, 4\\), got shape \\(2, 5, 3\\)",
    ):
        dec(np.zeros((2, 5, 8)), np.zeros((2, 5, 3)), src, shapes, starts, valid)


def test_inverse_sigmoid():
    x = np.array([0.0, 0.25, 0.5, 0.9, 1.0, 1.5])
    expected = np.log(
        np.clip(np.clip(x, 0, 1), 1e-5, None) / np.clip(1 - np.clip(x, 0, 1), 1e-5, None)
    )
    np.testing.assert_allclose(inverse_sigmoid(x).numpy(), expected)
