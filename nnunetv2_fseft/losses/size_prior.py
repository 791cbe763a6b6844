"""Transductive organ-size prior (TI): L = L_seg(supports) + lambda * L_TI(S, S_hat(query)).

Source. Silva-Rodriguez, Dolz, Ben Ayed, MedIA 2025 ("constrained transductive inference"), as coded in
jusiro/fewshot-finetuning @ e3a4193: fseft/transductive/utils.py::estimate_target (the size S) and
fseft/transductive/TI_modules.py::ProportionConstraint (the penalty); defaults margin=0.3, lambda_TI=0.1
and "TI only after 50 warm-up epochs, once per epoch, on the whole query volume" come from its main_fseft.py.

Size S (estimate_class_sizes). Reference: resample each support to 1.5 mm isotropic, count the voxels of
the largest connected component; with >= 5 supports keep sizes with median - std < s < median + std
(np.std, ddof=0), then average. Here: voxel count x voxel volume (mm^3), i.e. the same physical volume
without resampling, so S does not depend on spacing. The outlier band is inclusive (|s - median| <= std)
so that identical sizes (std = 0) are kept instead of leaving nothing to average. No largest-component
step (ground-truth labels; it would halve paired structures labelled as one class). A support in which a
class is absent (partial labels, organ outside the field of view) is left out of that class's estimate.

Penalty (SizePriorLoss). Reference: r = (S - S_hat) / max(S, S_hat) with the max detached (.item());
penalty |r| - gamma if r > gamma, |r| + gamma if r < -gamma, 0 inside. Here, per image b and class c:
    L = relu((1 - gamma) S - S_hat) / max(S, S_hat).detach() + relu(S_hat - (1 + gamma) S) / max(S, S_hat).detach()
  * below the band this is exactly the reference: ((1 - gamma) S - S_hat) / S, at most 1 - gamma (S_hat = 0);
  * above it the band edge is (1 + gamma) S as specified for this project (the reference's edge is
    S / (1 - gamma), 1.43 S at gamma = 0.3), normalised by S_hat as in the reference, so L < 1 even for a
    head that paints the whole image (S_hat = 2 S gives (1 - gamma) / 2); the reference's extra +gamma
    step above the band is dropped: a constant adds no gradient and only makes L discontinuous.
  So every term lies in [0, 1), like a soft Dice loss, and L is the mean over images and prior classes.
  Its gradient is -1/S (below) or +1/S_hat (above) per mm^3: it pushes S_hat into the band.
S and S_hat are compared as physical volumes, so the query may have any spacing: S_hat = voxel volume x
sum of foreground probabilities. In nnU-Net's preprocessed space, voxel volume = prod(configuration
spacing); cropping to the non-zero region removes no foreground, so S from raw labels stays comparable.

Whole images vs patches. The formula needs S_hat of a WHOLE query image: a patch holds only part of the
organ (or none), and the part it should hold is unknown without query labels. For patch training, first
get each query image's S_hat without gradient (e.g. a sliding-window pass once per epoch, as the reference
does, summing predicted_sizes over non-overlapping tiles or over the stitched probability map), then call
the loss on a patch with image_sizes=those totals: its value is the whole-image penalty and its gradient is
the exact share of that patch (straight-through: S_hat = total.detach() + s_patch - s_patch.detach()).
"""
from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

DEFAULT_GAMMA = 0.3  # relative half-width of the allowed size band (reference: --margin 0.3)
DEFAULT_LAMBDA = 0.1  # weight of L_TI against the segmentation loss (reference: --lambda_TI 0.1)
MIN_SUPPORTS_FOR_OUTLIERS = 5


def _robust_mean(sizes: Sequence[float]) -> float:
    sizes = np.asarray(sizes, dtype=np.float64)
    if len(sizes) >= MIN_SUPPORTS_FOR_OUTLIERS:
        keep = np.abs(sizes - np.median(sizes)) <= np.std(sizes)
        sizes = sizes[keep]
    return float(sizes.mean())


def estimate_class_sizes(label_arrays_with_spacings: Iterable[Tuple[np.ndarray, Sequence[float]]],
                         classes) -> Dict:
    """Expected physical size S (mm^3) per class from the support label maps.

    label_arrays_with_spacings: (label array, voxel spacing in mm) per support; the order of the spacing
    axes does not matter (only their product is used).
    classes: label values (e.g. [1, 2]) or a dict class -> label value or list of values (nnU-Net region).
    Returns {class: S} for the classes present in at least one support; absent classes get no prior.
    """
    spec = classes if isinstance(classes, dict) else {c: c for c in classes}
    spec = {k: np.atleast_1d(np.asarray(v)) for k, v in spec.items()}
    per_class = {k: [] for k in spec}
    for labels, spacing in label_arrays_with_spacings:
        labels = np.asarray(labels)
        voxel_mm3 = float(np.prod(np.asarray(spacing, dtype=np.float64)))
        for k, values in spec.items():
            n = int(np.count_nonzero(np.isin(labels, values)))
            if n > 0:
                per_class[k].append(n * voxel_mm3)
    return {k: _robust_mean(v) for k, v in per_class.items() if v}


def sizes_tensor(sizes: Dict, class_order: Sequence) -> torch.Tensor:
    """{class: S} -> Tensor[C] in network channel order (foreground classes), NaN where there is no prior."""
    return torch.tensor([float(sizes.get(c, float("nan"))) for c in class_order], dtype=torch.float32)


class SizePriorLoss(nn.Module):
    """L_TI on query predictions; see the module docstring for the formula and its source.

    sizes_mm3: Tensor[C], expected size per foreground class (channel order; NaN or <= 0: no prior).
    nonlin: 'softmax' (nnU-Net default: C + 1 logit channels, channel 0 background), 'sigmoid' (regions:
    C channels) or None (probabilities given; C + 1 channels means channel 0 is background).
    Trainer use: loss = seg_loss + DEFAULT_LAMBDA * size_prior(query_logits, voxel_volume_mm3).
    With deep supervision pass only the full-resolution output.
    """

    def __init__(self, sizes_mm3, gamma: float = DEFAULT_GAMMA, nonlin: Optional[str] = "softmax"):
        super().__init__()
        if nonlin not in ("softmax", "sigmoid", None):
            raise ValueError(f"nonlin must be 'softmax', 'sigmoid' or None, got {nonlin!r}")
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"gamma must be in [0, 1), got {gamma}")
        sizes = torch.as_tensor(sizes_mm3, dtype=torch.float32).flatten()
        self.register_buffer("sizes_mm3", sizes)
        self.register_buffer("has_prior", torch.isfinite(sizes) & (sizes > 0))
        self.gamma = gamma
        self.nonlin = nonlin

    def _foreground_probs(self, pred: torch.Tensor) -> torch.Tensor:
        n_cls = self.sizes_mm3.numel()
        pred = pred.float()  # sums over millions of voxels overflow float16 under autocast
        if self.nonlin == "softmax":
            expected = n_cls + 1
            probs = torch.softmax(pred, 1) if pred.shape[1] == expected else None
        elif self.nonlin == "sigmoid":
            expected = n_cls
            probs = torch.sigmoid(pred) if pred.shape[1] == expected else None
        else:
            expected = f"{n_cls} or {n_cls + 1}"
            probs = pred if pred.shape[1] in (n_cls, n_cls + 1) else None
        if probs is None:
            raise ValueError(f"prediction has {pred.shape[1]} channels, expected {expected} for "
                             f"{n_cls} size priors with nonlin={self.nonlin!r}")
        return probs[:, 1:] if probs.shape[1] == n_cls + 1 else probs

    def predicted_sizes(self, pred: torch.Tensor, voxel_volume_mm3: Union[float, torch.Tensor]) -> torch.Tensor:
        """S_hat: Tensor[B, C] = voxel volume x sum of foreground probabilities of each image/patch."""
        fg = self._foreground_probs(pred)
        voxels = fg.flatten(2).sum(-1)
        vv = torch.as_tensor(voxel_volume_mm3, dtype=voxels.dtype, device=voxels.device)
        return voxels * (vv.reshape(-1, 1) if vv.ndim else vv)

    def penalty(self, sizes_hat: torch.Tensor) -> torch.Tensor:
        """Mean over images and prior classes of the band penalty for predicted sizes S_hat[B, C]."""
        valid = self.has_prior.expand_as(sizes_hat)
        if not bool(valid.any()):
            return sizes_hat.sum() * 0.0  # keeps the graph (DDP-safe) and returns 0
        s = torch.where(self.has_prior, self.sizes_mm3, torch.ones_like(self.sizes_mm3)).expand_as(sizes_hat)
        scale = torch.maximum(s, sizes_hat).detach().clamp_min(1e-6)
        below = torch.relu((1.0 - self.gamma) * s - sizes_hat)
        above = torch.relu(sizes_hat - (1.0 + self.gamma) * s)
        return ((below + above) / scale)[valid].mean()

    def forward(self, pred: torch.Tensor, voxel_volume_mm3: Union[float, torch.Tensor] = 1.0,
                image_sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """pred: logits (or probabilities if nonlin=None) [B, C(+1), *spatial] of WHOLE query images, or
        of patches when image_sizes [B, C] gives the current S_hat of the images they come from.
        voxel_volume_mm3: float or Tensor[B]."""
        s_hat = self.predicted_sizes(pred, voxel_volume_mm3)
        if image_sizes is not None:
            image_sizes = image_sizes.to(s_hat).detach()
            s_hat = image_sizes + (s_hat - s_hat.detach())  # value: whole image; gradient: this patch
        return self.penalty(s_hat)
