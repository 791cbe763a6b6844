"""What one registration pair costs at abdominal CT size (nnunetv2_fseft.pseudo.registration, the defaults of
nnUNetv2_fseft_pseudolabel): the real TotalSegmentator subject 1 (122 x 101 x 112 at 3 mm, spleen mask) registered
onto itself moved by a known affine (a second scan of the same protocol), and onto the MSD spleen case 8
(512 x 512 x 32 at 0.79 x 0.79 x 7.5 mm, manual spleen mask), its spleen carried over.

  python benchmarks/registration_cost_ct.py [--results DIR]

Wall time and this process's peak RSS; the spleen Dice says whether the pair registered (one pair each: not a
quality claim)."""
import argparse
import resource
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

import bench_env
from nnunetv2_fseft.pseudo.registration import propagate

HERE = Path(__file__).resolve().parent
CT = HERE.parents[1] / "shared" / "data" / "ct"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results", default=str(HERE / "results"))
    a = p.parse_args(argv)
    fixed = sitk.ReadImage(str(CT / "msd_spleen_8" / "ct.nii.gz"))
    fixed_spleen = sitk.GetArrayFromImage(sitk.ReadImage(str(CT / "msd_spleen_8" / "spleen.nii.gz"))) > 0
    moving = sitk.ReadImage(str(CT / "totalseg_subject1" / "ct.nii.gz"))
    moving_spleen = sitk.ReadImage(str(CT / "totalseg_subject1" / "segmentations" / "spleen.nii.gz"))
    rows = ["| pair | fixed voxels | seconds | peak RSS (process, so far) | spleen Dice after affine |",
            "|---|---:|---:|---:|---:|"]
    spleen = sitk.Cast(moving_spleen > 0, sitk.sitkUInt8)
    # the same protocol: subject 1 moved by a known affine (5 degrees, 5 % larger, 12 mm off), as a second patient
    # scanned alike would be; its spleen moved with it is the truth
    known = sitk.AffineTransform(3)
    known.SetCenter(moving.TransformContinuousIndexToPhysicalPoint([s / 2 for s in moving.GetSize()]))
    known.Rotate(0, 1, np.deg2rad(5))
    known.Scale(1.05)
    known.SetTranslation((12.0, -8.0, 6.0))
    second = sitk.Resample(moving, moving, known, sitk.sitkLinear, -1024.0)
    second_spleen = sitk.GetArrayFromImage(sitk.Resample(spleen, moving, known, sitk.sitkNearestNeighbor, 0)) > 0
    for name, fixed_image, truth in (("TotalSegmentator subject 1 -> itself under a known affine (same protocol)",
                                      second, second_spleen),
                                     ("TotalSegmentator subject 1 -> MSD spleen 8 (another field of view, 7.5 mm "
                                      "slices)", fixed, fixed_spleen)):
        t = time.time()
        carried = propagate(fixed_image, moving, spleen) > 0
        seconds = time.time() - t
        dice = 2 * (carried & truth).sum() / (carried.sum() + truth.sum())
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows.append(f"| {name} | {np.prod(fixed_image.GetSize()):,} | {seconds:.1f} | {peak:.0f} MB | {dice:.2f} |")
    body = ["# One registration pair at abdominal CT size", "",
            *bench_env.provenance("python benchmarks/registration_cost_ct.py", __doc__.split("\n\n")[0].replace("\n", " ")),
            *rows, ""]
    out = Path(a.results) / "registration_ct_cpu.md"
    out.write_text("\n".join(body))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
