"""nnUNetv2_fseft_pseudolabel: learn from unlabelled scans of the same kind as the target.

  nnUNetv2_fseft_pseudolabel -d TARGET -f FOLD -i UNLABELLED_IMAGES -o OUT_ID
      [--labels registration|model|both] [-m ADAPTED_MODEL_FOLDER]
      [-tr TRAINER -pretrained_weights FOUNDATION.pth [--rounds N]] [--overwrite]
  nnUNetv2_fseft_pseudolabel --atlas -d TARGET -f FOLD -i IMAGES -o OUTPUT_FOLDER

The supports are the training cases of fold FOLD of the target (nnUNetv2_fseft_fewshot_splits). The unlabelled
scans (nnU-Net naming, CASE_0000.nii.gz, the target's channels) are pseudo-labelled by SimpleITK registration of
every support onto them ('registration', the default), by an adapted model's confident voxels ('model'), or where
both agree ('both'); every other voxel gets nnU-Net's ignore label. The result is dataset OUT_ID (supports, the
fold's validation cases and the pseudo-labelled scans), preprocessed with the target's plans, whose fold 0 trains on
supports plus pseudo-labelled scans, the supports listed often enough to be drawn at least half the time. With -tr
it is trained by nnUNetv2_train (round 2 onwards on OUT_ID+1, ...); predict with nnUNetv2_predict -d OUT_ID -f 0.
The unlabelled scans may be the very scans you want segmented (their labels are never read).
--atlas: no training; write each image's propagated, majority-voted label map to OUTPUT_FOLDER (the baseline).
"""
import argparse
from pathlib import Path

from ..errors import cli_entry
from ..pseudo.model_labels import CONFIDENCE
from ..pseudo.pipeline import MARGIN


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(prog="nnUNetv2_fseft_pseudolabel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--dataset", required=True, help="target dataset id or name (nnUNet_raw and _preprocessed)")
    p.add_argument("-f", "--fold", type=int, required=True, help="the few-shot fold whose training cases are the supports")
    p.add_argument("-i", "--images", required=True, help="folder of unlabelled images (CASE_0000.nii.gz, ...)")
    p.add_argument("-o", "--output", required=True, help="new dataset id (or, with --atlas, an output folder)")
    p.add_argument("--labels", default="registration", choices=("registration", "model", "both"),
                   help="pseudo-label source (default registration)")
    p.add_argument("-m", "--model", help="adapted model folder (TRAINER__PLANS__CONFIG) for --labels model/both")
    p.add_argument("--model_fold", type=int, help="its fold (default: -f)")
    p.add_argument("-tr", "--trainer", help="train each round with this trainer (nnUNetv2_train)")
    p.add_argument("-pretrained_weights", help="the foundation checkpoint for -tr, as for nnUNetv2_train")
    p.add_argument("--rounds", type=int, default=1, help="self-training rounds (needs -tr; default 1)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="the target's plans name (default nnUNetPlans)")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-n", "--name", help="new dataset name (default: the target's name + 'Pseudo')")
    p.add_argument("--margin", type=int, default=MARGIN,
                   help=f"voxels beside a propagated boundary left unlabelled ({MARGIN})")
    p.add_argument("--threshold", type=float, default=CONFIDENCE,
                   help=f"model probability a voxel needs to be trusted ({CONFIDENCE})")
    p.add_argument("-np", "--num_processes", type=int, default=2, help="preprocessing processes")
    p.add_argument("-device", default="cpu", choices=("cpu", "cuda", "mps"))
    p.add_argument("--atlas", action="store_true", help="write the propagated labels to -o (a folder); no training")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output dataset / folder")
    a = p.parse_args(argv)
    from ..errors import FSEFTError
    from ..pseudo.pipeline import Request, atlas, run
    if a.atlas:
        atlas(a.dataset, a.fold, a.images, a.output, a.overwrite)
        return
    try:
        out_id = int(a.output)
    except ValueError:
        raise FSEFTError(f"-o {a.output!r} must be a new dataset id (an integer), or pass --atlas to write label "
                         "maps to a folder") from None
    rounds = run(Request(a.dataset, a.fold, Path(a.images), out_id, a.labels, a.model and Path(a.model),
                         a.model_fold, a.trainer, a.pretrained_weights and Path(a.pretrained_weights), a.rounds,
                         a.plans, a.configuration, a.margin, a.threshold, a.name, a.overwrite, a.device,
                         a.num_processes))
    for r in rounds:
        print(f"written: {r['dataset']}" + (f"; model {r['model']}" if "model" in r else
                                            f" (train: nnUNetv2_train {r['dataset'][7:10]} {a.configuration} 0 "
                                            f"-p {a.plans} -tr TRAINER -pretrained_weights FOUNDATION)"))
