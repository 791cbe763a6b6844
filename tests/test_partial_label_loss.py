"""The partial-label loss: masking, equality with nnU-Net's loss when all is annotated, normalisation, DDP, sampling."""
import math

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunetv2_fseft.losses.partial_label import PartialLabelDCBCELoss, annotation_mask

B, C, S = 3, 4, (6, 5, 4)


def _inputs(seed=0, ignore_channel=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, C, *S, generator=g, requires_grad=True)
    target = torch.rand(B, C + int(ignore_channel), *S, generator=g) > 0.6
    return logits, target


def _nnunet_loss(batch_dice, use_ignore_label=False, weight_ce=1):
    return DC_and_BCE_loss({}, {'batch_dice': batch_dice, 'do_bg': True, 'smooth': 1e-5, 'ddp': False},
                           weight_ce=weight_ce, use_ignore_label=use_ignore_label,
                           dice_class=MemoryEfficientSoftDiceLoss)


@pytest.mark.parametrize("batch_dice", [True, False])
def test_fully_annotated_equals_nnunet_dc_and_bce(batch_dice):
    logits, target = _inputs()
    ours = PartialLabelDCBCELoss(batch_dice=batch_dice)(logits, target, torch.ones(B, C, dtype=torch.bool))
    theirs = _nnunet_loss(batch_dice)(logits, target)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_fully_annotated_dice_with_ignore_label_equals_nnunet():
    # nnU-Net's BCE with an ignore label divides by voxels, not voxels x classes (it is C times the mean), so
    # only the Dice term is comparable there; ours keeps the mean
    logits, target = _inputs(ignore_channel=True)
    ours = PartialLabelDCBCELoss(weight_bce=0, use_ignore_label=True)(logits, target, torch.ones(B, C, dtype=torch.bool))
    theirs = _nnunet_loss(True, use_ignore_label=True, weight_ce=0)(logits, target)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_dice", [True, False])
def test_unannotated_class_gets_exactly_zero_gradient(batch_dice):
    logits, target = _inputs()
    annotated = torch.ones(B, C, dtype=torch.bool)
    annotated[0, 1] = annotated[2, 3] = False
    annotated[:, 2] = False  # a class no sample of the batch annotates
    PartialLabelDCBCELoss(batch_dice=batch_dice)(logits, target, annotated).backward()
    grad = logits.grad
    for b in range(B):
        for c in range(C):
            if annotated[b, c]:
                assert grad[b, c].abs().sum() > 0
            else:
                assert torch.all(grad[b, c] == 0), (b, c)


def test_deep_supervision_wrapper_passes_the_mask_to_every_scale():
    logits, target = _inputs()
    small_logits = logits[:, :, ::2, ::2, ::2]
    small_target = target[:, :, ::2, ::2, ::2]
    annotated = torch.ones(B, C, dtype=torch.bool)
    annotated[1, 0] = False
    loss = DeepSupervisionWrapper(PartialLabelDCBCELoss(), (0.6, 0.4))
    loss([logits, small_logits], [target, small_target], [annotated] * 2).backward()
    assert torch.all(logits.grad[1, 0] == 0) and logits.grad[0, 0].abs().sum() > 0


@pytest.mark.parametrize("batch_dice", [True, False])
def test_unannotated_classes_do_not_dilute_the_loss(batch_dice):
    """Normalised by the annotated classes: unannotated channels change nothing, whatever they hold."""
    logits, target = _inputs()
    kept = [0, 2]
    annotated = torch.zeros(B, C, dtype=torch.bool)
    annotated[:, kept] = True
    loss = PartialLabelDCBCELoss(batch_dice=batch_dice)
    masked = loss(logits, target, annotated)
    only_kept = loss(logits[:, kept], target[:, kept], torch.ones(B, len(kept), dtype=torch.bool))
    assert torch.allclose(masked, only_kept, rtol=1e-6)
    assert torch.allclose(masked, _nnunet_loss(batch_dice)(logits[:, kept], target[:, kept]), rtol=1e-5)


def test_matches_direct_computation_when_samples_annotate_different_classes():
    """Sample 0 annotates classes {0, 1}, samples 1 and 2 annotate {0, 3}: BCE averages the 6 annotated
    (sample, class) pairs, batch Dice pools each class over the samples annotating it and averages 3 classes."""
    logits, target = _inputs()
    annotated = torch.zeros(B, C, dtype=torch.bool)
    annotated[0, [0, 1]] = True
    annotated[1:, [0, 3]] = True
    ours = PartialLabelDCBCELoss(batch_dice=True, smooth=1e-5)(logits, target, annotated)

    p, y = torch.sigmoid(logits), target.float()
    pairs = annotated.nonzero().tolist()
    bce = sum(torch.nn.functional.binary_cross_entropy_with_logits(logits[b, c], y[b, c]) for b, c in pairs) / len(pairs)
    dices = []
    for c in (0, 1, 3):
        samples = [b for b in range(B) if annotated[b, c]]
        tp = sum((p[b, c] * y[b, c]).sum() for b in samples)
        denominator = sum(p[b, c].sum() + y[b, c].sum() for b in samples)
        dices.append((2 * tp + 1e-5) / (denominator + 1e-5))
    direct = bce - sum(dices) / 3
    assert torch.allclose(ours, direct, rtol=1e-5)


def test_ignored_voxels_get_zero_gradient():
    logits, target = _inputs(ignore_channel=True)
    PartialLabelDCBCELoss(use_ignore_label=True)(logits, target, torch.ones(B, C, dtype=torch.bool)).backward()
    ignored = target[:, -1]
    assert torch.all(logits.grad.permute(1, 0, 2, 3, 4)[:, ignored] == 0)


def test_annotation_mask_rows():
    mask = annotation_mask(["a_001", "b_001", "other"], {"a_001": [0, 2], "b_001": [1]}, 3)
    assert mask.tolist() == [[True, False, True], [False, True, False], [True, True, True]]


def test_sampling_probabilities_inverse_sqrt_of_dataset_size():
    # imported here: the DDP test's worker processes re-import this module and need not load nnU-Net's trainer
    from nnunetv2_fseft.training.multitalent import balanced_sampling_probabilities
    cases = [f"big_{i}" for i in range(9)] + [f"small_{i}" for i in range(4)]
    sources = {c: c.split("_")[0] for c in cases}
    p = balanced_sampling_probabilities(cases, sources)
    assert math.isclose(sum(p), 1.0)
    assert math.isclose(p[0] / p[-1], math.sqrt(4) / math.sqrt(9))  # per case ∝ 1/sqrt(n)
    share_big, share_small = sum(p[:9]), sum(p[9:])
    assert math.isclose(share_big / share_small, math.sqrt(9) / math.sqrt(4))  # per dataset ∝ sqrt(n)


def test_single_source_samples_uniformly():
    from nnunetv2_fseft.training.multitalent import balanced_sampling_probabilities
    assert balanced_sampling_probabilities(["a", "b", "c"], {}) is None
    assert balanced_sampling_probabilities(["a", "b"], {"a": "x", "b": "x"}) is None


# ---------------------------------------------------------------- DDP (gloo on CPU, 2 processes)

def _ddp_worker(rank, world_size, init_file, logits, target, annotated, result_file):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    # uneven split, as nnU-Net splits a global batch of 3 over 2 GPUs
    rows = [0, 1] if rank == 0 else [2]
    x = logits[rows].clone().requires_grad_(True)
    loss = PartialLabelDCBCELoss(batch_dice=True, weight_bce=0, ddp=True)(x, target[rows], annotated[rows])
    loss.backward()
    torch.save({"loss": loss.detach(), "grad": x.grad, "rows": rows}, f"{result_file}.{rank}")
    dist.destroy_process_group()


def test_ddp_batch_dice_equals_single_process_batch_dice(tmp_path):
    """Batch Dice gathered over 2 ranks (masked per sample before summing) equals the full-batch Dice; each rank's
    gradient is world_size x the full-batch gradient of its samples, which DDP's gradient averaging undoes."""
    logits, target = _inputs()
    logits = logits.detach()
    annotated = torch.ones(B, C, dtype=torch.bool)
    annotated[0, 1] = annotated[2, 3] = False
    annotated[2, 0] = False
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), logits, target, annotated, str(tmp_path / "out")),
             nprocs=2, join=True)

    full_x = logits.clone().requires_grad_(True)
    full = PartialLabelDCBCELoss(batch_dice=True, weight_bce=0, ddp=False)(full_x, target, annotated)
    full.backward()
    for rank in range(2):
        r = torch.load(tmp_path / f"out.{rank}")
        assert torch.allclose(r["loss"], full.detach(), rtol=1e-6)
        assert torch.allclose(r["grad"], 2 * full_x.grad[r["rows"]], rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------- learning from two partially labelled sources

def _toy_batch(g, n, size=12):
    """2D images showing three square 'organs' (intensities 1, 2, 3) at random places; full per-class targets."""
    images = torch.randn(n, 1, size, size, generator=g) * 0.1
    targets = torch.zeros(n, 3, size, size, dtype=torch.bool)
    for i in range(n):
        spots = torch.randperm(4, generator=g)[:3]  # three of the four quadrants, shuffled
        for c, q in enumerate(spots.tolist()):
            y0, x0 = (q // 2) * size // 2 + 1, (q % 2) * size // 2 + 1
            images[i, 0, y0:y0 + 4, x0:x0 + 4] += c + 1
            targets[i, c, y0:y0 + 4, x0:x0 + 4] = True
    return images, targets


def _train_on_two_sources(masked: bool):
    """Source A annotates classes {0, 1}, source B {0, 2}; each image shows all three. Returns the mean predicted
    probability inside each class's squares on fresh, fully labelled images."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.LeakyReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.LeakyReLU(), nn.Conv2d(8, 3, 1))
    optimizer = torch.optim.Adam(net.parameters(), 1e-2)
    loss_fn = PartialLabelDCBCELoss(batch_dice=True)
    annotated = torch.tensor([[True, True, False]] * 4 + [[True, False, True]] * 4)
    for _ in range(150):
        images, targets = _toy_batch(g, 8)
        stored = targets & annotated[:, :, None, None]  # what the label maps of the sources hold
        mask = annotated if masked else torch.ones_like(annotated)  # naive: unlabelled = background
        optimizer.zero_grad()
        loss_fn(net(images), stored, mask).backward()
        optimizer.step()
    images, targets = _toy_batch(g, 16)
    with torch.no_grad():
        p = torch.sigmoid(net(images))
    return [p[:, c][targets[:, c]].mean().item() for c in range(3)]


def test_classes_of_both_sources_are_learned_only_with_the_mask():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: extra threads only fight other processes for the cores
    try:
        masked = _train_on_two_sources(masked=True)
        naive = _train_on_two_sources(masked=False)
    finally:
        torch.set_num_threads(threads)
    assert min(masked) > 0.9, masked  # class 1 only labelled in A, class 2 only in B: both found
    # treating the other source's unlabelled organ as background contradicts the labels of half the images
    # (BCE alone would settle at p = 1/2 there; Dice lifts it to about 0.76 here): clearly less certain
    assert naive[1] < 0.85 and naive[2] < 0.85, naive
