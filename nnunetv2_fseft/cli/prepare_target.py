"""nnUNetv2_fseft_prepare_target -d TARGET -m FOUNDATION_MODEL_FOLDER: preprocess a target with the
foundation's plans so that `nnUNetv2_train ... -pretrained_weights` loads."""
import argparse

from ..errors import cli_entry
from ..planning import prepare_target


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("-d", "--dataset", required=True, help="target dataset id or name (in nnUNet_raw)")
    p.add_argument("-m", "--model-folder", required=True,
                   help="the foundation's folder: nnUNet_results/DatasetX/TRAINER__PLANS__CONFIG")
    p.add_argument("-np", "--num-processes", type=int, default=2)
    p.add_argument("--overwrite", action="store_true", help="replace existing plans of the same name")
    a = p.parse_args(argv)
    plans_name = prepare_target(a.dataset, a.model_folder, a.num_processes, a.overwrite)
    print(f"target preprocessed with the foundation's plans: -p {plans_name}")
