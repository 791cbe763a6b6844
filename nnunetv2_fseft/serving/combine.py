"""--combine: one label map holding every adapter's classes by class name (numpy only, no torch here).

Where two adapters claim a voxel, the one whose predicted class has the higher probability there wins (the first
adapter given on a tie). The same class name from two adapters is refused unless the user says which adapter's
prediction of it counts (`prefer`); the other adapter's voxels of that class then claim nothing."""
import numpy as np

from ..errors import FSEFTError
from ..names import normalize_class_name


def _foreground(dataset_json: dict, source) -> list:
    """(label value, class name) of the foreground classes; region-based labels are refused."""
    out = []
    for name, value in dataset_json["labels"].items():
        if isinstance(value, (list, tuple)) and len(value) > 1:
            raise FSEFTError(f"adapter {source} predicts regions ('{name}': {value}), which have no single class per "
                             "voxel to combine; predict it without --combine")
        value = value[0] if isinstance(value, (list, tuple)) else value
        if name not in ("background", "ignore") and value != 0:
            out.append((int(value), name))
    return sorted(out)


def parse_prefer(items) -> dict:
    """['spleen=lora', ...] -> {normalised class name: adapter name}."""
    prefer = {}
    for item in items or []:
        cls, sep, adapter = str(item).partition("=")
        if not sep or not cls or not adapter:
            raise FSEFTError(f"--prefer {item!r}: write CLASS=ADAPTER (the adapter whose prediction of CLASS counts)")
        prefer[normalize_class_name(cls)] = adapter
    return prefer


def label_table(adapters: list, prefer: dict = None) -> tuple:
    """adapters: [(adapter name, dataset.json)] in command-line order. Returns (labels, luts, sources): the combined
    dataset.json labels, per adapter a lookup table from its label values to combined ones (0: claims nothing), and
    {class name: adapter name}."""
    prefer = dict(prefer or {})
    claims = {}  # normalised name -> [(adapter index, value, name as written)]
    for i, (adapter, dataset_json) in enumerate(adapters):
        for value, name in _foreground(dataset_json, adapter):
            claims.setdefault(normalize_class_name(name), []).append((i, value, name))
    names = [a for a, _ in adapters]
    for cls, adapter in prefer.items():
        owners = [names[i] for i, _, _ in claims.get(cls, [])]
        if adapter not in owners:
            raise FSEFTError(f"--prefer {cls}={adapter}: " + (
                f"no adapter named '{adapter}' predicts '{cls}' (it is predicted by {', '.join(owners)})" if owners
                else f"no adapter predicts a class '{cls}'"))
    labels, sources = {"background": 0}, {}
    luts = [np.zeros(max([v for v, _ in _foreground(j, a)] + [0]) + 1, dtype=np.int64) for a, j in adapters]
    for cls, owners in claims.items():
        if len(owners) > 1 and cls not in prefer:
            who = ", ".join(names[i] for i, _, _ in owners)
            raise FSEFTError(f"class '{cls}' is predicted by more than one adapter ({who}); say which one counts: "
                             f"--prefer {cls}={names[owners[0][0]]}")
        i, value, name = next(o for o in owners if len(owners) == 1 or names[o[0]] == prefer[cls])
        labels[name] = len(labels)
        luts[i][value] = labels[name]
        sources[name] = names[i]
    return labels, luts, sources


def combine(segmentations: list, probabilities: list, luts: list) -> np.ndarray:
    """One label map from each adapter's label map and class probabilities (channel = label value), same shape."""
    combined = np.zeros(segmentations[0].shape, dtype=np.int64)
    best = np.full(segmentations[0].shape, -1.0, dtype=np.float32)
    for seg, probs, lut in zip(segmentations, probabilities, luts):
        seg = np.asarray(seg).astype(np.int64)
        claim = lut[seg]
        score = np.take_along_axis(np.asarray(probs, dtype=np.float32), seg[None], 0)[0]
        take = (claim > 0) & (score > best)
        combined[take] = claim[take]
        best[take] = score[take]
    return combined.astype(np.uint8 if combined.max(initial=0) < 255 else np.uint16)


def combined_dataset_json(adapters: list, labels: dict, sources: dict) -> dict:
    """The dataset.json beside the combined label maps: the label table and which adapter each class comes from."""
    first = adapters[0][1]
    return {"channel_names": first.get("channel_names") or first.get("modality"), "labels": labels,
            "numTraining": 0, "file_ending": first["file_ending"],
            "fseft_combined": {"class_sources": sources, "adapters": [a for a, _ in adapters],
                               "overlap_rule": "the higher probability of each adapter's predicted class wins"}}
