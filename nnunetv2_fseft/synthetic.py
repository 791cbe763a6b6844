"""CT-like phantoms written as nnU-Net raw datasets: for tests and the demo (no real data needed).

Every case shows the whole anatomy (all organs), but its label map holds only the classes the dataset
annotates: exactly the partial-label situation of public datasets.

Intensities follow contrast-enhanced (portal-venous) CT, the phase of most public abdominal datasets: the spleen
enhances more than the liver, the kidneys most, the pancreas a little less than the liver. Relative sizes are
roughly those of an adult (liver : spleen : one kidney about 10 : 1.5 : 1). Each organ differs from its
neighbours by at least 15 HU against 15 HU of voxel noise, so position and shape still matter, but no organ
is invisible.
"""
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

# organ -> (centre as a fraction of the volume (z, y, x), radii as a fraction, mean HU)
ORGANS = {
    "liver": ((0.45, 0.45, 0.30), (0.22, 0.22, 0.20), 100.0),
    "spleen": ((0.45, 0.45, 0.76), (0.12, 0.12, 0.10), 125.0),
    "kidney_left": ((0.62, 0.62, 0.72), (0.12, 0.09, 0.09), 180.0),
    "kidney_right": ((0.62, 0.62, 0.28), (0.12, 0.09, 0.09), 180.0),
    "pancreas": ((0.55, 0.48, 0.52), (0.06, 0.06, 0.14), 85.0),
}
BODY_HU, AIR_HU, NOISE_HU = 0.0, -1000.0, 15.0


def _ellipsoid(shape, centre, radii) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    r2 = sum(((g - c * s) / (r * s)) ** 2 for g, c, r, s in zip(grid, centre, radii, shape))
    return r2 <= 1.0


def phantom(shape, rng: np.random.Generator, intensity_shift: float = 0.0):
    """One subject: (CT-like image, {organ: binary mask}). Organs jitter in place, size and brightness."""
    image = np.full(shape, AIR_HU, dtype=np.float32)
    image[_ellipsoid(shape, (0.5, 0.5, 0.5), (0.48, 0.45, 0.48))] = BODY_HU
    masks = {}
    for organ, (centre, radii, hu) in ORGANS.items():
        c = np.array(centre) + rng.normal(0, 0.02, 3)
        r = np.array(radii) * rng.uniform(0.85, 1.15, 3)
        mask = _ellipsoid(shape, c, r) & ~np.any(list(masks.values()) or [np.zeros(shape, bool)], axis=0)
        image[mask] = hu + intensity_shift + rng.normal(0, 5)
        masks[organ] = mask
    image += rng.normal(0, NOISE_HU, shape).astype(np.float32)
    return image, masks


def write_phantom_dataset(raw_root, dataset_id: int, name: str, classes, n_cases: int, shape=(32, 32, 32),
                          spacing=(1.5, 1.5, 1.5), seed: int = 0, intensity_shift: float = 0.0) -> Path:
    """Write Dataset{id:03d}_{name} into raw_root with labels for `classes` only (in that order)."""
    unknown = [c for c in classes if c not in ORGANS]
    if unknown:
        raise ValueError(f"unknown phantom organ(s) {unknown}; available: {sorted(ORGANS)}")
    folder = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n_cases):
        image, masks = phantom(shape, rng, intensity_shift)
        label = np.zeros(shape, dtype=np.uint8)
        for value, organ in enumerate(classes, start=1):
            label[masks[organ]] = value
        case = f"{name.lower()}_{i:03d}"
        for array, path in ((image, folder / "imagesTr" / f"{case}_0000.nii.gz"),
                            (label, folder / "labelsTr" / f"{case}.nii.gz")):
            img = sitk.GetImageFromArray(array)
            img.SetSpacing(tuple(float(s) for s in spacing[::-1]))
            sitk.WriteImage(img, str(path))
    dataset_json = {"channel_names": {"0": "CT"},
                    "labels": {"background": 0, **{c: v for v, c in enumerate(classes, start=1)}},
                    "numTraining": n_cases, "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return folder
