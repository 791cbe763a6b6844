"""Transductive size prior: physical size estimate, outlier rule, band penalty, gradient direction, patches."""
import math

import numpy as np
import pytest
import torch

from nnunetv2_fseft.losses.size_prior import SizePriorLoss, estimate_class_sizes, sizes_tensor


def ball(radius_mm, spacing, label=1, extent_mm=48.0):
    """A ball of the given physical radius rasterised on a grid with the given spacing (z, y, x in mm)."""
    axes = [(np.arange(int(extent_mm / s)) + 0.5) * s - extent_mm / 2 for s in spacing]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    return ((z ** 2 + y ** 2 + x ** 2) <= radius_mm ** 2).astype(np.uint8) * label


def n_voxels(n, total=4000, label=1):
    arr = np.zeros(total, np.uint8)
    arr[:n] = label
    return arr


def test_size_is_physical_and_spacing_independent():
    true = 4 / 3 * math.pi * 12 ** 3
    s = {sp: estimate_class_sizes([(ball(12, sp), sp)], [1])[1] for sp in [(1, 1, 1), (2, 2, 2), (3, 1.5, 1.5)]}
    for sp, v in s.items():
        assert v == pytest.approx(true, rel=0.06), sp  # voxelisation error only
    assert s[(1, 1, 1)] == pytest.approx(s[(2, 2, 2)], rel=0.06)


def test_outlier_rule_needs_five_supports_and_absent_classes_get_no_prior():
    four = [(n_voxels(100), (1, 1, 1))] * 3 + [(n_voxels(1000), (1, 1, 1))]
    assert estimate_class_sizes(four, [1])[1] == pytest.approx((3 * 100 + 1000) / 4)  # plain mean
    five = [(n_voxels(n), (1, 1, 1)) for n in (90, 100, 110, 105, 1000)]
    assert estimate_class_sizes(five, [1])[1] == pytest.approx((90 + 100 + 110 + 105) / 4)  # 1000 dropped
    same = [(n_voxels(100), (2, 1, 1))] * 5  # std 0: keep all
    assert estimate_class_sizes(same, [1])[1] == pytest.approx(200.0)
    two_classes = [(np.concatenate([n_voxels(10, 100, 1), n_voxels(20, 100, 2)]), (1, 1, 1)),
                   (n_voxels(30, 100, 1), (1, 1, 1))]  # class 2 absent from the second support
    sizes = estimate_class_sizes(two_classes, {"a": 1, "b": 2, "ab": [1, 2], "missing": 3})
    assert sizes == {"a": 20.0, "b": 20.0, "ab": 30.0}
    assert torch.isnan(sizes_tensor(sizes, ["a", "missing"])[1])


def probs_with_size(size_mm3, n=1000, voxel=1.0):
    """[1, 2, n] probabilities (background, foreground) whose foreground sums to size_mm3 / voxel."""
    p = torch.full((1, 1, n), size_mm3 / voxel / n)
    return torch.cat([1 - p, p], 1)


def test_zero_inside_band_and_order_one_outside():
    loss = SizePriorLoss(torch.tensor([500.0]), gamma=0.3, nonlin=None)
    for s_hat in (350.0, 400.0, 500.0, 600.0, 650.0):
        assert loss(probs_with_size(s_hat)).item() == pytest.approx(0.0, abs=1e-6), s_hat
    assert loss(probs_with_size(0.0)).item() == pytest.approx(0.7)  # 100% too small
    assert loss(probs_with_size(1000.0)).item() == pytest.approx(0.35)  # 100% too large
    assert loss(probs_with_size(1000.0, voxel=2.0), voxel_volume_mm3=2.0).item() == pytest.approx(0.35)
    assert 0 < loss(probs_with_size(1000.0 - 1e-3, n=1000)).item() < 1


@pytest.mark.parametrize("start,direction", [(50.0, +1), (900.0, -1)])
def test_gradient_pushes_size_into_the_band(start, direction):
    target = torch.tensor([300.0])
    loss = SizePriorLoss(target, nonlin="sigmoid")
    p0 = start / 1000
    logits = torch.full((1, 1, 10, 10, 10), math.log(p0 / (1 - p0)), requires_grad=True)
    value = loss(logits, 1.0)
    assert value.item() > 0
    value.backward()
    with torch.no_grad():
        stepped = logits - 50.0 * logits.grad
        before, after = (loss.predicted_sizes(t, 1.0).item() for t in (logits, stepped))
    assert (after - before) * direction > 0
    assert abs(after - 300) < abs(before - 300)


def test_only_classes_with_a_prior_contribute():
    logits = torch.randn(2, 3, 6, 6, 6, requires_grad=True)
    both = SizePriorLoss(torch.tensor([10.0, 1e6, float("nan")]), nonlin="sigmoid")
    only_first = SizePriorLoss(torch.tensor([10.0, float("nan"), 0.0]), nonlin="sigmoid")
    first = SizePriorLoss(torch.tensor([10.0]), nonlin="sigmoid")
    v = only_first(logits, 1.0)
    assert v.item() == pytest.approx(first(logits[:, :1], 1.0).item())
    second = SizePriorLoss(torch.tensor([1e6]), nonlin="sigmoid")(logits[:, 1:2], 1.0)
    assert both(logits, 1.0).item() == pytest.approx((v.item() + second.item()) / 2)  # mean over prior classes
    v.backward()
    assert logits.grad[:, 1:].abs().sum() == 0 and logits.grad[:, 0].abs().sum() > 0
    none = SizePriorLoss(torch.tensor([float("nan")]), nonlin="softmax")
    z = none(torch.randn(1, 2, 4, 4, 4, requires_grad=True))
    assert z.item() == 0.0 and z.requires_grad


def test_softmax_channels_and_per_image_voxel_volume():
    loss = SizePriorLoss(torch.tensor([100.0, 100.0]), nonlin="softmax")
    with pytest.raises(ValueError, match="channels"):
        loss(torch.randn(1, 2, 4, 4, 4))
    logits = torch.zeros(2, 3, 4, 4, 4)  # each class gets 1/3 of 64 voxels
    sizes = loss.predicted_sizes(logits, torch.tensor([1.0, 8.0]))
    assert torch.allclose(sizes, torch.tensor([[64 / 3] * 2, [8 * 64 / 3] * 2]))


def test_patches_use_the_whole_image_size_and_share_its_gradient():
    loss = SizePriorLoss(torch.tensor([40.0]), nonlin="sigmoid")
    whole = torch.randn(1, 1, 8, 8, 8, requires_grad=True)
    loss(whole, 1.0).backward()
    halves = whole.detach().clone().requires_grad_(True)
    with torch.no_grad():
        total = loss.predicted_sizes(halves, 1.0)
    values = [loss(halves[..., sl], 1.0, image_sizes=total) for sl in (slice(0, 4), slice(4, 8))]
    assert values[0].item() == pytest.approx(loss(whole, 1.0).item())
    sum(values).backward()
    assert torch.allclose(halves.grad, whole.grad, atol=1e-7)
