import os
import sys
from pathlib import Path

import pytest

# nnU-Net reads worker counts when first imported: keep CPU runs lean (8 export workers would each import torch)
os.environ.setdefault("nnUNet_def_n_proc", "1")
os.environ.setdefault("nnUNet_compile", "0")

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # tests/networks.py etc.
SHARED_DATA = TESTS.parents[1] / "shared" / "data"


@pytest.fixture(scope="module")
def nnunet_env(tmp_path_factory):
    """nnU-Net folders in a tmp dir, our trainers on nnUNet_extTrainer, CPU-friendly worker counts."""
    root = tmp_path_factory.mktemp("nnunet")
    from nnunetv2_fseft.trainer_names import trainers_folder
    env = {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
           "nnUNet_results": str(root / "res"), "nnUNet_n_proc_DA": "0", "nnUNet_compile": "0",
           "nnUNet_def_n_proc": "1", "nnUNet_extTrainer": os.pathsep.join([trainers_folder(), str(TESTS / "ext")])}
    for folder in ("raw", "pre", "res"):
        (root / folder).mkdir()
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield root
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
