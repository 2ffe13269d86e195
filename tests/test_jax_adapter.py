"""deformnp.jax: every function against deformnp's own ops (outputs and gradients, float64),
finite differences (``jax.test_util.check_grads``), ``jax.jit``, ``jax.vmap`` against a Python
loop, float32, validation messages, and that ``import deformnp`` does not import jax."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import deformnp as dn  # noqa: E402
import deformnp.jax as dj  # noqa: E402
from deformnp import ops  # noqa: E402
from deformnp.cases.inputs import (  # noqa: E402
    boxes_in,
    conv_offsets_off_kinks,
    deform_roi_offsets_off_kinks,
    grid_off_kinks,
    level_layout,
    locations_off_kinks,
    points_off_kinks,
)


@pytest.fixture(autouse=True, scope="module")
def x64():
    """float64 JAX arrays for this module (restored afterwards)."""
    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


# ============================================================================ the cases


@dataclass
class Case:
    """``jax_fn`` (deformnp.jax) and ``ref`` (deformnp.ops on Tensors) of the differentiable
    arguments ``args`` (static arguments and boxes are bound)."""

    jax_fn: Callable
    ref: Callable
    args: tuple[np.ndarray, ...]


def _deform_conv2d(dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 4, 4, 5))
    w = rng.standard_normal((6, 2, 3, 3))  # 2 weight groups
    b = rng.standard_normal(6)
    off = conv_offsets_off_kinks(rng, (2, 2 * 2 * 9, 2, 3))  # 2 offset groups
    m = rng.uniform(0.2, 1.0, (2, 2 * 9, 2, 3))
    geo = {"stride": (2, 1), "padding": (1, 1), "dilation": (1, 2)}
    return Case(
        lambda x, off, w, b, m: dj.deform_conv2d(x, off, w, b, mask=m, **geo),
        lambda x, off, w, b, m: ops.deform_conv2d(x, off, w, b, mask=m, **geo),
        (x, off, w, b, m),
    )


def _deform_conv2d_v1(dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 2, 4, 4))
    w = rng.standard_normal((3, 2, 2, 2))
    off = conv_offsets_off_kinks(rng, (1, 8, 3, 3))
    return Case(dj.deform_conv2d, ops.deform_conv2d, (x, off, w))


def _modulated_deform_conv2d(dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 4, 4, 5))
    w = rng.standard_normal((6, 2, 3, 3))
    b = rng.standard_normal(6)
    off = conv_offsets_off_kinks(rng, (2, 2 * 2 * 9, 4, 5))
    m = rng.uniform(0.2, 1.0, (2, 2 * 9, 4, 5))
    return Case(
        lambda x, off, m, w, b: dj.modulated_deform_conv2d(x, off, m, w, b, 1, 1, 1, 2, 2),
        lambda x, off, m, w, b: ops.deform_conv2d(x, off, w, b, 1, 1, 1, m),
        (x, off, m, w, b),
    )


def _boxes(dtype, K, B, H, W, s):
    return boxes_in(np.random.default_rng(0), K, B, H, W, s).astype(dtype)


def _roi_align(dtype, seed):
    x = np.random.default_rng(seed).standard_normal((2, 3, 6, 7))
    boxes = _boxes(dtype, 4, 2, 6, 7, 0.5)
    return Case(
        lambda x: dj.roi_align(x, boxes, (2, 3), 0.5, 2, True),
        lambda x: ops.roi_align(x, boxes, (2, 3), 0.5, 2, True),
        (x,),
    )


def _roi_align_adaptive(dtype, seed):
    x = np.random.default_rng(seed).standard_normal((2, 3, 6, 7))
    boxes = _boxes(dtype, 3, 2, 6, 7, 1.0)
    return Case(
        lambda x: dj.roi_align(x, boxes, 2),
        lambda x: ops.roi_align(x, boxes, 2),
        (x,),
    )


def _roi_pool(dtype, seed):
    x = np.random.default_rng(seed).standard_normal((2, 3, 6, 7))
    boxes = _boxes(dtype, 4, 2, 6, 7, 1.0)
    return Case(
        lambda x: dj.roi_pool(x, boxes, (2, 2)),
        lambda x: ops.roi_pool(x, boxes, (2, 2)),
        (x,),
    )


def _ps_roi_align(dtype, seed):
    x = np.random.default_rng(seed).standard_normal((2, 8, 6, 7))
    boxes = _boxes(dtype, 3, 2, 6, 7, 0.5)
    return Case(
        lambda x: dj.ps_roi_align(x, boxes, 2, 0.5, 2),
        lambda x: ops.ps_roi_align(x, boxes, 2, 0.5, 2),
        (x,),
    )


def _ps_roi_pool(dtype, seed):
    x = np.random.default_rng(seed).standard_normal((2, 8, 6, 7))
    boxes = _boxes(dtype, 3, 2, 6, 7, 1.0)
    return Case(
        lambda x: dj.ps_roi_pool(x, boxes, (2, 2)),
        lambda x: ops.ps_roi_pool(x, boxes, (2, 2)),
        (x,),
    )


def _deform_roi_pool(dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, 7, 8))
    rois = _boxes(np.float64, 3, 2, 7, 8, 1.0)
    off = deform_roi_offsets_off_kinks(rng, rois, 2, 2, 7, 8, 2, 0.1)
    rois = rois.astype(dtype)
    return Case(
        lambda x, off: dj.deform_roi_pool(x, rois, off, (2, 2), 1.0, 2, 0.1),
        lambda x, off: ops.deform_roi_pool(x, rois, off, (2, 2), 1.0, 2, 0.1),
        (x, off),
    )


def _ms_deform_attn(dtype, seed):
    rng = np.random.default_rng(seed)
    shapes, starts = level_layout(((4, 5), (2, 3)))
    value = rng.standard_normal((2, 26, 2, 3))
    loc = locations_off_kinks(rng, shapes, (2, 3, 2), 2)
    attn = rng.uniform(0.1, 1.0, (2, 3, 2, 2, 2))
    pairs = ((4, 5), (2, 3))  # the static tuple form
    return Case(
        lambda v, loc, a: dj.ms_deform_attn(v, pairs, starts, loc, a),
        lambda v, loc, a: ops.ms_deform_attn(v, shapes, starts, loc, a),
        (value, loc, attn),
    )


def _grid_sample(padding_mode, align_corners):
    def make(dtype, seed):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((2, 3, 5, 6))
        grid = grid_off_kinks(rng, 2, 3, 4, 5, 6, align_corners, padding_mode)
        return Case(
            lambda x, g: dj.grid_sample(x, g, "bilinear", padding_mode, align_corners),
            lambda x, g: ops.grid_sample(x, g, "bilinear", padding_mode, align_corners),
            (x, grid),
        )

    return make


def _bilinear(border):
    def make(dtype, seed):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((2, 3, 5, 6))
        points = points_off_kinks(rng, 2, 7, 5, 6)
        return Case(
            lambda x, p: dj.bilinear_interpolate(x, p, border),
            lambda x, p: ops.bilinear_interpolate(x, p, border),
            (x, points),
        )

    return make


CASES = {
    "deform_conv2d": _deform_conv2d,
    "deform_conv2d_v1": _deform_conv2d_v1,
    "modulated_deform_conv2d": _modulated_deform_conv2d,
    "roi_align": _roi_align,
    "roi_align_adaptive": _roi_align_adaptive,
    "roi_pool": _roi_pool,
    "ps_roi_align": _ps_roi_align,
    "ps_roi_pool": _ps_roi_pool,
    "deform_roi_pool": _deform_roi_pool,
    "ms_deform_attn": _ms_deform_attn,
    "grid_sample_zeros": _grid_sample("zeros", False),
    "grid_sample_border": _grid_sample("border", True),
    "grid_sample_reflection": _grid_sample("reflection", False),
    "bilinear_zero": _bilinear("zero"),
    "bilinear_clamp": _bilinear("clamp"),
}
names = pytest.mark.parametrize("name", list(CASES))


def case(name: str, dtype=np.float64, seed: int = 1) -> Case:
    c = CASES[name](dtype, seed)
    c.args = tuple(np.asarray(a, dtype) for a in c.args)
    return c


def cotangent(out, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(out.shape).astype(out.dtype)


def loss(f: Callable, cot: np.ndarray) -> Callable:
    """A scalar of f's output whose gradient is f's vjp of ``cot``."""
    return lambda *a: jnp.sum(f(*a) * cot)


def argnums(c: Case) -> tuple[int, ...]:
    return tuple(range(len(c.args)))


def close(actual, expected, rtol=1e-12) -> None:
    expected = np.asarray(expected)
    scale = max(float(np.abs(expected).max(initial=0.0)), 1.0)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=rtol * scale)


# ============================================================================ per case


@names
def test_matches_deformnp_ops(name):
    """Output and every gradient equal deformnp's own op (Tensor autograd)."""
    c = case(name)
    xs = [jnp.asarray(a) for a in c.args]
    out, vjp = jax.vjp(c.jax_fn, *xs)
    cot = cotangent(out)
    grads = vjp(jnp.asarray(cot))

    ts = [dn.tensor(a.copy(), requires_grad=True) for a in c.args]
    ref = c.ref(*ts)
    ref.backward(cot)
    assert out.dtype == jnp.float64 and out.shape == ref.shape
    close(out, ref.numpy())
    for g, t in zip(grads, ts):
        assert g.dtype == jnp.float64 and g.shape == t.shape
        close(g, t.grad)


@names
def test_check_grads(name):
    c = case(name)
    check_grads(c.jax_fn, tuple(jnp.asarray(a) for a in c.args), order=1, modes=("rev",))


@names
def test_jit(name):
    c = case(name)
    out = c.jax_fn(*c.args)
    f = loss(c.jax_fn, cotangent(out))
    np.testing.assert_array_equal(np.asarray(jax.jit(c.jax_fn)(*c.args)), np.asarray(out))
    eager = jax.grad(f, argnums(c))(*c.args)
    jitted = jax.jit(jax.grad(f, argnums(c)))(*c.args)
    for a, b in zip(jitted, eager):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@names
def test_vmap_equals_a_loop(name):
    """vmap over a new leading axis of every argument, and of the first only, for the values
    and the gradients, equals a Python loop over the examples."""
    c1, c2 = case(name, seed=1), case(name, seed=2)
    stacked = [np.stack(pair) for pair in zip(c1.args, c2.args)]
    f = c1.jax_fn  # (boxes and static arguments are the same in c1 and c2)
    close(jax.vmap(f)(*stacked), np.stack([f(*c1.args), f(*c2.args)]))

    cot = cotangent(f(*c1.args))
    g = jax.grad(loss(f, cot), argnums(c1))
    batched = jax.vmap(g)(*stacked)
    loop = [g(*c1.args), g(*c2.args)]
    for i, b in enumerate(batched):
        close(b, np.stack([loop[0][i], loop[1][i]]))

    # the other arguments shared (unbatched) by the mapped examples
    axes = (0,) + (None,) * (len(c1.args) - 1)
    rest = c1.args[1:]
    got = jax.vmap(f, in_axes=axes)(stacked[0], *rest)
    close(got, np.stack([f(c1.args[0], *rest), f(c2.args[0], *rest)]))
    batched = jax.vmap(g, in_axes=axes)(stacked[0], *rest)
    loop = [g(c1.args[0], *rest), g(c2.args[0], *rest)]
    for i, b in enumerate(batched):
        close(b, np.stack([loop[0][i], loop[1][i]]))


@names
def test_float32(name):
    c64, c32 = case(name), case(name, np.float32)
    out64 = c64.jax_fn(*c64.args)
    out32 = c32.jax_fn(*c32.args)
    assert out32.dtype == jnp.float32
    close(out32, out64, rtol=1e-5)
    cot = cotangent(out64)
    g64 = jax.grad(loss(c64.jax_fn, cot), argnums(c64))(*c64.args)
    g32 = jax.grad(loss(c32.jax_fn, cot.astype(np.float32)), argnums(c32))(*c32.args)
    for a, b in zip(g32, g64):
        assert a.dtype == jnp.float32
        close(a, b, rtol=1e-4)


# ============================================================================ the rest


def test_nested_vmap_folds_into_the_batch():
    """Two vmapped axes (broadcast_all: folded into N for one kernel call) equal loops."""
    cs = [case("grid_sample_zeros", seed=s) for s in (1, 2, 3, 4)]
    x = np.stack([np.stack([cs[0].args[0], cs[1].args[0]]), np.stack([cs[2].args[0],
                 cs[3].args[0]])])  # fmt: skip
    grid = np.stack([np.stack([cs[1].args[1], cs[2].args[1]]), np.stack([cs[3].args[1],
                    cs[0].args[1]])])  # fmt: skip
    f = cs[0].jax_fn
    got = jax.vmap(jax.vmap(f))(x, grid)
    for i in range(2):
        for j in range(2):
            close(got[i, j], f(x[i, j], grid[i, j]))


def test_only_the_gradients_asked_for_are_computed(monkeypatch):
    seen = []
    backward = ops.deform_conv2d_backward

    def spy(*args, needs, **kwargs):
        seen.append(tuple(needs))
        return backward(*args, needs=needs, **kwargs)

    monkeypatch.setattr(ops, "deform_conv2d_backward", spy)
    c = case("deform_conv2d")
    f = loss(c.jax_fn, cotangent(c.jax_fn(*c.args)))
    g = jax.grad(f, argnums=1)(*c.args)
    assert seen == [(False, True, False, False, False)]
    close(g, jax.grad(f, argnums=(0, 1, 2, 3, 4))(*c.args)[1])
    assert seen[-1] == (True, True, True, True, True)
    jax.grad(f, argnums=(2, 3))(*c.args)
    assert seen[-1] == (False, False, True, True, False)


def test_list_boxes_equal_the_k5_form_and_boxes_get_zero_cotangent(rng):
    x = rng.standard_normal((2, 3, 6, 7))
    k5 = _boxes(np.float64, 5, 2, 6, 7, 1.0)
    k5 = k5[np.argsort(k5[:, 0], kind="stable")]
    per_image = [k5[k5[:, 0] == i, 1:] for i in range(2)]
    expected = dj.roi_align(x, k5, 3, 1.0, 2)
    close(dj.roi_align(x, per_image, 3, 1.0, 2), expected)
    close(jax.jit(lambda x, b: dj.roi_align(x, b, 3, 1.0, 2))(x, per_image), expected)
    for f in (dj.roi_align, dj.roi_pool, dj.ps_roi_pool):
        g = jax.grad(lambda b, f=f: f(x, b, (1, 1)).sum())(jnp.asarray(k5))
        np.testing.assert_array_equal(np.asarray(g), np.zeros_like(k5))
    g = jax.grad(lambda b: dj.deform_roi_pool(x, b, None, 2, 1.0, 2).sum())(jnp.asarray(k5))
    np.testing.assert_array_equal(np.asarray(g), np.zeros_like(k5))


def test_deform_roi_pool_without_offset(rng):
    x = rng.standard_normal((2, 3, 6, 7))
    rois = _boxes(np.float64, 3, 2, 6, 7, 1.0)
    out = dj.deform_roi_pool(x, rois, None, (2, 3), 1.0, 2)
    close(out, ops.deform_roi_pool(x, rois, None, (2, 3), 1.0, 2).numpy())
    g = jax.grad(lambda x: dj.deform_roi_pool(x, rois, None, (2, 3), 1.0, 2).sum())(x)
    t = dn.tensor(x, requires_grad=True)
    ops.deform_roi_pool(t, rois, None, (2, 3), 1.0, 2).sum().backward()
    close(g, t.grad)


def test_the_function_is_built_once_per_configuration():
    """Repeated eager calls reuse one custom_vjp and one compiled callback."""
    c = case("bilinear_zero")
    c.jax_fn(*c.args)
    before = dj._function.cache_info()
    c.jax_fn(*c.args)
    after = dj._function.cache_info()
    assert after.hits == before.hits + 1 and after.misses == before.misses


def test_writeable_view_shares_the_buffer():
    x = jnp.arange(12.0).reshape(3, 4)
    view = np.asarray(x)
    alias = dj._writeable(x)
    assert not view.flags.writeable
    assert alias.flags.writeable and alias.flags.c_contiguous
    assert alias.ctypes.data == view.ctypes.data and alias.shape == (3, 4)
    np.testing.assert_array_equal(alias, view)


def test_deformnp_gets_the_callback_buffers_without_a_copy(monkeypatch):
    """The arrays deformnp receives are writeable and C-contiguous: it uses them in place."""
    seen = []
    forward = ops.grid_sample_forward

    def spy(input, grid, *args):
        seen.append(all(a.flags.writeable and a.flags.c_contiguous for a in (input, grid)))
        return forward(input, grid, *args)

    monkeypatch.setattr(ops, "grid_sample_forward", spy)
    c = case("grid_sample_border")
    c.jax_fn(*c.args)
    jax.jit(c.jax_fn)(*c.args)
    assert seen == [True, True]


def test_x64_disabled_computes_in_float32(rng):
    c = case("grid_sample_zeros")
    with jax.enable_x64(False):
        out = c.jax_fn(*c.args)  # float64 NumPy inputs become float32 JAX arrays
        assert out.dtype == jnp.float32
    close(out, c.jax_fn(*c.args), rtol=1e-5)


# ============================================================================ validation


def test_bad_shapes_raise_deformnp_messages(rng):
    c = case("deform_conv2d")
    x, off, w, b, m = c.args
    msg = "deform_conv2d: offset has 35 channels, expected 2*offset_groups*kh*kw"
    with pytest.raises(ValueError, match=msg.replace("*", r"\*")):
        dj.deform_conv2d(x, off[:, :35], w, b, mask=m)
    with pytest.raises(ValueError, match="offset has 35 channels"):  # at trace time
        jax.jit(lambda o: dj.deform_conv2d(x, o, w, b, mask=m))(off[:, :35])
    with pytest.raises(ValueError, match="grid_sample: grid must be .N, Hout, Wout, 2."):
        dj.grid_sample(x, np.zeros((2, 3, 4, 3)))
    with pytest.raises(ValueError, match="padding_mode must be 'zeros', 'border' or"):
        dj.grid_sample(x, np.zeros((2, 3, 4, 2)), "bilinear", "bilinear")
    with pytest.raises(ValueError, match="grid_sample: mode must be 'bilinear'"):
        dj.grid_sample(x, np.zeros((2, 3, 4, 2)), "nearest")
    with pytest.raises(ValueError, match="ms_deform_attn: level_start_index .0, 19. is "):
        d = case("ms_deform_attn")
        dj.ms_deform_attn(d.args[0], ((4, 5), (2, 3)), (0, 19), *d.args[1:])
    with pytest.raises(ValueError, match="ps_roi_pool: input has 3 channels, expected a mul"):
        dj.ps_roi_pool(np.zeros((1, 3, 4, 4)), np.zeros((1, 5)), 2)


def test_bad_dtypes_raise_deformnp_messages():
    x = np.zeros((1, 2, 4, 4))
    with pytest.raises(TypeError, match="grid_sample: inputs must share one float dtype"):
        dj.grid_sample(x, np.zeros((1, 2, 2, 2), np.float32))
    with pytest.raises(TypeError, match="roi_align: input must be float32 or float64, got int"):
        dj.roi_align(np.zeros((1, 2, 4, 4), np.int32), np.zeros((1, 5)), 2)
    with pytest.raises(TypeError, match="roi_align: inputs must share one float dtype"):
        dj.roi_align(x, np.zeros((1, 5), np.float32), 2)


def test_modulated_deform_conv2d_checks_groups_and_takes_no_mask():
    c = case("modulated_deform_conv2d")
    x, off, m, w, b = c.args
    msg = r"input has 4 channels, expected groups \* weight.shape\[1\] = 1 \* 2 = 2"
    with pytest.raises(ValueError, match=msg):
        dj.modulated_deform_conv2d(x, off, m, w, b, 1, 1, 1, 1, 2)
    msg = r"offset has 36 channels, expected 2\*deform_groups\*kh\*kw = 18 .deform_groups = 1."
    with pytest.raises(ValueError, match=msg):
        dj.modulated_deform_conv2d(x, off, m, w, b, 1, 1, 1, 2, 1)
    v1 = dj.modulated_deform_conv2d(x, off, None, w, b, 1, 1, 1, 2, 2)
    close(v1, ops.deform_conv2d(x, off, w, b, 1, 1, 1).numpy())


def test_box_values_are_checked_eagerly_and_in_the_callback_under_jit():
    x = np.zeros((2, 3, 5, 5))
    boxes = np.array([[2.0, 0, 0, 3, 3]])
    msg = r"roi_align: boxes\[0, 0\] = 2.0 is not a batch index of input"
    with pytest.raises(ValueError, match=msg):
        dj.roi_align(x, boxes, 2)
    with pytest.raises(jax.errors.JaxRuntimeError, match=msg):
        jax.jit(lambda b: dj.roi_align(x, b, 2))(boxes).block_until_ready()


def test_static_arguments_must_not_be_traced():
    c = case("roi_align")
    boxes = _boxes(np.float64, 4, 2, 6, 7, 0.5)
    with pytest.raises(TypeError, match="roi_align: spatial_scale must be static"):
        jax.jit(lambda x, s: dj.roi_align(x, boxes, 2, s))(c.args[0], 0.5)
    shapes = np.array([[4, 5], [2, 3]])
    d = case("ms_deform_attn")
    with pytest.raises(TypeError, match="ms_deform_attn: spatial_shapes must be static"):
        jax.jit(lambda s: dj.ms_deform_attn(d.args[0], s, (0, 20), *d.args[1:]))(shapes)
    # a concrete array is fine, and so is a static argument marked static under jit
    close(dj.ms_deform_attn(d.args[0], shapes, np.array([0, 20]), *d.args[1:]),
          d.jax_fn(*d.args))  # fmt: skip
    f = jax.jit(dj.roi_align, static_argnums=(2, 3, 4, 5))
    close(f(c.args[0], boxes, (2, 3), 0.5, 2, True), c.jax_fn(*c.args))


def test_import_deformnp_does_not_import_jax():
    code = (
        "import sys, deformnp, deformnp.ops\n"
        "assert 'jax' not in sys.modules, 'import deformnp imported jax'\n"
        "import deformnp.jax\n"
        "assert 'jax' in sys.modules\n"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=120)
