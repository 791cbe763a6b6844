"""One cell of the grid = one (method, K, seed): nnUNetv2_train on that fold (its final validation is nnU-Net's
evaluation of the query set), or the zero-shot model once for all cells. A finished cell leaves a record in
OUTPUT/cells/, so a re-run skips it."""
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..commands import console_script
from ..errors import FSEFTError
from ..names import dice_by_class
from .config import BenchmarkConfig


@dataclass(frozen=True)
class Cell:
    method: str
    k: int
    seed: int
    fold: int
    trainer: str  # the nnU-Net trainer class that runs it ('' for zeroshot)

    @property
    def key(self) -> str:
        return f"{self.method}_k{self.k}_s{self.seed}"


# Linux keeps a process's peak RSS across fork and exec, so a command forked straight from a driver that holds
# 2 GB reports 2 GB whatever it uses itself. A tiny launcher forks the command and reports its child's peak.
_LAUNCHER = ("import os, subprocess, sys\n"
             "p = subprocess.Popen(sys.argv[2:])\n"
             "_, status, usage = os.wait4(p.pid, 0)\n"
             "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
             "sys.exit(os.waitstatus_to_exitcode(status) & 255)\n")


def run_logged(cmd: list, log: Path, env: dict) -> dict:
    """Run a command with its output in `log`; wall time and its peak RSS (through _LAUNCHER)."""
    t0 = time.monotonic()
    with open(log, "a") as f, tempfile.TemporaryDirectory() as tmp:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        peak = Path(tmp) / "maxrss_kb"
        returncode = subprocess.run([sys.executable, "-I", "-c", _LAUNCHER, str(peak)] + cmd, stdout=f,
                                    stderr=subprocess.STDOUT, env=env).returncode
        if returncode:
            raise FSEFTError(f"{cmd[0]} failed (exit code {returncode}); see the end of {log}")
        return {"train_seconds": round(time.monotonic() - t0, 1), "peak_rss_mb": round(int(peak.read_text()) / 1024, 1)}


def model_folder(config: BenchmarkConfig, dataset_name: str, trainer: str) -> Path:
    from nnunetv2.paths import nnUNet_results
    return Path(nnUNet_results) / dataset_name / f"{trainer}__{config.plans_name}__{config.configuration}"


def train_cell(config: BenchmarkConfig, dataset_name: str, cell: Cell, log: Path, env: dict) -> dict:
    fold_dir = model_folder(config, dataset_name, cell.trainer) / f"fold_{cell.fold}"
    cmd = [console_script("nnUNetv2_train"), config.dataset, config.configuration, str(cell.fold),
           "-tr", cell.trainer, "-p", config.plans_name, "-device", config.device]
    if any(fold_dir.glob("checkpoint_*.pth")):
        cmd.append("--c")  # interrupted earlier: nnU-Net resumes (and only validates if training had finished)
    elif cell.method != "scratch":
        cmd += ["-pretrained_weights", str(config.checkpoint)]
    # same seed, same initial new head / adapter for every method of a cell (nnU-Net itself does not seed)
    return run_logged(cmd, log, dict(env, nnUNet_fseft_seed=str(cell.seed)))


def zeroshot_cell(config: BenchmarkConfig, fold: int, log: Path) -> dict:
    from ..zeroshot import build_zeroshot_model, predict_and_evaluate
    t0 = time.monotonic()
    with open(log, "a") as f:
        f.write(f"zero-shot from {config.foundation}, query = val of fold {fold}\n")
    folder = build_zeroshot_model(config.foundation, config.dataset, fold, config.foundation_fold, overwrite=True)
    predict_and_evaluate(folder, config.dataset, fold, config.device)
    return {"train_seconds": 0.0, "predict_seconds": round(time.monotonic() - t0, 1)}


def collect(config: BenchmarkConfig, dataset_json: dict, fold_dir: Path) -> dict:
    """Dice per class from nnU-Net's summary.json, and what the cell cost to keep."""
    summary_file = fold_dir / "validation" / "summary.json"
    if not summary_file.is_file():
        raise FSEFTError(f"{summary_file} is missing: nnU-Net's final validation did not run for this cell")
    summary = json.loads(summary_file.read_text())
    record = {"dice": summary["foreground_mean"]["Dice"], "dice_per_class": dice_by_class(summary, dataset_json)}
    adapter = fold_dir / "adapter.json"
    checkpoint = fold_dir / "checkpoint_final.pth"
    record["checkpoint_bytes"] = checkpoint.stat().st_size if checkpoint.is_file() else None
    if adapter.is_file():
        info = json.loads(adapter.read_text())
        record.update(trainable_parameters=info.get("trainable_parameters"),
                      adapter_bytes=(fold_dir / "adapter.safetensors").stat().st_size,
                      peak_cuda_mb=round(info["peak_cuda_memory_bytes"] / 2 ** 20, 1)
                      if info.get("peak_cuda_memory_bytes") else None)
    return record


def train_losses(fold_dir: Path):
    """nnU-Net's train_loss per epoch from the final checkpoint's logger: the supports' learning curve, which
    says whether a budget was long enough without looking at the query set. None if there is no checkpoint."""
    checkpoint = fold_dir / "checkpoint_final.pth"
    if not checkpoint.is_file():
        return None
    import torch
    logged = torch.load(checkpoint, map_location="cpu", weights_only=False).get("logging", {})
    return [round(float(v), 4) for v in logged.get("train_losses", [])] or None


def count_checkpoint_parameters(fold_dir: Path) -> int:
    import torch
    weights = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    # nnU-Net's state dict names each conv weight up to three times (conv.weight, all_modules.0.weight and the
    # decoder's alias of the encoder); torch.save keeps the shared storage, so count each tensor once
    unique = {(v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)): v.numel()
              for v in weights.values() if v.is_floating_point()}
    return sum(unique.values())
