"""MultiAdapterPredictor: one foundation, several adapters, each image preprocessed and slid over once.

Built on nnU-Net's nnUNetPredictor: its preprocessing (the adapters' shared plans, see adapters.py), its sliding
window with Gaussian weighting and mirroring (over a StackedNetwork, networks.py), and its resampling and export
(`convert_predicted_logits_to_segmentation_with_correct_shape`, `export_prediction_from_logits`) per adapter.
Adapters whose allowed mirroring axes differ run in separate passes, so that each one mirrors as its own
nnUNetv2_predict would; several folds are averaged as nnU-Net averages them."""
import multiprocessing
import os
import time
from copy import deepcopy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from ..errors import FSEFTError
from ..files import write_json
from ..foundations import read_foundation
from .adapters import read_adapters
from .combine import combine, combined_dataset_json, label_table
from .networks import StackedNetwork, build_network, share_frozen_tensors, trunk_depths


def _nnunet_predictor_class():
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    class StackedPredictor(nnUNetPredictor):
        """nnU-Net's predictor over one StackedNetwork per fold: its sliding window runs once for all adapters of a
        group (the logits array holds all their channels); folds are summed and averaged in nnU-Net's order."""

        def __init__(self, fold_networks: list, channels: int, managers: tuple, dataset_json: dict, mirror_axes,
                     **kwargs):
            super().__init__(**kwargs)
            plans_manager, configuration_manager, _ = managers
            self.manual_initialization(fold_networks[0], plans_manager, configuration_manager, None, dataset_json,
                                       "nnunetv2_fseft multi-adapter", mirror_axes)
            self.fold_networks = fold_networks
            # read by the sliding window only, to size the logits array: every adapter's channels
            self.label_manager = SimpleNamespace(num_segmentation_heads=channels)

        @torch.inference_mode()
        def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
            from nnunetv2.configuration import default_num_processes
            n_threads = torch.get_num_threads()
            torch.set_num_threads(default_num_processes if default_num_processes < n_threads else n_threads)
            prediction = None
            for network in self.fold_networks:  # the tensors are in place: no load_state_dict between folds
                self.network = network
                if prediction is None:
                    prediction = self.predict_sliding_window_return_logits(data).to("cpu")
                else:
                    prediction += self.predict_sliding_window_return_logits(data).to("cpu")
            if len(self.fold_networks) > 1:
                prediction /= len(self.fold_networks)
            torch.set_num_threads(n_threads)
            return prediction

    return StackedPredictor


class MultiAdapterPredictor:
    """Built once from a foundation and its adapters; `predict(image)` returns each adapter's segmentation.

    foundation: a Foundation (foundations.read_foundation); adapters: [Adapter] (serving.read_adapters).
    shared_encoder: True runs the foundation's encoder once per window for all adapters that leave it untouched
    (decoder, FT-last, linear probe, spatial adapter), and the foundation's decoder stages that several of them leave
    untouched once too: only their own decoder stages and heads run per adapter (networks.trunk_depths). False runs
    every adapter's network whole (the reference the shared path is tested against)."""

    def __init__(self, foundation, adapters: list, device: torch.device = torch.device("cpu"),
                 use_mirroring: bool = True, tile_step_size: float = 0.5, shared_encoder: bool = True,
                 allow_tqdm: bool = False, verbose: bool = False):
        self.foundation, self.adapters, self.device = foundation, adapters, device
        self.managers = {a.name: a.managers() for a in adapters}
        networks = {a.name: [build_network(a, f, foundation) for f in range(len(a.folds))] for a in adapters}
        trained = {a.name: [list(t) for t in a.tensors] for a in adapters}
        self.tensors_shared = share_frozen_tensors([n for a in adapters for n in networks[a.name]],
                                                   [k for a in adapters for k in trained[a.name]])
        groups = {}
        for a in adapters:  # one pass per set of mirroring axes, in command-line order
            groups.setdefault(a.mirror_axes if use_mirroring else None, []).append(a)
        self.passes = []
        for axes, members in groups.items():
            folds = range(len(members[0].folds))
            depths = [trunk_depths([networks[a.name][f] for a in members], [trained[a.name][f] for a in members])
                      for f in folds]
            depths = [None if None in d or not shared_encoder else min(d) for d in zip(*depths)]
            stacked = [StackedNetwork([networks[a.name][f] for a in members], depths).to(device) for f in folds]
            channels = [self.managers[a.name][2].num_segmentation_heads for a in members]
            predictor = _nnunet_predictor_class()(
                stacked, sum(channels), self.managers[members[0].name], members[0].dataset_json, axes,
                tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                perform_everything_on_device=device.type == "cuda", device=device, verbose=verbose,
                allow_tqdm=allow_tqdm)
            depths = stacked[0].depths
            self.passes.append(SimpleNamespace(adapters=members, channels=channels, predictor=predictor,
                                               shared=[a.name for a, d in zip(members, depths) if d is not None],
                                               depths={a.name: d for a, d in zip(members, depths)}))
        self.plans_manager, self.configuration_manager, _ = self.managers[adapters[0].name]
        self.dataset_json = adapters[0].dataset_json
        self.verbose = verbose

    @classmethod
    def from_paths(cls, foundation, adapters: list, folds=None, **kwargs) -> "MultiAdapterPredictor":
        """foundation: model folder or checkpoint (nnU-Net or nnssl); adapters: folders, or NAME=FOLDER."""
        foundation = read_foundation(foundation)
        return cls(foundation, read_adapters(adapters, foundation, folds), **kwargs)

    @property
    def names(self) -> list:
        return [a.name for a in self.adapters]

    def describe(self) -> list:
        """One line per pass, for logs."""
        lines = []
        for i, p in enumerate(self.passes):
            runs = ", ".join(f"{a.name} ({a.method}: " + ("whole" if p.depths[a.name] is None else
                                                          f"shared encoder + {p.depths[a.name]} decoder stage(s)") + ")"
                             for a in p.adapters)
            mirroring = p.predictor.allowed_mirroring_axes if p.predictor.use_mirroring else "off"
            lines.append(f"pass {i + 1}: {runs}; mirroring {mirroring}; {len(p.adapters[0].folds)} fold(s)")
        return lines

    # ------------------------------------------------------------------------------------------------ one image
    def preprocess(self, image, properties: dict = None) -> tuple:
        """(data tensor, properties) by nnU-Net's preprocessor with the adapters' plans. `image`: a file, a list of
        files (one per channel), or an array (channels, *spatial) in the reader's axis order with `properties`
        holding at least 'spacing' (as nnUNetPredictor.predict_single_npy_array takes it)."""
        preprocessor = self.configuration_manager.preprocessor_class(verbose=self.verbose)
        if isinstance(image, (str, Path)) or (isinstance(image, (list, tuple)) and image
                                              and isinstance(image[0], (str, Path))):
            files = [str(image)] if isinstance(image, (str, Path)) else [str(f) for f in image]
            missing = [f for f in files if not Path(f).is_file()]
            if missing:
                raise FSEFTError(f"image {missing[0]} does not exist")
            data, _, props = preprocessor.run_case(files, None, self.plans_manager, self.configuration_manager,
                                                   self.dataset_json)
        else:
            array = np.asarray(image)
            if properties is None or "spacing" not in properties:
                raise FSEFTError("an image array needs its properties: {'spacing': [...]} in the array's axis order")
            if array.ndim == len(properties["spacing"]):
                array = array[None]  # one channel, given without its axis
            data, _, props = preprocessor.run_case_npy(array, None, deepcopy(properties), self.plans_manager,
                                                       self.configuration_manager, self.dataset_json)
        return torch.from_numpy(data).to(dtype=torch.float32, memory_format=torch.contiguous_format), props

    def predict_logits(self, data: torch.Tensor) -> dict:
        """{adapter name: logits} in the preprocessed geometry, for one preprocessed image."""
        out = {}
        for p in self.passes:
            stacked = p.predictor.predict_logits_from_preprocessed_data(data)
            for adapter, part in zip(p.adapters, torch.split(stacked, p.channels, dim=0)):
                out[adapter.name] = part
        return {a.name: out[a.name] for a in self.adapters}

    def predict(self, image, properties: dict = None, return_probabilities: bool = False) -> dict:
        """{adapter name: label map} (or (label map, probabilities)) in the image's own geometry."""
        from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
        data, props = self.preprocess(image, properties)
        logits = self.predict_logits(data)
        out = {}
        for name, value in logits.items():
            plans_manager, configuration_manager, label_manager = self.managers[name]
            out[name] = convert_predicted_logits_to_segmentation_with_correct_shape(
                value, plans_manager, configuration_manager, label_manager, props, return_probabilities)
        return out

    # ------------------------------------------------------------------------------------------------ a folder
    def predict_folder(self, inputs: list, output_folder: Path, save_probabilities: bool = False,
                       combine_with: tuple = None, num_processes_preprocessing: int = 1,
                       num_processes_export: int = 1, log=print) -> None:
        """inputs: [(case id, [files])]. Writes output_folder/<adapter>/<case> as nnUNetv2_predict writes it, or with
        `combine_with` (label_table's result) one combined label map per case and its dataset.json."""
        output_folder = Path(output_folder)
        self._write_model_files(output_folder, combine_with, save_probabilities)
        pool = multiprocessing.get_context("spawn").Pool(num_processes_export) if num_processes_export > 0 else None
        pending = []
        try:
            for case, data, props in self._preprocessed(inputs, num_processes_preprocessing):
                t = time.time()
                logits = {k: v.cpu().numpy() for k, v in self.predict_logits(data).items()}
                job = (_export_combined, (logits, props, self.managers, combine_with[1], self._ending(),
                                          str(output_folder / case))) if combine_with else \
                    (_export_each, (logits, props, self.managers, {a.name: a.dataset_json for a in self.adapters},
                                    str(output_folder), case, save_probabilities))
                if pool is None:
                    job[0](*job[1])
                else:
                    _wait_for_room(pending, len(self.adapters) + 1)
                    pending.append(pool.apply_async(*job))
                log(f"{case}: {len(self.adapters)} adapter(s) in {time.time() - t:.1f} s")
            for result in pending:
                result.get()
        finally:
            if pool is not None:
                pool.close()
                pool.join()

    def _ending(self) -> str:
        return self.dataset_json["file_ending"]

    def _write_model_files(self, output_folder: Path, combine_with, save_probabilities: bool) -> None:
        """Beside the predictions, as nnUNetv2_predict writes them: dataset.json and plans.json (and the call)."""
        call = {"foundation": str(self.foundation.path), "foundation_weights_sha256": self.foundation.weights_sha256,
                "adapters": {a.name: str(a.folder) for a in self.adapters}, "folds": self.adapters[0].folds,
                "save_probabilities": save_probabilities, "passes": self.describe()}
        if combine_with:
            output_folder.mkdir(parents=True, exist_ok=True)
            labels, _, sources = combine_with
            write_json(output_folder / "dataset.json",
                       combined_dataset_json([(a.name, a.dataset_json) for a in self.adapters], labels, sources))
            write_json(output_folder / "predict_from_raw_data_args.json", call)
            return
        for a in self.adapters:
            folder = output_folder / a.name
            folder.mkdir(parents=True, exist_ok=True)
            write_json(folder / "dataset.json", a.dataset_json)
            write_json(folder / "plans.json", a.plans)
            write_json(folder / "predict_from_raw_data_args.json", dict(call, adapter=str(a.folder)))

    def _preprocessed(self, inputs: list, num_processes: int):
        """(case id, data, properties) per case: nnU-Net's background preprocessing, or in this process with 0."""
        if num_processes <= 0:
            for case, files in inputs:
                data, props = self.preprocess(files)
                yield case, data, props
            return
        from nnunetv2.inference.data_iterators import preprocessing_iterator_fromfiles
        iterator = preprocessing_iterator_fromfiles(
            [files for _, files in inputs], None, [case for case, _ in inputs], self.plans_manager,
            self.dataset_json, self.configuration_manager, num_processes, self.device.type == "cuda", self.verbose)
        for item in iterator:
            data = item["data"]
            if isinstance(data, str):  # nnU-Net hands large arrays over as a file
                path, data = data, torch.from_numpy(np.load(data))
                os.remove(path)
            yield item["ofile"], data, item["data_properties"]


def _wait_for_room(pending: list, allowed: int) -> None:
    """Back-pressure as nnU-Net's predictor applies it: at most `allowed` exports queued."""
    while sum(not r.ready() for r in pending) > allowed:
        time.sleep(0.05)
    for r in [r for r in pending if r.ready()]:
        r.get()  # an export that failed fails the run here
        pending.remove(r)


def _export_each(logits: dict, props: dict, managers: dict, dataset_jsons: dict, output_folder: str, case: str,
                 save_probabilities: bool) -> None:
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    for name, value in logits.items():
        plans_manager, configuration_manager, _ = managers[name]
        export_prediction_from_logits(value, props, configuration_manager, plans_manager, dataset_jsons[name],
                                      os.path.join(output_folder, name, case), save_probabilities)


def _export_combined(logits: dict, props: dict, managers: dict, luts: list, file_ending: str,
                     output_file_truncated: str) -> None:
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    segmentations, probabilities = [], []
    for name, value in logits.items():
        plans_manager, configuration_manager, label_manager = managers[name]
        seg, probs = convert_predicted_logits_to_segmentation_with_correct_shape(
            value, plans_manager, configuration_manager, label_manager, props, return_probabilities=True)
        segmentations.append(seg)
        probabilities.append(probs)
    plans_manager = next(iter(managers.values()))[0]
    plans_manager.image_reader_writer_class().write_seg(combine(segmentations, probabilities, luts),
                                                        output_file_truncated + file_ending, props)


def combine_table(adapters: list, prefer: dict) -> tuple:
    """label_table over the adapters, in their order."""
    return label_table([(a.name, a.dataset_json) for a in adapters], prefer)
