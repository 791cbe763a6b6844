"""The adaptation runs: one nnUNetv2_train -pretrained_weights + nnUNetv2_predict + evaluation per (method, K)."""
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Tuple

from ..errors import FSEFTError
from .settings import CONFIGURATION, METHODS, PLANS, SCRATCH, Settings
from .stages import evaluate, saved_parameters
from .steps import Progress, done, run_command, run_in_process, save_record
from ..commands import console_script
from .workdir import Workdir


@dataclass
class Run:
    method: str
    trainer: str         # full class name, with the schedule suffix
    k: int
    fold: int
    pretrained: bool     # False: the from-scratch baseline (no -pretrained_weights)

    @property
    def step(self) -> str:
        return f"adapt_{self.trainer}_K{self.k}"


def plan_runs(settings: Settings, folds: List[dict]) -> List[Run]:
    """One run per (method, K), in table order: methods as listed, the baseline last, K ascending."""
    names = dict((t, m) for m, t in METHODS)
    runs = []
    for trainer in settings.trainers:
        runs += [Run(names.get(trainer, trainer), f"{trainer}_{settings.schedule}", f["k"], f["fold"], True)
                 for f in folds]
    if settings.scratch:
        runs += [Run(SCRATCH[0], f"{SCRATCH[1]}_{settings.schedule}", f["k"], f["fold"], False) for f in folds]
    return runs


def adapt_and_score(wd: Workdir, run: Run, target: dict, checkpoint: Path, env: dict, query: Tuple[Path, Path]) -> dict:
    """nnUNetv2_train one few-shot fold, nnUNetv2_predict the query cases, score them with nnU-Net."""
    dataset = target["dataset"]
    train = [console_script("nnUNetv2_train"), dataset, CONFIGURATION, str(run.fold), "-tr", run.trainer, "-p", PLANS,
             "-device", "cpu"]
    if run.pretrained:
        train += ["-pretrained_weights", str(checkpoint)]
    train_s = run_command(wd, run.step, train, env)
    model = wd.results / dataset / f"{run.trainer}__{PLANS}__{CONFIGURATION}"
    out = wd.root / "predictions" / run.trainer / f"fold_{run.fold}"
    if out.exists():
        shutil.rmtree(out)
    predict = [console_script("nnUNetv2_predict"), "-i", str(query[0]), "-o", str(out), "-d", dataset,
               "-tr", run.trainer, "-c", CONFIGURATION, "-p", PLANS, "-f", str(run.fold), "-device", "cpu",
               "--disable_tta", "-npp", "0", "-nps", "0", "--disable_progress_bar"]  # sequential: no worker start-ups
    predict_s = run_command(wd, run.step.replace("adapt_", "predict_"), predict, env)
    dataset_json = json.loads((model / "dataset.json").read_text())
    scores = run_in_process(wd, run.step.replace("adapt_", "evaluate_"), evaluate, out, query[1], dataset_json,
                            model / "plans.json", capture=False)
    params, size, file = saved_parameters(model / f"fold_{run.fold}")
    return {**asdict(run), **scores, "trainable_parameters": params, "file_bytes": size, "file": file,
            "train_s": round(train_s, 1), "predict_s": round(predict_s, 1)}


def adaptation_step(wd: Workdir, run: Run, target: dict, checkpoint: Path, env: dict, query,
                    progress: Progress) -> dict:
    """One (method, K) run, or its record from an earlier demo run."""
    label = f"{run.method} K={run.k}"
    record = done(wd, run.step)
    if record is not None:
        progress.line(label, f"Dice {record['dice']:.3f} (done earlier)")
        return record
    record = save_record(wd, run.step, adapt_and_score(wd, run, target, checkpoint, env, query))
    per_class = record.get("dice_per_class", {})
    detail = f" ({', '.join(f'{c} {d:.2f}' for c, d in per_class.items())})" if len(per_class) > 1 else ""
    progress.line(label, f"Dice {record['dice']:.3f}{detail}  {record['trainable_parameters']:,} trained params  "
                         f"(train {record['train_s']:.0f} s, predict {record['predict_s']:.0f} s)")
    return record


def wait_for_plans(model_folder: Path, pretraining) -> None:
    """The foundation's plans.json and dataset.json appear when its training starts (nnU-Net's on_train_start)."""
    while True:
        try:
            for name in ("plans.json", "dataset.json"):
                json.loads((model_folder / name).read_text())
            return
        except (OSError, ValueError):
            if pretraining.done():  # failed (its own error is raised first by Lanes.wait) or files removed
                raise FSEFTError(f"the foundation's plans.json/dataset.json are missing from {model_folder}; "
                                 "rerun with --overwrite")
            time.sleep(1)
