"""nnU-Net's environment for the benchmark scripts (shared by the hippocampus and abdominal benchmarks)."""
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent


def setup_env(work: Path) -> None:
    """nnU-Net's folders in WORKDIR; the plugin's and the benchmarks' trainers on nnUNet_extTrainer. Must run before
    nnunetv2 is imported (nnunetv2.paths reads the variables once)."""
    for d in ("raw", "pre", "res"):
        (work / d).mkdir(parents=True, exist_ok=True)
    from nnunetv2_fseft.cli.ext_path import trainers_folder
    os.environ.update(nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "pre"),
                      nnUNet_results=str(work / "res"), nnUNet_compile="0", nnUNet_def_n_proc="1",
                      nnUNet_n_proc_DA=os.environ.get("nnUNet_n_proc_DA", "2"),  # nnU-Net would start 12 on 2 cores
                      OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                      nnUNet_extTrainer=os.pathsep.join([trainers_folder(), str(HERE / "ext")]))
