"""The TFDS route, end to end on datasets written locally with TFDS's own writers.

No network and no TensorFlow: small datasets with the feature schemas of TFDS
``omniglot`` (from Lake's real PNGs) and ``cifar100`` (generated PNGs) are
written with ``GeneratorBasedBuilder.download_and_prepare(file_format="array_record")``
and read back through ``tfds.data_source`` by the metajax loaders.
"""

import io
import zipfile

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets", reason="the TFDS route needs the 'data' extra "
                           "(tensorflow-datasets + array_record)")
pytest.importorskip("array_record", reason="tfds.data_source needs array_record ('data' extra)")

from PIL import Image  # noqa: E402

from metajax.data.errors import DatasetNotFoundError, UnknownSplitError  # noqa: E402
from metajax.data.omniglot import load_omniglot  # noqa: E402
from metajax.data.splits import (CIFAR100_FINE_LABELS, CIFAR100_SUPERCLASSES,  # noqa: E402
                                 CIFAR_FS_CLASSES, FC100_SUPERCLASSES)
from metajax.data.tfds_source import (load_cifar_fs, load_fc100, load_omniglot_tfds,  # noqa: E402
                                      tfds_class_dataset)

SMALL1 = "images_background_small1.zip"
OMNI_CHARS = 5  # characters written per split


def _png(array: np.ndarray) -> io.BytesIO:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    buf.seek(0)
    return buf


def _omniglot_entries(zip_path):
    with zipfile.ZipFile(zip_path) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".png"))
        chars = sorted({tuple(n.split("/")[1:3]) for n in names})[:OMNI_CHARS]
        return [(a, c, n, zf.read(n)) for n in names for a, c in [tuple(n.split("/")[1:3])]
                if (a, c) in chars]


class MetajaxTestOmniglot(tfds.core.GeneratorBasedBuilder):
    """TFDS ``omniglot``'s feature schema, filled with some of Lake's small1 PNGs."""

    VERSION = tfds.core.Version("1.0.0")
    zip_path = None

    def _info(self):
        entries = _omniglot_entries(self.zip_path)
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(105, 105, 3), encoding_format="png"),
            "alphabet": tfds.features.ClassLabel(names=sorted({e[0] for e in entries})),
            "alphabet_char_id": np.int64,
            "label": tfds.features.ClassLabel(num_classes=OMNI_CHARS),
        }))

    def _split_generators(self, dl_manager):
        return {"small1": self._generate_examples()}

    def _generate_examples(self):
        entries = _omniglot_entries(self.zip_path)
        alphabets = sorted({e[0] for e in entries})
        chars = sorted({(e[0], e[1]) for e in entries})
        for alphabet, char, name, data in entries:
            yield name, {"image": io.BytesIO(data), "alphabet": alphabets.index(alphabet),
                         "alphabet_char_id": int(char[len("character"):]) - 1,
                         "label": chars.index((alphabet, char))}


def _cifar_image(label: int, i: int, split: int) -> np.ndarray:
    img = np.random.default_rng(1000 * label + 10 * i + split).integers(0, 256, (32, 32, 3),
                                                                      dtype=np.uint8)
    img[0, 0] = (label, i, split)
    return img


class MetajaxTestCifar100(tfds.core.GeneratorBasedBuilder):
    """TFDS ``cifar100``'s feature schema, 2 train + 1 test generated image per class."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "id": np.str_,
            "image": tfds.features.Image(shape=(32, 32, 3)),
            "label": tfds.features.ClassLabel(names=list(CIFAR100_FINE_LABELS)),
            "coarse_label": tfds.features.ClassLabel(names=sorted(CIFAR100_SUPERCLASSES)),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 2), "test": self._generate_examples(1, 1)}

    def _generate_examples(self, split, per_class):
        coarse = {f: c for c, fine in CIFAR100_SUPERCLASSES.items() for f in fine}
        superclasses = sorted(CIFAR100_SUPERCLASSES)
        for label, fine in enumerate(CIFAR100_FINE_LABELS):
            for i in range(per_class):
                key = f"{split}_{label}_{i}"
                yield key, {"id": key, "image": _png(_cifar_image(label, i, split)),
                            "label": label, "coarse_label": superclasses.index(coarse[fine])}


@pytest.fixture(scope="module")
def tfds_dir(omniglot_root, tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    MetajaxTestOmniglot.zip_path = omniglot_root / "omniglot" / SMALL1
    config = tfds.download.DownloadConfig(try_download_gcs=False)
    for builder in (MetajaxTestOmniglot, MetajaxTestCifar100):
        builder(data_dir=data_dir, file_format="array_record").download_and_prepare(
            download_config=config)
    return data_dir


def test_omniglot_via_tfds_matches_the_zip_loader(tfds_dir, omniglot_root, tmp_path):
    ds = load_omniglot_tfds("small1", data_dir=tfds_dir, dataset_name="metajax_test_omniglot")
    assert ds.num_classes == OMNI_CHARS and ds.images.shape == (OMNI_CHARS, 20, 28, 28, 1)
    zipped = load_omniglot(omniglot_root, parts=("small1",), cache_dir=tmp_path)
    assert ds.class_names == zipped.class_names[:OMNI_CHARS]
    # same pixels; examples may come in another order within a class
    for c in range(OMNI_CHARS):
        a = sorted(x.tobytes() for x in ds.images[c])
        b = sorted(x.tobytes() for x in zipped.images[c])
        assert a == b


def test_cifar_fs_and_fc100(tfds_dir):
    for subset, count in (("train", 64), ("val", 16), ("test", 20)):
        ds = load_cifar_fs(subset, data_dir=tfds_dir, dataset_name="metajax_test_cifar100")
        assert ds.class_names == CIFAR_FS_CLASSES[subset] and ds.num_classes == count
        assert ds.images.shape == (count, 3, 32, 32, 3)
        for c, name in enumerate(ds.class_names):  # every image sits under its own class
            assert (ds.images[c, :, 0, 0, 0] == CIFAR100_FINE_LABELS.index(name)).all()
            assert sorted(ds.images[c, :, 0, 0, 2].tolist()) == [0, 0, 1]  # train + test
    for subset in ("train", "val", "test"):
        ds = load_fc100(subset, data_dir=tfds_dir, dataset_name="metajax_test_cifar100")
        want = {f for sc in FC100_SUPERCLASSES[subset] for f in CIFAR100_SUPERCLASSES[sc]}
        assert set(ds.class_names) == want and ds.num_classes == 5 * len(FC100_SUPERCLASSES[subset])


def test_generic_route_keeps_label_order(tfds_dir):
    ds = tfds_class_dataset("metajax_test_cifar100", "test", data_dir=tfds_dir)
    assert ds.class_names == CIFAR100_FINE_LABELS and ds.counts.tolist() == [1] * 100
    coarse = tfds_class_dataset("metajax_test_cifar100", "train", data_dir=tfds_dir,
                                label_key="coarse_label")
    assert coarse.num_classes == 20 and coarse.counts.tolist() == [10] * 20


def test_errors(tfds_dir, tmp_path):
    with pytest.raises(DatasetNotFoundError, match="not prepared.*download_and_prepare"):
        load_cifar_fs("train", data_dir=tmp_path)
    with pytest.raises(UnknownSplitError, match="valid splits are"):
        tfds_class_dataset("metajax_test_cifar100", "validation", data_dir=tfds_dir)
    with pytest.raises(UnknownSplitError, match="valid subsets are"):
        load_fc100("dev", data_dir=tfds_dir, dataset_name="metajax_test_cifar100")
    with pytest.raises(UnknownSplitError, match="valid splits are"):
        load_omniglot_tfds("background", data_dir=tfds_dir)
