"""Shared by the hippocampus and abdominal benchmark scripts: nnU-Net's environment and the published tables."""
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent


def setup_env(work: Path) -> None:
    """nnU-Net's folders in WORKDIR; the plugin's and the benchmarks' trainers on nnUNet_extTrainer. Must run before
    nnunetv2 is imported (nnunetv2.paths reads the variables once)."""
    for d in ("raw", "pre", "res"):
        (work / d).mkdir(parents=True, exist_ok=True)
    from nnunetv2_fseft.trainer_names import trainers_folder
    os.environ.update(nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "pre"),
                      nnUNet_results=str(work / "res"), nnUNet_compile="0", nnUNet_def_n_proc="1",
                      nnUNet_n_proc_DA=os.environ.get("nnUNet_n_proc_DA", "2"),  # nnU-Net would start 12 on 2 cores
                      OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                      nnUNet_extTrainer=os.pathsep.join([trainers_folder(), str(HERE / "ext")]))


def provenance(command: str, details: str) -> list:
    """A results file's opening lines: the command, then the machine followed by `details`."""
    import datetime
    import platform
    import torch
    return [f"Command ({datetime.date.today()}): `{command}`", "",
            f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}, torch's CPU kernels "
            f"{torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}, load average "
            f"{os.getloadavg()[0]:.1f}; {details}", ""]


def publish_fewshot(stem: Path, records: list, title: str, preamble: list) -> None:
    """The harness's few-shot tables under stem.{csv,md,png}: `preamble` lines between the title and the table."""
    from nnunetv2_fseft.benchmark.report import markdown, plot, write_csv
    classes = list(dict.fromkeys(c for r in records for c in r.get("dice_per_class", {})))
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_csv(stem.with_suffix(".csv"), records, classes)
    body = markdown(records, classes, title).split("\n", 2)[2]  # the harness's table without its own title
    stem.with_suffix(".md").write_text("\n".join([f"# {title}", "", *preamble, ""]) + body)
    plot(stem.with_suffix(".png"), records, title)
