"""nnUNetv2_fseft_prepare_target -d TARGET -m FOUNDATION: plan and preprocess a target for adapting a foundation.

FOUNDATION is an nnU-Net model folder (nnUNet_results/DatasetX/TRAINER__PLANS__CONFIG) or its
fold_X/checkpoint_final.pth (the target takes its plans), or an nnssl checkpoint .pth (nnU-Net plans the target,
then 3d_fullres takes the checkpoint's network and normalization, a patch that fits it, and batch 2)."""
import argparse

from ..errors import FSEFTError, cli_entry
from ..foundation_plans import CPU_PATCH_EDGE
from ..planning import NNSSL_PLANS, SPACING_MODES, prepare_target


def _spacing(values):
    if len(values) == 1 and values[0] in SPACING_MODES:
        return values[0]
    try:
        return [float(v) for v in values]
    except ValueError:
        raise FSEFTError(f"--spacing {' '.join(values)} is not one of {', '.join(SPACING_MODES)} or three numbers "
                         "(mm); e.g. --spacing like_pretrained or --spacing 1 1 1") from None


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--dataset", required=True, help="target dataset id or name (in nnUNet_raw)")
    p.add_argument("-m", "--model-folder", "--foundation", dest="foundation", required=True,
                   help="the foundation: an nnU-Net model folder, its fold_X/checkpoint_final.pth, or an nnssl .pth")
    p.add_argument("-c", "--configurations", nargs="+", default=None,
                   help="configurations to preprocess (default: the one the foundation was trained as, else "
                        "3d_fullres; nnssl checkpoints: 3d_fullres only)")
    p.add_argument("-p", "--plans-name", default=None,
                   help=f"name of the target's plans (default: the foundation's; nnssl: {NNSSL_PLANS})")
    p.add_argument("--spacing", nargs="+", default=["like_pretrained"], metavar="MODE",
                   help="nnssl: like_pretrained (the checkpoint's; the dataset's when it records none), dataset, "
                        "or three numbers in mm (nnU-Net's axis order)")
    p.add_argument("--patch-size", nargs="+", type=int, default=None,
                   help="patch size; each edge a multiple of the network's total stride")
    p.add_argument("--cpu", action="store_true",
                   help=f"CPU-size run (tests, demo): patch edges at most {CPU_PATCH_EDGE} voxels, batch 2; the network stays")
    p.add_argument("-gpu_memory_target", "--gpu-memory-target", dest="gpu_memory_target", type=float, default=8.0,
                   help="GB the patch must fit at batch 2, by nnU-Net's estimate (nnssl; default 8)")
    p.add_argument("-np", "--num-processes", type=int, default=2)
    p.add_argument("--overwrite", action="store_true", help="replace existing plans of the same name")
    a = p.parse_args(argv)
    if a.patch_size and a.cpu:
        raise FSEFTError("--patch-size and --cpu both set the patch; pass one of them")
    prepare_target(a.dataset, a.foundation, a.num_processes, a.overwrite, configurations=a.configurations,
                   plans_name=a.plans_name, spacing=_spacing(a.spacing), patch_size=a.patch_size, cpu=a.cpu,
                   gpu_memory_target=a.gpu_memory_target, log=print)
