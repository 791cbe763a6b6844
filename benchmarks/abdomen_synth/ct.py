"""One synthetic CT case from a real label map, with torchio (imported here only).

    label map (read only) -> crop to the organs' z range -> tissue map (anatomy.py)
      -> tio.RandomLabelsToImage (a Gaussian per tissue: the priors' mean +- jitter, texture std)
      -> tio.RandomBlur (the scanner's in-plane PSF and slice profile, in mm)
      -> tio.Resample to the output grid (antialiased; labels nearest neighbour)
      -> tio.RandomBiasField on attenuation (HU + 1000): smooth shading, as cupping / beam hardening scale
         attenuation, never a shift of air
      -> tio.RandomNoise (white, in HU) -> int16 HU in [-1024, 3071]

Deterministic: the anatomy (fat layer, bowel, stomach gas) depends on (subject, seed) only, since it is the
patient's; intensities, blur, shading and noise on (subject, domain, seed). torch's global random state is left as
it was.
"""
import hashlib
import json
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from nnunetv2_fseft.errors import FSEFTError
from . import require_torchio
from .anatomy import TissueMap, build_tissue_map
from .priors import Priors

VERSION = 1  # bump when the generator changes what it writes, so cached cases are rebuilt
GENERATOR = "nnunetv2_fseft.synth"  # the name cached cases were recorded under; kept so that they stay valid
HU_RANGE = (-1024, 3071)
FWHM_TO_STD = 1 / (2 * np.sqrt(2 * np.log(2)))


def seed_for(*parts) -> int:
    """A stable 31-bit seed from strings/ints (Python's hash() is salted per process)."""
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def output_spacing(priors: Priors, domain: str, spacing_mm: float) -> Tuple[float, float, float]:
    """In-plane `spacing_mm`; along z the domain's slice thickness when it is coarser."""
    d = priors.domain(domain)
    return spacing_mm, spacing_mm, max(spacing_mm, d.slice_thickness_mm)


def read_organ_names(labels_json: Path) -> Dict[int, str]:
    try:
        names = json.loads(Path(labels_json).read_text())
        return {int(k): str(v) for k, v in names.items() if int(k) > 0}
    except (OSError, ValueError, AttributeError) as e:
        raise FSEFTError(f"cannot read organ names from {labels_json} ({e}); it must map label values to names, "
                         'e.g. {"1": "spleen"}') from None


def _organ_z_crop(label: np.ndarray, spacing, margin_mm: float) -> Tuple[int, int]:
    """(first, last + 1) z index of the organs plus a margin: slices with no organ carry no label to learn."""
    zs = np.nonzero(label.any(axis=(0, 1)))[0]
    if not len(zs):
        raise FSEFTError("the label map has no labelled voxel; nothing to synthesise around")
    m = int(round(margin_mm / spacing[2]))
    return max(0, zs[0] - m), min(label.shape[2], zs[-1] + 1 + m)


@dataclass
class SynthCase:
    image: sitk.Image                 # int16 HU on the output grid
    label: sitk.Image                 # uint8 organ labels on the same grid
    tissue_map: TissueMap = None      # on the (cropped) source grid, with keep_intermediate
    clean_hu: np.ndarray = None       # the image before blur/resampling/shading/noise, with keep_intermediate


def synthesize(label_file, organs: Dict[int, str], priors: Priors, subject: str, domain: str, seed: int = 0,
               spacing_mm: float = 4.0, keep_intermediate: bool = False) -> SynthCase:
    """One CT image and its label map on the same output grid. The label file is only read."""
    tio = require_torchio()
    import torch
    # every torchio transform draws from torch's global generator (even a crop does): a private copy of it
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_for("intensity", subject, domain, seed))
        return _synthesize(tio, torch, label_file, organs, priors, subject, domain, seed, spacing_mm,
                           keep_intermediate)


def _synthesize(tio, torch, label_file, organs, priors, subject, domain, seed, spacing_mm, keep_intermediate):
    dom = priors.domain(domain)
    source = tio.LabelMap(str(label_file))
    label = source.data[0].numpy()
    z0, z1 = _organ_z_crop(label, source.spacing, priors.anatomy["z_margin_mm"])
    cropped = tio.Crop((0, 0, 0, 0, z0, label.shape[2] - z1))(source)
    label = cropped.data[0].numpy().astype(np.int16)
    unknown = sorted(set(np.unique(label).tolist()) - set(organs) - {0})
    if unknown:
        raise FSEFTError(f"{label_file} has label values {unknown[:5]} that the organ names do not list")

    tissue_map = build_tissue_map(label, cropped.spacing, organs, priors.anatomy,
                                  np.random.default_rng(seed_for("anatomy", subject, seed)))
    present, compact = np.unique(tissue_map.tissues, return_inverse=True)
    ranges = [priors.gaussian(tissue_map.names[t], domain) for t in present]
    means = [(m - j, m + j) for m, _, j in ranges]
    stds = [(s, s) for _, s, _ in ranges]
    tissues = tio.LabelMap(tensor=torch.from_numpy(compact.reshape(label.shape).astype(np.int16))[None],
                           affine=cropped.affine)
    subj = tio.Subject(tissues=tissues, label=cropped)
    psf = [dom.inplane_fwhm_mm * FWHM_TO_STD] * 2 + [dom.slice_thickness_mm * FWHM_TO_STD]
    to_attenuation = tio.Lambda(lambda x: x + 1000.0, types_to_apply=[tio.INTENSITY])
    to_hu = tio.Lambda(lambda x: x - 1000.0, types_to_apply=[tio.INTENSITY])
    subj = tio.RandomLabelsToImage(label_key="tissues", image_key="ct", mean=means, std=stds)(subj)
    subj.remove_image("tissues")
    clean = subj["ct"].data[0].numpy().copy() if keep_intermediate else None
    subj = tio.Compose([
        tio.RandomBlur(std=tuple(s for s in psf for _ in range(2))),
        tio.Resample(output_spacing(priors, domain, spacing_mm), antialias=True),
        to_attenuation, tio.RandomBiasField(coefficients=dom.bias_coefficient, order=3), to_hu,
        tio.RandomNoise(mean=0.0, std=(dom.noise_hu, dom.noise_hu)),
    ])(subj)
    ct = subj["ct"].data.clamp(*HU_RANGE).round().to(torch.int16)
    image = tio.ScalarImage(tensor=ct, affine=subj["ct"].affine).as_sitk()
    label_image = tio.LabelMap(tensor=subj["label"].data.to(torch.uint8), affine=subj["label"].affine).as_sitk()
    label_image.CopyInformation(image)  # the same grid by construction; make the header bit-identical too
    if keep_intermediate:
        return SynthCase(image, label_image, tissue_map, clean)
    return SynthCase(image, label_image)


def case_record(subject: str, domain: str, seed: int, spacing_mm: float, priors: Priors, label_file) -> dict:
    """What a case is made from; a cached case is reused only when all of it matches (the label map by content, so
    a moved copy still matches and an edited one does not)."""
    return {"generator": GENERATOR, "version": VERSION, "subject": subject, "domain": domain,
            "seed": seed, "spacing_mm": spacing_mm, "priors_sha256": priors.sha256,
            "label_map": Path(label_file).name,
            "label_map_sha256": hashlib.sha256(Path(label_file).read_bytes()).hexdigest(),
            "note": "real anatomy, synthetic intensities"}


def write_case(folder: Path, label_file, organs: Dict[int, str], priors: Priors, subject: str, domain: str,
               seed: int = 0, spacing_mm: float = 4.0) -> Path:
    """folder/ct.nii.gz, labels.nii.gz, segmentations/<organ>.nii.gz (TotalSegmentator layout, what
    nnUNetv2_fseft_convert reads) and synth.json; written to a hidden folder and renamed when complete. An existing
    case made with the same settings is kept (returned as is)."""
    folder = Path(folder)
    record = case_record(subject, domain, seed, spacing_mm, priors, label_file)
    if existing_record(folder) == record:
        return folder
    case = synthesize(label_file, organs, priors, subject, domain, seed, spacing_mm)
    image, label = case.image, case.label
    staging = folder.parent / f".{folder.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "segmentations").mkdir(parents=True)
    try:
        sitk.WriteImage(image, str(staging / "ct.nii.gz"), useCompression=True)
        sitk.WriteImage(label, str(staging / "labels.nii.gz"), useCompression=True)
        array = sitk.GetArrayViewFromImage(label)
        for value, name in organs.items():
            mask = sitk.GetImageFromArray((array == value).astype(np.uint8))
            mask.CopyInformation(label)
            sitk.WriteImage(mask, str(staging / "segmentations" / f"{name}.nii.gz"), useCompression=True)
        (staging / "synth.json").write_text(json.dumps(record, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)
    return folder


def existing_record(folder: Path) -> Optional[dict]:
    try:
        return json.loads((Path(folder) / "synth.json").read_text())
    except (OSError, ValueError):
        return None
