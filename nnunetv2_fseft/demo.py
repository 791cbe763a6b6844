"""The FSEFT story end to end, through nnU-Net's own machinery, in minutes on a CPU (nnUNetv2_fseft_demo).

    data -> assemble -> plan -> pretrain (MultiTalentTrainer) -> prepare target + K-shot folds
         -> adapt (FSEFT trainers, K = 1 and 5) -> nnUNetv2_predict the query cases -> nnU-Net's evaluation
         -> table (markdown) + plot of Dice vs K

The default data are synthetic CT-like phantoms (nnunetv2_fseft.synthetic): two partially labelled "public
datasets" (A: liver + spleen, B: liver + kidneys) make the foundation; the target comes from another "scanner"
(organ intensities shifted) and labels the liver (a class the foundation knows, in a new domain) and the
pancreas (a structure no foundation dataset annotates): the FSEFT study's two scenarios, reported per class. With `data=` the same
story runs on the user's own raw datasets.

Training and prediction run as nnU-Net's console scripts (nnUNetv2_train, nnUNetv2_predict) in subprocesses whose
environment points nnUNet_raw/_preprocessed/_results into the work dir; data assembly, planning, target
preparation, the few-shot splits and the evaluation call the plugin's and nnU-Net's Python functions. Every step
logs to <workdir>/logs/ and records its result in <workdir>/steps/, so a re-run skips finished steps.
"""
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .demo_trainers import SCHEDULES, THREADS_VARIABLE
from .errors import FSEFTError

MARKER = ".fseft_demo.json"
MARKER_VERSION = 1
OWN_ENTRIES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "logs", "steps", "query", "predictions",
               "results.md", "results.json", "dice_vs_k.png", MARKER)
PLANS, CONFIGURATION, PRESET = "nnUNetPlans", "3d_fullres", "tiny"
FOUNDATION_FOLD = 0  # nnU-Net's 5-fold split: the foundation's final validation scores held-out cases

# (display name, trainer); the schedule suffix (_demo / _demoquick) is added per run
METHODS = (
    ("linear probe", "FSEFTLinearProbeTrainer"),
    ("decoder + encoder LoRA", "FSEFTDecoderLoRATrainer"),
    ("LoRA", "FSEFTLoRATrainer"),
    ("full fine-tuning", "FSEFTFullFTTrainer"),
)
SCRATCH = ("from scratch (nnU-Net)", "nnUNetTrainer")
DEFAULT_METHODS = ("FSEFTLinearProbeTrainer", "FSEFTDecoderLoRATrainer", "FSEFTFullFTTrainer")
QUICK_METHODS = ("FSEFTLinearProbeTrainer", "FSEFTDecoderLoRATrainer")

# the synthetic story: (id, name, annotated organs, seed, organ intensity shift in HU)
SOURCES = ((501, "PhantomLiverSpleen", ("liver", "spleen"), 1, 0.0),
           (502, "PhantomLiverKidneys", ("liver", "kidney_left", "kidney_right"), 2, 0.0))
FOUNDATION = (510, "PhantomFoundation")
TARGET = (520, "PhantomScannerB", ("liver", "pancreas"), 3, 40.0)


@dataclass(frozen=True)
class Settings:
    """What a demo run does; stored in the work dir's marker so that a resumed run does the same."""
    schedule: str                   # suffix of the trainers in nnunetv2_fseft/demo_trainers
    n_source_cases: int             # per foundation dataset (synthetic)
    n_target_cases: int             # synthetic target
    n_query: int                    # query cases: the val set of every few-shot fold, never trained on
    ks: Tuple[int, ...]
    trainers: Tuple[str, ...]       # FSEFT trainers (base names)
    scratch: bool                   # also a stock nnU-Net baseline from random init
    data: Optional[Tuple[Tuple[int, ...], int]] = None  # (foundation ids, target id) of the user's datasets
    preset: str = PRESET


def default_settings(quick: bool = False, data=None, preset: str = PRESET) -> Settings:
    if quick:
        return Settings("demoquick", 6, 8, 3, (1, 5), QUICK_METHODS, True, data, preset)
    return Settings("demo", 12, 11, 6, (1, 5), DEFAULT_METHODS, True, data, preset)


# ---------------------------------------------------------------------------------------------- work dir

@dataclass
class Workdir:
    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "nnUNet_raw"

    @property
    def preprocessed(self) -> Path:
        return self.root / "nnUNet_preprocessed"

    @property
    def results(self) -> Path:
        return self.root / "nnUNet_results"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def steps(self) -> Path:
        return self.root / "steps"

    def log(self, step: str) -> Path:
        return self.logs / f"{step}.log"

    def record(self, step: str) -> Path:
        return self.steps / f"{step}.json"


def open_workdir(path, settings: Settings, overwrite: bool = False) -> Workdir:
    """Create or reopen a demo work dir. A non-empty folder that is not a demo's is refused, whatever the flags;
    a demo folder made with other settings is refused unless overwrite (which removes the demo's own entries)."""
    root = Path(path).expanduser().resolve()
    marker = root / MARKER
    wanted = {"tool": "nnUNetv2_fseft_demo", "version": MARKER_VERSION, "settings": _jsonable(asdict(settings))}
    if root.exists() and not root.is_dir():
        raise FSEFTError(f"--workdir {root} is a file; pass a folder (it is created if missing)")
    if root.is_dir() and any(root.iterdir()) and not marker.is_file():
        raise FSEFTError(f"--workdir {root} exists and is not a demo folder (no {MARKER}); pass a new or empty "
                         "folder, e.g. --workdir ./fseft_demo")
    if marker.is_file():
        try:
            found = json.loads(marker.read_text())
        except ValueError:
            found = None
        if overwrite:
            for name in OWN_ENTRIES:
                entry = root / name
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)  # never follows symlinks (--data links the user's raw datasets)
                elif entry.exists() or entry.is_symlink():
                    entry.unlink()
        elif found != wanted:
            was = (found or {}).get("settings", "unreadable")
            raise FSEFTError(f"{root} holds a demo run with other options ({_describe(was)}); pass --overwrite to "
                             f"start over there, or another --workdir")
    wd = Workdir(root)
    for folder in (wd.raw, wd.preprocessed, wd.results, wd.logs, wd.steps):
        folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(wanted, indent=2))
    return wd


def _jsonable(obj):
    return json.loads(json.dumps(obj))


def _describe(settings) -> str:
    if not isinstance(settings, dict):
        return str(settings)
    mode = f"--data {settings.get('data')}" if settings.get("data") else "synthetic"
    return f"{mode}, schedule {settings.get('schedule')}"


def nnunet_env(wd: Workdir) -> dict:
    """The variables nnU-Net reads, pointing into the work dir; CPU-friendly worker counts."""
    from .cli.ext_path import trainers_folder
    from .demo_trainers import FOLDER as DEMO_TRAINERS
    return {"nnUNet_raw": str(wd.raw), "nnUNet_preprocessed": str(wd.preprocessed), "nnUNet_results": str(wd.results),
            "nnUNet_extTrainer": os.pathsep.join([trainers_folder(), DEMO_TRAINERS]),
            "nnUNet_n_proc_DA": "0",    # augmentation in the training process: no worker processes to start
            "nnUNet_compile": "0",
            "nnUNet_def_n_proc": "1",   # else nnU-Net starts 8 export workers, each importing torch
            # OpenMP threads that sleep rather than spin while waiting: on a busy CPU, spinning threads made a
            # 2-thread training step 8x slower (measured); the user's own setting wins
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
            "PYTHONUNBUFFERED": "1"}


def console_script(name: str) -> str:
    """nnU-Net's console script next to this Python (works without an activated venv), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise FSEFTError(f"{name} not found next to {sys.executable} or on PATH; install nnunetv2 in this environment")
    return found


# ---------------------------------------------------------------------------------------------- steps

class Progress:
    """One line per step: elapsed time since the start, step, what it did."""

    def __init__(self, stream=None):
        self.t0 = time.monotonic()
        self.own_stream = None
        if stream is None:
            try:  # a copy of stdout's file descriptor: steps that redirect fd 1 to their log do not swallow it
                stream = self.own_stream = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
            except (AttributeError, OSError, ValueError):  # stdout without a file descriptor (captured)
                stream = sys.stdout
        self.stream = stream
        self.lock = threading.Lock()

    def close(self) -> None:
        if self.own_stream is not None:
            self.own_stream.close()

    def line(self, step: str, text: str) -> None:
        elapsed = int(time.monotonic() - self.t0)
        with self.lock:
            print(f"[{elapsed // 60:2d}:{elapsed % 60:02d}] {step:<28} {text}", file=self.stream, flush=True)


@contextlib.contextmanager
def output_to(log: Path):
    """Send this process's stdout/stderr (file descriptors, so worker processes too) to a log file."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield f
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_in_process(wd: Workdir, step: str, function, *args, capture: bool = True, **kwargs):
    """Call a Python step with its output in logs/<step>.log; errors become one line naming step and log.

    capture=False leaves the output alone (redirecting file descriptors is not thread-safe)."""
    log = wd.log(step)
    log.write_text(f"# {step}: {function.__module__}.{function.__name__}\n")
    try:
        with output_to(log) if capture else contextlib.nullcontext():
            return function(*args, **kwargs)
    except FSEFTError as e:
        raise FSEFTError(f"step '{step}' failed: {e} (log: {log})") from None
    except Exception as e:
        with open(log, "a") as f:
            traceback.print_exc(file=f)
        raise FSEFTError(f"step '{step}' failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                         f"see {log}") from None


def run_command(wd: Workdir, step: str, command: List[str], env: dict) -> float:
    """Run a console script with output in logs/<step>.log; returns its wall time. Failure: one line + log."""
    log = wd.log(step)
    t0 = time.monotonic()
    with open(log, "w") as f:
        f.write("# " + " ".join(command) + "\n# env: " + " ".join(f"{k}={v}" for k, v in env.items()) + "\n")
        f.flush()
        rc = subprocess.call(command, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env={**os.environ, **env}, cwd=str(wd.root))
    if rc != 0:
        raise FSEFTError(f"step '{step}' failed ({Path(command[0]).name} exit code {rc}){_last_error(log)}; "
                         f"see {log}")
    return time.monotonic() - t0


def _last_error(log: Path) -> str:
    """The log's last line that looks like an error, to say what went wrong without a traceback."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    for ln in reversed(lines[-40:]):
        if "Error" in ln or "error:" in ln:
            return f": {ln[:200]}"
    return ""


def done(wd: Workdir, step: str) -> Optional[dict]:
    path = wd.record(step)
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            return None
    return None


def save_record(wd: Workdir, step: str, record: dict) -> dict:
    tmp = wd.record(step).with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, wd.record(step))
    return record


# ---------------------------------------------------------------------------------------------- the story

def make_synthetic_data(wd: Workdir, settings: Settings) -> dict:
    from .synthetic import write_phantom_dataset
    for dataset_id, name, organs, seed, shift in SOURCES:
        write_phantom_dataset(wd.raw, dataset_id, name, list(organs), settings.n_source_cases, seed=seed,
                              intensity_shift=shift)
    dataset_id, name, organs, seed, shift = TARGET
    write_phantom_dataset(wd.raw, dataset_id, name, list(organs), settings.n_target_cases, seed=seed,
                          intensity_shift=shift)
    return {"sources": [s[0] for s in SOURCES], "target": TARGET[0]}


def _describe_phantoms(settings: Settings) -> str:
    sources = ", ".join("%s (%s)" % (name, "+".join(organs)) for _, name, organs, _, _ in SOURCES)
    return (f"{settings.n_source_cases} cases each: {sources}; target {TARGET[1]} ({'+'.join(TARGET[2])}, "
            f"organs +{TARGET[4]:.0f} HU): {settings.n_target_cases} cases")


def user_raw_folder() -> str:
    """--data reads the user's datasets from their nnUNet_raw."""
    user_raw = os.environ.get("nnUNet_raw")
    if not user_raw or not Path(user_raw).is_dir():
        raise FSEFTError("--data needs nnUNet_raw set to the folder that holds your raw datasets "
                         "(see nnU-Net's documentation/setting_up_paths.md)")
    return user_raw


def link_user_data(wd: Workdir, settings: Settings, user_raw: str) -> dict:
    """--data: link the user's raw datasets into the work dir's nnUNet_raw (read only; nothing is written there)."""
    foundation_ids, target_id = settings.data
    folders = {}
    for dataset_id in (*foundation_ids, target_id):
        matches = sorted(Path(user_raw).glob(f"Dataset{int(dataset_id):03d}_*"))
        if len(matches) != 1:
            found = ", ".join(m.name for m in matches) or "none"
            raise FSEFTError(f"--data: dataset id {dataset_id} must match exactly one folder "
                             f"Dataset{int(dataset_id):03d}_* in nnUNet_raw={user_raw} (found: {found})")
        folders[int(dataset_id)] = matches[0].resolve()
        link = wd.raw / matches[0].name
        if not link.exists():
            link.symlink_to(matches[0].resolve(), target_is_directory=True)
    return {"sources": list(foundation_ids), "target": target_id, "linked": {k: str(v) for k, v in folders.items()}}


def foundation_id(wd: Workdir, settings: Settings) -> int:
    """The assembled foundation's id: 510 for the phantoms; with --data the highest id <= 999 not linked."""
    if settings.data is None:
        return FOUNDATION[0]
    taken = {int(p.name[7:10]) for p in wd.raw.glob("Dataset[0-9][0-9][0-9]_*") if not p.name.endswith("_DemoFoundation")}
    free = [i for i in range(999, 900, -1) if i not in taken]
    if not free:
        raise FSEFTError("--data: no free dataset id between 901 and 999 for the assembled foundation dataset")
    return free[0]


def assemble(wd: Workdir, settings: Settings, sources: Sequence[int]) -> dict:
    from .data.assemble import assemble_datasets
    fid = foundation_id(wd, settings)
    name = FOUNDATION[1] if settings.data is None else "DemoFoundation"
    folder = assemble_datasets(list(sources), fid, name, overwrite=True)
    dataset_json = json.loads((folder / "dataset.json").read_text())
    annotated = {}
    for info in dataset_json.get("fseft_cases", {}).values():
        annotated.setdefault(info["dataset"], info["annotated"])
    return {"dataset": folder.name, "id": fid, "n_cases": dataset_json["numTraining"],
            "classes": [k for k in dataset_json["labels"] if k != "background"], "annotated": annotated}


def plan(dataset: str, settings: Settings) -> dict:
    from .planning import plan_with_preset
    plans_name = plan_with_preset(dataset, settings.preset, num_processes=1, overwrite=True)
    return {"plans": plans_name, **_plan_summary(Path(os.environ["nnUNet_preprocessed"]) / dataset / f"{plans_name}.json")}


def _plan_summary(plans_file: Path) -> dict:
    plans = json.loads(plans_file.read_text())
    config = plans["configurations"][CONFIGURATION]
    return {"patch_size": config["patch_size"], "batch_size": config["batch_size"],
            "features": config["architecture"]["arch_kwargs"]["features_per_stage"]}


def foundation_folder(wd: Workdir, dataset: str, settings: Settings) -> Path:
    return wd.results / dataset / f"MultiTalentTrainer_{settings.schedule}__{PLANS}__{CONFIGURATION}"


def foundation_scores(model_folder: Path) -> dict:
    """Held-out Dice per class from the foundation's final validation (annotated classes only, if written)."""
    validation = model_folder / f"fold_{FOUNDATION_FOLD}" / "validation"
    annotated = validation / "summary_annotated.json"
    if annotated.is_file():
        classes = json.loads(annotated.read_text())["classes"]
        return {k: v["Dice"] for k, v in classes.items()}
    summary = validation / "summary.json"
    if summary.is_file():
        return {"mean": json.loads(summary.read_text())["foreground_mean"]["Dice"]}
    return {}


def prepare(wd: Workdir, settings: Settings, target: int, model_folder: Path) -> dict:
    from .data.fewshot import write_fewshot_splits
    from .planning import prepare_target
    plans_name = prepare_target(target, model_folder, num_processes=1, overwrite=True)
    n_query, ks = settings.n_query, list(settings.ks)
    if settings.data is not None:
        n_query, ks = _fit_ks(_n_cases(wd, target), ks)
    result = write_fewshot_splits(target, ks=ks, seeds=1, n_query=n_query, overwrite=True)
    return {"dataset": result["dataset"], "plans": plans_name, "query": result["query"],
            "folds": [{"fold": f["fold"], "k": f["k"], "train": f["train"]} for f in result["folds"]]}


def _n_cases(wd: Workdir, target: int) -> int:
    folder = next(wd.raw.glob(f"Dataset{int(target):03d}_*"))
    return int(json.loads((folder / "dataset.json").read_text())["numTraining"])


def _fit_ks(n_cases: int, ks: List[int]) -> Tuple[int, List[int]]:
    """--data: up to 10 query cases, and the Ks that still leave supports for them."""
    n_query = max(1, min(10, n_cases - max(ks), n_cases // 2))
    fitting = [k for k in ks if k + n_query <= n_cases]
    if not fitting:
        raise FSEFTError(f"--data: the target has {n_cases} training cases; it needs at least 2 "
                         "(1 support + 1 query)")
    return n_query, fitting


def link_query(wd: Workdir, dataset: str, query: Sequence[str]) -> Tuple[Path, Path]:
    """query/images (the query cases' images, for nnUNetv2_predict) and query/labels (references)."""
    raw = wd.raw / dataset
    dataset_json = json.loads((raw / "dataset.json").read_text())
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    files = get_filenames_of_train_images_and_targets(str(raw), dataset_json)
    images, labels = wd.root / "query" / "images", wd.root / "query" / "labels"
    for folder in (images, labels):
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    ending = dataset_json["file_ending"]
    for case in query:
        for c, image in enumerate(files[case]["images"]):
            _link(Path(image), images / f"{case}_{c:04d}{ending}")
        _link(Path(files[case]["label"]), labels / f"{case}{ending}")
    return images, labels


def _link(src: Path, dst: Path) -> None:
    try:
        os.symlink(src.resolve(), dst)
    except OSError:
        shutil.copyfile(src, dst)


def evaluate(pred_folder: Path, labels: Path, dataset_json: dict, plans_file: Path) -> dict:
    """nnU-Net's own evaluation of a prediction folder (writes summary.json there)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    label_manager = PlansManager(str(plans_file)).get_label_manager(dataset_json)
    example = next(labels.iterdir())
    reader = determine_reader_writer_from_dataset_json(dataset_json, str(example), verbose=False)()
    regions = label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels
    summary = compute_metrics_on_folder(str(labels), str(pred_folder), str(pred_folder / "summary.json"), reader,
                                        dataset_json["file_ending"], regions, label_manager.ignore_label,
                                        num_processes=1, chill=False)
    from .names import dice_by_class
    return {"dice": summary["foreground_mean"]["Dice"], "n_query": len(summary["metric_per_case"]),
            "dice_per_class": dice_by_class(summary, dataset_json)}


def saved_parameters(fold_folder: Path) -> Tuple[int, int, str]:
    """(trainable parameters, bytes, file): from adapter.safetensors, else the full checkpoint's network."""
    adapter = fold_folder / "adapter.safetensors"
    if adapter.is_file():
        from safetensors import safe_open
        n = 0
        with safe_open(str(adapter), framework="pt") as f:
            for key in f.keys():
                n += _numel(f.get_slice(key).get_shape())
        return n, adapter.stat().st_size, "adapter.safetensors"
    import torch
    checkpoint = fold_folder / "checkpoint_final.pth"
    weights = torch.load(checkpoint, map_location="cpu", weights_only=False)["network_weights"]
    seen, n = set(), 0
    for tensor in weights.values():  # dynamic-network-architectures keeps each conv twice in the state dict
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            n += tensor.numel()
    return n, checkpoint.stat().st_size, "checkpoint_final.pth"


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ---------------------------------------------------------------------------------------------- adaptation runs

@dataclass
class Run:
    method: str
    trainer: str         # full class name, with the schedule suffix
    k: int
    fold: int
    pretrained: bool     # False: the from-scratch baseline, which does not wait for the foundation

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
               "--disable_tta", "-npp", "1", "-nps", "1", "--disable_progress_bar"]
    predict_s = run_command(wd, run.step.replace("adapt_", "predict_"), predict, env)
    dataset_json = json.loads((model / "dataset.json").read_text())
    scores = run_in_process(wd, run.step.replace("adapt_", "evaluate_"), evaluate, out, query[1], dataset_json,
                            model / "plans.json", capture=False)
    params, size, file = saved_parameters(model / f"fold_{run.fold}")
    return {**asdict(run), **scores, "trainable_parameters": params, "file_bytes": size, "file": file,
            "train_s": round(train_s, 1), "predict_s": round(predict_s, 1)}


class Lanes:
    """Runs steps `jobs` at a time in threads; the first failure stops new work and is raised by wait()."""

    def __init__(self, jobs: int):
        self.pool = ThreadPoolExecutor(max_workers=max(1, jobs))
        self.failures: List[BaseException] = []

    def submit(self, function, *args):
        def guarded():
            if self.failures:
                return None
            try:
                return function(*args)
            except BaseException as e:  # FSEFTError, or a bug: re-raised in the main thread
                self.failures.append(e)
                return None
        return self.pool.submit(guarded)

    def wait(self, futures) -> list:
        results = [f.result() for f in futures]
        if self.failures:
            raise self.failures[0]
        return results

    def close(self):
        self.pool.shutdown(wait=True)


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


# ---------------------------------------------------------------------------------------------- report

def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def results_table(records: List[dict]) -> str:
    """Markdown table, one row per (method, K); a Dice column per class when the target has several."""
    classes = list(dict.fromkeys(c for r in records for c in r.get("dice_per_class", {})))
    classes = classes if len(classes) > 1 else []
    header = ("| method | trainer | K | Dice (query) | " + "".join(f"{c} | " for c in classes)
              + "trainable params | saved file | train (s) | predict (s) |\n"
              "|---|---|---:|---:|" + "---:|" * len(classes) + "---:|---|---:|---:|")
    rows = [f"| {r['method']} | {r['trainer']} | {r['k']} | {r['dice']:.3f} | "
            + "".join(f"{r['dice_per_class'].get(c, float('nan')):.3f} | " for c in classes)
            + f"{r['trainable_parameters']:,} | {_size(r['file_bytes'])} ({r['file']}) | {r['train_s']:.0f} | "
            f"{r['predict_s']:.0f} |" for r in records]
    return "\n".join([header, *rows])


def plot(records: List[dict], path: Path, title: str) -> Path:
    """Dice vs K per method: one panel per target class when there are several, else the mean."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    classes = list(dict.fromkeys(c for r in records for c in r.get("dice_per_class", {})))
    panels = classes if len(classes) > 1 else [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), dpi=120, squeeze=False)
    ks = sorted({r["k"] for r in records})
    for ax, cls in zip(axes[0], panels):
        for method in dict.fromkeys(r["method"] for r in records):
            points = sorted((r["k"], r["dice"] if cls is None else r["dice_per_class"].get(cls, float("nan")))
                            for r in records if r["method"] == method)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                    linestyle="--" if method == SCRATCH[0] else "-", label=method)
        ax.set_xticks(ks)
        ax.set_xlabel("K (support cases)")
        ax.set_ylabel("Dice on the query cases" + ("" if cls is None else f": {cls}"))
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(wd: Workdir, records: List[dict], context: dict, total_s: float) -> Tuple[Path, Path, str]:
    table = results_table(records)
    target = context["target"]
    title = f"{target['dataset']}: {', '.join(context['target_classes'])}"
    png = plot(records, wd.root / "dice_vs_k.png", f"Few-shot adaptation, {title}")
    found = context.get("foundation_scores") or {}
    lines = [f"# nnUNetv2_fseft_demo results", "",
             f"- foundation: `{context['foundation']['dataset']}` ({context['foundation']['n_cases']} cases, classes "
             f"{', '.join(context['foundation']['classes'])}), trained with `{context['foundation_trainer']}`; "
             f"held-out Dice (annotated classes): "
             + (", ".join(f"{k} {v:.3f}" for k, v in found.items() if v is not None) or "n/a"),
             f"- target: `{target['dataset']}` ({', '.join(context['target_classes'])}); "
             f"{len(target['query'])} query cases (the val set of every fold, never trained on)",
             f"- Dice: nnU-Net's `compute_metrics_on_folder` on `nnUNetv2_predict -device cpu --disable_tta` output, "
             f"mean over the query cases and the target's foreground classes",
             f"- trainable params: tensors in `fold_X/adapter.safetensors` (FSEFT trainers) or unique parameters of "
             f"`checkpoint_final.pth` (stock nnU-Net)",
             f"- total wall time: {total_s / 60:.1f} min; train/predict times include each command's start-up", "",
             table, "", f"![Dice vs K]({png.name})", ""]
    md = wd.root / "results.md"
    md.write_text("\n".join(lines))
    (wd.root / "results.json").write_text(json.dumps({"context": context, "runs": records, "total_s": total_s},
                                                     indent=2))
    return md, png, table


# ---------------------------------------------------------------------------------------------- main

def run_demo(workdir="fseft_demo", quick: bool = False, data=None, overwrite: bool = False, jobs: int = 1,
             preset: str = PRESET, stream=None) -> dict:
    """The whole story; returns {'table', 'markdown', 'plot', 'records', 'total_s'}."""
    settings = default_settings(quick, data, preset)
    user_raw = user_raw_folder() if data is not None else None
    wd = open_workdir(workdir, settings, overwrite)
    env = nnunet_env(wd)
    progress = Progress(stream)
    try:
        with environment(env):  # for the steps that run in this process
            return _story(wd, settings, env, user_raw, jobs, progress)
    finally:
        progress.close()


@contextlib.contextmanager
def environment(variables: dict):
    old = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _story(wd: Workdir, settings: Settings, env: dict, user_raw: Optional[str], jobs: int, progress: Progress) -> dict:
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
        data_record = step("data", make_synthetic_data, wd, settings, describe=lambda r: _describe_phantoms(settings))
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
    # with several lanes each training takes its share of the cores (read by the demo trainers)
    train_env = {**env, THREADS_VARIABLE: str(max(1, (os.cpu_count() or 1) // jobs))} if jobs > 1 else env

    def pretrain() -> dict:
        record = done(wd, "pretrain")
        if record is None:
            epochs, iterations, _ = SCHEDULES[settings.schedule]["pretrain"]
            progress.line("pretrain", f"{trainer}: {epochs} x {iterations} iterations, partial-label loss "
                                      f"(log: {wd.log('pretrain')})")
            seconds = run_command(wd, "pretrain", [console_script("nnUNetv2_train"), foundation["dataset"],
                                                   CONFIGURATION, str(FOUNDATION_FOLD), "-tr", trainer, "-p", PLANS,
                                                   "-device", "cpu"], train_env)
            record = save_record(wd, "pretrain", {"trainer": trainer, "checkpoint": str(checkpoint),
                                                  "seconds": seconds, "scores": foundation_scores(model_folder)})
            suffix = f"({seconds:.0f} s)"
        else:
            suffix = "(done earlier)"
        scores = ", ".join(f"{k} {v:.2f}" for k, v in record["scores"].items() if v is not None) or "n/a"
        progress.line("pretrain", f"foundation ready; held-out Dice {scores} {suffix}")
        return record

    def prepare_and_baseline(pretraining) -> tuple:
        """Meanwhile: the target needs only the foundation's plans, the from-scratch baseline not even its weights."""
        wait_for_plans(model_folder, pretraining)
        target = step("target", prepare, wd, settings, data_record["target"], model_folder, describe=lambda r: (
            f"{r['dataset']} preprocessed with the foundation's plans; "
            + ", ".join("fold %d = K=%d" % (f["fold"], f["k"]) for f in r["folds"])
            + f"; {len(r['query'])} query cases"))
        query = link_query(wd, target["dataset"], target["query"])
        runs = plan_runs(settings, target["folds"])
        baseline = [r for r in runs if not r.pretrained]
        if baseline:
            progress.line("baseline", f"{len(baseline)} from-scratch runs alongside the pre-training")
        records = [adaptation_step(wd, r, target, checkpoint, train_env, query, progress) for r in baseline]
        return target, query, runs, dict(zip((r.step for r in baseline), records))

    lanes = Lanes(jobs)
    try:
        if jobs > 1:  # two lanes: pre-training || (target, baseline runs)
            pretraining = lanes.submit(pretrain)
            side = lanes.submit(prepare_and_baseline, pretraining)
            record, (target, query, runs, records) = lanes.wait([pretraining, side])
        else:
            record = pretrain()
            target, query, runs, records = prepare_and_baseline(_Finished(record))
        todo = [r for r in runs if r.step not in records]
        progress.line("adapt", f"{len(todo)} runs: nnUNetv2_train -pretrained_weights <foundation>, "
                               f"nnUNetv2_predict, nnU-Net's evaluation; {jobs} at a time")
        # longest first, so that the lanes finish together
        order = sorted(todo, key=lambda r: r.trainer.startswith("FSEFTLinearProbe"))
        futures = [lanes.submit(adaptation_step, wd, r, target, checkpoint, train_env, query, progress)
                   for r in order]
        records.update(zip((r.step for r in order), lanes.wait(futures)))
    finally:
        lanes.close()

    total_s = time.monotonic() - progress.t0
    target_json = json.loads((wd.raw / target["dataset"] / "dataset.json").read_text())
    context = {"settings": _jsonable(asdict(settings)), "foundation": foundation, "plans": planned,
               "foundation_trainer": trainer, "foundation_scores": record["scores"], "target": target,
               "target_classes": [k for k in target_json["labels"] if k not in ("background", "ignore")]}
    runs_in_order = [records[r.step] for r in runs]
    md, png, table = write_report(wd, runs_in_order, context, total_s)
    return {"table": table, "markdown": md, "plot": png, "records": runs_in_order, "total_s": total_s}


class _Finished:
    """A done future, for the one-lane path."""

    def __init__(self, value):
        self.value = value

    def done(self) -> bool:
        return True

    def result(self):
        return self.value
