"""Label map -> tissue map: the organs as labelled, inside a body built around them. No torch here.

Arrays are indexed (x, y, z) as torchio holds them. Orientation is read from the anatomy where it can be: the
posterior side is where the kidneys lie relative to the organs' centre (else lower y), the caudal side is below the
kidneys' centre. The label map itself is never written to: every step works on copies.

Painted, later steps never overwriting an organ:
  air outside an elliptical body per axial slice (fitted around organs + spine, smoothed along z);
  subcutaneous fat, an abdominal muscle wall, visceral fat inside;
  a vertebral column behind the aorta, paraspinal and psoas muscles;
  bowel-like blobs in the free visceral space: a wall and a lumen (fluid, gas, or an organ's look-alike);
  the stomach split into its wall (the organ's prior) and lumen content with an optional gas cap.
"""
from dataclasses import dataclass
from typing import Dict, List

import numpy as np
from scipy import ndimage

LOOKALIKE = "lookalike:"  # tissue name prefix: an unlabelled blob drawn from an organ's prior


@dataclass
class TissueMap:
    tissues: np.ndarray   # int16 ids, same grid as the label map
    names: List[str]      # names[id] = prior name (look-alikes resolve to their organ's prior)
    kinds: List[str]      # kinds[id] = tissue name as painted (e.g. 'lookalike:liver'), for tests and debugging


def tissue_table(organs: Dict[int, str]) -> List[str]:
    """Tissue name per id: 0 air, organ ids = their label values, then body tissues and organ look-alikes."""
    top = max(organs, default=0)
    table = ["air"] + [organs.get(v, f"unused_{v}") for v in range(1, top + 1)]
    table += ["fat", "muscle", "bone", "stomach_content", "bowel_gas", "bowel_fluid"]
    return table + [LOOKALIKE + organs[v] for v in sorted(organs)]


def _disk(shape_xy, center, radii) -> np.ndarray:
    x, y = np.ogrid[:shape_xy[0], :shape_xy[1]]
    return ((x - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2 <= 1.0


def _fill_z(values: np.ndarray, valid: np.ndarray, fallback: float) -> np.ndarray:
    """Values known on some slices -> every slice (linear inside, constant beyond the ends)."""
    if not valid.any():
        return np.full(values.shape, fallback, dtype=float)
    z = np.arange(len(values))
    return np.interp(z, z[valid], values[valid])


def _orientation(label: np.ndarray, names: Dict[str, int]) -> tuple:
    """(posterior sign along y, z of the kidneys' centre or None)."""
    organs = np.argwhere(label > 0)
    kidneys = np.argwhere(np.isin(label, [names[n] for n in ("kidney_left", "kidney_right") if n in names]))
    if len(kidneys) and len(organs):
        sign = -1.0 if kidneys[:, 1].mean() <= organs[:, 1].mean() else 1.0
        return sign, float(kidneys[:, 2].mean())
    return -1.0, None


def _spine(label, names, spacing, radius_mm, posterior) -> dict:
    """Per-slice centre of the vertebral body: just behind the aorta (or the organs' posterior edge)."""
    nx, ny, nz = label.shape
    organs = label > 0
    aorta = label == names["aorta"] if "aorta" in names else np.zeros_like(organs)
    r = radius_mm / spacing[1]
    cx, cy = np.zeros(nz), np.zeros(nz)
    has_aorta = aorta.any(axis=(0, 1))
    for z in np.nonzero(has_aorta)[0]:
        xs, ys = np.nonzero(aorta[:, :, z])
        cx[z] = xs.mean()
        edge = ys.min() if posterior < 0 else ys.max()  # the aorta's posterior wall
        cy[z] = edge + posterior * (r + 3.0 / spacing[1])
    if not has_aorta.any():
        xs, ys, _ = np.nonzero(organs)
        mid_x = xs.mean() if len(xs) else nx / 2
        back = (ys.min() if posterior < 0 else ys.max()) if len(ys) else ny / 2
        return {"x": np.full(nz, mid_x), "y": np.full(nz, back - posterior * r)}
    return {"x": ndimage.gaussian_filter1d(_fill_z(cx, has_aorta, nx / 2), 3),
            "y": ndimage.gaussian_filter1d(_fill_z(cy, has_aorta, ny / 2), 3)}


def _spine_masks(shape, spine, spacing, radius_mm, posterior, kidney_z) -> tuple:
    """(bone, muscle) masks of the vertebral column, paraspinal muscles and (caudally) the psoas muscles."""
    bone, muscle = np.zeros(shape, bool), np.zeros(shape, bool)
    mm = np.array(spacing[:2])
    for z in range(shape[2]):
        c = np.array([spine["x"][z], spine["y"][z]])
        bone[:, :, z] = _disk(shape[:2], c, radius_mm / mm)
        bone[:, :, z] |= _disk(shape[:2], c + [0, posterior * (radius_mm + 12) / mm[1]], 9 / mm)
        for side in (-1, 1):
            muscle[:, :, z] |= _disk(shape[:2], c + [side * 28 / mm[0], posterior * (radius_mm + 24) / mm[1]],
                                     20 / mm)
            if kidney_z is not None and z < kidney_z:  # psoas: below the renal hila, beside the vertebrae
                muscle[:, :, z] |= _disk(shape[:2], c + [side * (radius_mm + 14) / mm[0], 0], 14 / mm)
    return bone, muscle & ~bone


def _ellipses(core: np.ndarray, margin_vox) -> tuple:
    """Per slice, the smallest axis-aligned ellipse around `core` with the bbox's aspect ratio, widened by
    margin_vox = (x, y) and smoothed along z (max filter, then Gaussian) so the body has no steps."""
    nz = core.shape[2]
    cx, cy, ax, ay = (np.zeros(nz) for _ in range(4))
    valid = core.any(axis=(0, 1))
    for z in np.nonzero(valid)[0]:
        xs, ys = np.nonzero(core[:, :, z])
        cx[z], cy[z] = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
        hx, hy = (xs.max() - xs.min()) / 2 + 1, (ys.max() - ys.min()) / 2 + 1
        s = np.sqrt((((xs - cx[z]) / hx) ** 2 + ((ys - cy[z]) / hy) ** 2).max())
        ax[z], ay[z] = hx * s, hy * s
    shape = core.shape
    cx, cy = (ndimage.gaussian_filter1d(_fill_z(v, valid, n / 2), 4) for v, n in ((cx, shape[0]), (cy, shape[1])))
    smooth = []
    for v in (ax, ay):
        v = _fill_z(v, valid, 1.0)
        smooth.append(np.maximum(ndimage.gaussian_filter1d(ndimage.maximum_filter1d(v, 15), 4), v))
    return cx, cy, smooth[0] + margin_vox[0], smooth[1] + margin_vox[1]


def _inside(shape, ellipse, extra_vox=(0.0, 0.0)) -> np.ndarray:
    cx, cy, ax, ay = ellipse
    x = np.arange(shape[0])[:, None, None]
    y = np.arange(shape[1])[None, :, None]
    return ((x - cx) / (ax + extra_vox[0])) ** 2 + ((y - cy) / (ay + extra_vox[1])) ** 2 <= 1.0


def _blob(shape, center, radii_vox, rng) -> tuple:
    """(slices, mask) of a randomly oriented ellipsoid around `center`, clipped to the volume."""
    reach = int(np.ceil(max(radii_vox))) + 1
    box = tuple(slice(max(0, c - reach), min(n, c + reach + 1)) for c, n in zip(center, shape))
    grid = np.stack(np.meshgrid(*(np.arange(s.start, s.stop) - c for s, c in zip(box, center)), indexing="ij"), -1)
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    local = grid @ rotation
    return box, ((local / np.asarray(radii_vox)) ** 2).sum(-1) <= 1.0


def build_tissue_map(label: np.ndarray, spacing, organs: Dict[int, str], anatomy: dict,
                     rng: np.random.Generator) -> TissueMap:
    """The tissue map of one subject. `organs` maps label values to organ names; `anatomy` is the priors file's
    "anatomy" section; `rng` decides the body's fat layer, the bowel and the stomach gas (the patient, not the
    scanner)."""
    label = np.asarray(label)
    spacing = np.asarray(spacing, dtype=float)
    table = tissue_table(organs)
    tid = {name: i for i, name in enumerate(table)}
    names = {n: v for v, n in organs.items()}
    organ_mask = label > 0
    posterior, kidney_z = _orientation(label, names)

    radius = float(anatomy["vertebra_radius_mm"])
    spine = _spine(label, names, spacing, radius, posterior)
    bone, spine_muscle = _spine_masks(label.shape, spine, spacing, radius, posterior, kidney_z)
    visceral = np.array([anatomy["visceral_margin_mm"]] * 2) / spacing[:2]
    inner = _ellipses(organ_mask | bone | spine_muscle, visceral)
    wall = float(anatomy["muscle_wall_mm"]) / spacing[:2]
    fat_mm = rng.uniform(*anatomy["subcutaneous_fat_mm"])
    inside_inner = _inside(label.shape, inner)
    inside_wall = _inside(label.shape, inner, wall)
    body = _inside(label.shape, inner, wall + fat_mm / spacing[:2])

    tissues = np.full(label.shape, tid["air"], np.int16)
    tissues[body] = tid["fat"]
    tissues[inside_wall & ~inside_inner] = tid["muscle"]
    tissues[spine_muscle & body] = tid["muscle"]
    tissues[bone & body] = tid["bone"]

    free = inside_inner & (tissues == tid["fat"]) & ~organ_mask
    _paint_bowel(tissues, free, spacing, anatomy, rng, tid, list(organs.values()))
    tissues[organ_mask] = label[organ_mask]
    if "stomach" in names:
        _split_stomach(tissues, label == names["stomach"], spacing, anatomy, rng, tid, posterior)
    kinds = list(table)
    resolved = [n[len(LOOKALIKE):] if n.startswith(LOOKALIKE) else n for n in table]
    return TissueMap(tissues, resolved, kinds)


def _paint_bowel(tissues, free, spacing, anatomy, rng, tid, organ_names) -> None:
    """Bowel-like loops in the free visceral space; their intensities come from the organs' own priors."""
    candidates = np.argwhere(free)
    if not len(candidates) or not organ_names:
        return
    n = int(rng.integers(anatomy["bowel_blobs"][0], anatomy["bowel_blobs"][1] + 1))
    for center in candidates[rng.choice(len(candidates), size=n)]:
        radii = rng.uniform(*anatomy["bowel_radius_mm"], size=3) / spacing
        box, mask = _blob(tissues.shape, center, radii, rng)
        mask &= free[box]
        lumen = ndimage.binary_erosion(mask)
        region = tissues[box]
        region[mask & ~lumen] = tid[LOOKALIKE + rng.choice(organ_names)]
        content = rng.choice(["bowel_fluid", "bowel_gas", "lookalike"], p=[0.35, 0.2, 0.45])
        region[lumen] = tid[LOOKALIKE + rng.choice(organ_names) if content == "lookalike" else content]
        free[box] &= ~mask  # loops touch but do not overwrite each other


def _split_stomach(tissues, stomach, spacing, anatomy, rng, tid, posterior) -> None:
    """The stomach label keeps the wall (the 'stomach' prior); its lumen holds fluid/food and maybe a gas cap."""
    steps = max(1, int(round(anatomy["stomach_wall_mm"] / spacing.min())))
    lumen = ndimage.binary_erosion(stomach, iterations=steps)
    tissues[lumen] = tid["stomach_content"]
    if lumen.any() and rng.uniform() < anatomy["stomach_gas_probability"]:
        ys = np.nonzero(lumen)[1]
        y = np.arange(tissues.shape[1])[None, :, None]
        # the non-dependent (anterior) quarter of the lumen: the patient lies supine
        cap = y >= np.percentile(ys, 75) if posterior < 0 else y <= np.percentile(ys, 25)
        tissues[lumen & cap] = tid["bowel_gas"]
