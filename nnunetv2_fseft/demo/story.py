"""The whole story in order (nnUNetv2_fseft_demo): data, foundation, target, adaptation runs, report."""
import json
import os
import time
from dataclasses import asdict
from typing import Optional

from ..demo_trainers import SCHEDULES, THREADS_VARIABLE
from .adapt import adaptation_step, plan_runs, wait_for_plans
from .report import write_report
from .settings import CONFIGURATION, FOUNDATION_FOLD, PLANS, PRESET, Settings, default_settings
from .stages import (assemble, foundation_folder, foundation_scores, link_query, link_user_data, make_synthetic_data,
                     plan, prepare, user_raw_folder, describe_phantoms)
from .steps import Lanes, Progress, Finished, done, run_command, run_in_process, save_record
from ..commands import console_script
from .workdir import Workdir, jsonable, environment, nnunet_env, open_workdir


def run_demo(workdir="fseft_demo", quick: bool = False, data=None, overwrite: bool = False, jobs: int = 1,
             preset: str = PRESET, stream=None) -> dict:
    """The whole story; returns {'table', 'markdown', 'plot', 'records', 'total_s'}."""
    settings = default_settings(quick, data, preset)
    user_raw = user_raw_folder() if data is not None else None
    wd = open_workdir(workdir, settings, overwrite)
    env = nnunet_env(wd)
    alone_env = _alone(env)  # before the environment below replaces the user's variables
    progress = Progress(stream)
    try:
        with environment(env):  # for the steps that run in this process
            return _story(wd, settings, env, user_raw, jobs, progress, alone_env)
    finally:
        progress.close()


def _alone(env: dict) -> dict:
    """The environment of a training that runs alone (the pre-training): its OpenMP threads spin while they wait
    (ACTIVE), which trains this small network on two threads far faster than PASSIVE, the demo's setting for
    trainings side by side (docs/demo.md); the user's own setting wins."""
    return {**env, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "ACTIVE")}


def _story(wd: Workdir, settings: Settings, env: dict, user_raw: Optional[str], jobs: int, progress: Progress,
           alone_env: dict) -> dict:
    progress.line("work dir", f"{wd.root} (logs: {wd.logs})")

    def step(name: str, function, *args, describe=lambda r: "", **kwargs) -> dict:
        record = done(wd, name)
        if record is not None:
            progress.line(name, describe(record) + " (done earlier)")
            return record
        t0 = time.monotonic()
        record = save_record(wd, name, run_in_process(wd, name, function, *args, **kwargs))
        progress.line(name, f"{describe(record)} ({time.monotonic() - t0:.0f} s)")
        return record

    if settings.data is None:
        data_record = step("data", make_synthetic_data, wd, settings, describe=lambda r: describe_phantoms(settings))
    else:
        data_record = step("data", link_user_data, wd, settings, user_raw,
                           describe=lambda r: f"linked {len(r['linked'])} raw datasets from your nnUNet_raw")
    foundation = step("assemble", assemble, wd, settings, data_record["sources"], describe=lambda r: (
        f"{r['dataset']}: {r['n_cases']} cases, classes {', '.join(r['classes'])}; each case annotated only "
        f"for its own dataset's classes"))
    planned = step("plan", plan, foundation["dataset"], settings, describe=lambda r: (
        f"nnU-Net plans + '{settings.preset}' preset: patch {'x'.join(map(str, r['patch_size']))}, "
        f"batch {r['batch_size']}, features {r['features']}; preprocessed"))

    model_folder = foundation_folder(wd, foundation["dataset"], settings)
    trainer = f"MultiTalentTrainer_{settings.schedule}"
    checkpoint = model_folder / f"fold_{FOUNDATION_FOLD}" / "checkpoint_final.pth"
    # the adaptation runs go side by side, each with its share of the cores (read by the demo trainers); the
    # pre-training, which everything after it waits for, takes all of them
    train_env = {**env, THREADS_VARIABLE: str(max(1, (os.cpu_count() or 1) // jobs))} if jobs > 1 else env

    def pretrain() -> dict:
        record = done(wd, "pretrain")
        if record is None:
            epochs, iterations, _ = SCHEDULES[settings.schedule]["pretrain"]
            progress.line("pretrain", f"{trainer}: {epochs} x {iterations} iterations, partial-label loss "
                                      f"(log: {wd.log('pretrain')})")
            seconds = run_command(wd, "pretrain", [console_script("nnUNetv2_train"), foundation["dataset"],
                                                   CONFIGURATION, str(FOUNDATION_FOLD), "-tr", trainer, "-p", PLANS,
                                                   "-device", "cpu"], alone_env)
            record = save_record(wd, "pretrain", {"trainer": trainer, "checkpoint": str(checkpoint),
                                                  "seconds": seconds, "scores": foundation_scores(model_folder)})
            suffix = f"({seconds:.0f} s)"
        else:
            suffix = "(done earlier)"
        scores = ", ".join(f"{k} {v:.2f}" for k, v in record["scores"].items() if v is not None) or "n/a"
        progress.line("pretrain", f"foundation ready; held-out Dice {scores} {suffix}")
        return record

    def prepare_target(pretraining) -> tuple:
        """Meanwhile: the target needs only the foundation's plans, not its weights."""
        wait_for_plans(model_folder, pretraining)
        target = step("target", prepare, wd, settings, data_record["target"], model_folder, describe=lambda r: (
            f"{r['dataset']} preprocessed with the foundation's plans; "
            + ", ".join("fold %d = K=%d" % (f["fold"], f["k"]) for f in r["folds"])
            + f"; {len(r['query'])} query cases"))
        return target, link_query(wd, target["dataset"], target["query"])

    lanes = Lanes(jobs)
    try:
        if jobs > 1:
            pretraining = lanes.submit(pretrain)
            side = lanes.submit(prepare_target, pretraining)
            record, (target, query) = lanes.wait([pretraining, side])
        else:
            record = pretrain()
            target, query = prepare_target(Finished(record))
        runs = plan_runs(settings, target["folds"])
        progress.line("adapt", f"{len(runs)} runs: nnUNetv2_train (-pretrained_weights <foundation>, except from "
                               f"scratch), nnUNetv2_predict, nnU-Net's evaluation; {jobs} at a time")
        # longest first, so that the lanes finish together
        order = sorted(runs, key=lambda r: r.trainer.startswith("FSEFTLinearProbe"))
        futures = [lanes.submit(adaptation_step, wd, r, target, checkpoint, train_env, query, progress)
                   for r in order]
        records = dict(zip((r.step for r in order), lanes.wait(futures)))
    finally:
        lanes.close()

    total_s = time.monotonic() - progress.t0
    target_json = json.loads((wd.raw / target["dataset"] / "dataset.json").read_text())
    context = {"settings": jsonable(asdict(settings)), "foundation": foundation, "plans": planned,
               "foundation_trainer": trainer, "foundation_scores": record["scores"], "target": target,
               "target_classes": [k for k in target_json["labels"] if k not in ("background", "ignore")]}
    runs_in_order = [records[r.step] for r in runs]
    md, png, table = write_report(wd, runs_in_order, context, total_s)
    return {"table": table, "markdown": md, "plot": png, "records": runs_in_order, "total_s": total_s}
