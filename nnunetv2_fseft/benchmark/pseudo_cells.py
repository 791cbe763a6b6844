"""Benchmark methods that learn from unlabelled scans (config key "unlabelled": a folder of images):

  "atlas"                           the supports' labels registered onto each query image; no training
  "TRAINER+registration"            TRAINER on supports + scans pseudo-labelled by registration
  "TRAINER+self"                    ... by TRAINER's own few-shot model of the cell (trained first if missing)
  "TRAINER+both"                    ... where registration and that model agree

Each runs nnUNetv2_fseft_pseudolabel (the command a user runs); a pseudo cell's dataset id is
config.pseudo_ids + 3 * fold + the source's index, and nnU-Net's final validation of its fold 0 scores the same
query cases as every other cell."""
from pathlib import Path

from ..commands import console_script
from ..errors import FSEFTError
from ..files import read_json
from .cells import Cell, model_folder, run_logged
from .config import BenchmarkConfig

ATLAS = "atlas"
SOURCES = {"registration": "registration", "self": "model", "both": "both"}  # method suffix -> --labels


def split_method(method: str):
    """'TRAINER+source' -> (TRAINER, source); None for any other method."""
    trainer, plus, source = method.rpartition("+")
    if not plus:
        return None
    if source not in SOURCES or not trainer:
        raise FSEFTError(f"method '{method}': the part after '+' must be one of {', '.join(SOURCES)} "
                         "(e.g. FSEFTDecoderLoRATrainer+registration)")
    return trainer, source


def needs_unlabelled(config: BenchmarkConfig) -> None:
    uses = [m for m in config.methods if m == ATLAS or "+" in m]
    if uses and config.unlabelled is None:
        raise FSEFTError(f"method '{uses[0]}' needs \"unlabelled\": a folder of unlabelled images in the config")
    if uses and not Path(config.unlabelled).is_dir():
        raise FSEFTError(f"unlabelled folder {config.unlabelled} does not exist")


def _dataset_id(config: BenchmarkConfig, cell: Cell, source: str) -> int:
    dataset_id = config.pseudo_ids + 3 * cell.fold + list(SOURCES).index(source)
    if dataset_id > 999:
        raise FSEFTError(f"pseudo dataset id {dataset_id} is over 999; lower \"pseudo_ids\" in the config")
    return dataset_id


def pseudo_cell(config: BenchmarkConfig, name: str, cell: Cell, log: Path, env: dict) -> tuple:
    """(cost, fold folder of the trained pseudo-label model)."""
    trainer, source = split_method(cell.method)
    dataset_id = _dataset_id(config, cell, source)
    dataset_name = f"{name[11:]}Pseudo{source.capitalize()}"
    folder = model_folder(config, f"Dataset{dataset_id:03d}_{dataset_name}", trainer) / "fold_0"
    cmd = [console_script("nnUNetv2_fseft_pseudolabel"), "-d", name, "-f", str(cell.fold), "-i", str(config.unlabelled),
           "-o", str(dataset_id), "-n", dataset_name, "--labels", SOURCES[source], "-tr", trainer,
           "-pretrained_weights", str(config.checkpoint), "-p", config.plans_name, "-c", config.configuration,
           "-device", config.device, "-np", "1", "--overwrite"]
    cost = run_logged(cmd, log, dict(env, nnUNet_fseft_seed=str(cell.seed)))
    return cost, folder


def atlas_cell(config: BenchmarkConfig, name: str, dataset_json: dict, cell: Cell, log: Path, env: dict,
               query: list) -> dict:
    """Propagated labels of the query images, scored by nnU-Net's evaluation."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder2
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw

    from ..data.nnunet_raw import link_file, training_cases
    from ..names import dice_by_class
    raw = Path(nnUNet_raw) / name
    inputs, out = config.output / "atlas" / "query_images", config.output / "atlas" / f"fold_{cell.fold}"
    inputs.mkdir(parents=True, exist_ok=True)
    for case, (images, _) in training_cases(raw, dataset_json).items():
        if case in query:
            for c, image in enumerate(images):
                link = inputs / f"{case}_{c:04d}{dataset_json['file_ending']}"
                if not link.exists():
                    link_file(image, link)
    cost = run_logged([console_script("nnUNetv2_fseft_pseudolabel"), "--atlas", "-d", name, "-f", str(cell.fold),
                       "-i", str(inputs), "-o", str(out), "--overwrite"], log, env)
    pre = Path(nnUNet_preprocessed) / name
    compute_metrics_on_folder2(str(raw / "labelsTr"), str(out), str(pre / "dataset.json"),
                               str(pre / f"{config.plans_name}.json"), str(out / "summary.json"), num_processes=1,
                               chill=True)
    summary = read_json(out / "summary.json")
    return {"train_seconds": 0.0, "predict_seconds": cost["train_seconds"], "dice": summary["foreground_mean"]["Dice"],
            "dice_per_class": dice_by_class(summary, dataset_json), "trainable_parameters": 0, "adapter_bytes": 0}
