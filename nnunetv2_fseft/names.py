"""Class-name matching shared by head mapping and dataset assembly (no torch here)."""
import re


def normalize_class_name(name: str) -> str:
    """'Liver_Tumor', 'liver tumor' and 'liver-tumor' are the same class."""
    return re.sub(r"[\s_\-]+", "_", str(name).strip().lower())


def foreground_label_names(dataset_json: dict) -> list:
    """Foreground class names of an nnU-Net dataset.json, in label-value order (background and ignore excluded)."""
    labels = dataset_json["labels"]

    def first_value(v):
        return min(v) if isinstance(v, (list, tuple)) else v

    items = sorted(((first_value(v), k) for k, v in labels.items()), key=lambda t: t[0])
    return [k for v, k in items if k != "background" and k != "ignore" and v != 0]


def dice_by_class(summary: dict, dataset_json: dict) -> dict:
    """{class name: Dice} from an nnU-Net evaluation summary; its keys are label values (str(tuple) for
    regions), as ints in memory and as strings once read back from summary.json."""
    names = {str(tuple(v) if isinstance(v, list) else v): k for k, v in dataset_json["labels"].items()
             if k not in ("background", "ignore")}
    return {names.get(str(label), str(label)): m["Dice"] for label, m in summary["mean"].items()}
