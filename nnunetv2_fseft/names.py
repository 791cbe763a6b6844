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
