"""Partial-label BCE + soft Dice: the loss only sees the classes each sample's source dataset annotates.

Datasets that annotate only some organs leave the others as background. Treating that background as
"not this organ" would teach the network to miss organs that are merely unlabelled, so every
(sample, class) pair that the sample's dataset does not annotate is masked out of both terms
(MultiTalent, Ulrich et al., MICCAI 2023).

With A[b, c] = 1 if sample b annotates class c, p = sigmoid(logits), y the binary target and m an optional
voxel mask (nnU-Net's ignore label), sums over voxels v:

    BCE  = sum_{b,c} A[b,c] * sum_v m[b,v] * bce(x[b,c,v], y[b,c,v])  /  sum_{b,c} A[b,c] * sum_v m[b,v]

    batch Dice (the configuration's batch_dice in nnU-Net's plans), per class c, with the sums over samples
    taken only where A[b,c] = 1 and gathered over all DDP ranks:
        I_c = sum_b A[b,c] sum_v p y m,  P_c = sum_b A[b,c] sum_v p m,  G_c = sum_b A[b,c] sum_v y m
        dc_c = (2 I_c + smooth) / max(P_c + G_c + smooth, 1e-8)
        Dice = - sum_c a_c dc_c / sum_c a_c,   a_c = 1 if any sample of the global batch annotates c
    per-sample Dice: dc[b,c] from the per-sample sums, Dice = - sum_{b,c} A[b,c] dc[b,c] / sum_{b,c} A[b,c]

    loss = weight_bce * BCE + weight_dice * Dice

Both terms are normalised by the number of annotated classes (MultiTalent v2, where every sample gets nnU-Net's
class-averaged loss over its own dataset's classes), so a fully annotated batch gives exactly nnU-Net's
DC_and_BCE_loss (MemoryEfficientSoftDiceLoss, do_bg=True) and nnU-Net's learning rate and gradient clipping keep
their meaning. MultiTalent v1 (compute_loss in MultiTalent_Trainer_DDP.py) summed over classes instead.
"""
import torch
import torch.nn.functional as F
from torch import distributed as dist
from torch import nn


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Sum a (C,) tensor over all DDP ranks, with gradient, as nnU-Net's MemoryEfficientSoftDiceLoss does.

    nnU-Net gathers (B, C) tensors with AllGatherGrad and sums; we sum the local batch first, so ranks whose batch
    sizes differ by one (nnU-Net splits the global batch unevenly) still gather tensors of one shape."""
    from nnunetv2.utilities.ddp_allgather import AllGatherGrad
    return AllGatherGrad.apply(t).sum(0, dtype=torch.float32)


def _count_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Sum a (C,) tensor over all DDP ranks, no gradient needed (how many samples annotate each class)."""
    t = t.detach().clone().float()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class PartialLabelDCBCELoss(nn.Module):
    """BCE + soft Dice over annotated (sample, class) pairs only. DO NOT apply a nonlinearity in the network.

    forward(logits (B, C, *spatial), target (B, C[+1], *spatial) one-hot regions as nnU-Net's region transforms make
    them (last channel = ignore mask if use_ignore_label), annotated (B, C) bool) -> scalar loss.
    """

    def __init__(self, batch_dice: bool = True, smooth: float = 1e-5, weight_bce: float = 1.0,
                 weight_dice: float = 1.0, use_ignore_label: bool = False, ddp: bool = False):
        super().__init__()
        self.batch_dice = batch_dice
        self.smooth = smooth
        self.weight_bce = weight_bce
        self.weight_dice = weight_dice
        self.use_ignore_label = use_ignore_label
        self.ddp = ddp

    def forward(self, logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
        if self.use_ignore_label:
            # nnU-Net puts the ignore label into the last target channel; True there means "not annotated voxel"
            voxel_mask = (~target[:, -1:].bool()).float()
            target = target[:, :-1]
        else:
            voxel_mask = None
        if annotated.shape != logits.shape[:2]:
            raise ValueError(f"annotated mask must be (batch, classes) = {tuple(logits.shape[:2])}, "
                             f"got {tuple(annotated.shape)}")
        a = annotated.to(device=logits.device, dtype=torch.float32)
        y = target.float()
        axes = tuple(range(2, logits.ndim))
        bce = self._bce(logits, y, a, voxel_mask, axes) if self.weight_bce != 0 else 0
        dice = self._dice(torch.sigmoid(logits), y, a, voxel_mask, axes) if self.weight_dice != 0 else 0
        return self.weight_bce * bce + self.weight_dice * dice

    @staticmethod
    def _bce(logits, y, a, voxel_mask, axes):
        per_voxel = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        if voxel_mask is not None:
            per_voxel = per_voxel * voxel_mask
            voxels = voxel_mask.sum(axes)  # (B, 1): annotated voxels per sample
        else:
            voxels = torch.full_like(a[:, :1], float(per_voxel[0, 0].numel()))
        summed = per_voxel.sum(axes, dtype=torch.float32)  # (B, C)
        return (summed * a).sum() / torch.clip((voxels * a).sum(), min=1e-8)

    def _dice(self, p, y, a, voxel_mask, axes):
        with torch.no_grad():
            gt = y if voxel_mask is None else y * voxel_mask
            sum_gt = gt.sum(axes, dtype=torch.float32) * a
        p_masked = p if voxel_mask is None else p * voxel_mask
        # masking per sample (times a) before any sum over the batch: an unannotated pair contributes nothing and
        # gets exactly zero gradient
        intersect = (p_masked * gt).sum(axes, dtype=torch.float32) * a
        sum_pred = p_masked.sum(axes, dtype=torch.float32) * a

        if not self.batch_dice:
            dc = (2 * intersect + self.smooth) / (sum_gt + sum_pred + self.smooth).clamp_min(1e-8)
            return -(dc * a).sum() / torch.clip(a.sum(), min=1)

        intersect, sum_pred, sum_gt, n_annotated = (intersect.sum(0), sum_pred.sum(0), sum_gt.sum(0), a.sum(0))
        if self.ddp and dist.is_available() and dist.is_initialized():
            intersect, sum_pred = _sum_over_ranks(intersect), _sum_over_ranks(sum_pred)
            sum_gt, n_annotated = _count_over_ranks(sum_gt), _count_over_ranks(n_annotated)
        dc = (2 * intersect + self.smooth) / (sum_gt + sum_pred + self.smooth).clamp_min(1e-8)
        class_seen = (n_annotated > 0).float()
        return -(dc * class_seen).sum() / torch.clip(class_seen.sum(), min=1)


def annotation_mask(case_ids, annotated_by_case: dict, num_classes: int) -> torch.Tensor:
    """(B, C) bool mask for a batch: row b is annotated_by_case[case_ids[b]]; a case not listed annotates all."""
    rows = []
    for case in case_ids:
        channels = annotated_by_case.get(str(case))
        row = torch.ones(num_classes, dtype=torch.bool) if channels is None else torch.zeros(num_classes, dtype=torch.bool)
        if channels is not None:
            row[list(channels)] = True
        rows.append(row)
    return torch.stack(rows)

