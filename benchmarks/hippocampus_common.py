"""Shared by the hippocampus benchmarks: nnU-Net folders in WORKDIR, and the Posterior-only foundation.

Foundation: stock nnU-Net, tiny preset, 1,000 iterations (nnUNetTrainer_20x50) on split 'B' of
hippocampus_split.json with Posterior labels only; its validation uses 5 cases of split 'A'. The 50 'query'
cases never enter any training.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import bench_env

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parents[1] / "shared" / "data" / "hippocampus" / "Dataset004_Hippocampus"
SPLIT = json.loads((HERE / "hippocampus_split.json").read_text())
FOUNDATION_TRAINER = "nnUNetTrainer_20x50"


def setup_env(work: Path) -> None:
    """bench_env.setup_env, once the hippocampus source is there."""
    if not SOURCE.is_dir():
        sys.exit(f"{SOURCE} not found: the hippocampus benchmarks need ../shared/data (see its README)")
    bench_env.setup_env(work)


def run(cmd, log: Path) -> float:
    t = time.time()
    with open(log, "a") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        sys.exit(f"failed: {' '.join(cmd)} (see {log})")
    return time.time() - t


def posterior_foundation(work: Path, train: bool = True) -> Path:
    """The foundation's model folder, trained on the first call (unless `train` is False)."""
    from nnunetv2_fseft.data.convert import relabel_dataset
    from nnunetv2_fseft.planning import plan_with_preset
    folder = work / "res" / "Dataset104_HippoPosterior" / f"{FOUNDATION_TRAINER}__nnUNetPlans__3d_fullres"
    if not train or (folder / "fold_0" / "checkpoint_final.pth").is_file():
        return folder
    relabel_dataset(SOURCE, 104, "HippoPosterior", {"posterior": ["Posterior"]}, overwrite=True)
    plan_with_preset(104, "tiny", overwrite=True)
    splits = [{"train": SPLIT["B"], "val": SPLIT["A"][:5]}]  # validation never touches the query
    (work / "pre" / "Dataset104_HippoPosterior" / "splits_final.json").write_text(json.dumps(splits))
    t = run([str(Path(sys.executable).parent / "nnUNetv2_train"), "104", "3d_fullres", "0", "-tr",
             FOUNDATION_TRAINER, "-device", "cpu"], work / "log.txt")
    print(f"foundation trained in {t:.0f} s", flush=True)
    return folder


# ---------------------------------------------------------------------------------- protocol 1: shifted domain
# strong enough that the foundation loses Dice on scanner B, so that adaptation has something to recover; a milder
# version barely moved it (benchmarks/results/hippocampus_shift_20261201/NOTES.md has both)
SHIFT = {"gamma": 0.4, "contrast": 0.7, "noise_std": 0.05, "bias": 0.25, "slice_spacing_mm": 3.0}
SHIFT_DOC = ("scanner B: intensities gamma 0.4 and 0.7x contrast (on the case's min-max range), a linear bias "
             "field of up to +-25 %, Gaussian noise of 5 % of the range (seeded by the case id), and 3 mm slices "
             "along the first image axis (linear resampling of the image, nearest neighbour for the label) "
             "instead of 1 mm")


def shift_intensities(a, case: str):
    """Scanner B's intensities for one image array; deterministic for a case id."""
    import zlib
    import numpy as np
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    lo, hi = float(a.min()), float(a.max())
    u = ((a - lo) / max(hi - lo, 1e-6)) ** SHIFT["gamma"]
    axes = np.meshgrid(*[np.linspace(-1, 1, n) for n in u.shape], indexing="ij")
    direction = rng.uniform(-1, 1, 3)
    u = u * (1 + SHIFT["bias"] * sum(c * x for c, x in zip(direction, axes)) / 3 ** 0.5)
    u = u + rng.normal(0, SHIFT["noise_std"], u.shape)
    return (lo + (hi - lo) * SHIFT["contrast"] * u).astype(np.float32)


def shifted_dataset(cases, dataset_id: int, name: str) -> Path:
    """A target 'from another scanner' built from `cases` of the source dataset (all labels kept). The source
    is only read; the new dataset is written to $nnUNet_raw."""
    import SimpleITK as sitk
    out = Path(os.environ["nnUNet_raw"]) / f"Dataset{dataset_id:03d}_{name}"
    if (out / "dataset.json").is_file():
        if SHIFT_DOC not in json.loads((out / "dataset.json").read_text()).get("description", ""):
            sys.exit(f"{out} was built with another shift; move it (and its nnUNet_preprocessed and nnUNet_results "
                     "folders) away to rebuild it")
        return out
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    for case in cases:
        image = sitk.ReadImage(str(SOURCE / "imagesTr" / f"{case}_0000.nii.gz"), sitk.sitkFloat32)
        label = sitk.ReadImage(str(SOURCE / "labelsTr" / f"{case}.nii.gz"))
        shifted = sitk.GetImageFromArray(shift_intensities(sitk.GetArrayFromImage(image), case))
        shifted.CopyInformation(image)
        spacing = list(image.GetSpacing())
        spacing[0] = SHIFT["slice_spacing_mm"]  # SimpleITK axis 0 = the array's last axis
        size = [int(round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]

        def resample(img, interpolator):
            return sitk.Resample(img, size, sitk.Transform(), interpolator, img.GetOrigin(), spacing,
                                 img.GetDirection(), 0, img.GetPixelID())
        sitk.WriteImage(resample(shifted, sitk.sitkLinear), str(out / "imagesTr" / f"{case}_0000.nii.gz"))
        sitk.WriteImage(resample(label, sitk.sitkNearestNeighbor), str(out / "labelsTr" / f"{case}.nii.gz"))
    source = json.loads((SOURCE / "dataset.json").read_text())
    (out / "dataset.json").write_text(json.dumps({
        "channel_names": source["channel_names"], "labels": source["labels"], "numTraining": len(cases),
        "file_ending": ".nii.gz", "name": name, "description": f"hippocampus cases, {SHIFT_DOC}"}, indent=2))
    return out


def both_classes_foundation(work: Path, train: bool = True) -> Path:
    """Protocol 1's foundation: stock nnU-Net on split 'B' with both labels, tiny preset, 1,000 iterations;
    trained on the first call unless `train` is False."""
    from nnunetv2_fseft.data.convert import relabel_dataset
    from nnunetv2_fseft.planning import plan_with_preset
    folder = work / "res" / "Dataset108_HippoBoth" / f"{FOUNDATION_TRAINER}__nnUNetPlans__3d_fullres"
    if not train or (folder / "fold_0" / "checkpoint_final.pth").is_file():
        return folder
    relabel_dataset(SOURCE, 108, "HippoBoth", {"Anterior": ["Anterior"], "Posterior": ["Posterior"]},
                    overwrite=True)
    plan_with_preset(108, "tiny", overwrite=True)
    splits = [{"train": SPLIT["B"], "val": SPLIT["A"][:5]}]
    (work / "pre" / "Dataset108_HippoBoth" / "splits_final.json").write_text(json.dumps(splits))
    t = run([str(Path(sys.executable).parent / "nnUNetv2_train"), "108", "3d_fullres", "0", "-tr",
             FOUNDATION_TRAINER, "-device", "cpu"], work / "log.txt")
    print(f"foundation (both classes) trained in {t:.0f} s", flush=True)
    return folder
