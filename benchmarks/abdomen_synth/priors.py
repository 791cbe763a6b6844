"""The intensity priors of the synthetic CT (a JSON file such as benchmarks/abdomen_priors.json), checked up front so
that a typo is one line naming the entry, not a KeyError deep inside the generator. No torch here."""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

from nnunetv2_fseft.errors import FSEFTError

# tissues the anatomy model paints besides the labelled organs
BODY_TISSUES = ("air", "fat", "muscle", "bone", "stomach_content", "bowel_gas", "bowel_fluid")
DOMAIN_KEYS = ("noise_hu", "inplane_fwhm_mm", "slice_thickness_mm", "bias_coefficient", "jitter_hu")
ANATOMY_KEYS = ("visceral_margin_mm", "muscle_wall_mm", "subcutaneous_fat_mm", "z_margin_mm", "vertebra_radius_mm",
                "bowel_blobs", "bowel_radius_mm", "stomach_wall_mm", "stomach_gas_probability")


@dataclass(frozen=True)
class Domain:
    name: str
    noise_hu: float
    inplane_fwhm_mm: float
    slice_thickness_mm: float
    bias_coefficient: float
    jitter_hu: float


@dataclass(frozen=True)
class Priors:
    path: Path
    sha256: str
    domains: Dict[str, Domain]
    anatomy: dict
    tissues: Dict[str, Dict[str, Tuple[float, float, float]]]  # tissue -> domain -> (mean, std, jitter)

    def gaussian(self, tissue: str, domain: str) -> Tuple[float, float, float]:
        """(mean, std, jitter) in HU of a tissue in a domain."""
        try:
            return self.tissues[tissue][domain]
        except KeyError:
            raise FSEFTError(f"{self.path}: no prior for tissue '{tissue}' in domain '{domain}'; add \"{tissue}\": "
                             f"{{\"{domain}\": {{\"mean\": ..., \"std\": ...}}}} to \"tissues\"") from None

    def domain(self, name: str) -> Domain:
        if name not in self.domains:
            raise FSEFTError(f"unknown scanner domain '{name}'; {self.path} defines {', '.join(self.domains)}")
        return self.domains[name]


def _number(value, where: str, minimum: float = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FSEFTError(f"{where} must be a number, got {value!r}")
    if minimum is not None and value < minimum:
        raise FSEFTError(f"{where} must be >= {minimum}, got {value}")
    return float(value)


def load_priors(path) -> Priors:
    path = Path(path)
    try:
        raw = path.read_bytes()
        data = json.loads(raw)
    except FileNotFoundError:
        raise FSEFTError(f"priors file {path} does not exist; pass benchmarks/abdomen_priors.json or a copy") from None
    except ValueError as e:
        raise FSEFTError(f"priors file {path} is not valid JSON ({e})") from None
    for key in ("domains", "anatomy", "tissues"):
        if not isinstance(data.get(key), dict):
            raise FSEFTError(f"{path}: needs an object \"{key}\" (see benchmarks/abdomen_priors.json)")
    domains = {}
    for name, d in data["domains"].items():
        missing = [k for k in DOMAIN_KEYS if k not in d]
        if missing:
            raise FSEFTError(f"{path}: domain '{name}' lacks \"{missing[0]}\"")
        domains[name] = Domain(name, *(_number(d[k], f"{path}: domains.{name}.{k}", 0) for k in DOMAIN_KEYS))
    missing = [k for k in ANATOMY_KEYS if k not in data["anatomy"]]
    if missing:
        raise FSEFTError(f"{path}: anatomy lacks \"{missing[0]}\"")
    tissues = {}
    for tissue, entry in data["tissues"].items():
        tissues[tissue] = {}
        for name, domain in domains.items():
            g = entry.get(name) if isinstance(entry, dict) else None
            if not isinstance(g, dict) or "mean" not in g or "std" not in g:
                raise FSEFTError(f"{path}: tissue '{tissue}' needs {{\"mean\": ..., \"std\": ...}} for domain '{name}'")
            where = f"{path}: tissues.{tissue}.{name}"
            tissues[tissue][name] = (_number(g["mean"], where + ".mean"), _number(g["std"], where + ".std", 0),
                                     _number(g.get("jitter", domain.jitter_hu), where + ".jitter", 0))
    absent = [t for t in BODY_TISSUES if t not in tissues]
    if absent:
        raise FSEFTError(f"{path}: tissues lack '{absent[0]}' (the body model needs {', '.join(BODY_TISSUES)})")
    return Priors(path, hashlib.sha256(raw).hexdigest(), domains, dict(data["anatomy"]), tissues)
