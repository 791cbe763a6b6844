"""nnUNetv2_fseft_plan -d ID --preset NAME: nnU-Net planning + a plan preset + preprocessing."""
import argparse

from ..errors import cli_entry
from ..planning import available_presets, plan_with_preset


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name (in nnUNet_raw)")
    p.add_argument("--preset", required=True, help=f"one of: {', '.join(sorted(available_presets()))}")
    p.add_argument("-c", "--configurations", nargs="+", default=["3d_fullres"])
    p.add_argument("-np", "--num-processes", type=int, default=2)
    p.add_argument("--overwrite", action="store_true", help="replace existing plans of the same name")
    a = p.parse_args(argv)
    plans_name = plan_with_preset(a.dataset, a.preset, a.configurations, a.num_processes, a.overwrite)
    print(f"plans written: {plans_name}; preprocessed: {', '.join(a.configurations)} (-c for others, e.g. -c 2d)")
