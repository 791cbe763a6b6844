"""A benchmark config (JSON, or YAML when PyYAML is installed) and its checks.

    {"dataset": 105,                          target (nnU-Net id or name), in nnUNet_raw
     "foundation": "path/to/TRAINER__PLANS__CONFIG",   the foundation's model folder (fold 0 unless
     "foundation_fold": 0,                    foundation_fold says otherwise)
     "methods": ["zeroshot", "scratch", "FSEFTLinearProbeTrainer", "FSEFTLoRATrainer"],
     "k": [1, 5, 10], "seeds": 3,             a count (0..n-1) or a list
     "query": 50,                             query set size, or a JSON file of case ids
     "target_class": null, "device": "cpu", "output": "results/my_benchmark"}

Methods: any nnU-Net trainer class name (adapted from the foundation with -pretrained_weights), "scratch"
(random init; "scratch_trainer" names the trainer, default FSEFTScratchTrainer: stock nnU-Net on the FSEFT
schedule) and "zeroshot" (no training). With "unlabelled": "FOLDER" (images, nnU-Net naming) also "atlas" and
"TRAINER+registration", "TRAINER+self", "TRAINER+both" (benchmark/pseudo_cells.py; their datasets take ids from
"pseudo_ids", default 500).
Relative paths are relative to the config file.
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

from ..errors import FSEFTError

SCRATCH_TRAINER = "FSEFTScratchTrainer"
KEYS = {"dataset", "foundation", "foundation_fold", "methods", "k", "seeds", "query", "target_class", "device",
        "output", "scratch_trainer", "unlabelled", "pseudo_ids"}
PSEUDO_IDS = 500  # the first dataset id of the pseudo-labelled datasets (benchmark/pseudo_cells.py)


@dataclass(frozen=True)
class BenchmarkConfig:
    dataset: str
    foundation: Path
    methods: List[str]
    ks: List[int]
    seeds: List[int]
    query: Union[int, Path]
    output: Path
    foundation_fold: int = 0
    target_class: Optional[str] = None
    device: str = "cpu"
    scratch_trainer: str = SCRATCH_TRAINER
    unlabelled: Optional[Path] = None
    pseudo_ids: int = PSEUDO_IDS

    @property
    def configuration(self) -> str:
        return self.foundation.name.split("__")[-1]

    @property
    def plans_name(self) -> str:
        return self.foundation.name.split("__")[1]

    @property
    def checkpoint(self) -> Path:
        return self.foundation / f"fold_{self.foundation_fold}" / "checkpoint_final.pth"


def _read(path: Path) -> dict:
    if not path.is_file():
        raise FSEFTError(f"benchmark config {path} does not exist")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise FSEFTError(f"{path} is YAML but PyYAML is not installed; pip install pyyaml, or write JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise FSEFTError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    else:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise FSEFTError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise FSEFTError(f"{path} must hold an object with keys {', '.join(sorted(KEYS))}")
    return data


def load_config(path) -> BenchmarkConfig:
    path = Path(path).resolve()
    data = _read(path)
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise FSEFTError(f"{path}: unknown key '{unknown[0]}'; known keys: {', '.join(sorted(KEYS))}")
    missing = [k for k in ("dataset", "foundation", "methods", "k", "query") if k not in data]
    if missing:
        raise FSEFTError(f"{path}: missing key '{missing[0]}' (see nnUNetv2_fseft_benchmark -h for an example)")
    here = path.parent

    def resolve(value) -> Path:
        return (here / Path(value).expanduser()).resolve()

    foundation = resolve(data["foundation"])
    if len(foundation.name.split("__")) != 3:
        raise FSEFTError(f"{path}: foundation must be a model folder named TRAINER__PLANS__CONFIG, got {foundation}")
    methods = data["methods"]
    if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
        raise FSEFTError(f"{path}: methods must be a non-empty list of trainer names, 'scratch' or 'zeroshot'")
    ks = data["k"] if isinstance(data["k"], list) else [data["k"]]
    if not ks or not all(isinstance(k, int) and k >= 1 for k in ks):
        raise FSEFTError(f"{path}: k must be shot counts >= 1, got {data['k']}")
    seeds = data.get("seeds", 1)
    seeds = list(range(seeds)) if isinstance(seeds, int) else seeds
    if not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise FSEFTError(f"{path}: seeds must be a count >= 1 or a list of seeds >= 0")
    query = data["query"]
    query = query if isinstance(query, int) else resolve(query)
    output = resolve(data.get("output", f"results/{path.stem}"))
    return BenchmarkConfig(str(data["dataset"]), foundation, list(dict.fromkeys(methods)), sorted(set(ks)),
                           list(seeds), query, output, int(data.get("foundation_fold", 0)),
                           data.get("target_class"), data.get("device", "cpu"),
                           data.get("scratch_trainer", SCRATCH_TRAINER),
                           resolve(data["unlabelled"]) if data.get("unlabelled") else None,
                           int(data.get("pseudo_ids", PSEUDO_IDS)))
