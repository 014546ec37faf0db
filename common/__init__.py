"""Shared library of the Maennel et al. (NeurIPS 2020) reproduction: data, models, training,
run cache, alignment linear algebra and first-layer transfer. See README.md."""
from .alignment import (aligned_part, eigh_desc, extract_patches, filter_matrix, misalignment,
                        misalignment_floor, patch_covariance, random_orthonormal_basis,
                        second_moment, transfer_function, weight_covariance)
from .cache import cached_run
from .data import (Cifar10, DeviceLoader, disjoint_split, fake_cifar10, load_cifar10, load_data,
                   random_labels, standardize, standardized)
from .models import (classifier, first_layer, replace_classifier, two_layer_cnn, two_layer_fc,
                     vgg16, wrn)
from .report import Claims, pick, resolve_preset, save_figure
from .train import device, evaluate, train
from .transfer import (gaussian_resample, layerwise_covariance_transfer, rescale_to_reference,
                       sample_gaussian, transplant)
