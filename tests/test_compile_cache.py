"""The persistent compilation cache: a rerun loads the executable instead of compiling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from metajax.training.compile_cache import enable_compilation_cache

# Run in fresh processes: the cache is process-wide JAX configuration.
CHILD = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    from metajax.training.compile_cache import configure_compilation_cache
    hits = []
    jax.monitoring.register_event_listener(
        lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None)
    folder = configure_compilation_cache(sys.argv[1])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # cache even tiny compiles
    f = jax.jit(lambda x: jnp.sin(x) @ x.T + 3.0)
    value = float(f(jnp.arange(12.0).reshape(3, 4)).sum())
    print("RESULT " + json.dumps({"folder": folder, "hits": len(hits), "value": value}))
""")


def _run(setting: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, setting], capture_output=True, text=True,
                         check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout
    return json.loads(out.split("RESULT ", 1)[1])


def test_second_run_loads_from_the_cache_with_the_same_result(tmp_path):
    folder = str(tmp_path / "xla")
    first = _run(folder)
    assert first["folder"] == folder and first["hits"] == 0
    assert os.listdir(folder), "the first run wrote no cache entry"
    second = _run(folder)
    assert second["hits"] >= 1
    assert second["value"] == first["value"]
    off = _run("off")
    assert off["folder"] is None and off["hits"] == 0


def test_unusable_folder_and_bad_threshold_are_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="cannot create the compilation cache folder.*'off'"):
        enable_compilation_cache(str(blocker / "xla"))
    with pytest.raises(ValueError, match="min_compile_time_s must be >= 0"):
        enable_compilation_cache(str(tmp_path), min_compile_time_s=-1)
