"""Named class splits of the few-shot benchmarks, with their sources.

Omniglot (class names ``'<part>/<alphabet>/<character>'`` as made by
:func:`metajax.data.omniglot.load_omniglot`, in its canonical order):

``lake``
  Lake et al. (2015), *Science* 350(6266): the 30 *background* alphabets
  (964 characters) are ``train``, the 20 *evaluation* alphabets (659) ``test``.
``vinyals``
  Vinyals et al. (2016), "Matching networks for one shot learning", as released
  by Snell et al. (prototypical networks, ``data/omniglot/splits/vinyals``) and
  used by torchmeta: ``train`` 1028, ``val`` 172, ``test`` 423 characters
  (``trainval`` = 1200). The split is by alphabet, with one alphabet cut:
  ``val`` = the background alphabets Armenian, Bengali, Early_Aramaic, Hebrew
  and Mkhedruli_(Georgian); ``test`` = the evaluation alphabets Kannada, Keble,
  Malayalam, Manipuri, Mongolian, Old_Church_Slavonic_(Cyrillic), Oriya,
  Sylheti, Syriac_(Serto), Tengwar, Tibetan and ULOG plus Gurmukhi characters
  42-45; ``train`` = everything else (the other 25 background alphabets and
  7 evaluation alphabets, incl. Gurmukhi characters 01-41).
``maml``
  Finn et al. (2017), MAML: 1200 characters drawn at random (seeded) for
  ``train``, the other 423 for ``test``. MAML's own script shuffles the
  ``os.listdir`` order with Python's ``random.seed(1)``, which is not
  reproducible across machines; here the rule is explicit: take the 1623
  classes in canonical order (background then evaluation, sorted by alphabet
  then character), permute them with ``np.random.default_rng(seed)``, and the
  first 1200 of the permutation are ``train`` (kept in canonical order).

CIFAR-100 derived (class names are CIFAR-100 fine label names, as in TFDS
``cifar100``; both use all 600 images of a class, i.e. CIFAR's train+test):

``cifar_fs``
  Bertinetto et al. (2019), "Meta-learning with differentiable closed-form
  solvers": 64 / 16 / 20 classes (:data:`CIFAR_FS_CLASSES`), the class lists
  released with the paper (as shipped by torchmeta and learn2learn).
``fc100``
  Oreshkin et al. (2018), TADAM: split by CIFAR-100 *superclass*, 12 / 4 / 4
  superclasses = 60 / 20 / 20 classes (:data:`FC100_SUPERCLASSES`).

Example:
  >>> len(cifar_fs_classes("train")), len(fc100_classes("test"))
  (64, 20)
  >>> split_subsets("vinyals")
  ('train', 'val', 'test', 'trainval')
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from metajax.data.errors import UnknownSplitError

# ------------------------------------------------------------------ Omniglot
OMNIGLOT_NUM_BACKGROUND = 964
OMNIGLOT_NUM_EVALUATION = 659
OMNIGLOT_NUM_CLASSES = OMNIGLOT_NUM_BACKGROUND + OMNIGLOT_NUM_EVALUATION

VINYALS_VAL_ALPHABETS = ("Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)")
VINYALS_TEST_ALPHABETS = ("Kannada", "Keble", "Malayalam", "Manipuri", "Mongolian",
                          "Old_Church_Slavonic_(Cyrillic)", "Oriya", "Sylheti", "Syriac_(Serto)",
                          "Tengwar", "Tibetan", "ULOG")
VINYALS_TEST_CHARACTERS = tuple(f"evaluation/Gurmukhi/character{i}" for i in range(42, 46))
MAML_NUM_TRAIN = 1200

OMNIGLOT_SPLITS = {
    "lake": ("train", "test"),
    "vinyals": ("train", "val", "test", "trainval"),
    "maml": ("train", "test"),
}
_LAKE_ALIASES = {"background": "train", "evaluation": "test"}


def split_subsets(split: str) -> tuple[str, ...]:
    """The subsets of an Omniglot split (``'lake'``, ``'vinyals'``, ``'maml'``)."""
    if split not in OMNIGLOT_SPLITS:
        raise UnknownSplitError(f"unknown Omniglot split {split!r}; valid splits are "
                                f"{sorted(OMNIGLOT_SPLITS)}.")
    return OMNIGLOT_SPLITS[split]


def _check_subset(split: str, subset: str, valid: Sequence[str]) -> None:
    if subset not in valid:
        raise UnknownSplitError(f"split {split!r} has no subset {subset!r}; valid subsets are "
                                f"{list(valid)}.")


def _vinyals_subset(name: str) -> str:
    part, alphabet, _ = name.split("/")
    if part == "background":
        return "val" if alphabet in VINYALS_VAL_ALPHABETS else "train"
    if alphabet in VINYALS_TEST_ALPHABETS or name in VINYALS_TEST_CHARACTERS:
        return "test"
    return "train"


def _require_full(class_names: Sequence[str], split: str) -> None:
    parts = [n.split("/", 1)[0] for n in class_names]
    n_bg, n_ev = parts.count("background"), parts.count("evaluation")
    if (n_bg, n_ev) != (OMNIGLOT_NUM_BACKGROUND, OMNIGLOT_NUM_EVALUATION):
        raise ValueError(
            f"the {split!r} split needs full Omniglot ({OMNIGLOT_NUM_BACKGROUND} background + "
            f"{OMNIGLOT_NUM_EVALUATION} evaluation characters); this dataset has {n_bg} + {n_ev} "
            f"of {len(class_names)} classes. Load it with load_omniglot(parts=('background', "
            "'evaluation')) and split before any other selection.")


def omniglot_split_indices(class_names: Sequence[str], split: str, subset: str, *,
                           seed: int = 0) -> np.ndarray:
    """Indices (into ``class_names``, ascending) of one subset of a named Omniglot split.

    Example:
      >>> names = [f"background/A/character{i:02d}" for i in range(1, 4)]
      >>> omniglot_split_indices(names + ["evaluation/B/character01"], "lake", "test").tolist()
      [3]
    """
    valid = split_subsets(split)
    if split == "lake":
        subset = _LAKE_ALIASES.get(subset, subset)
        _check_subset(split, subset, valid)
        part = "background" if subset == "train" else "evaluation"
        idx = [i for i, n in enumerate(class_names) if n.split("/", 1)[0] == part]
        if not idx:
            raise ValueError(f"no {part!r} classes in this dataset (class names look like "
                             f"{list(class_names[:2])}); load the {part} zip.")
        return np.asarray(idx, dtype=np.int64)
    _check_subset(split, subset, valid)
    _require_full(class_names, split)
    if split == "vinyals":
        wanted = {"train", "val"} if subset == "trainval" else {subset}
        return np.asarray([i for i, n in enumerate(class_names) if _vinyals_subset(n) in wanted],
                          dtype=np.int64)
    perm = np.random.default_rng(seed).permutation(len(class_names))
    chosen = perm[:MAML_NUM_TRAIN] if subset == "train" else perm[MAML_NUM_TRAIN:]
    return np.sort(chosen).astype(np.int64)


# ----------------------------------------------------------------- CIFAR-100
CIFAR100_SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
#: The 100 fine labels in CIFAR-100's (and TFDS's) label order: alphabetical.
CIFAR100_FINE_LABELS: tuple[str, ...] = tuple(sorted(
    c for classes in CIFAR100_SUPERCLASSES.values() for c in classes))

_CIFAR_FS_VAL = ("beaver", "otter", "flatfish", "shark", "lamp", "television", "beetle",
                 "butterfly", "sea", "camel", "cattle", "crab", "crocodile", "maple_tree",
                 "motorcycle", "tractor")
_CIFAR_FS_TEST = ("whale", "poppy", "rose", "sweet_pepper", "telephone", "bed", "table",
                  "wardrobe", "leopard", "plain", "chimpanzee", "fox", "snail", "worm", "baby",
                  "man", "woman", "bicycle", "pickup_truck", "rocket")
#: CIFAR-FS class lists (Bertinetto et al. 2019), each sorted alphabetically.
CIFAR_FS_CLASSES: dict[str, tuple[str, ...]] = {
    "train": tuple(c for c in CIFAR100_FINE_LABELS
                   if c not in _CIFAR_FS_VAL and c not in _CIFAR_FS_TEST),
    "val": tuple(sorted(_CIFAR_FS_VAL)),
    "test": tuple(sorted(_CIFAR_FS_TEST)),
}
#: FC100 superclasses (Oreshkin et al. 2018; CIFAR-100 coarse ids 1-6, 9, 10, 15, 17-19 /
#: 8, 11, 13, 16 / 0, 7, 12, 14).
FC100_SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "train": ("fish", "flowers", "food_containers", "fruit_and_vegetables",
              "household_electrical_devices", "household_furniture",
              "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "reptiles", "trees",
              "vehicles_1", "vehicles_2"),
    "val": ("large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates",
            "small_mammals"),
    "test": ("aquatic_mammals", "insects", "medium_mammals", "people"),
}


def cifar_fs_classes(subset: str) -> tuple[str, ...]:
    """CIFAR-100 fine class names of a CIFAR-FS subset (``train`` 64, ``val`` 16, ``test`` 20)."""
    _check_subset("cifar_fs", subset, tuple(CIFAR_FS_CLASSES))
    return CIFAR_FS_CLASSES[subset]


def fc100_classes(subset: str) -> tuple[str, ...]:
    """CIFAR-100 fine class names of an FC100 subset (``train`` 60, ``val`` 20, ``test`` 20)."""
    _check_subset("fc100", subset, tuple(FC100_SUPERCLASSES))
    return tuple(c for sc in FC100_SUPERCLASSES[subset] for c in CIFAR100_SUPERCLASSES[sc])


CIFAR_SPLITS = {"cifar_fs": cifar_fs_classes, "fc100": fc100_classes}


def cifar_split_classes(split: str, subset: str) -> tuple[str, ...]:
    """Fine class names of ``subset`` of the CIFAR-100 split ``'cifar_fs'`` or ``'fc100'``."""
    if split not in CIFAR_SPLITS:
        raise UnknownSplitError(f"unknown CIFAR-100 split {split!r}; valid splits are "
                                f"{sorted(CIFAR_SPLITS)}.")
    return CIFAR_SPLITS[split](subset)
