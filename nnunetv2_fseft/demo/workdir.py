"""The demo's work dir (its own nnUNet_raw/_preprocessed/_results, logs, step records) and the environment
its nnU-Net commands run in."""
import contextlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import FSEFTError
from .settings import Settings

MARKER = ".fseft_demo.json"
MARKER_VERSION = 1
OWN_ENTRIES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "logs", "steps", "query", "predictions",
               "results.md", "results.json", "dice_vs_k.png", MARKER)


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
    wanted = {"tool": "nnUNetv2_fseft_demo", "version": MARKER_VERSION, "settings": jsonable(asdict(settings))}
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


def jsonable(obj):
    return json.loads(json.dumps(obj))


def _describe(settings) -> str:
    if not isinstance(settings, dict):
        return str(settings)
    mode = f"--data {settings.get('data')}" if settings.get("data") else "synthetic"
    return f"{mode}, schedule {settings.get('schedule')}"


def nnunet_env(wd: Workdir) -> dict:
    """The variables nnU-Net reads, pointing into the work dir; CPU-friendly worker counts."""
    from ..trainer_names import trainers_folder
    from ..demo_trainers import FOLDER as DEMO_TRAINERS
    return {"nnUNet_raw": str(wd.raw), "nnUNet_preprocessed": str(wd.preprocessed), "nnUNet_results": str(wd.results),
            "nnUNet_extTrainer": os.pathsep.join([trainers_folder(), DEMO_TRAINERS]),
            "nnUNet_n_proc_DA": "0",    # augmentation in the training process: no worker processes to start
            "nnUNet_compile": "0",
            "nnUNet_def_n_proc": "1",   # else nnU-Net starts 8 export workers, each importing torch
            # OpenMP threads that sleep rather than spin while waiting, so that trainings side by side do not
            # steal each other's cores (docs/demo.md); the user's own setting wins
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
            # seeds the demo trainers (and the FSEFT trainers' new heads), so that two runs print close numbers
            "nnUNet_fseft_seed": os.environ.get("nnUNet_fseft_seed", "0"),
            "PYTHONUNBUFFERED": "1"}


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
