"""Moving first-layer statistics from an upstream network to a downstream one (docs/protocol.md,
"Gaussian approximation", "Rescaling", "Layer-wise transfer").

Bias policies (docs/protocol.md, "Biases"): ``"zero"`` sets transferred biases to 0, ``"keep"``
carries them over as trained, ``"scale"`` multiplies them by the same factor as the weights.
Default ``"zero"``: trained biases next to weights shrunk back to a tiny norm wreck the start.
"""

from __future__ import annotations

import copy
from typing import Iterable, Optional

import torch
from torch import nn

from .alignment import (
    eigh_desc,
    filter_matrix,
    patch_covariance,
    random_orthonormal_basis,
    second_moment,
    transfer_function,
    weight_covariance,
)

BIAS_POLICIES = ("zero", "keep", "scale")


def _check_bias(bias: str) -> None:
    if bias not in BIAS_POLICIES:
        raise ValueError(f"bias policy must be one of {BIAS_POLICIES}, got {bias!r}")


def weight_layers(model: nn.Module) -> list:
    """Names of every Conv2d and Linear module, in order."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@torch.no_grad()
def rescale_to_reference(
    model: nn.Module, reference_state: dict, layers: Optional[Iterable[str]] = None, bias: str = "zero"
) -> dict:
    """Scale each layer's weight tensor to the Frobenius norm it has in ``reference_state``
    (normally the same run's ``state_dict()`` at initialisation; per layer, docs/protocol.md "Rescaling").

    ``layers``: module names (default: every Conv2d/Linear). Biases follow ``bias``. Changes the
    model in place and returns ``{layer: factor}``.
    """
    _check_bias(bias)
    factors = {}
    for name in weight_layers(model) if layers is None else layers:
        mod = model.get_submodule(name)
        ref = reference_state[f"{name}.weight"].to(mod.weight.device, torch.float64)
        factor = (ref.norm() / mod.weight.to(torch.float64).norm()).item()
        mod.weight.mul_(factor)
        if mod.bias is not None:
            if bias == "zero":
                mod.bias.zero_()
            elif bias == "scale":
                mod.bias.mul_(factor)
        factors[name] = factor
    return factors


def gaussian_resample(W: torch.Tensor, m: int, generator: torch.Generator, centered: bool = False) -> torch.Tensor:
    """``m`` new filters i.i.d. from the Gaussian fitted to the rows of ``W (m0, d)``.

    ``centered=False``: N(0, S) with S = ``W^T W / m0`` (mean 0, the paper's choice).
    ``centered=True``: N(mean, C) with C the ``1/(m0-1)`` covariance (an ablation). Sampling
    goes through ``eigh`` with negative eigenvalues clipped to 0. Returns ``(m, d)`` in W's dtype.
    """
    W64 = torch.as_tensor(W).to(torch.float64).cpu()
    mean = W64.mean(0) if centered else None
    return sample_gaussian(weight_covariance(W64, centered=centered), m, generator, mean).to(W.dtype)


def sample_gaussian(cov, m: int, generator: torch.Generator, mean=None) -> torch.Tensor:
    """``m`` draws from N(mean, cov): ``(m, d) float64``. ``cov (d, d)`` symmetric PSD (negative
    eigenvalues from round-off are clipped to 0)."""
    vals, vecs = eigh_desc(cov)
    root = vecs * vals.clamp_min(0).sqrt()[None, :]
    z = torch.randn(m, root.shape[0], generator=generator, dtype=torch.float64)
    out = z @ root.T
    return out if mean is None else out + torch.as_tensor(mean, dtype=torch.float64)


@torch.no_grad()
def set_filters(layer: nn.Module, W: torch.Tensor, bias_zero: bool = True) -> None:
    """Write ``W (m, d)`` into a Conv2d/Linear weight (reshaped in ``(C, kh, kw)`` order)."""
    layer.weight.copy_(torch.as_tensor(W).reshape(layer.weight.shape).to(layer.weight))
    if bias_zero and layer.bias is not None:
        layer.bias.zero_()


@torch.no_grad()
def transplant(
    source: nn.Module,
    target: nn.Module,
    layers: Iterable[str],
    reference_state: Optional[dict] = None,
    bias: str = "zero",
) -> None:
    """Copy the named layers' weights and biases from ``source`` into ``target`` (in place).

    With ``reference_state`` (the source's state at initialisation) each copied weight is rescaled
    to its reference norm ("Rescaling"); without it the weights are copied as trained. Biases follow
    ``bias`` ("scale" needs ``reference_state``).
    """
    _check_bias(bias)
    if bias == "scale" and reference_state is None:
        raise ValueError("bias='scale' needs reference_state")
    layers = list(layers)
    for name in layers:
        src, dst = source.get_submodule(name), target.get_submodule(name)
        dst.weight.copy_(src.weight)
        if dst.bias is not None:
            dst.bias.copy_(src.bias)
            if bias == "zero" and reference_state is None:
                dst.bias.zero_()
    if reference_state is not None:
        rescale_to_reference(target, reference_state, layers, bias)


def _conv_indices(model: nn.Module) -> list:
    feats = getattr(model, "features", None)
    if not isinstance(feats, nn.Sequential):
        raise TypeError(
            "layerwise_covariance_transfer needs a model with a `features` nn.Sequential of conv layers (e.g. vgg16)"
        )
    return [i for i, m in enumerate(feats) if isinstance(m, nn.Conv2d)]


@torch.no_grad()
def _layer_input(model: nn.Module, idx: int, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([model.features[:idx](x[s : s + batch]) for s in range(0, len(x), batch)])


def _input_covariance(a: torch.Tensor, k: int) -> torch.Tensor:
    """Patch covariance of the layer inputs ``a (N, C, H, W)``, summed over chunks of images whose float64 patch
    matrix stays near 256 MB (one chunk of 1,000 images of 64 channels at 32 x 32 would take 4 GB)."""
    n, c, h, w = a.shape
    per_image = (h - k + 1) * (w - k + 1) * c * k * k
    return patch_covariance(a, k, chunk=max(1, 2**25 // per_image))


@torch.no_grad()
def layerwise_covariance_transfer(
    pretrained: nn.Module,
    fresh: nn.Module,
    probe_images: torch.Tensor,
    n_layers: int,
    generator: torch.Generator,
    rescale: bool = True,
) -> list:
    """Our reading of the paper's Section 2.5 (docs/protocol.md, "Layer-wise transfer"): initialise
    the first ``n_layers`` conv
    layers of ``fresh`` layer by layer from the eigenvalue mapping of ``pretrained``.

    For layer l: take the inputs of layer l in ``pretrained`` on ``probe_images (N, 3, H, W)``,
    decompose their patch covariance (eigenpairs ``lambda_i^P, v_i^P``, descending) and read off
    ``tau_i = sqrt(v_i^P^T S_P v_i^P)`` (S_P the second moment of P's layer-l filters). Then take
    the inputs of layer l in ``fresh`` (whose layers < l are already re-sampled), decompose their
    patch covariance (``v_i^N``), and draw the layer-l filters i.i.d. from
    ``N(0, sum_i tau_i^2 v_i^N v_i^N^T)``; bias 0; with ``rescale`` the sampled layer gets the
    Frobenius norm ``fresh``'s layer had before. Both models must be ``features``-Sequential
    conv stacks (vgg16). Changes ``fresh`` in place; returns per-layer ``{"tau", "lambda_P",
    "lambda_N"}`` (float64 tensors).
    """
    idx_p, idx_n = _conv_indices(pretrained), _conv_indices(fresh)
    info = []
    for l in range(n_layers):
        conv_p, conv_n = pretrained.features[idx_p[l]], fresh.features[idx_n[l]]
        k = conv_p.kernel_size[0]
        a_p = _layer_input(pretrained, idx_p[l], probe_images)
        lam_p, v_p = eigh_desc(_input_covariance(a_p, k))
        tau = transfer_function(second_moment(filter_matrix(conv_p)), v_p)
        a_n = a_p if l == 0 else _layer_input(fresh, idx_n[l], probe_images)
        lam_n, v_n = eigh_desc(_input_covariance(a_n, k))
        target = (v_n * tau**2) @ v_n.T
        old_norm = conv_n.weight.norm()
        W = sample_gaussian(target, conv_n.out_channels, generator)
        set_filters(conv_n, W)
        if rescale:
            conv_n.weight.mul_(old_norm / conv_n.weight.norm())
        info.append({"tau": tau, "lambda_P": lam_p, "lambda_N": lam_n})
    return info


@torch.no_grad()
def covariance_init(layer: nn.Module, source_filters: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Figure 5 "covariance": replace ``layer``'s ``m`` filters by i.i.d. draws from N(0, S), S the
    second moment ``W^T W / m0`` of ``source_filters (m0, d)`` (the rescaled pretrained filters);
    bias 0 (docs/protocol.md, "Gaussian approximation"). Returns the new ``(m, d) float64`` filters."""
    W = gaussian_resample(torch.as_tensor(source_filters, dtype=torch.float64), layer.weight.shape[0], generator)
    set_filters(layer, W)
    return W


@torch.no_grad()
def random_eigenbasis_init(
    layer: nn.Module, source_filters: torch.Tensor, generator: torch.Generator, basis_seed: int
) -> torch.Tensor:
    """The control for :func:`covariance_init`: draws from N(0, Q diag(s) Q^T), with ``s`` the
    eigenvalues of the second moment of ``source_filters (m0, d)`` and ``Q`` a Haar-random basis
    (seed ``basis_seed``): the same spectrum without the alignment. Bias 0. Returns ``(m, d)``."""
    vals, _ = eigh_desc(second_moment(torch.as_tensor(source_filters, dtype=torch.float64)))
    Q = random_orthonormal_basis(len(vals), seed=basis_seed)
    W = sample_gaussian((Q * vals) @ Q.T, layer.weight.shape[0], generator)
    set_filters(layer, W)
    return W


def _upstream_network(model: nn.Module, trained: dict) -> nn.Module:
    """A copy of ``model`` holding the upstream run's ``trained`` state dict, but for tensors of another shape (the
    upstream head may have another number of classes: it is never copied)."""
    source = copy.deepcopy(model)
    own = source.state_dict()
    source.load_state_dict({k: v for k, v in trained.items() if k in own and own[k].shape == v.shape}, strict=False)
    return source


class Variant:
    """A downstream initialisation of Figure 5, applied to a freshly built network.

    ``upstream`` is the cached upstream run (its states ``"init"`` and ``"trained"``; see
    :func:`common.train.cached_train`), ``seed`` seeds the Gaussian sampling. Names:

    - ``"pretrained"``: the first layer copied, rescaled to its initial norm, bias 0;
    - ``"no rescaling"``: the first layer copied as trained, bias as trained;
    - ``"covariance"``: :func:`covariance_init` from the rescaled pretrained first layer;
    - ``"pretrained + FC"``: every layer but the head copied and rescaled, biases 0;
    - ``"pretrained, bias kept"``: as "pretrained" with the trained bias next to the rescaled weights;
    - ``"random-eigenbasis Gaussian"``: :func:`random_eigenbasis_init` from the rescaled first layer;
    - ``"all but head"``: every layer but the head copied as trained, biases as trained (Figure 1);
    - ``"all but head, rescaled"``: every layer but the head copied, each weight tensor rescaled to
      its initial norm, biases 0 (Figure 1: "even after accounting for weight scaling").

    Every other layer keeps the fresh network's init; the head is always fresh. ``key()`` names the
    upstream run by its cache hash, so a downstream run's key changes whenever its upstream does.
    """

    NAMES = (
        "pretrained",
        "no rescaling",
        "covariance",
        "pretrained + FC",
        "pretrained, bias kept",
        "random-eigenbasis Gaussian",
        "all but head",
        "all but head, rescaled",
    )

    def __init__(self, name: str, upstream, seed: int):
        if name not in self.NAMES:
            raise ValueError(f"unknown variant {name!r}; one of {self.NAMES}")
        self.name, self.upstream, self.seed = name, upstream, seed

    def key(self) -> dict:
        return {"variant": self.name, "seed": self.seed, "upstream": self.upstream.hash}

    @torch.no_grad()
    def apply(self, model: nn.Module) -> nn.Module:
        init = self.upstream.states["init"]
        source = _upstream_network(model, self.upstream.states["trained"])
        first = type(model).FIRST
        if self.name == "no rescaling":
            transplant(source, model, [first], bias="keep")
        elif self.name == "pretrained":
            transplant(source, model, [first], reference_state=init, bias="zero")
        elif self.name == "pretrained, bias kept":
            transplant(source, model, [first], reference_state=init, bias="keep")
        elif self.name in ("pretrained + FC", "all but head, rescaled"):
            layers = [n for n in weight_layers(model) if n != type(model).HEAD]
            transplant(source, model, layers, reference_state=init, bias="zero")
        elif self.name == "all but head":
            layers = [n for n in weight_layers(model) if n != type(model).HEAD]
            transplant(source, model, layers, bias="keep")
        else:
            rescale_to_reference(source, init, [first], bias="zero")
            W = filter_matrix(source.get_submodule(first))
            g = torch.Generator().manual_seed(20_000 + self.seed)
            if self.name == "covariance":
                covariance_init(model.get_submodule(first), W, g)
            else:
                random_eigenbasis_init(model.get_submodule(first), W, g, basis_seed=30_000 + self.seed)
        return model


class LayerVariant:
    """A downstream initialisation of Section 2.5, transferring more layers (docs/protocol.md, "Layer-wise
    transfer"): the first ``n_layers`` conv layers of a fresh network with a ``features`` stack of conv layers
    (vgg16) come from the upstream run ``upstream`` (its states ``"init"`` and ``"trained"``); every other layer
    keeps the fresh init and the head is fresh. Kinds:

    - ``"pretrained"``: those layers copied, each rescaled to its initial norm, biases 0 (for one layer the same as
      ``Variant("pretrained")``);
    - ``"covariance"``: :func:`layerwise_covariance_transfer` from the upstream network with those layers rescaled
      to their initial norms and biases 0 (the network that "pretrained" copies from), through ``probe_images
      (N, 3, H, W)``; biases 0, each sampled layer rescaled to the fresh layer's norm, sampling seeded by ``seed``.
      Computed on the probe images' device; the model is returned where it was.

    ``key()`` names the upstream run by its cache hash and, for "covariance", the probe images by their
    fingerprint.
    """

    KINDS = ("pretrained", "covariance")

    def __init__(self, kind: str, n_layers: int, upstream, seed: int, probe_images: Optional[torch.Tensor] = None):
        if kind not in self.KINDS:
            raise ValueError(f"unknown kind {kind!r}; one of {self.KINDS}")
        if n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, got {n_layers}")
        if kind == "covariance" and probe_images is None:
            raise ValueError("kind 'covariance' needs probe_images (N, 3, H, W): the layers' inputs come from them")
        self.kind, self.n_layers, self.upstream, self.seed = kind, n_layers, upstream, seed
        self.probe_images = probe_images

    def key(self) -> dict:
        key = {"variant": self.kind, "n_layers": self.n_layers, "seed": self.seed, "upstream": self.upstream.hash}
        if self.kind == "covariance":
            key["probe"] = self.probe_images
        return key

    @torch.no_grad()
    def apply(self, model: nn.Module) -> nn.Module:
        convs = [f"features.{i}" for i in _conv_indices(model)]
        if self.n_layers > len(convs):
            raise ValueError(f"the network has {len(convs)} conv layers; cannot transfer {self.n_layers}")
        convs = convs[: self.n_layers]
        init = self.upstream.states["init"]
        source = _upstream_network(model, self.upstream.states["trained"])
        if self.kind == "pretrained":
            transplant(source, model, convs, reference_state=init, bias="zero")
            return model
        rescale_to_reference(source, init, convs, bias="zero")
        home, dev = next(model.parameters()).device, self.probe_images.device
        g = torch.Generator().manual_seed(40_000 + self.seed)
        layerwise_covariance_transfer(source.to(dev), model.to(dev), self.probe_images, self.n_layers, g)
        return model.to(home)
