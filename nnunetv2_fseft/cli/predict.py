"""nnUNetv2_fseft_predict: several adapters on one foundation, in one pass over the images.

  nnUNetv2_fseft_predict -i IMAGES -o OUT -m FOUNDATION -a ADAPTER [ADAPTER ...] [-f 0] [-device cpu]

ADAPTER: an adapter folder (nnUNetv2_fseft_export MODEL OUT) or a trained FSEFT model folder
(nnUNet_results/DatasetX/FSEFT...Trainer__PLANS__CONFIG); NAME=FOLDER names its output folder. FOUNDATION: the
one the adapters were trained from (model folder or checkpoint, nnU-Net or nnssl; checked by its weights' sha256).

Each image is read and preprocessed once, the foundation is loaded once, and each adapter's predictions go to
OUT/<adapter name>/ as nnUNetv2_predict writes them (equal to its own run). With --combine, OUT holds one label map
per image with every adapter's classes by name, and a dataset.json with the label table (docs/serving.md).
"""
import argparse
import multiprocessing
import os
from pathlib import Path

from ..errors import FSEFTError, cli_entry


def _default(env: str, default: int) -> int:
    try:
        return int(os.environ.get(env) or default)
    except ValueError:
        return default


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", required=True, help="input folder (CASE_0000.ext, as nnUNetv2_predict reads it)")
    p.add_argument("-o", required=True, help="output folder (refused if it exists, unless --overwrite)")
    p.add_argument("-m", required=True, help="the foundation: model folder or checkpoint (nnU-Net or nnssl)")
    p.add_argument("-a", nargs="+", required=True, metavar="ADAPTER",
                   help="adapter folders or trained FSEFT model folders, optionally NAME=FOLDER")
    p.add_argument("-f", nargs="+", default=None,
                   help="folds to use (ensembled as nnU-Net does); default: the folds the adapters have")
    p.add_argument("--save_probabilities", action="store_true", help="also write CASE.npz and CASE.pkl per adapter")
    p.add_argument("--combine", action="store_true",
                   help="one label map per image with every adapter's classes by name (higher probability wins)")
    p.add_argument("--prefer", nargs="+", default=[], metavar="CLASS=ADAPTER",
                   help="with --combine: the adapter whose prediction of CLASS counts, when several predict it")
    p.add_argument("--no_shared_encoder", action="store_true",
                   help="run the encoder per adapter even where all adapters leave it untouched")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring (as nnUNetv2_predict --disable_tta)")
    p.add_argument("-step_size", type=float, default=0.5, help="sliding-window step (nnU-Net's default 0.5)")
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"], help="as nnUNetv2_predict -device")
    p.add_argument("-npp", type=int, default=_default("nnUNet_npp", 3),
                   help="preprocessing processes (nnU-Net's default 3; 0: in this process)")
    p.add_argument("-nps", type=int, default=_default("nnUNet_nps", 3),
                   help="export processes (nnU-Net's default 3; 0: in this process)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--disable_progress_bar", action="store_true")
    return p


def _folds(values):
    if values is None:
        return None
    try:
        return [v if v == "all" else int(v) for v in values]
    except ValueError:
        raise FSEFTError(f"-f {' '.join(values)}: folds are numbers or 'all'") from None


def _inputs(folder: Path, file_ending: str, channels: int) -> list:
    """[(case id, [channel files])] as nnUNetv2_predict lists them; one line when the folder does not fit."""
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder
    if not folder.is_dir():
        raise FSEFTError(f"input folder {folder} does not exist")
    lists = create_lists_from_splitted_dataset_folder(str(folder), file_ending)
    if not lists:
        raise FSEFTError(f"input folder {folder} holds no images named CASE_0000{file_ending}; name them as "
                         "nnUNetv2_predict expects")
    cases = []
    for files in lists:
        case = os.path.basename(files[0])[:-(len(file_ending) + 5)]
        if len(files) != channels:
            raise FSEFTError(f"case {case} in {folder} has {len(files)} channel file(s), but the adapters take "
                             f"{channels} (CASE_0000{file_ending} ...)")
        cases.append((case, files))
    return cases


def _device(name: str):
    import torch
    if name == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())  # as nnUNetv2_predict does
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise FSEFTError("-device cuda: no CUDA device is available here; pass -device cpu")
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
        return torch.device("cuda")
    return torch.device("mps")


@cli_entry
def main(argv=None):
    a = _parser().parse_args(argv)
    out = Path(a.o)
    if out.exists() and not a.overwrite:
        raise FSEFTError(f"output folder {out} exists; pass --overwrite to replace it")
    if a.prefer and not a.combine:
        raise FSEFTError("--prefer applies to --combine; add --combine or leave --prefer out")
    if a.combine and a.save_probabilities:
        raise FSEFTError("--save_probabilities writes each adapter's own probabilities; it does not go with "
                         "--combine (run once without --combine for them)")
    from ..export import OutputFolder
    from ..foundations import read_foundation
    from ..serving.adapters import read_adapters
    from ..serving.combine import parse_prefer
    from ..serving.predictor import MultiAdapterPredictor, combine_table
    foundation = read_foundation(a.m)
    adapters = read_adapters(a.a, foundation, _folds(a.f))
    table = combine_table(adapters, parse_prefer(a.prefer)) if a.combine else None
    first = adapters[0]
    inputs = _inputs(Path(a.i), first.dataset_json["file_ending"],
                     len(first.dataset_json.get("channel_names") or first.dataset_json.get("modality") or {}))
    device = _device(a.device)
    predictor = MultiAdapterPredictor(foundation, adapters, device=device, use_mirroring=not a.disable_tta,
                                      tile_step_size=a.step_size, shared_encoder=not a.no_shared_encoder,
                                      allow_tqdm=not a.disable_progress_bar, verbose=a.verbose)
    for line in predictor.describe():
        print(line)
    with OutputFolder(out, a.overwrite) as tmp:
        predictor.predict_folder(inputs, tmp, save_probabilities=a.save_probabilities, combine_with=table,
                                 num_processes_preprocessing=a.npp, num_processes_export=a.nps)
    print(f"written: {out} ({len(inputs)} image(s) x {len(adapters)} adapter(s)"
          f"{', combined' if a.combine else ''})")
