"""nnUNetv2_fseft_ext_path: print the folder to export as nnUNet_extTrainer (editable or regular install)."""
from pathlib import Path


def trainers_folder() -> str:
    import nnunetv2_fseft_trainers
    return str(Path(nnunetv2_fseft_trainers.__file__).resolve().parent)


def main(argv=None):
    print(trainers_folder())
