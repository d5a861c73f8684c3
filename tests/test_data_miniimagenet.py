"""mini-ImageNet readers on small generated sets in the two real layouts."""

import pickle

import jax
import numpy as np
import pytest
from PIL import Image

from metajax.data import EpisodeSampler
from metajax.data.errors import CorruptDatasetError, DatasetNotFoundError, UnknownSplitError
from metajax.data.miniimagenet import load_miniimagenet, read_split_csv

CLASSES = ["n01532829", "n01558993", "n01704323", "n01749939"]
PER_CLASS = [6, 6, 5, 6]  # one class short, as a user dataset may be


def _image(class_idx: int, i: int, size=84) -> np.ndarray:
    rng = np.random.default_rng(100 * class_idx + i)
    img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    img[0, 0] = (class_idx, i, 7)
    return img


@pytest.fixture
def pickle_root(tmp_path):
    folder = tmp_path / "miniimagenet"
    folder.mkdir()
    rows, class_dict = [], {}
    order = [(c, i) for i in range(max(PER_CLASS)) for c in range(len(CLASSES))
             if i < PER_CLASS[c]]  # interleaved, as in the real files' row order
    for row, (c, i) in enumerate(order):
        rows.append(_image(c, i))
        class_dict.setdefault(CLASSES[c], []).append(row)
    with open(folder / "mini-imagenet-cache-train.pkl", "wb") as f:
        pickle.dump({"image_data": np.stack(rows), "class_dict": class_dict}, f)
    return tmp_path


@pytest.fixture
def csv_root(tmp_path):
    folder = tmp_path / "miniimagenet"
    (folder / "images").mkdir(parents=True)
    lines = ["filename,label"]
    for c, name in enumerate(CLASSES):
        for i in range(PER_CLASS[c]):
            fname = f"{name}{i + 1:08d}.png"  # lossless, so pixels round-trip
            Image.fromarray(_image(c, i)).save(folder / "images" / fname)
            lines.append(f"{fname},{name}")
    (folder / "val.csv").write_text("\n".join(lines) + "\n")
    return tmp_path


def _check(ds):
    assert ds.class_names == tuple(CLASSES)
    assert ds.counts.tolist() == PER_CLASS and ds.images.shape == (4, 6, 84, 84, 3)
    for c in range(4):
        for i in range(PER_CLASS[c]):
            np.testing.assert_array_equal(ds.images[c, i], _image(c, i))
    assert (ds.images[2, 5] == 0).all()  # padding


def test_pickle_layout(pickle_root):
    _check(load_miniimagenet(pickle_root, "train"))


def test_csv_layout_and_cache(csv_root, tmp_path):
    cache = tmp_path / "cache"
    ds = load_miniimagenet(csv_root, "val", cache_dir=cache)
    _check(ds)
    assert len(list(cache.glob("*.npz"))) == 1
    _check(load_miniimagenet(csv_root, "val", cache_dir=cache))
    small = load_miniimagenet(csv_root, "val", image_size=32, use_cache=False)
    assert small.images.shape == (4, 6, 32, 32, 3)


def test_csv_with_per_class_folders(csv_root):
    folder = csv_root / "miniimagenet" / "images"
    for path in list(folder.glob("*.png")):
        (folder / path.name[:9]).mkdir(exist_ok=True)
        path.rename(folder / path.name[:9] / path.name)
    _check(load_miniimagenet(csv_root, "val", use_cache=False))


def test_sampler_on_uneven_classes(pickle_root):
    ds = load_miniimagenet(pickle_root, "train")
    with pytest.raises(Exception, match="drop_small_classes"):
        EpisodeSampler(ds, n_way=3, k_shot=1, n_query=5)
    batch = EpisodeSampler(ds, n_way=3, k_shot=1, n_query=4, meta_batch_size=4)(jax.random.key(0))
    assert batch.query_inputs.shape == (4, 12, 84, 84, 3)


def test_errors(pickle_root, csv_root, tmp_path):
    with pytest.raises(UnknownSplitError, match=r"valid splits are \['train', 'val', 'test'\]"):
        load_miniimagenet(pickle_root, "validation")
    with pytest.raises(DatasetNotFoundError, match="mini-imagenet-cache-test.pkl.*test.csv"):
        load_miniimagenet(pickle_root, "test")
    (csv_root / "miniimagenet" / "images" / f"{CLASSES[0]}00000001.png").unlink()
    with pytest.raises(DatasetNotFoundError, match="listed in the split csv is missing"):
        load_miniimagenet(csv_root, "val", use_cache=False)
    bad = pickle_root / "miniimagenet" / "mini-imagenet-cache-train.pkl"
    bad.write_bytes(bad.read_bytes()[:500])
    with pytest.raises(CorruptDatasetError, match="truncated or corrupt"):
        load_miniimagenet(pickle_root, "train")
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("file,class\na.jpg,x\n")
    with pytest.raises(CorruptDatasetError, match="filename,label"):
        read_split_csv(wrong)
