"""Shared by the abdominal benchmark scripts (issue 8): the split, the datasets they write, nnU-Net's folders.

Real anatomy (Learn2Reg 2020 task 3 / BTCV label maps), synthetic intensities (benchmarks/abdomen_synth with
abdomen_priors.json). WORKDIR holds synth/<domain>/<subject>/ (the synthetic cases), raw/, pre/, res/ (nnU-Net's
folders) and abdomen_data.json (what abdomen_data.py wrote, and with which settings).
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

from bench_env import setup_env  # noqa: F401 (the drivers import it from here)

HERE = Path(__file__).resolve().parent
LABEL_MAPS = HERE.parents[1] / "shared" / "data" / "abdomen_labels_l2r"
PRIORS = HERE / "abdomen_priors.json"
SPLIT_FILE = HERE / "abdomen_split.json"
SPLIT = json.loads(SPLIT_FILE.read_text())
DATA_RECORD = "abdomen_data.json"
TAG = "real anatomy, synthetic intensities"
PRESET = "abdomen_cpu"


@dataclass(frozen=True)
class DatasetSpec:
    id: int
    name: str
    domain: str
    subjects: Tuple[str, ...]
    organs: Tuple[str, ...]
    role: str

    @property
    def folder_name(self) -> str:
        return f"Dataset{self.id:03d}_{self.name}"


def _pretraining():
    groups = SPLIT["pretraining"]["datasets"]
    return [DatasetSpec(801 + i, f"AbdA_{name}", "A", tuple(g["subjects"]), tuple(g["organs"]),
                        f"partially labelled pre-training dataset {i + 1} of 3")
            for i, (name, g) in enumerate(groups.items())]


PARTIAL = _pretraining()
ALL_PRETRAINING = tuple(s for d in PARTIAL for s in d.subjects)
TARGET = tuple(SPLIT["target"]["supports"] + SPLIT["target"]["query"])
FULL = DatasetSpec(811, "AbdA_Full", "A", ALL_PRETRAINING, tuple(SPLIT["known_organs"]),
                   "upper bound: the 18 pre-training subjects with every pre-training organ labelled")
QUERY_A = DatasetSpec(812, "AbdA_Query", "A", tuple(SPLIT["target"]["query"]), tuple(SPLIT["known_organs"]),
                      "experiment 1's test set: the 7 query subjects in domain A (never trained on)")
KNOWN_B = DatasetSpec(820, "AbdB_Known", "B", TARGET, tuple(SPLIT["known_organs"]),
                      "target clinic (domain B), the organs the foundation knows (experiment 2)")
NOVEL_B = DatasetSpec(821, "AbdB_Novel", "B", TARGET, tuple(SPLIT["novel_organs"]),
                      "target clinic (domain B), organs no pre-training dataset annotates (experiment 3)")
ASSEMBLED = (810, "AbdA_Partial")  # the three partial datasets unified by nnUNetv2_fseft_assemble
CONVERTED = PARTIAL + [FULL, QUERY_A, KNOWN_B, NOVEL_B]


def assembled_folder_name() -> str:
    return f"Dataset{ASSEMBLED[0]:03d}_{ASSEMBLED[1]}"


def cases_by_domain() -> dict:
    """domain -> subjects whose synthetic case that domain needs."""
    wanted = {}
    for spec in CONVERTED:
        wanted.setdefault(spec.domain, set()).update(spec.subjects)
    return {d: sorted(s) for d, s in wanted.items()}


