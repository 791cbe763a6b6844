"""Atlas propagation with SimpleITK: register a labelled support onto an unlabelled scan, carry its labels over.

The registration is SimpleITK's own framework (no registration code of ours): an affine transform initialised by
image moments, Mattes mutual information (so MR and CT of any intensity scale work), two resolution levels. About
0.3 s a pair at hippocampus size. A fixed sampling seed makes the result repeatable. No torch here.
"""
from typing import List, Sequence

import numpy as np
import SimpleITK as sitk

SAMPLING_SEED = 1234


class RegistrationFailed(Exception):
    """SimpleITK could not register one pair (no overlap, flat image, ...): the caller skips that case."""


FINEST_LEVEL_VOXELS = 2e6  # a CT volume is registered on a grid shrunk to about this many voxels (time, memory)


def _nonnegative(image: sitk.Image) -> sitk.Image:
    """Moments treat intensity as mass: CT's air at -1000 HU would be negative mass, so shift the minimum to 0."""
    return image - float(sitk.GetArrayViewFromImage(image).min())


def shrink_factors(image: sitk.Image) -> list:
    """[2, 1] for small images (the hippocampus); larger images start from a proportionally coarser grid."""
    n = 1
    for size in image.GetSize():
        n *= size
    base = max(1, int(np.ceil((n / FINEST_LEVEL_VOXELS) ** (1 / image.GetDimension()))))
    return [2 * base, base]


def register_affine(fixed: sitk.Image, moving: sitk.Image) -> sitk.Transform:
    """The affine transform mapping `fixed` points into `moving` (SimpleITK's convention for resampling)."""
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    try:
        initial = sitk.CenteredTransformInitializer(_nonnegative(fixed), _nonnegative(moving),
                                                    sitk.AffineTransform(fixed.GetDimension()),
                                                    sitk.CenteredTransformInitializerFilter.MOMENTS)
        method = sitk.ImageRegistrationMethod()
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricSamplingPercentage(0.25, SAMPLING_SEED)
        method.SetInterpolator(sitk.sitkLinear)
        method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=200,
                                                        gradientMagnitudeTolerance=1e-6)
        method.SetOptimizerScalesFromPhysicalShift()
        method.SetShrinkFactorsPerLevel(shrink_factors(fixed))
        method.SetSmoothingSigmasPerLevel([1, 0])
        method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        method.SetInitialTransform(initial, inPlace=False)
        return method.Execute(fixed, moving)
    except RuntimeError as e:  # ITK's exceptions are long; keep its own first line
        raise RegistrationFailed(str(e).strip().splitlines()[-1][:200]) from None


def propagate(fixed: sitk.Image, moving: sitk.Image, moving_label: sitk.Image) -> np.ndarray:
    """The support's label map carried onto the unlabelled scan's grid (nearest neighbour), as an array."""
    transform = register_affine(fixed, moving)
    warped = sitk.Resample(moving_label, fixed, transform, sitk.sitkNearestNeighbor, 0, moving_label.GetPixelID())
    return sitk.GetArrayFromImage(warped)


def vote(label_maps: Sequence[np.ndarray], n_classes: int) -> np.ndarray:
    """Per-voxel votes (n_classes, *shape) of K propagated maps: votes[c] = how many supports say class c."""
    votes = np.zeros((n_classes, *label_maps[0].shape), dtype=np.uint8)
    for m in label_maps:
        for c in range(n_classes):
            votes[c] += m == c
    return votes


def boundary_band(label_map: np.ndarray, margin: int) -> np.ndarray:
    """Voxels within `margin` voxels of a boundary between two labels (both sides)."""
    from scipy.ndimage import grey_dilation, grey_erosion
    if margin <= 0:
        return np.zeros(label_map.shape, dtype=bool)
    size = (2 * margin + 1,) * label_map.ndim
    return grey_dilation(label_map, size=size) != grey_erosion(label_map, size=size)


def fuse(label_maps: List[np.ndarray], n_classes: int, margin: int):
    """Majority vote of the propagated maps, and where it is trusted.

    Trusted: every support agrees and the voxel is at least `margin` voxels from every propagated map's
    boundaries, since an affine registration errs most at boundaries. With K = 1 only the band is untrusted."""
    votes = vote(label_maps, n_classes)
    fused = votes.argmax(0).astype(np.uint8)
    trusted = votes.max(0) == len(label_maps)
    for m in label_maps:
        trusted &= ~boundary_band(m, margin)
    return fused, trusted
