"""Run a benchmark config: prepare the target like the foundation, write the few-shot splits, run every
missing cell (a progress bar over cells), then write results.csv, results.md and dice_vs_k.png."""
import contextlib
import io
import os
from pathlib import Path

from ..commands import plugin_environment
from ..errors import FSEFTError
from ..files import read_json, write_json
from ..trainer_names import plugin_trainers, unknown_name
from .cells import Cell, collect, count_checkpoint_parameters, model_folder, train_cell, \
    train_losses, zeroshot_cell
from .config import BenchmarkConfig
from .pseudo_cells import ATLAS, atlas_cell, needs_unlabelled, pseudo_cell, split_method
from .report import write_reports


def check_methods(config: BenchmarkConfig) -> None:
    """Every method names a trainer nnU-Net will find, before any cell runs; else one line with the valid names."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    plugin = plugin_trainers()
    needs_unlabelled(config)
    trainers = [config.scratch_trainer if m == "scratch" else (split_method(m) or (m,))[0]
                for m in config.methods if m not in ("zeroshot", ATLAS)]
    for method in trainers:
        if method in plugin:
            continue
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net narrates its search
                recursive_find_trainer_class_by_name(method)
        except (Exception, SystemExit):  # nnU-Net's RuntimeError, or trainers/name_check.py's one line
            message = unknown_name("method/trainer", method, ["zeroshot", "scratch", ATLAS, *plugin],
                                   also=", or a trainer nnU-Net finds (built in or on nnUNet_extTrainer)")
            raise FSEFTError(message) from None


def prepare(config: BenchmarkConfig) -> tuple:
    """(dataset name, dataset.json, fold table): the target preprocessed with the foundation's plans and
    split into few-shot folds; both steps are skipped when already done."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from ..data.fewshot import TABLE_FILE, EarlierFoldsChanged, splits_are_ours, write_fewshot_splits
    from ..planning import prepare_target
    if not config.checkpoint.is_file():
        raise FSEFTError(f"foundation checkpoint {config.checkpoint} does not exist; train the foundation first")
    try:
        name = str(maybe_convert_to_dataset_name(config.dataset))
    except RuntimeError:
        raise FSEFTError(f"no dataset {config.dataset} in nnUNet_raw; create the target dataset first") from None
    pre = Path(nnUNet_preprocessed) / name
    if not (pre / f"{config.plans_name}.json").is_file():
        prepare_target(name, config.foundation, num_processes=1)
    table = read_json(pre / TABLE_FILE) if splits_are_ours(str(pre)) else None
    wanted_query = config.query if isinstance(config.query, int) else \
        read_json(config.query, "the config's query names a JSON list of case ids")
    if isinstance(wanted_query, dict):  # an earlier fewshot_splits.json used as the query file
        wanted_query = wanted_query.get("query", [])
    if table is None or not _covers(table, config, wanted_query):
        query = {"n_query": config.query} if isinstance(config.query, int) else {"query_file": str(config.query)}
        trained = _trained_folds(name)  # new K or seeds are appended; only a change to these folds must stop
        try:
            table = write_fewshot_splits(name, config.ks, config.seeds, target_class=config.target_class,
                                         keep_earlier=bool(trained), **query)
        except EarlierFoldsChanged as e:
            raise FSEFTError(f"{e}, but models trained on the earlier folds exist (e.g. {trained[0]}); move "
                             f"nnUNet_results/{name} away, or keep the query set of fewshot_splits.json") from None
    return name, read_json(pre / "dataset.json", "prepare the target again"), table


def _trained_folds(name: str) -> list:
    """fold_X folders of the target: a fold given other supports would be read as another (K, seed)."""
    from nnunetv2.paths import nnUNet_results
    from ..zeroshot import TRAINER_NAME as ZEROSHOT  # rebuilt by every zero-shot cell, never stale
    return sorted(str(p) for p in (Path(nnUNet_results) / name).glob("*/fold_*")
                  if not p.parent.name.startswith(f"{ZEROSHOT}__"))


def _covers(table: dict, config: BenchmarkConfig, query) -> bool:
    same_query = len(table["query"]) == query if isinstance(query, int) else table["query"] == list(query)
    # (K, seed) pairs, not K and seeds apart: K=1 x seeds 0-2 plus K=5 x seed 0 lacks (5, 1)
    have = {(f["k"], f["seed"]) for f in table["folds"]}
    return same_query and all((k, s) in have for k in config.ks for s in config.seeds)


def plan_cells(config: BenchmarkConfig, table: dict) -> list:
    folds = {(f["k"], f["seed"]): f["fold"] for f in table["folds"]}
    trainers = {"zeroshot": "", ATLAS: "", "scratch": config.scratch_trainer}
    # Seed-major order: an interrupted run leaves every method compared on the same seeds, not some methods done.
    return [Cell(m, k, s, folds[(k, s)], trainers.get(m, m))
            for s in config.seeds for k in config.ks for m in config.methods]


def run_benchmark(config: BenchmarkConfig, progress: bool = True, on_cell=None) -> dict:
    """Runs the cells not done yet. The reports are rewritten after every new cell (so a long run interrupted
    part-way still has its tables); `on_cell(records)` is called then too, for callers that publish elsewhere."""
    env = plugin_environment()
    os.environ["nnUNet_extTrainer"] = env["nnUNet_extTrainer"]  # for the in-process checks and zero-shot
    check_methods(config)
    name, dataset_json, table = prepare(config)
    cells_dir, logs = config.output / "cells", config.output / "logs"
    cells_dir.mkdir(parents=True, exist_ok=True)
    logs.mkdir(exist_ok=True)
    cells = plan_cells(config, table)
    records = []
    from tqdm import tqdm
    bar = tqdm(cells, desc="benchmark cells", disable=not progress, unit="cell")
    for cell in bar:
        bar.set_postfix_str(f"{cell.method} K={cell.k} seed={cell.seed}")
        record_file = cells_dir / f"{cell.key}.json"
        if record_file.is_file():
            records.append(finished_record(config, name, cell, record_file))
            continue
        records.append(_run_cell(config, name, dataset_json, cell, logs / f"{cell.key}.log", env, cells_dir,
                                 table["query"]))
        write_json(record_file, records[-1])  # atomic: a kill mid-write must not break resuming
        write_reports(config, name, records)
        if on_cell:
            on_cell(records)
    return write_reports(config, name, records)


def finished_cells(config: BenchmarkConfig) -> list:
    """The records of the config's cells that have run, in the harness's order; nothing is trained (for
    rewriting tables from a grid run in several parts)."""
    name, _, table = prepare(config)
    files = {cell: config.output / "cells" / f"{cell.key}.json" for cell in plan_cells(config, table)}
    records = [finished_record(config, name, cell, f) for cell, f in files.items() if f.is_file()]
    if not records:
        raise FSEFTError(f"no finished cells in {config.output / 'cells'} for these methods, K and seeds")
    return records


def finished_record(config: BenchmarkConfig, name: str, cell: Cell, record_file: Path) -> dict:
    """A finished cell's record; one written before records kept the learning curve gets it from the model."""
    record = read_json(record_file, "delete it to run that cell again")
    if cell.method not in ("zeroshot", ATLAS) and "+" not in cell.method and "train_losses" not in record:
        record["train_losses"] = train_losses(model_folder(config, name, cell.trainer) / f"fold_{cell.fold}")
    return record


def _run_cell(config, name, dataset_json, cell: Cell, log: Path, env: dict, cells_dir: Path, query: list) -> dict:
    base = {"method": cell.method, "k": cell.k, "seed": cell.seed, "fold": cell.fold}
    if cell.method == "zeroshot":  # one evaluation serves every (K, seed): the query set is shared
        shared = cells_dir / "zeroshot.json"
        if not shared.is_file():
            cost = zeroshot_cell(config, cell.fold, log)
            fold_dir = model_folder(config, name, "FSEFTZeroShot") / f"fold_{cell.fold}"
            write_json(shared, {**collect(config, dataset_json, fold_dir), **cost,
                                "trainable_parameters": 0, "adapter_bytes": 0})
        return {**base, **read_json(shared, "delete it to evaluate the zero-shot cell again")}
    if cell.method == ATLAS:
        return {**base, **atlas_cell(config, name, dataset_json, cell, log, env, query)}
    if split_method(cell.method):
        cost, fold_dir = pseudo_cell(config, name, cell, log, env)
    else:
        cost = train_cell(config, name, cell, log, env)
        fold_dir = model_folder(config, name, cell.trainer) / f"fold_{cell.fold}"
    record = {**base, **cost, **collect(config, dataset_json, fold_dir)}
    if record.get("trainable_parameters") is None:  # a stock trainer trains everything
        record["trainable_parameters"] = count_checkpoint_parameters(fold_dir)
    record["train_losses"] = train_losses(fold_dir)
    return record
