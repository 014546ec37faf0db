"""Shared library of the Maennel et al. (NeurIPS 2020) reproduction: data, models, training,
run cache, probes, alignment linear algebra and first-layer transfer. See README.md and docs/."""

from .alignment import (
    aligned_part,
    eigh_desc,
    extract_patches,
    filter_matrix,
    misalignment,
    misalignment_floor,
    patch_covariance,
    random_orthonormal_basis,
    second_moment,
    transfer_function,
    weight_covariance,
)
from .budget import BudgetExceeded, Plan
from .cache import cached_run, keyed, run_key
from .data import (
    Cifar10,
    DeviceLoader,
    disjoint_split,
    fake_cifar10,
    load_cifar10,
    load_data,
    per_image_standardize,
    random_labels,
    standardize,
    standardized,
)
from .models import (
    ModelSpec,
    classifier,
    first_layer,
    replace_classifier,
    spec,
    two_layer_cnn,
    two_layer_fc,
    vgg16,
    wrn,
)
from .probes import FirstLayerFilters, FirstLayerMisalignment, FirstLayerSecondMoment, ReluActivity
from .report import Claims, Notebook, paired_mean, resolve_preset
from .stacked import train_stacked
from .train import cached_train, cached_train_many, device, evaluate, keep_freed_memory, reproducible, train
from .transfer import (
    LayerVariant,
    Variant,
    covariance_init,
    gaussian_resample,
    layerwise_covariance_transfer,
    random_eigenbasis_init,
    rescale_to_reference,
    sample_gaussian,
    transplant,
)
