"""Decodes PNG entries of zip files into uint8 arrays; also runs as a stand-alone worker script.

Run as ``python _png_worker.py`` (by path, so it imports only numpy and PIL, not
JAX) it reads a JSON job ``{"jobs": [[zip_path, [entry, ...]], ...], "size": [H, W],
"resample": "lanczos", "out": "x.npy"}`` from stdin and writes the ``(n, H, W)``
array to ``out``. On a decode error it prints the message to stderr and exits 3.
The loaders use it to decode on several cores without ``multiprocessing``
(whose spawn mode re-imports the user's ``__main__``, and whose fork mode is
unsafe once JAX's threads run).
"""

from __future__ import annotations

import io
import json
import sys
import zipfile
import zlib

import numpy as np


class DecodeError(ValueError):
    """An entry could not be read or decoded."""


def decode_pngs(zip_path: str, names, size, resample: str = "lanczos") -> np.ndarray:
    """Decodes PNG entries of one zip to grey ``(n, H, W)`` uint8, resized to ``size``."""
    from PIL import Image

    filt = {"lanczos": Image.LANCZOS, "bilinear": Image.BILINEAR}[resample]
    height, width = int(size[0]), int(size[1])
    out = np.empty((len(names), height, width), np.uint8)
    name = ""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for i, name in enumerate(names):
                with Image.open(io.BytesIO(zf.read(name))) as im:
                    im = im.convert("L")
                    if im.size != (width, height):
                        im = im.resize((width, height), filt)
                    out[i] = np.asarray(im)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as e:
        raise DecodeError(f"cannot decode {name!r} in {zip_path} ({type(e).__name__}: {e})") from e
    return out


def decode_jobs(jobs, size, resample: str = "lanczos") -> np.ndarray:
    """Decodes ``[(zip_path, [entry, ...]), ...]`` in order into one ``(n, H, W)`` array."""
    parts = [decode_pngs(zp, names, size, resample) for zp, names in jobs if names]
    if not parts:
        return np.empty((0, int(size[0]), int(size[1])), np.uint8)
    return np.concatenate(parts, axis=0)


def _main() -> int:
    job = json.load(sys.stdin)
    try:
        arr = decode_jobs(job["jobs"], job["size"], job["resample"])
    except DecodeError as e:
        print(str(e), file=sys.stderr)
        return 3
    np.save(job["out"], arr)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
