"""Omniglot from Lake's zips: counts, splits, cache, errors (uses ../shared/data)."""

import json
import shutil
import warnings
import zipfile

import numpy as np
import pytest

from metajax.data import cache as cache_lib
from metajax.data import paths
from metajax.data.errors import (CacheError, CorruptDatasetError, DatasetNotFoundError,
                                 UnknownSplitError)
from metajax.data.omniglot import load_omniglot, omniglot_split
from metajax.data.splits import omniglot_split_indices, split_subsets


# ------------------------------------------------------------------ full data
def test_full_shape_and_ink(omniglot_full):
    ds = omniglot_full
    assert ds.images.shape == (1623, 20, 28, 28, 1) and ds.images.dtype == np.uint8
    assert (ds.counts == 20).all()
    assert ds.class_names[0] == "background/Alphabet_of_the_Magi/character01"
    assert ds.class_names[964].startswith("evaluation/")
    # strokes high on a zero background: mostly dark, with bright strokes
    assert ds.images.mean() < 64 and ds.images.max() == 255
    assert np.median(ds.images) == 0


@pytest.mark.parametrize("split,expected", [
    ("lake", {"train": 964, "test": 659}),
    ("vinyals", {"train": 1028, "val": 172, "test": 423, "trainval": 1200}),
    ("maml", {"train": 1200, "test": 423}),
])
def test_split_counts(omniglot_full, split, expected):
    assert set(expected) == set(split_subsets(split))
    for subset, count in expected.items():
        assert omniglot_split(omniglot_full, split, subset).num_classes == count
        rotated = omniglot_split(omniglot_full, split, subset, rotations=True)
        assert rotated.num_classes == 4 * count and rotated.num_base_classes == count
        assert len(rotated.all_class_names) == 4 * count


@pytest.mark.parametrize("split", ["lake", "vinyals", "maml"])
def test_splits_partition_the_classes(omniglot_full, split):
    names = omniglot_full.class_names
    parts = [set(omniglot_split_indices(names, split, s).tolist())
             for s in split_subsets(split) if s != "trainval"]
    assert sum(map(len, parts)) == len(set().union(*parts)) == 1623


def test_vinyals_is_by_alphabet(omniglot_full):
    names = omniglot_full.class_names
    val = {names[i].split("/")[1] for i in omniglot_split_indices(names, "vinyals", "val")}
    assert val == {"Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)"}
    test = [names[i] for i in omniglot_split_indices(names, "vinyals", "test")]
    assert "evaluation/Gurmukhi/character42" in test
    assert "evaluation/Gurmukhi/character41" not in test


def test_maml_split_is_seeded(omniglot_full):
    names = omniglot_full.class_names
    a = omniglot_split_indices(names, "maml", "train", seed=0)
    assert (a == omniglot_split_indices(names, "maml", "train", seed=0)).all()
    assert not (a == omniglot_split_indices(names, "maml", "train", seed=1)).all()


def test_unknown_split_lists_valid_names(omniglot_full):
    with pytest.raises(UnknownSplitError, match="valid splits are.*lake.*maml.*vinyals"):
        omniglot_split(omniglot_full, "ravi")
    with pytest.raises(UnknownSplitError, match="valid subsets are.*train.*val.*test"):
        omniglot_split(omniglot_full, "vinyals", "validation")


def test_lake_aliases(omniglot_full):
    assert omniglot_split(omniglot_full, "lake", "background").num_classes == 964
    assert omniglot_split(omniglot_full, "lake", "evaluation").num_classes == 659


# --------------------------------------------------- small1 (fast) features
@pytest.fixture(scope="module")
def small1_dir(omniglot_root, tmp_path_factory):
    """A writable data root holding only images_background_small1.zip (a copy)."""
    root = tmp_path_factory.mktemp("data")
    (root / "omniglot").mkdir()
    shutil.copy(omniglot_root / "omniglot" / "images_background_small1.zip", root / "omniglot")
    return root


def _small1(root, **kw):
    return load_omniglot(root, parts=("small1",), **kw)


def test_small1_cache_roundtrip_and_default_cache_dir(small1_dir):
    ds = _small1(small1_dir)
    cache_files = list((small1_dir / "omniglot" / "cache").glob("*.npz"))
    assert len(cache_files) == 1, "the default cache goes under a writable data dir"
    assert ds.num_classes == 136 and ds.images.shape[1:] == (20, 28, 28, 1)
    again = _small1(small1_dir)
    np.testing.assert_array_equal(ds.images, again.images)
    assert again.class_names == ds.class_names
    _, header = cache_lib.read_array_cache(cache_files[0])
    assert header["format_version"] == cache_lib.CACHE_FORMAT_VERSION
    assert header["image_size"] == [28, 28] and header["resample"] == "lanczos"
    assert header["sources"]["images_background_small1.zip"]["size"] > 0


def test_worker_decode_matches_in_process(small1_dir, tmp_path):
    one = _small1(small1_dir, use_cache=False, num_workers=1)
    two = _small1(small1_dir, use_cache=False, num_workers=2)
    np.testing.assert_array_equal(one.images, two.images)


def test_invert_and_size_options(small1_dir, tmp_path):
    ds = _small1(small1_dir, cache_dir=tmp_path)
    raw = _small1(small1_dir, cache_dir=tmp_path, invert=False)
    np.testing.assert_array_equal(raw.images, 255 - ds.images)
    small = _small1(small1_dir, cache_dir=tmp_path, image_size=(14, 12), resample="bilinear")
    assert small.images.shape[2:] == (14, 12, 1)
    with pytest.raises(ValueError, match="resample"):
        _small1(small1_dir, resample="nearest")


def test_stale_cache_is_rebuilt_or_reported(small1_dir, tmp_path):
    ds = _small1(small1_dir, cache_dir=tmp_path)
    (cache_file,) = tmp_path.glob("*.npz")
    arrays, header = cache_lib.read_array_cache(cache_file)
    header = {k: v for k, v in header.items() if k != "format_version"}
    # Pretend an older metajax wrote it.
    with np.load(cache_file) as npz:
        stale = {k: npz[k] for k in npz.files}
    stale["__header__"] = np.array(json.dumps({**header, "format_version": 0}))
    np.savez(cache_file, **stale)
    with pytest.raises(CacheError, match="format version 0.*Delete the file"):
        _small1(small1_dir, cache_dir=tmp_path, on_cache_mismatch="error")
    with pytest.warns(UserWarning, match="rebuilding the cache"):
        rebuilt = _small1(small1_dir, cache_dir=tmp_path)
    np.testing.assert_array_equal(rebuilt.images, ds.images)
    assert cache_lib.read_array_cache(cache_file)[1]["format_version"] == \
        cache_lib.CACHE_FORMAT_VERSION


def test_truncated_cache_is_rebuilt(small1_dir, tmp_path):
    _small1(small1_dir, cache_dir=tmp_path)
    (cache_file,) = tmp_path.glob("*.npz")
    cache_file.write_bytes(cache_file.read_bytes()[:1000])
    with pytest.raises(CacheError, match="unreadable"):
        _small1(small1_dir, cache_dir=tmp_path, on_cache_mismatch="error")
    with pytest.warns(UserWarning, match="rebuilding"):
        assert _small1(small1_dir, cache_dir=tmp_path).num_classes == 136


# -------------------------------------------------------------------- errors
def test_missing_files_say_what_to_download(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_omniglot(tmp_path)
    msg = str(err.value)
    assert "images_background.zip" in msg and "images_evaluation.zip" in msg
    assert "github.com/brendenlake/omniglot" in msg and str(tmp_path / "omniglot") in msg
    assert "METAJAX_DATA" in msg


def test_truncated_zip(small1_dir, tmp_path):
    (tmp_path / "omniglot").mkdir()
    data = (small1_dir / "omniglot" / "images_background_small1.zip").read_bytes()
    (tmp_path / "omniglot" / "images_background_small1.zip").write_bytes(data[:len(data) // 2])
    with pytest.raises(CorruptDatasetError, match="truncated or corrupt.*Download"):
        _small1(tmp_path, use_cache=False)


def test_corrupt_entry_in_zip(small1_dir, tmp_path):
    (tmp_path / "omniglot").mkdir()
    target = tmp_path / "omniglot" / "images_background_small1.zip"
    data = bytearray((small1_dir / "omniglot" / "images_background_small1.zip").read_bytes())
    with zipfile.ZipFile(small1_dir / "omniglot" / "images_background_small1.zip") as zf:
        info = [i for i in zf.infolist() if i.filename.endswith(".png")][100]
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 10
    data[start:start + 40] = bytes(40)  # clobber the compressed PNG bytes
    target.write_bytes(bytes(data))
    for workers in (1, 2):
        with pytest.raises(CorruptDatasetError, match="corrupt"):
            _small1(tmp_path, use_cache=False, num_workers=workers)


def test_not_an_omniglot_zip(tmp_path):
    (tmp_path / "omniglot").mkdir()
    with zipfile.ZipFile(tmp_path / "omniglot" / "images_background_small1.zip", "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(CorruptDatasetError, match="not an Omniglot zip"):
        _small1(tmp_path)


def test_split_of_partial_data_is_refused(small1_dir):
    ds = _small1(small1_dir)
    with pytest.raises(ValueError, match="needs full Omniglot"):
        omniglot_split(ds, "vinyals", "train")


# -------------------------------------------------------------------- paths
def test_data_root_resolution(tmp_path, monkeypatch):
    (tmp_path / "omniglot").mkdir()
    monkeypatch.setenv(paths.DATA_ENV, str(tmp_path))
    assert paths.dataset_dir("omniglot") == tmp_path / "omniglot"
    assert paths.dataset_dir("omniglot", tmp_path / "omniglot") == tmp_path / "omniglot"
    monkeypatch.delenv(paths.DATA_ENV)
    assert paths.data_root() == paths.DEFAULT_DATA_ROOT.expanduser()


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv(paths.CACHE_ENV, raising=False)
    assert paths.cache_dir(tmp_path) == tmp_path / "cache"  # writable data dir
    # An unusable data dir (missing here; read-only in ../shared/data) falls back.
    assert paths.cache_dir(tmp_path / "missing") == paths.DEFAULT_CACHE_DIR.expanduser()
    assert paths.cache_dir(tmp_path, tmp_path / "x") == tmp_path / "x"
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "c"))
    assert paths.cache_dir(tmp_path) == tmp_path / "c"


def test_no_warnings_on_clean_load(small1_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _small1(small1_dir)
