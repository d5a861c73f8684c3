"""The native (C++ XLA FFI) im2col / col2im kernels against the pure-XLA reference."""

import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metajax.models import layers, native_patches
from metajax.models.layers import extract_patches

needs_native = pytest.mark.skipif(not native_patches.available(),
                                  reason=f"native kernels: {native_patches.status()[1]}")

GEOMETRIES = [((2, 7, 9, 3), (3, 3, 2, 1)),   # odd sizes, Conv4's stride-2 block
              ((3, 28, 28, 1), (3, 3, 2, 1)),  # Omniglot's first layer
              ((2, 6, 5, 4), (3, 3, 1, 1)),    # mini-ImageNet / ResNet-12 3x3 stride 1
              ((1, 8, 8, 2), (2, 2, 2, 0))]


@needs_native
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("shape,geometry", GEOMETRIES)
def test_im2col_and_col2im_equal_the_xla_reference(shape, geometry, dtype):
    with jax.enable_x64(dtype == jnp.float64):
        x = jax.random.normal(jax.random.key(0), shape, dtype)
        patches = jax.jit(lambda x: native_patches.im2col(x, *geometry))(x)
        reference = extract_patches(x, *geometry)
        assert patches.dtype == dtype
        np.testing.assert_array_equal(patches, reference)  # a copy: bit-identical

        cotangent = jax.random.normal(jax.random.key(1), reference.shape, dtype)
        _, vjp = jax.vjp(lambda x: extract_patches(x, *geometry), x)
        image = jax.jit(lambda c: native_patches.col2im(c, shape[1:], *geometry))(cotangent)
        np.testing.assert_allclose(image, vjp(cotangent)[0], rtol=1e-6, atol=1e-6)


@needs_native
def test_padding_after_comes_from_the_output_size_and_vmap_folds_into_images():
    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))
    # A 2x2 window padded only after: the four shifts [x, x>>col, x>>row, x>>both].
    shifted = native_patches.im2col(x, 2, 2, stride=1, padding=0, out_hw=(5, 6))
    xp = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    expected = jnp.concatenate([xp[:, :5, :6], xp[:, :5, 1:], xp[:, 1:, :6], xp[:, 1:, 1:]], -1)
    np.testing.assert_array_equal(shifted, expected)

    batched = jnp.stack([x, -2.0 * x])
    mapped = jax.vmap(lambda x: native_patches.im2col(x, 3, 3, 2, 1))(batched)
    np.testing.assert_array_equal(mapped[1], -2.0 * extract_patches(x, 3, 3, 2, 1))
    images = jax.vmap(lambda p: native_patches.col2im(p, x.shape[1:], 3, 3, 2, 1))(mapped)
    _, vjp = jax.vjp(lambda x: extract_patches(x, 3, 3, 2, 1), x)
    np.testing.assert_allclose(images[1], vjp(mapped[1])[0], rtol=1e-6, atol=1e-5)


@needs_native
@pytest.mark.parametrize("geometry", [(3, 3, 2, 1), (3, 3, 1, 1)])
def test_second_and_third_order_derivatives_match_xla(geometry):
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(0), (2, 7, 6, 3), jnp.float64)
        weights = jax.random.normal(jax.random.key(1), extract_patches(x, *geometry).shape,
                                    jnp.float64)

        def second_order(patch_fn):
            inner = lambda x: jnp.sum(jnp.sin(patch_fn(x)) * weights)
            return jax.grad(lambda x: jnp.sum(jax.grad(inner)(x) ** 2))(x)

        np.testing.assert_allclose(
            jax.jit(lambda x: second_order(lambda y: native_patches.im2col(y, *geometry)))(x),
            second_order(lambda y: extract_patches(y, *geometry)), rtol=1e-10, atol=1e-10)

        _, vjp = jax.vjp(lambda x: extract_patches(x, *geometry), x)
        col2im_native = lambda p: native_patches.col2im(p, x.shape[1:], *geometry)
        third = lambda fn: jax.grad(lambda p: jnp.sum(jax.grad(
            lambda q: jnp.sum(jnp.cos(fn(q))))(p) ** 2))(weights)
        np.testing.assert_allclose(third(col2im_native), third(lambda p: vjp(p)[0]),
                                   rtol=1e-10, atol=1e-10)


def _weight_grad_reference(x, dz, geometry):
    kh, kw = geometry[:2]
    patches = extract_patches(x, *geometry)
    return jnp.einsum("...k,...o->ko", patches, dz).reshape(kh, kw, x.shape[-1], dz.shape[-1])


@needs_native
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("shape,geometry", GEOMETRIES + [((5, 14, 14, 64), (3, 3, 2, 1))])
def test_conv_weight_grad_equals_the_patch_product_and_vmaps(shape, geometry, dtype):
    """All tile paths: 64x64 (6x16 AVX2 blocks), 20 output channels (a 4-column edge), few
    input channels (6-row blocks plus edge rows); several threads for the large shape."""
    with jax.enable_x64(dtype == jnp.float64):
        x = jax.random.normal(jax.random.key(0), shape, dtype)
        out_hw = extract_patches(x, *geometry).shape[1:3]
        cout = 64 if shape[-1] == 64 else 20
        dz = jax.random.normal(jax.random.key(1), (shape[0],) + out_hw + (cout,), dtype)
        tol = 1e-12 if dtype == jnp.float64 else 2e-5
        ref = _weight_grad_reference(x, dz, geometry)
        got = jax.jit(lambda x, dz: native_patches.conv_weight_grad(x, dz, *geometry))(x, dz)
        assert got.shape == ref.shape and got.dtype == dtype
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * float(jnp.max(jnp.abs(ref))))
        mapped = jax.vmap(lambda x, dz: native_patches.conv_weight_grad(x, dz, *geometry))(
            jnp.stack([x, 2 * x]), jnp.stack([dz, -dz]))
        np.testing.assert_allclose(mapped[1], -2 * ref, rtol=tol,
                                   atol=2 * tol * float(jnp.max(jnp.abs(ref))))


@needs_native
def test_conv_weight_grad_derivatives_match_xla_to_third_order():
    geometry = (3, 3, 2, 1)
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(0), (2, 7, 6, 9), jnp.float64)
        dz = jax.random.normal(jax.random.key(1), (2, 4, 3, 5), jnp.float64)
        probe = jax.random.normal(jax.random.key(2), (3, 3, 9, 5), jnp.float64)

        def third(fn):
            second = lambda x, dz: jax.grad(lambda x, dz: jnp.sum(
                jax.grad(lambda x, dz: jnp.sum(jnp.sin(fn(x, dz)) * probe), (0, 1))(x, dz)[1]
                ** 2), (0, 1))(x, dz)
            return jax.grad(lambda x: jnp.sum(second(x, dz)[0] ** 2))(x), second(x, dz)

        native = jax.jit(lambda: third(
            lambda x, dz: native_patches.conv_weight_grad(x, dz, *geometry)))()
        xla = third(lambda x, dz: _weight_grad_reference(x, dz, geometry))
        for a, b in zip(jax.tree.leaves(native), jax.tree.leaves(xla)):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
        with pytest.raises(ValueError, match="same leading"):
            native_patches.conv_weight_grad(x, dz[:1], *geometry)


@needs_native
@pytest.mark.parametrize("geometry", [(3, 3, 2, 1), (3, 3, 1, 1)])
def test_conv_and_its_transpose_match_xla_to_third_order(geometry):
    """The closed family conv / conv_input_grad / conv_weight_grad: values, and derivatives
    in both the image and the kernel to third order, against XLA autodiff of the patch
    product (float64)."""
    kh, kw, stride, padding = geometry
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(keys[0], (2, 7, 6, 9), jnp.float64)
        kernel = jax.random.normal(keys[1], (kh, kw, 9, 5), jnp.float64)
        out_hw = extract_patches(x, *geometry).shape[1:3]
        dz = jax.random.normal(keys[2], (2,) + out_hw + (5,), jnp.float64)

        def reference_conv(x, k):
            return extract_patches(x, *geometry) @ k.reshape(-1, k.shape[-1])

        def reference_transpose(dz, k):
            return jax.vjp(lambda x: reference_conv(x, k), x)[1](dz)[0]

        def third(conv, transpose):
            def loss(x, k, dz):  # both functions, nonlinearly mixed
                return jnp.sum(jnp.sin(conv(x, k))) + jnp.sum(jnp.cos(transpose(dz, k)) * x)
            second = lambda x, k: jax.grad(lambda x, k: jnp.sum(
                jax.grad(loss, (0, 1))(x, k, dz)[1] ** 2), (0, 1))(x, k)
            return (conv(x, kernel), transpose(dz, kernel), second(x, kernel),
                    jax.grad(lambda k: jnp.sum(second(x, k)[1] ** 2))(kernel))

        native = jax.jit(lambda: third(
            lambda x, k: native_patches.conv(x, k, stride, padding),
            lambda dz, k: native_patches.conv_input_grad(dz, k, x.shape[1:], stride, padding)))()
        xla = third(reference_conv, reference_transpose)
        for a, b in zip(jax.tree.leaves(native), jax.tree.leaves(xla)):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
        mapped = jax.vmap(lambda x: native_patches.conv(x, kernel, stride, padding))(
            jnp.stack([x, -x]))
        np.testing.assert_allclose(mapped[1], -reference_conv(x, kernel), rtol=1e-12)
        with pytest.raises(ValueError, match="C_in = 9"):
            native_patches.conv(x, kernel[:, :, :4], stride, padding)
        with pytest.raises(ValueError, match="output channels"):
            native_patches.conv_input_grad(dz[..., :4], kernel, x.shape[1:], stride, padding)


@needs_native
def test_fused_block_meta_gradient_is_the_same_with_and_without_native_kernels():
    """Second-order MAML through two fused blocks: native kernels on vs the XLA slices."""
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(0), 6)
        params = {"k1": 0.3 * jax.random.normal(keys[0], (3, 3, 1, 8), jnp.float64),
                  "k2": 0.2 * jax.random.normal(keys[1], (3, 3, 8, 8), jnp.float64),
                  "s": jnp.ones(8, jnp.float64), "t": jnp.zeros(8, jnp.float64)}
        support = jax.random.normal(keys[2], (4, 9, 9, 1), jnp.float64)
        query = jax.random.normal(keys[3], (6, 9, 9, 1), jnp.float64)

        def features(p, x):
            zero = jnp.zeros(8, jnp.float64)
            h = layers.conv_bn_relu(x, p["k1"], zero, p["s"], p["t"], stride=2, padding=1,
                                    impl="fused")
            h = layers.conv_bn_relu(h, p["k2"], zero, p["s"], p["t"], stride=2, padding=1,
                                    impl="fused")
            return jnp.mean(h ** 2)

        def meta_loss(p):
            adapted = jax.tree.map(lambda w, g: w - 0.1 * g, p, jax.grad(features)(p, support))
            return features(adapted, query)

        defaults = dict(layers.FUSED_OPTIONS)
        try:
            layers.FUSED_OPTIONS["native_conv_vjp"] = False  # native patches, XLA's products
            with_native = jax.jit(jax.grad(meta_loss))(params)
            layers.FUSED_OPTIONS["native_conv_vjp"] = True  # the whole native conv family
            with_conv_family = jax.jit(jax.grad(meta_loss))(params)
            layers.FUSED_OPTIONS["native_patches"] = False
            without = jax.jit(jax.grad(meta_loss))(params)
        finally:
            layers.FUSED_OPTIONS.update(defaults)
        for name in params:
            for got in (with_native, with_conv_family):
                np.testing.assert_allclose(got[name], without[name], rtol=1e-9, atol=1e-12)


@needs_native
def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match=r"\(\.\.\., H, W, C\)"):
        native_patches.im2col(jnp.ones((3, 3)), 3, 3)
    with pytest.raises(ValueError, match="float32 or float64"):
        native_patches.im2col(jnp.ones((1, 3, 3, 2), jnp.int32), 3, 3)
    with pytest.raises(ValueError, match="kh\\*kw\\*C"):
        native_patches.col2im(jnp.ones((1, 2, 2, 10)), (4, 4, 2), 3, 3, 2, 1)
    with pytest.raises(ValueError, match="non-empty output"):
        native_patches.im2col(jnp.ones((1, 2, 2, 1)), 5, 5)


def test_build_errors_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(native_patches.shutil, "which", lambda name: None)
    with pytest.raises(native_patches.NativeBuildError, match="set CXX"):
        native_patches.build_library(directory=tmp_path)

    broken = tmp_path / "broken-cxx"
    broken.write_text("#!/bin/sh\necho 'fatal: this compiler is broken' >&2\nexit 3\n")
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(native_patches.NativeBuildError, match="(?s)exit 3.*this compiler is broken"
                       ) as err:
        native_patches.build_library(compiler=str(broken), directory=tmp_path / "cache")
    assert "native_patches.cc" in str(err.value)
    assert not any((tmp_path / "cache").glob("*.so"))  # no half-written library left behind
    assert not any(p.name.startswith(".native_patches-") for p in (tmp_path / "cache").iterdir())


@needs_native
def test_library_is_cached_by_content(tmp_path):
    first = native_patches.build_library(directory=tmp_path)
    mtime = os.stat(first).st_mtime_ns
    assert native_patches.build_library(directory=tmp_path) == first  # no rebuild
    assert os.stat(first).st_mtime_ns == mtime


def test_without_a_compiler_the_fused_block_warns_once_and_uses_xla(tmp_path):
    """A fresh process with a failing compiler and an empty cache: one NativePatchesWarning
    naming the failure, and the fused conv block still gives the XLA-slice result."""
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent("""
        import warnings
        import jax, jax.numpy as jnp, numpy as np
        from metajax.models import layers, native_patches
        x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
        k = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
        zero, one = jnp.zeros(4), jnp.ones(4)
        f = lambda x, k: jnp.sum(layers.conv_bn_relu(x, k, zero, one, zero, stride=2, padding=1,
                                                     impl="fused") ** 2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            grads = jax.grad(f, argnums=(0, 1))(x, k)
            grads_again = jax.grad(f, argnums=(0, 1))(2 * x, k)
        messages = [str(w.message) for w in caught
                    if issubclass(w.category, native_patches.NativePatchesWarning)]
        assert len(messages) == 1, messages
        assert "exit 1" in messages[0] and "XLA slices" in messages[0], messages[0]
        assert native_patches.status()[0] is False
        ref = jax.grad(lambda x, k: jnp.sum(layers.conv_bn_relu(
            x, k, zero, one, zero, stride=2, padding=1, impl="patches") ** 2), argnums=(0, 1))(x, k)
        for g, r in zip(grads, ref):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)
        print("FALLBACK_OK")
    """)
    env = dict(os.environ, CXX="false", METAJAX_NATIVE_CACHE=str(tmp_path / "cache"),
               JAX_PLATFORMS="cpu")
    env.pop("METAJAX_NATIVE_PATCHES", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0 and "FALLBACK_OK" in proc.stdout, proc.stdout + proc.stderr


def test_native_kernels_active_follows_the_option_dtype_and_build():
    assert layers.native_kernels_active(jnp.float32) == native_patches.available()
    assert not layers.native_kernels_active(jnp.int32)
    layers.FUSED_OPTIONS["native_patches"] = False
    try:
        assert not layers.native_kernels_active(jnp.float32)
    finally:
        layers.FUSED_OPTIONS["native_patches"] = True
