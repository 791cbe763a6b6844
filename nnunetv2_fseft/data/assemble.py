"""Assemble several nnU-Net raw datasets into one with a unified label space (MultiTalent-style partial
labels). No torch here.

dataset.json of the result carries, besides the usual keys, the contract with MultiTalentTrainer:
    "fseft_cases": {"D011_case": {"dataset": "Dataset011_Liver", "annotated": ["liver", ...]}, ...}
"annotated" lists the unified class names the case's source dataset annotates: the loss may only judge
those; every other class is unknown (not background) in that case.
"""
import json
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from tqdm import tqdm

from nnunetv2_fseft.data.nnunet_raw import (
    check_file_ending, dataset_folder, integer_labels, link_file, load_dataset_json, remap_label_file,
    resolve_dataset, staged_output, training_cases, write_dataset_json)
from nnunetv2_fseft.errors import FSEFTError
from nnunetv2_fseft.names import foreground_label_names, normalize_class_name

SEPARATE = "{dataset}:{label}"  # --keep-separate class names, e.g. "Dataset011_Liver:liver"


def load_synonyms(synonyms: Union[None, str, Path, Mapping]) -> Dict[str, str]:
    """{"liver": ["hepar"]} (dict or JSON file) -> {normalised name: canonical name}. A name that would map
    to two different canonical names is an error, so the result never depends on dict order."""
    if synonyms is None:
        return {}
    where = "synonyms"
    if isinstance(synonyms, (str, Path)):
        where = str(synonyms)
        try:
            synonyms = json.loads(Path(synonyms).read_text())
        except FileNotFoundError:
            raise FSEFTError(f"synonyms file {where} does not exist; fix: check the path") from None
        except json.JSONDecodeError as e:
            raise FSEFTError(f"synonyms file {where} is not valid JSON ({e}); fix: repair it") from None
    if not isinstance(synonyms, Mapping):
        raise FSEFTError(f"{where} must map canonical names to lists of other names, "
                         f"e.g. {{\"liver\": [\"hepar\"]}}")
    canonical_of = {}
    for canonical, others in synonyms.items():
        others = [others] if isinstance(others, str) else others
        if not isinstance(others, (list, tuple)) or not all(isinstance(o, str) for o in others):
            raise FSEFTError(f"{where}: the value for '{canonical}' must be a list of names")
        for name in [canonical, *others]:
            previous = canonical_of.get(normalize_class_name(name))
            if previous is not None and normalize_class_name(previous) != normalize_class_name(canonical):
                raise FSEFTError(f"synonym conflict in {where}: '{name}' maps to both '{previous}' and "
                                 f"'{canonical}'; fix: list each name under one canonical name only")
            canonical_of[normalize_class_name(name)] = canonical
    return canonical_of


def build_label_space(source_labels: Mapping[str, Sequence[str]], synonyms: Mapping[str, str] = None,
                      keep_separate: bool = False, contains: Mapping[str, Sequence[str]] = None
                      ) -> Tuple[List[str], Dict[str, Dict[str, str]], Dict[str, List[str]]]:
    """Unified classes from {dataset name: foreground label names}.

    Returns (class names in label-value order, {dataset: {source label: class}}, {class: contained classes}).
    Names equal after normalisation (and synonyms) are one class, spelt as first seen or as the synonyms'
    canonical name. With `contains`, containers come before what they contain, so that nnU-Net paints the
    contained structure last (regions_class_order) and a region's own label is its smallest value.
    """
    synonyms = synonyms or {}
    display: Dict[str, str] = {}  # normalised key -> class name
    mapping: Dict[str, Dict[str, str]] = {}
    for dataset, names in source_labels.items():
        mapping[dataset] = {}
        seen_here: Dict[str, str] = {}
        for name in names:
            unified = (SEPARATE.format(dataset=dataset, label=name) if keep_separate
                       else synonyms.get(normalize_class_name(name), name))
            key = normalize_class_name(unified)
            if key in seen_here:
                raise FSEFTError(f"{dataset}: labels '{seen_here[key]}' and '{name}' would both become class "
                                 f"'{unified}'; fix: rename one in its dataset.json or in the synonyms")
            seen_here[key] = name
            display.setdefault(key, unified)
            mapping[dataset][name] = display[key]
    order = list(display)
    contained_by_key = _contains_graph(contains or {}, display, synonyms)
    order = _containers_first(order, contained_by_key, display)
    closure = {k: _reachable(k, contained_by_key) for k in contained_by_key}
    rank = {k: i for i, k in enumerate(order)}
    regions = {display[k]: [display[c] for c in sorted(v, key=rank.get)] for k, v in closure.items()}
    return [display[k] for k in order], mapping, regions


def _contains_graph(contains, display, synonyms) -> Dict[str, List[str]]:
    def key_of(name):
        key = normalize_class_name(synonyms.get(normalize_class_name(name), name))
        if key not in display:
            raise FSEFTError(f"--contains names unknown class '{name}'; classes: {', '.join(display.values())}")
        return key

    graph: Dict[str, List[str]] = {}
    for container, inner in contains.items():
        inner = [inner] if isinstance(inner, str) else list(inner)
        outer = key_of(container)
        for name in inner:
            k = key_of(name)
            if k == outer:
                raise FSEFTError(f"--contains: '{container}' cannot contain itself")
            graph.setdefault(outer, [])
            if k not in graph[outer]:
                graph[outer].append(k)
    return graph


def _containers_first(order: List[str], graph: Dict[str, List[str]], display) -> List[str]:
    """First-seen order, except that a container is pulled up to just before the first thing it contains."""
    parents = {k: [p for p in order if k in graph.get(p, [])] for k in order}
    placed: List[str] = []
    path: List[str] = []

    def place(k):
        if k in placed:
            return
        if k in path:
            cycle = [display[x] for x in path[path.index(k):]]
            raise FSEFTError(f"--contains forms a cycle among {', '.join(cycle)}; fix: an organ can contain a "
                             f"structure, not the other way round as well")
        path.append(k)
        for p in parents[k]:
            place(p)
        path.pop()
        placed.append(k)

    for k in order:
        place(k)
    return placed


def _reachable(start: str, graph: Dict[str, List[str]]) -> List[str]:
    seen, stack = [], list(graph.get(start, []))
    while stack:
        k = stack.pop()
        if k not in seen:
            seen.append(k)
            stack.extend(graph.get(k, []))
    return seen


def _check_compatible(jsons: Dict[str, dict]):
    """Same channels (nnU-Net compares channel names case-insensitively) and file ending everywhere."""
    (first, ref), *rest = jsons.items()
    ref_channels = [str(v).casefold() for v in ref["channel_names"].values()]
    for name, dj in rest:
        channels = [str(v).casefold() for v in dj["channel_names"].values()]
        if channels != ref_channels:
            raise FSEFTError(f"{name} has channels {list(dj['channel_names'].values())} but {first} has "
                             f"{list(ref['channel_names'].values())}; fix: assemble only datasets with the same "
                             f"input channels in the same order")
        if dj["file_ending"] != ref["file_ending"]:
            raise FSEFTError(f"{name} uses file_ending '{dj['file_ending']}' but {first} uses "
                             f"'{ref['file_ending']}'; fix: convert one of them to the other format")


def assemble_datasets(sources: Sequence[Union[int, str]], target_id: int, name: str,
                      synonyms: Union[None, str, Path, Mapping] = None, keep_separate: bool = False,
                      contains: Optional[Mapping[str, Sequence[str]]] = None, overwrite: bool = False) -> Path:
    """Build $nnUNet_raw/DatasetXXX_Name from several raw datasets (ids or names); returns its folder."""
    if keep_separate and synonyms:
        raise FSEFTError("--keep-separate and --synonyms exclude each other; fix: use one of them")
    if len(sources) < 1:
        raise FSEFTError("no source datasets given; fix: pass -d with one or more dataset ids")
    folders = [resolve_dataset(s) for s in sources]
    if len({f.name for f in folders}) < len(folders):
        raise FSEFTError(f"a source dataset is given twice ({', '.join(f.name for f in folders)}); "
                         f"fix: list each dataset once")
    jsons = {f.name: load_dataset_json(f) for f in folders}
    for ds, dj in jsons.items():
        integer_labels(dj, ds)
        check_file_ending(dj["file_ending"], ds)
        if "fseft_cases" in dj:
            raise FSEFTError(f"{ds} is itself an assembled dataset; fix: assemble from its source datasets")
    _check_compatible(jsons)
    classes, mapping, regions = build_label_space(
        {ds: foreground_label_names(dj) for ds, dj in jsons.items()},
        load_synonyms(synonyms), keep_separate, contains)
    value = {c: i for i, c in enumerate(classes, start=1)}
    cases = {f.name: training_cases(f, jsons[f.name]) for f in folders}
    ref = next(iter(jsons.values()))
    ending = ref["file_ending"]

    fseft_cases = {}
    with staged_output(target_id, name, overwrite, source_folders=folders) as out:
        for folder in folders:
            ds, dj = folder.name, jsons[folder.name]
            old = integer_labels(dj, ds)
            lut = {v: (0 if n == "background" else value[mapping[ds][n]]) for n, v in old.items()}
            annotated = sorted({mapping[ds][n] for n in old if n != "background"}, key=value.get)
            prefix = f"D{int(ds[7:10]):03d}_"
            for case, (images, label) in tqdm(cases[ds].items(), desc=ds, unit="case", disable=None):
                new_case = prefix + case
                remap_label_file(case, images, label, lut, out / "labelsTr" / f"{new_case}{ending}")
                for c, image in enumerate(images):
                    link_file(image, out / "imagesTr" / f"{new_case}_{c:04d}{ending}")
                fseft_cases[new_case] = {"dataset": ds, "annotated": annotated}
        labels = {"background": 0}
        for c in classes:
            # nnU-Net region syntax: a container's target is the union of its own and its contents' labels
            labels[c] = [value[c]] + [value[x] for x in regions[c]] if c in regions else value[c]
        dataset_json = {
            "channel_names": ref["channel_names"],
            "labels": labels,
            "numTraining": len(fseft_cases),
            "file_ending": ending,
            "name": name,
            "description": "assembled by nnUNetv2_fseft_assemble from " + ", ".join(jsons),
        }
        if regions:
            dataset_json["regions_class_order"] = list(range(1, len(classes) + 1))
        dataset_json["fseft_cases"] = fseft_cases
        write_dataset_json(out, dataset_json)
    target = dataset_folder(target_id, name)
    _print_summary(target, classes, mapping, regions, len(fseft_cases))
    return target


def _print_summary(target, classes, mapping, regions, n_cases):
    print(f"wrote {target}: {n_cases} cases, {len(classes)} classes")
    for i, c in enumerate(classes, start=1):
        origin = [f"{ds}:{old}" for ds, m in mapping.items() for old, new in m.items() if new == c]
        extra = f" (region: also {', '.join(regions[c])})" if c in regions else ""
        print(f"  {i:3d} {c} <- {', '.join(origin)}{extra}")
