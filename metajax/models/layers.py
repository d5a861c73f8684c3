"""Functional convolution and batch-norm layers with backend-tuned implementations.

The meta-learning backbones (:mod:`metajax.models.conv4`) run their convolutions
through :func:`conv2d`, which has two implementations that compute the same
function:

``"lax"``
    ``lax.conv_general_dilated``. The right choice on GPU/TPU (cuDNN / the TPU
    convolution emitter). On CPU it is slow for meta-learning: under ``vmap``
    every task has its own adapted weights, which XLA lowers to a grouped
    convolution, and XLA:CPU's grouped convolutions and convolution gradients
    run far below the matmul peak.

``"patches"``
    im2col written as ``kh * kw`` strided slices of the padded input that are
    concatenated on the channel axis, followed by one matmul with the
    ``(kh*kw*C_in, C_out)`` weight matrix. Everything is a slice, a concatenate,
    a pad or a ``dot_general``, so the first- and second-order derivatives are
    again slices, pads and matmuls, which XLA:CPU fuses and runs on its GEMM
    kernels. Under ``vmap`` with per-task weights the matmul becomes one batched
    matmul (one GEMM per task); with shared weights JAX folds the task axis into
    the rows and it becomes a single large GEMM.

``"fused"``
    ``"patches"`` for :func:`conv2d`; for the conv -> batch norm -> ReLU block
    (:func:`conv_bn_relu`) one ``jax.custom_vjp`` with a hand-written backward
    pass (closed-form batch-norm backward, sub-pixel input gradient and col2im for
    3x3 stride-2 convolutions), itself differentiable for second-order MAML. Its
    im2col and col2im run as C++ custom calls (:mod:`metajax.models.native_patches`)
    where a C++ compiler is available, else as XLA slices. Blocks with few patch
    features (the single-channel first layer: 9 per pixel against 64 filters) take the
    batch statistics from the patches' small covariance matrix and fold batch norm into
    the kernel, so their wide output is written once (``_gram_fwd``; (a) +8%, (d) +9%).

``"auto"`` (the default) picks ``"fused"`` on CPU and ``"lax"`` elsewhere
(:func:`resolve_conv_impl`). The choice is proven by ``benchmarks/conv_paths.py``;
results agree to float32 rounding whichever is chosen (``tests/test_conv4.py``).

:func:`batch_norm` is training-mode batch normalisation written with mean/variance
ops: it always normalises with the statistics of the batch it is given (the MAML
convention; there are no running statistics), so it is a pure function of its
inputs and parameters and is differentiable to any order.

Example:
  >>> import jax, jax.numpy as jnp
  >>> x = jnp.ones((2, 28, 28, 1)); w = jnp.ones((3, 3, 1, 8))
  >>> conv2d(x, w, stride=2, padding=1, impl="patches").shape
  (2, 14, 14, 8)
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.typing import DTypeLike

from metajax.core.remat import REMAT_SAVE_NAME
from metajax.models import native_patches

CONV_IMPLS = ("lax", "patches", "fused", "auto")
# Trace-time switches of the fused path, kept so benchmarks/conv_paths.py can re-measure the
# alternatives: "phase_dx" (sub-pixel input gradient for 3x3/2 convs, else dz @ W^T + col2im;
# "auto": only without the native kernels, whose one-pass col2im makes dz @ W^T faster)
# and "materialize" (an optimization barrier on each block's output, so XLA writes the
# activation once instead of re-fusing batch norm + ReLU into every im2col slice).
# "phase_col2im": the transpose of im2col (what second-order MAML differentiates the fused
# backward into) as four sub-pixel phases for 3x3/2 convs instead of nine full-size pads.
# "native_patches": im2col and col2im as the C++ custom calls of native_patches.py where
# they build (CPU, float32/64); else XLA slices.
# "gram_bn": blocks with few patch features (kh*kw*C_in at most a quarter of C_out, the
# single-channel first layer) take the batch statistics from the patches' K x K covariance
# and fold batch norm into the kernel (_gram_fwd), so the wide conv output is never
# normalised, reduced or stored on its own.
# "native_weight_grad": the kernel gradient im2col(x)^T dz as native_patches.conv_weight_grad
# (patch rows built in cache, no patch matrix; XLA:CPU's transposed-left GEMM is its slowest)
# where the native kernels run and the input has at least WEIGHT_GRAD_MIN_CHANNELS channels.
# "native_conv_vjp": under the same conditions the forward product P W and the input gradient
# col2im(dz W^T) are native_patches.conv / conv_input_grad, whose kernel cotangents (what
# second-order MAML takes of them) are conv_weight_grad too instead of XLA's autodiff GEMMs.
# On: interleaved A/B on a 2-core Zen 3 (a) 0.99-1.01x, (c) 1.05x, (d) 1.02-1.07x; on a
# 2-core Zen 1 no difference beyond the host's noise ((a) 0.96-1.04x, (c) 0.92x,
# (d) 0.94-1.01x); the same XLA temp memory, see README.
FUSED_OPTIONS = {"phase_dx": "auto", "materialize": False, "phase_col2im": True,
                 "native_patches": True, "gram_bn": True, "native_weight_grad": True,
                 "native_conv_vjp": True}
# Below this many input channels a patch row is many short copies and XLA's product is faster.
WEIGHT_GRAD_MIN_CHANNELS = 8


def resolve_conv_impl(impl: str = "auto", backend: Optional[str] = None) -> str:
    """The concrete convolution implementation for ``impl`` on ``backend``.

    ``"auto"`` gives ``"fused"`` on CPU and ``"lax"`` on GPU/TPU (or other accelerators).
    ``backend`` defaults to ``jax.default_backend()``.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}.")
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    return "fused" if backend == "cpu" else "lax"


def _out_size(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


def extract_patches(x: jax.Array, kh: int, kw: int, stride: int = 1, padding: int = 0) -> jax.Array:
    """im2col: ``(N, H, W, C) -> (N, Ho, Wo, kh*kw*C)``, features ordered ``(dy, dx, c)``.

    The ordering matches a ``(kh, kw, C, O)`` (HWIO) kernel reshaped to ``(kh*kw*C, O)``.
    Built from ``kh*kw`` strided slices of the zero-padded input and one concatenate.
    """
    n, h, w, c = x.shape
    ho, wo = _out_size(h, kh, stride, padding), _out_size(w, kw, stride, padding)
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    cols = []
    for dy in range(kh):
        for dx in range(kw):
            cols.append(lax.slice(
                x, (0, dy, dx, 0),
                (n, dy + stride * (ho - 1) + 1, dx + stride * (wo - 1) + 1, c),
                (1, stride, stride, 1)))
    return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


# ``x @ w`` over the last axis of ``x`` as one 2-D GEMM over the flattened rows. Written on
# 4-D arrays, the matmuls whose transposes contract the rows (the kernel gradients, and their
# second-order counterparts) let XLA's layout assignment copy whole activations into another
# row order; flat rows leave it nothing to reorder (config (a) +9%, (d) +8-12% against the
# 4-D einsums, benchmarks/maml_step.py interleaved). Shared with the native conv family.
_matmul_rows = native_patches.rows_matmul


def conv2d(x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array] = None, *,
           stride: int = 1, padding: int = 0, impl: str = "auto") -> jax.Array:
    """2-D convolution (cross-correlation, as in PyTorch/Flax) of NHWC ``x`` with an HWIO kernel.

    Args:
      x: ``(N, H, W, C_in)`` inputs.
      kernel: ``(kh, kw, C_in, C_out)`` weights.
      bias: optional ``(C_out,)`` bias.
      stride: the same stride on both spatial axes.
      padding: symmetric zero padding on both spatial axes.
      impl: ``"lax"``, ``"patches"``, ``"fused"`` (here the same as ``"patches"``) or
        ``"auto"`` (see the module docstring).

    Returns:
      ``(N, Ho, Wo, C_out)`` with ``Ho = (H + 2*padding - kh) // stride + 1``.
    """
    impl = resolve_conv_impl(impl)
    kh, kw, cin, cout = kernel.shape
    if x.shape[-1] != cin:
        raise ValueError(f"conv2d: input has {x.shape[-1]} channels but the kernel expects {cin}.")
    if impl == "lax":
        y = lax.conv_general_dilated(
            x, kernel, window_strides=(stride, stride),
            padding=((padding, padding), (padding, padding)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    else:
        patches = extract_patches(x, kh, kw, stride, padding)
        y = _matmul_rows(patches, kernel.reshape(kh * kw * cin, cout))
    if bias is not None:
        y = y + bias
    return y


def batch_norm(x: jax.Array, scale: Optional[jax.Array] = None, bias: Optional[jax.Array] = None,
               *, eps: float = 1e-5, axes=(0, 1, 2)) -> jax.Array:
    """Training-mode batch norm: normalise with the batch's own mean and (biased) variance.

    ``y = (x - mean) / sqrt(var + eps) * scale + bias`` with the statistics taken over
    ``axes`` (all but the channel axis for NHWC). Same math as PyTorch's
    ``F.batch_norm(training=True)``; no running statistics are kept or used.
    """
    mean = jnp.mean(x, axis=axes, keepdims=True)
    centered = x - mean
    var = jnp.mean(jnp.square(centered), axis=axes, keepdims=True)
    y = centered * lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y


def max_pool2d(x: jax.Array, window: int = 2, stride: Optional[int] = None) -> jax.Array:
    """Max pooling over NHWC spatial axes (floor mode, no padding, like PyTorch's default)."""
    stride = stride or window
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1),
                             (1, stride, stride, 1), "VALID")


def _pixel_shuffle(phases: jax.Array, h: int, w: int) -> jax.Array:
    """``(N, Ho, Wo, 2, 2, C)`` sub-pixel phases ``[a, b]`` -> pixel ``(2i + a, 2j + b)``, cropped to ``h x w``."""
    n, ho, wo, _, _, c = phases.shape
    return jnp.transpose(phases, (0, 1, 3, 2, 4, 5)).reshape(n, 2 * ho, 2 * wo, c)[:, :h, :w]


def _col2im_3x3_stride2(dpatches: jax.Array, x_shape) -> jax.Array:
    """The transpose of ``extract_patches(x, 3, 3, stride=2, padding=1)``, by sub-pixel phase.

    Input pixel ``(2m + a, 2l + b)`` is read by the taps ``dy = 1`` (row phase ``a = 0``) or
    ``dy in {0, 2}`` (``a = 1``) of the patches at rows ``m + 1`` and ``m``, likewise for
    columns. So each of the four phases is a sum of one, two or four (shifted) tap blocks of
    the patch cotangent at output resolution, and the pixel shuffle interleaves them: one
    read of the patch cotangent and one write of the result, where the autodiff transpose
    builds nine zero-padded full-size arrays and adds them up.
    """
    n, h, w, c = x_shape
    ho, wo = dpatches.shape[1], dpatches.shape[2]
    tap = lambda dy, dx: dpatches[..., (3 * dy + dx) * c:(3 * dy + dx + 1) * c]
    up = lambda a: jnp.pad(a[:, 1:], ((0, 0), (0, 1), (0, 0), (0, 0)))     # row m <- m + 1
    left = lambda a: jnp.pad(a[:, :, 1:], ((0, 0), (0, 0), (0, 1), (0, 0)))  # column l <- l + 1
    phases = jnp.stack([
        tap(1, 1),
        tap(1, 2) + left(tap(1, 0)),
        tap(2, 1) + up(tap(0, 1)),
        tap(2, 2) + left(tap(2, 0)) + up(tap(0, 2)) + up(left(tap(0, 0))),
    ], axis=3).reshape(n, ho, wo, 2, 2, c)
    return _pixel_shuffle(phases, h, w)


@jax.custom_vjp
def _patches_3x3_stride2(x):
    """``extract_patches(x, 3, 3, stride=2, padding=1)`` whose transpose is the sub-pixel col2im."""
    return extract_patches(x, 3, 3, 2, 1)


_patches_3x3_stride2.defvjp(lambda x: (extract_patches(x, 3, 3, 2, 1), x.shape),
                            lambda x_shape, dpatches: (_col2im_3x3_stride2(dpatches, x_shape),))


def native_kernels_active(dtype: DTypeLike = jnp.float32) -> bool:
    """Whether the fused block runs its im2col, col2im and kernel gradients as the native
    custom calls of :mod:`metajax.models.native_patches` for arrays of ``dtype`` (CPU
    backend, float32/64, ``FUSED_OPTIONS["native_patches"]`` on and the library built)."""
    return bool(FUSED_OPTIONS["native_patches"] and jnp.dtype(dtype) in native_patches.DTYPES
                and jax.default_backend() == "cpu" and native_patches.available())


def _native_patches_on(x) -> bool:
    return native_kernels_active(x.dtype)


def _fused_patches(x, kh, kw, stride, padding):
    """im2col for the fused block: the native kernel where available; else XLA slices, and
    3x3/2/pad-1 patches get the sub-pixel transpose."""
    if _native_patches_on(x):
        return native_patches.im2col(x, kh, kw, stride, padding)
    if (kh, kw, stride, padding) == (3, 3, 2, 1) and FUSED_OPTIONS["phase_col2im"]:
        return _patches_3x3_stride2(x)
    return extract_patches(x, kh, kw, stride, padding)


def _native_kernel_grads_on(option: str, x, in_channels: int) -> bool:
    """Whether the ``option`` of FUSED_OPTIONS sends a kernel gradient of a convolution with
    ``in_channels`` input channels through ``native_patches.conv_weight_grad`` (``x``: an
    array of the computation, for its dtype)."""
    return (FUSED_OPTIONS[option] and _native_patches_on(x)
            and in_channels >= WEIGHT_GRAD_MIN_CHANNELS)


def _patch_matmul(x, kernel, stride, padding):
    kh, kw, cin, cout = kernel.shape
    if _native_kernel_grads_on("native_conv_vjp", x, cin):
        # Named so remat="dots" keeps it as it keeps the plain product (a custom call
        # output is not a dot to the policy).
        return checkpoint_name(native_patches.conv(x, kernel, stride, padding), REMAT_SAVE_NAME)
    patches = _fused_patches(x, kh, kw, stride, padding)
    return _matmul_rows(patches, kernel.reshape(kh * kw * cin, cout))


def _conv_input_grad(dz, kernel, x_shape, stride, padding):
    """Cotangent of the conv input (the transposed convolution of ``dz`` with ``kernel``).

    With the native kernels it is ``dz @ W^T`` and the one-pass native col2im. Without them,
    3x3 stride-2 pad-1 convolutions (the Omniglot Conv4) use the sub-pixel decomposition:
    each of the four (row, column) parity phases of the input gradient is a sum over at most
    four shifted copies of ``dz``, so the whole gradient is one matmul of ``[dz, dz>>col,
    dz>>row, dz>>both]`` (``4*C_out`` features) with a ``(4*C_out, 4*C_in)`` block matrix of
    kernel taps, followed by a pixel shuffle. That avoids XLA's slow scatter-add of the
    im2col transpose, at the price of 16/9 of the matmul FLOPs (7 of the 16 blocks are zero),
    which is why the native col2im path is faster (``conv_paths.py``: (a) +9%, (d) +12%).
    Other shapes use ``dz @ W^T`` and the transpose of im2col.
    """
    kh, kw, cin, cout = kernel.shape
    n, h, w, _ = x_shape
    if _native_kernel_grads_on("native_conv_vjp", dz, cin):
        dx = native_patches.conv_input_grad(dz, kernel, x_shape[1:], stride, padding)
        return checkpoint_name(dx, REMAT_SAVE_NAME)
    phase_dx = FUSED_OPTIONS["phase_dx"]
    if phase_dx == "auto":
        phase_dx = not _native_patches_on(dz)
    if (kh, kw, stride, padding) == (3, 3, 2, 1) and phase_dx:
        ho, wo = dz.shape[1], dz.shape[2]
        dzp = jnp.pad(dz, ((0, 0), (0, 1), (0, 1), (0, 0)))
        shifted = jnp.concatenate(
            [dzp[:, :ho, :wo], dzp[:, :ho, 1:], dzp[:, 1:, :wo], dzp[:, 1:, 1:]], axis=-1)
        kt = jnp.swapaxes(kernel, 2, 3)  # (3, 3, C_out, C_in)
        zero = jnp.zeros_like(kt[0, 0])
        # rows: dz[p,q], dz[p,q+1], dz[p+1,q], dz[p+1,q+1]; cols: phases (0,0),(0,1),(1,0),(1,1)
        blocks = [[kt[1, 1], kt[1, 2], kt[2, 1], kt[2, 2]],
                  [zero, kt[1, 0], zero, kt[2, 0]],
                  [zero, zero, kt[0, 1], kt[0, 2]],
                  [zero, zero, zero, kt[0, 0]]]
        wmat = jnp.concatenate([jnp.concatenate(row, axis=1) for row in blocks], axis=0)
        phases = _matmul_rows(shifted, wmat).reshape(n, ho, wo, 2, 2, cin)
        return _pixel_shuffle(phases, h, w)
    # dz @ W^T as a transposed-right-operand product: remat="dots" recomputes it rather than
    # storing the kh*kw times larger patch cotangent, and keeps the named col2im result.
    dpatches = native_patches.rows_matmul_t(dz, kernel.reshape(kh * kw * cin, cout))
    if _native_patches_on(dpatches):
        dx = native_patches.col2im(dpatches, x_shape[1:], kh, kw, stride, padding)
    else:
        _, vjp = jax.vjp(lambda x: extract_patches(x, kh, kw, stride, padding),
                         jnp.zeros(x_shape, dz.dtype))
        dx = vjp(dpatches)[0]
    return checkpoint_name(dx, REMAT_SAVE_NAME)


def _conv_weight_grad(x, dz, kh, kw, stride, padding):
    """``im2col(x)^T dz`` as a ``(kh, kw, C_in, C_out)`` kernel gradient."""
    if _native_kernel_grads_on("native_weight_grad", x, x.shape[-1]):
        return native_patches.conv_weight_grad(x, dz, kh, kw, stride, padding)
    patches = _fused_patches(x, kh, kw, stride, padding)
    # One 2-D GEMM over the flattened rows (see _matmul_rows): contracting the 4-D (n, h, w)
    # axes let XLA copy the whole patch matrix into another row order, 6-15% of a (a) step.
    return lax.dot_general(patches.reshape(-1, patches.shape[-1]), dz.reshape(-1, dz.shape[-1]),
                           (((0,), (0,)), ((), ()))).reshape(kh, kw, x.shape[-1], dz.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _fused_conv_bn_relu(x, kernel, bias, scale, shift, stride, padding, eps, gram):
    return _fused_fwd(x, kernel, bias, scale, shift, stride, padding, eps, gram)[0]


def _gram_bn_on(kernel) -> bool:
    """Whether the block's batch statistics come from the patch covariance (``_gram_fwd``)."""
    kh, kw, cin, cout = kernel.shape
    return FUSED_OPTIONS["gram_bn"] and 4 * kh * kw * cin <= cout


def _fused_fwd(x, kernel, bias, scale, shift, stride, padding, eps, gram):
    form = _gram_fwd if gram else _direct_fwd
    return form(x, kernel, bias, scale, shift, stride, padding, eps)


def _fused_bwd(stride, padding, eps, gram, res, dy):
    return (_gram_bwd if gram else _direct_bwd)(stride, padding, eps, res, dy)


def _gram_fwd(x, kernel, bias, scale, shift, stride, padding, eps):
    """The block through the ``K x K`` covariance of the patches (``K = kh*kw*C_in``).

    With patches ``P`` (rows ``N``), mean ``mu`` and covariance ``S = (P - mu)^T (P - mu) / N``,
    the conv output ``z = P W`` has batch mean ``mu W`` and variance ``diag(W^T S W)``, so
    ``relu(bn(z))`` is ``relu(P (W a) + shift - (mu W) a)`` with ``a = scale / std``: one GEMM
    with a folded kernel and one element-wise pass, where the direct form centres,
    normalises, reduces twice and keeps the normalised output for the backward pass. Costs
    ``N K^2`` multiply-adds for ``S``, which is why it is only used for small ``K``.
    """
    kh, kw, cin, cout = kernel.shape
    patches = _fused_patches(x, kh, kw, stride, padding)
    rows = patches.reshape(-1, patches.shape[-1])
    w2d = kernel.reshape(-1, cout)
    mu = jnp.mean(rows, axis=0)
    centered = rows - mu
    cov = lax.dot_general(centered, centered, (((0,), (0,)), ((), ()))) / rows.shape[0]
    var = jnp.maximum(jnp.sum(w2d * (cov @ w2d), axis=0), 0.0)
    rstd = lax.rsqrt(var + eps)
    gain = scale * rstd
    y = jnp.maximum(_matmul_rows(patches, w2d * gain) + (shift - (mu @ w2d) * gain), 0.0)
    if FUSED_OPTIONS["materialize"]:
        y = lax.optimization_barrier(y)
    return y, (x, kernel, bias, scale, rstd, mu, cov, y)


def _gram_bwd(stride, padding, eps, res, dy):
    """Backward of :func:`_gram_fwd` from ``G = P^T relu'(.) dy`` (a ``K x C_out`` product).

    With ``dr`` the ReLU-masked cotangent and ``Gc = G - mu (sum dr)^T = (P - mu)^T dr``:
    ``dscale = rstd * colsum(W * Gc)`` and ``dW = a * (Gc - S W * rstd * dscale)``, the
    closed forms of the direct backward with ``P^T zhat = N S W rstd``. The input gradient
    needs the normalised output and is only computed where it is used (XLA drops it for
    the first layer, whose input is data).
    """
    x, kernel, bias, scale, rstd, mu, cov, y = res
    kh, kw, cin, cout = kernel.shape
    w2d = kernel.reshape(-1, cout)
    dr = jnp.where(y > 0, dy, 0.0)
    dr2d = dr.reshape(-1, cout)
    count = dr2d.shape[0]
    dshift = jnp.sum(dr2d, axis=0)
    patches = _fused_patches(x, kh, kw, stride, padding)
    rows = patches.reshape(-1, patches.shape[-1])
    g_centered = lax.dot_general(rows, dr2d, (((0,), (0,)), ((), ()))) - mu[:, None] * dshift
    dscale = rstd * jnp.sum(w2d * g_centered, axis=0)
    gain = scale * rstd
    dkernel = (gain * (g_centered - (cov @ w2d) * (rstd * dscale))).reshape(kernel.shape)
    zhat = (_matmul_rows(patches, w2d) - mu @ w2d) * rstd
    dz = gain * (dr - (dshift + zhat * dscale) / count)
    dx = _conv_input_grad(dz, kernel, x.shape, stride, padding)
    return dx, dkernel, jnp.zeros_like(bias), dscale, dshift


def _direct_fwd(x, kernel, bias, scale, shift, stride, padding, eps):
    # The conv bias is added before batch norm, which subtracts the batch mean again:
    # BN(z + b) == BN(z) exactly, and dL/db == 0. It is therefore left out of the arithmetic.
    z = _patch_matmul(x, kernel, stride, padding)
    axes = tuple(range(z.ndim - 1))
    mean = jnp.mean(z, axis=axes)
    zc = z - mean
    rstd = lax.rsqrt(jnp.mean(jnp.square(zc), axis=axes) + eps)
    zhat = zc * rstd
    y = jnp.maximum(zhat * scale + shift, 0.0)
    if FUSED_OPTIONS["materialize"]:
        y = lax.optimization_barrier(y)
    return y, (x, kernel, bias, scale, zhat, rstd, y)


def _direct_bwd(stride, padding, eps, res, dy):
    x, kernel, bias, scale, zhat, rstd, y = res
    axes = tuple(range(dy.ndim - 1))
    count = 1
    for a in axes:
        count *= dy.shape[a]
    dr = jnp.where(y > 0, dy, 0.0)
    dshift = jnp.sum(dr, axis=axes)
    dscale = jnp.sum(dr * zhat, axis=axes)
    dz = (scale * rstd) * (dr - (dshift + zhat * dscale) / count)
    kh, kw, cin, cout = kernel.shape
    dkernel = _conv_weight_grad(x, dz, kh, kw, stride, padding)
    dx = _conv_input_grad(dz, kernel, x.shape, stride, padding)
    return dx, dkernel, jnp.zeros_like(bias), dscale, dshift


_fused_conv_bn_relu.defvjp(
    lambda x, k, b, s, t, stride, padding, eps, gram: _fused_fwd(x, k, b, s, t, stride, padding,
                                                                 eps, gram),
    _fused_bwd)


def conv_bn_relu(x: jax.Array, kernel: jax.Array, bias: jax.Array, scale: jax.Array,
                 shift: jax.Array, *, stride: int = 1, padding: int = 0, eps: float = 1e-5,
                 impl: str = "auto",
                 stats: Optional[tuple[jax.Array, jax.Array]] = None) -> jax.Array:
    """``relu(batch_norm(conv2d(x, kernel) + bias) * scale + shift)`` (NHWC, HWIO kernel).

    With ``impl="fused"`` (the CPU default) the block is one ``jax.custom_vjp`` whose backward
    pass is written by hand: the closed-form batch-norm backward, the kernel gradient as one
    patches-transposed matmul, and the input gradient as ``dz @ W^T`` plus the transpose of
    im2col. The backward is itself plain differentiable JAX, so reverse-over-reverse (the
    second-order MAML meta-gradient) differentiates through it. Forward-mode (``jax.jvp``)
    is not available for the fused block; use ``impl="patches"`` for that.

    ``stats=(mean, var)`` normalises with those fixed statistics instead of the batch's
    (evaluation with running averages, e.g. MAML++'s per-step running statistics).
    """
    impl = resolve_conv_impl(impl)
    if stats is not None:
        # Fixed statistics (running averages): an affine map of the conv output, so the conv
        # bias matters here; the fused block's batch-statistics backward does not apply.
        mean, var = stats
        y = conv2d(x, kernel, bias, stride=stride, padding=padding,
                   impl="patches" if impl == "fused" else impl)
        return jax.nn.relu((y - mean) * lax.rsqrt(var + eps) * scale + shift)
    if impl == "fused":
        return _fused_conv_bn_relu(x, kernel, bias, scale, shift, stride, padding, eps,
                                   _gram_bn_on(kernel))
    y = conv2d(x, kernel, bias, stride=stride, padding=padding, impl=impl)
    return jax.nn.relu(batch_norm(y, scale, shift, eps=eps))


def conv_bn_statistics(x: jax.Array, kernel: jax.Array, bias: jax.Array, *, stride: int = 1,
                       padding: int = 0, impl: str = "auto") -> tuple[jax.Array, jax.Array]:
    """Per-channel batch mean and unbiased variance of ``conv2d(x, kernel) + bias``.

    What a batch-norm layer after this convolution would record as running statistics
    (PyTorch's convention: the unbiased variance is the one that is averaged).
    """
    impl = resolve_conv_impl(impl)
    y = conv2d(x, kernel, bias, stride=stride, padding=padding,
               impl="patches" if impl == "fused" else impl)
    count = y.size // y.shape[-1]
    mean = jnp.mean(y, axis=(0, 1, 2))
    var = jnp.sum(jnp.square(y - mean), axis=(0, 1, 2)) / max(count - 1, 1)
    return mean, var
