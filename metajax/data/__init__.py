"""Task distributions and few-shot datasets, sampled on device."""

from metajax.data.sinusoid import (SinusoidParams, sample_sinusoid_params, sample_sinusoid_tasks,
                                   sinusoid_tasks_from_params)
from metajax.data.class_dataset import ClassDataset
from metajax.data.episodes import (EpisodeIndices, EpisodeSampler, EpisodeSpec,
                                   class_splitter, gather_episodes, normalize_images,
                                   pack_image_rows, sample_episode_indices, sample_episodes,
                                   sample_without_replacement)
from metajax.data.errors import (CacheError, CorruptDatasetError, DatasetNotFoundError,
                                 EpisodeConfigError, UnknownSplitError)
from metajax.data.miniimagenet import load_miniimagenet
from metajax.data.omniglot import load_omniglot, omniglot_split
from metajax.data.tfds_source import (load_cifar_fs, load_fc100, load_omniglot_tfds,
                                      tfds_class_dataset)
from metajax.data.splits import (CIFAR_FS_CLASSES, FC100_SUPERCLASSES, cifar_fs_classes,
                                 fc100_classes, omniglot_split_indices)
