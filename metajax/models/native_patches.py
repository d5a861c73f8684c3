"""Native im2col / col2im kernels for the fused CPU convolution (XLA FFI custom calls).

Why: XLA:CPU builds an im2col (``kh * kw`` strided slices and a concatenate) as one buffer
per slice plus a copy into the concatenated result, and runs several thousand such small
ops per MAML meta-step. ``native_patches.cc`` writes the whole patch matrix in one pass
(and its transpose, col2im, in one pass), split over XLA's intra-op thread pool. On the
Omniglot Conv4 (``benchmarks/conv_paths.py``, interleaved) this made the second-order
meta-step 7.5-8% faster, its compile about 35% shorter and the compiling process's peak RSS
150-190 MiB smaller (the step's HLO shrinks by a quarter); the one-pass col2im then also
made ``dz @ W^T`` + col2im the fastest input gradient (another 9-12%, see
``layers._conv_input_grad``).

The C++ source ships with the package and is compiled on first use with the system C++
compiler (``$CXX``, else ``c++``/``g++``/``clang++``) against the XLA FFI headers of the
installed jaxlib, into ``$METAJAX_NATIVE_CACHE`` (default ``~/.cache/metajax/native``),
keyed by a hash of the source, the jax/jaxlib versions and the compiler, and written atomically
(concurrent processes are safe). Nothing is downloaded. Without a compiler, or with
``METAJAX_NATIVE_PATCHES=0``, :func:`status` says why and the fused convolution keeps its
pure-XLA im2col (same results: im2col is an exact copy, col2im differs only in summation
order). The kernels take float32 and float64.

Both functions are linear and each is the other's transpose, so they are differentiable to
any order (second-order MAML differentiates the fused block's backward pass, which holds
both). ``vmap`` folds the mapped axis into the image axis.

:func:`conv_weight_grad` is the kernel gradient ``im2col(x)^T dz`` of a convolution without
the patch matrix: patch rows are built a few dozen pixels at a time in a buffer that stays in
cache and multiplied into the result with a register-tiled AVX2/FMA kernel (plain loops on
other CPUs and for float64). XLA:CPU runs that transposed-left product at about two thirds of
its plain-GEMM speed (``benchmarks/gemm_floor.py``: 107 GFLOP/s against 165 on the Conv4's
3675 x 576 x 64 query product); the kernel runs it at about 170, patch rows included. It is
bilinear, and its derivatives are a convolution and a transposed convolution (im2col/col2im
and plain products), so it too is differentiable to any order; under ``vmap`` each mapped
element gets its own kernel gradient.

:func:`conv` (``im2col(x) @ W``) and :func:`conv_input_grad` (``col2im(dz @ W^T)``) close
the family: the derivatives of each of the three are the other two, so a kernel cotangent
taken at any order of differentiation is :func:`conv_weight_grad`, never XLA's transposed-left
GEMM over a patch matrix (``layers.FUSED_OPTIONS["native_conv_vjp"]`` routes the fused block
through them; on by default since it measured 2-7% faster on (c) and (d) on a 2-core Zen 3).

Example:
  >>> import jax.numpy as jnp
  >>> from metajax.models import native_patches
  >>> x = jnp.arange(2 * 5 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 5, 3)
  >>> if native_patches.available():  # a C++ compiler was found
  ...     p = native_patches.im2col(x, 3, 3, stride=2, padding=1)
  ...     assert p.shape == (2, 3, 3, 27)
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).with_name("native_patches.cc")
_FLAGS = ("-O3", "-shared", "-fPIC", "-std=c++17", "-w")
_KERNELS = {("im2col", "float32"): "MetajaxIm2colF32", ("im2col", "float64"): "MetajaxIm2colF64",
            ("col2im", "float32"): "MetajaxCol2imF32", ("col2im", "float64"): "MetajaxCol2imF64",
            ("conv_weight_grad", "float32"): "MetajaxConvWeightGradF32",
            ("conv_weight_grad", "float64"): "MetajaxConvWeightGradF64"}
DTYPES = (jnp.float32, jnp.float64)


class NativePatchesWarning(UserWarning):
    """The native kernels could not be built; the XLA fallback is used (the message says why)."""


class NativeBuildError(RuntimeError):
    """The native kernels could not be compiled or loaded (the message says why and the fix)."""


def find_compiler() -> Optional[str]:
    """``$CXX`` if set, else the first of ``c++``, ``g++``, ``clang++`` on ``PATH``."""
    if os.environ.get("CXX"):
        return os.environ["CXX"]
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def cache_dir() -> Path:
    """Where built libraries go: ``$METAJAX_NATIVE_CACHE`` or ``~/.cache/metajax/native``."""
    root = os.environ.get("METAJAX_NATIVE_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "metajax" / "native"


def build_library(compiler: Optional[str] = None, directory: Optional[Path] = None) -> Path:
    """Compiles ``native_patches.cc`` (if not already built) and returns the library path.

    Raises:
      NativeBuildError: no compiler, a failed compile (with the compiler's message), or an
        unwritable cache directory.
    """
    compiler = compiler or find_compiler()
    if not compiler:
        raise NativeBuildError("no C++ compiler found: set CXX to a C++17 compiler (or install "
                               "g++ / clang++), or METAJAX_NATIVE_PATCHES=0 to skip the native "
                               "kernels")
    include = jax.ffi.include_dir()
    source = SOURCE.read_bytes()
    versions = f"jax {jax.__version__} jaxlib {importlib.metadata.version('jaxlib')}"
    key = hashlib.sha256(b"\0".join([source, versions.encode(), compiler.encode(),
                                     " ".join(_FLAGS).encode()])).hexdigest()[:16]
    directory = Path(directory) if directory else cache_dir()
    target = directory / f"native_patches-{key}.so"
    if target.exists():
        return target
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".native_patches-", suffix=".so", dir=directory)
        os.close(fd)
    except OSError as err:
        raise NativeBuildError(f"cannot write the native-kernel cache {directory} ({err}): set "
                               f"METAJAX_NATIVE_CACHE to a writable folder") from err
    try:
        cmd = [compiler, *_FLAGS, f"-I{include}", str(SOURCE), "-o", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise NativeBuildError(f"running the C++ compiler {compiler!r} failed ({err}): set CXX "
                                   f"to a working C++17 compiler") from err
        if proc.returncode != 0:
            raise NativeBuildError(f"compiling {SOURCE.name} with {compiler!r} failed (exit "
                                   f"{proc.returncode}):\n{proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: a concurrent build of the same key is harmless
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def status() -> tuple[bool, str]:
    """``(available, reason)``: builds, loads and registers the kernels once per process."""
    if os.environ.get("METAJAX_NATIVE_PATCHES", "1").lower() in ("0", "false", "no", "off"):
        return False, "disabled by METAJAX_NATIVE_PATCHES"
    try:
        library = ctypes.cdll.LoadLibrary(str(build_library()))
        for (_, dtype), symbol in _KERNELS.items():
            jax.ffi.register_ffi_target(_target(symbol), jax.ffi.pycapsule(getattr(library, symbol)),
                                        platform="cpu")
    except (NativeBuildError, OSError, AttributeError) as err:
        warnings.warn(f"metajax: the native im2col kernels are unavailable, so the fused CPU "
                      f"convolution uses XLA slices (slower, same results): {err}",
                      NativePatchesWarning, stacklevel=2)
        return False, str(err)
    return True, "built and registered"


def available() -> bool:
    """Whether the native kernels are usable in this process (see :func:`status`)."""
    return status()[0]


def _target(symbol: str) -> str:
    return f"metajax_{symbol}"


def _check(x: jax.Array, what: str) -> None:
    if x.ndim < 3:
        raise ValueError(f"{what}: expected (..., H, W, C) arrays, got shape {x.shape}.")
    if x.dtype not in DTYPES:
        raise ValueError(f"{what}: the native kernels take float32 or float64, got {x.dtype}; "
                         f"cast first or use layers.extract_patches.")
    if not available():
        raise NativeBuildError(f"{what}: the native kernels are not available: {status()[1]}")


# spec = (kh, kw, stride, padding, (H, W, C), (Ho, Wo)): everything static about one im2col.
def _ffi(kind: str, operand, spec):
    """The raw custom call: ``kind="im2col"`` (image -> patches) or ``"col2im"`` (back)."""
    kh, kw, stride, padding, image_hwc, out_hw = spec
    trailing = tuple(out_hw) + (kh * kw * image_hwc[-1],) if kind == "im2col" else image_hwc
    out = jax.ShapeDtypeStruct(operand.shape[:-3] + tuple(trailing), operand.dtype)
    symbol = _KERNELS[(kind, jnp.dtype(operand.dtype).name)]
    return jax.ffi.ffi_call(_target(symbol), out, vmap_method="broadcast_all")(
        operand, kh=np.int64(kh), kw=np.int64(kw), stride=np.int64(stride), pad=np.int64(padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _im2col(x, spec):
    return _ffi("im2col", x, spec)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _col2im(patches, spec):
    return _ffi("col2im", patches, spec)


# Each is the other's transpose (both linear), so any order of derivative is again one of them.
# The forward rules call the custom_vjp functions themselves, not the raw FFI call: an outer
# derivative (second-order MAML) then differentiates them through these rules again.
_im2col.defvjp(lambda x, spec: (_im2col(x, spec), None),
               lambda spec, _, dpatches: (_col2im(dpatches, spec),))
_col2im.defvjp(lambda p, spec: (_col2im(p, spec), None),
               lambda spec, _, dimage: (_im2col(dimage, spec),))


def _weight_grad_ffi(x, dz, spec):
    kh, kw, _, _, image_hwc, _ = spec
    out = jax.ShapeDtypeStruct((kh, kw, image_hwc[-1], dz.shape[-1]), x.dtype)
    symbol = _KERNELS[("conv_weight_grad", jnp.dtype(x.dtype).name)]
    # broadcast_all puts a vmapped axis first on both operands and the result, which the
    # kernel reads as separate problems (one kernel gradient per mapped element).
    return jax.ffi.ffi_call(_target(symbol), out, vmap_method="broadcast_all")(
        x, dz, kh=np.int64(kh), kw=np.int64(kw), stride=np.int64(spec[2]),
        pad=np.int64(spec[3]))


def rows_matmul(rows: jax.Array, w2d: jax.Array) -> jax.Array:
    """``(..., K) @ (K, O)`` as one 2-D GEMM over the flattened rows (see
    ``layers._matmul_rows`` for why flat rows)."""
    out = rows.reshape(-1, rows.shape[-1]) @ w2d
    return out.reshape(rows.shape[:-1] + (w2d.shape[-1],))


def rows_matmul_t(rows: jax.Array, w2d: jax.Array) -> jax.Array:
    """``(..., O) @ (K, O)^T``, kept a transposed-right product: ``remat="dots"`` recomputes
    it rather than storing the ``kh*kw`` times larger patch cotangent."""
    out = jax.lax.dot_general(rows.reshape(-1, rows.shape[-1]), w2d, (((1,), (1,)), ((), ())))
    return out.reshape(rows.shape[:-1] + (w2d.shape[0],))


# The convolution, its transpose and its kernel gradient are one closed family: each one's
# derivatives are the other two (all bilinear), so every kernel cotangent, at any order of
# differentiation, is the native kernel gradient rather than XLA's transposed-left GEMM
# over a materialised patch matrix. Kernels are (kh*kw*C, O) matrices inside the family.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x, w2d, spec):
    return rows_matmul(_im2col(x, spec), w2d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_transpose(dz, w2d, spec):
    return _col2im(rows_matmul_t(dz, w2d), spec)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_weight_grad(x, dz, spec):
    return _weight_grad_ffi(x, dz, spec)


def _kernel_grad(x, dz, spec):
    return _conv_weight_grad(x, dz, spec).reshape(-1, dz.shape[-1])


def _conv_bwd(spec, res, dout):
    x, w2d = res
    return _conv_transpose(dout, w2d, spec), _kernel_grad(x, dout, spec)


def _conv_transpose_bwd(spec, res, dimage):
    dz, w2d = res
    return _conv(dimage, w2d, spec), _kernel_grad(dimage, dz, spec)


def _conv_weight_grad_bwd(spec, res, dkernel):
    # Bilinear in (x, dz): the cotangent of x is the transposed convolution of dz with the
    # kernel cotangent, that of dz the convolution of x with it.
    x, dz = res
    w2d = dkernel.reshape(-1, dkernel.shape[-1])
    return _conv_transpose(dz, w2d, spec), _conv(x, w2d, spec)


_conv.defvjp(lambda x, w2d, spec: (_conv(x, w2d, spec), (x, w2d)), _conv_bwd)
_conv_transpose.defvjp(lambda dz, w2d, spec: (_conv_transpose(dz, w2d, spec), (dz, w2d)),
                       _conv_transpose_bwd)
_conv_weight_grad.defvjp(lambda x, dz, spec: (_conv_weight_grad(x, dz, spec), (x, dz)),
                         _conv_weight_grad_bwd)


def _check_kernel(kernel, in_channels, what):
    if kernel.ndim != 4 or kernel.shape[2] != in_channels:
        raise ValueError(f"{what}: kernel {kernel.shape} must be (kh, kw, C_in, C_out) with "
                         f"C_in = {in_channels}, the image's channels.")


def _conv_spec(kernel, image_hwc, out_hw, stride, padding, what):
    kh, kw = kernel.shape[:2]
    _check_window(kh, kw, stride, padding, out_hw, what)
    return (kh, kw, stride, padding, tuple(int(d) for d in image_hwc), tuple(out_hw))


def conv(x: jax.Array, kernel: jax.Array, stride: int = 1, padding: int = 0) -> jax.Array:
    """Convolution ``im2col(x) @ kernel`` of ``x`` (``(..., H, W, C)``) with an HWIO
    ``kernel``, symmetric ``padding``: ``(..., Ho, Wo, C_out)``.

    Its kernel cotangent is :func:`conv_weight_grad` and its input cotangent
    :func:`conv_input_grad`, whose own derivatives are again these three functions.
    """
    _check(x, "conv")
    h, w, c = x.shape[-3:]
    _check_kernel(kernel, c, "conv")
    kh, kw = kernel.shape[:2]
    out_hw = ((h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1)
    spec = _conv_spec(kernel, (h, w, c), out_hw, stride, padding, "conv")
    return _conv(x, kernel.reshape(-1, kernel.shape[-1]), spec)


def conv_input_grad(dz: jax.Array, kernel: jax.Array, image_hwc: tuple[int, int, int],
                    stride: int = 1, padding: int = 0) -> jax.Array:
    """Input cotangent of :func:`conv` for images of shape ``(..., *image_hwc)`` given the
    output cotangent ``dz`` (``(..., Ho, Wo, C_out)``): ``col2im(dz @ W^T)``, the
    transposed convolution."""
    _check(dz, "conv_input_grad")
    _check_kernel(kernel, tuple(image_hwc)[-1], "conv_input_grad")
    if dz.shape[-1] != kernel.shape[-1]:
        raise ValueError(f"conv_input_grad: dz {dz.shape} and kernel {kernel.shape} need the "
                         "same number of output channels (dz's last dim, the kernel's last).")
    spec = _conv_spec(kernel, tuple(image_hwc), tuple(dz.shape[-3:-1]), stride, padding,
                      "conv_input_grad")
    return _conv_transpose(dz, kernel.reshape(-1, kernel.shape[-1]), spec)


def conv_weight_grad(x: jax.Array, dz: jax.Array, kh: int, kw: int, stride: int = 1,
                     padding: int = 0) -> jax.Array:
    """``(kh, kw, C, C_out)`` kernel gradient of a convolution of ``x`` (``(..., H, W, C)``)
    given the output cotangent ``dz`` (``(..., Ho, Wo, C_out)``): equal to
    ``einsum("...k,...o->ko", im2col(x, kh, kw, stride, padding), dz)`` reshaped, summed over
    every leading (image) axis. ``padding`` and the output size work as in :func:`im2col`.
    """
    _check(x, "conv_weight_grad")
    _check(dz, "conv_weight_grad")
    if dz.ndim != x.ndim or dz.shape[:-3] != x.shape[:-3] or dz.dtype != x.dtype:
        raise ValueError(f"conv_weight_grad: x {x.shape} {x.dtype} and dz {dz.shape} "
                         f"{dz.dtype} need the same leading (image) dims and dtype.")
    out_hw = tuple(dz.shape[-3:-1])
    _check_window(kh, kw, stride, padding, out_hw, "conv_weight_grad")
    return _conv_weight_grad(x, dz, (kh, kw, stride, padding, tuple(x.shape[-3:]), out_hw))


def im2col(x: jax.Array, kh: int, kw: int, stride: int = 1, padding: int = 0,
           out_hw: Optional[tuple[int, int]] = None) -> jax.Array:
    """``(..., H, W, C) -> (..., Ho, Wo, kh*kw*C)``, the same as ``layers.extract_patches``.

    ``padding`` is the zero padding before the first row and column; ``out_hw`` (default:
    symmetric padding, ``Ho = (H + 2*padding - kh) // stride + 1``) sets the output size and
    so the padding after the last row and column.
    """
    _check(x, "im2col")
    h, w, c = x.shape[-3:]
    if out_hw is None:
        out_hw = ((h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1)
    _check_window(kh, kw, stride, padding, out_hw, "im2col")
    return _im2col(x, (kh, kw, stride, padding, (h, w, c), tuple(out_hw)))


def col2im(patches: jax.Array, image_hwc: tuple[int, int, int], kh: int, kw: int,
           stride: int = 1, padding: int = 0) -> jax.Array:
    """The transpose of :func:`im2col` for images of shape ``(..., *image_hwc)``: each patch
    entry is added to the pixel it was read from."""
    _check(patches, "col2im")
    image_hwc = tuple(int(d) for d in image_hwc)
    if len(image_hwc) != 3 or patches.shape[-1] != kh * kw * image_hwc[-1]:
        raise ValueError(f"col2im: patches with {patches.shape[-1]} features do not fit "
                         f"image_hwc={image_hwc} and a {kh}x{kw} window (need kh*kw*C).")
    out_hw = tuple(patches.shape[-3:-1])
    _check_window(kh, kw, stride, padding, out_hw, "col2im")
    return _col2im(patches, (kh, kw, stride, padding, image_hwc, out_hw))


def _check_window(kh, kw, stride, padding, out_hw, what):
    if min(kh, kw, stride) < 1 or padding < 0 or min(out_hw) < 1:
        raise ValueError(f"{what}: need kh, kw, stride >= 1, padding >= 0 and a non-empty "
                         f"output; got kh={kh}, kw={kw}, stride={stride}, padding={padding}, "
                         f"output {out_hw}.")
