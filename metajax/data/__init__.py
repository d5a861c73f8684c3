"""Task distributions and few-shot datasets, sampled on device."""

from metajax.data.sinusoid import (SinusoidParams, sample_sinusoid_params, sample_sinusoid_tasks,
                                   sinusoid_tasks_from_params)
