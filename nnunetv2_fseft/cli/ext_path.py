"""nnUNetv2_fseft_ext_path: print the folder to export as nnUNet_extTrainer (editable or regular install).

  export nnUNet_extTrainer=$(nnUNetv2_fseft_ext_path)
  nnUNetv2_fseft_ext_path --list      the trainers there, each with its method, learning rate and optimizer
"""
import argparse

from ..errors import cli_entry
from ..trainer_names import trainer_table, trainers_folder


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(prog="nnUNetv2_fseft_ext_path", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="list the plugin's trainers (names for -tr)")
    if p.parse_args(argv).list:
        print(trainer_table())
    else:
        print(trainers_folder())
