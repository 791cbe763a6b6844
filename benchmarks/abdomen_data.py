"""Write the abdominal benchmark's nnU-Net raw datasets (issue 8): real anatomy, synthetic intensities.

  python benchmarks/abdomen_data.py WORKDIR [--spacing 4] [--seed 0] [--overwrite]

Needs torchio (pip install -e ".[abdomen]") and ../shared/data/abdomen_labels_l2r (30 label maps, only read).
Per benchmarks/abdomen_split.json it synthesises each needed (subject, scanner domain) once into
WORKDIR/synth/<domain>/<subject>/ (ct.nii.gz + segmentations/<organ>.nii.gz, the TotalSegmentator layout), then
builds the datasets with the plugin's own conversion and assembly (nnunetv2_fseft_convert / _assemble):

  801-803 AbdA_<group>   3 partially labelled pre-training datasets, 6 subjects each, domain A
  810     AbdA_Partial   the three assembled (unified labels + per-case annotated classes: MultiTalent, naive merge)
  811     AbdA_Full      upper bound: the 18 pre-training subjects with all 8 pre-training organs
  812     AbdA_Query     the 7 query subjects in domain A, 8 organs (experiment 1's test set, never trained on)
  820     AbdB_Known     the 12 target subjects in domain B, the 8 known organs (experiment 2)
  821     AbdB_Novel     the same 12 in domain B, the novel organs (experiment 3)

Existing outputs are refused unless --overwrite; an interrupted run resumes (finished cases are kept).
"""
import argparse
import hashlib
import json
import sys
from pathlib import Path

from abdomen_common import (ASSEMBLED, CONVERTED, DATA_RECORD, LABEL_MAPS, PARTIAL, PRIORS, SPLIT_FILE, TAG,
                            assembled_folder_name, cases_by_domain, setup_env)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir")
    p.add_argument("--spacing", type=float, default=4.0, help="output spacing in mm (default 4: the CPU preset's); "
                   "domain B's slices stay at least its slice thickness")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--labels", default=str(LABEL_MAPS), help="folder of the label maps + labels.json")
    p.add_argument("--priors", default=str(PRIORS), help="intensity priors (default benchmarks/abdomen_priors.json)")
    p.add_argument("--threads", type=int, default=1, help="torch threads while synthesising (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace existing synthetic cases and datasets")
    return p.parse_args(argv)


def check_inputs(labels: Path, organs: dict) -> None:
    from nnunetv2_fseft.errors import FSEFTError
    if not labels.is_dir():
        raise FSEFTError(f"{labels} not found: the abdominal benchmark needs ../shared/data/abdomen_labels_l2r "
                         "(see ../shared/data/README.md) or --labels DIR")
    missing = [s for subjects in cases_by_domain().values() for s in subjects if not (labels / f"{s}.nii.gz").is_file()]
    if missing:
        raise FSEFTError(f"{labels} has no {missing[0]}.nii.gz, which {SPLIT_FILE.name} uses")
    unknown = [o for spec in CONVERTED for o in spec.organs if o not in organs.values()]
    if unknown:
        raise FSEFTError(f"{SPLIT_FILE.name} names organ '{unknown[0]}', which {labels}/labels.json does not list")


def settings_record(args, priors) -> dict:
    from abdomen_synth.ct import VERSION
    return {"tag": TAG, "spacing_mm": args.spacing, "seed": args.seed, "generator_version": VERSION,
            "priors_sha256": priors.sha256, "split_sha256": hashlib.sha256(SPLIT_FILE.read_bytes()).hexdigest(),
            "label_maps": str(Path(args.labels).resolve()),
            "datasets": {**{s.folder_name: s.role for s in CONVERTED},
                         assembled_folder_name(): "the three partial datasets assembled (unified labels)"}}


def refuse_existing(work: Path, overwrite: bool) -> None:
    from nnunetv2_fseft.errors import FSEFTError
    if overwrite:
        return
    names = [s.folder_name for s in CONVERTED] + [assembled_folder_name()]
    existing = [n for n in names if (work / "raw" / n).exists()]
    if existing:
        raise FSEFTError(f"{work / 'raw' / existing[0]} already exists ({len(existing)} of the benchmark's "
                         f"{len(names)} datasets do); pass --overwrite to rebuild them")


def synthesise_cases(work: Path, labels: Path, organs: dict, priors, args) -> None:
    from tqdm import tqdm
    from nnunetv2_fseft.errors import FSEFTError
    from abdomen_synth.ct import case_record, existing_record, write_case
    todo = [(d, s) for d, subjects in cases_by_domain().items() for s in subjects]
    for domain, subject in tqdm(todo, desc="synthesising subjects", unit="case"):
        folder = work / "synth" / domain / subject
        found = existing_record(folder)
        wanted = case_record(subject, domain, args.seed, args.spacing, priors, labels / f"{subject}.nii.gz")
        if found is not None and found != wanted and not args.overwrite:
            raise FSEFTError(f"{folder} was synthesised with other settings; pass --overwrite to rebuild it")
        write_case(folder, labels / f"{subject}.nii.gz", organs, priors, subject, domain, args.seed, args.spacing)


def describe(folder: Path, text: str) -> None:
    """Every dataset.json says what its images are."""
    from nnunetv2_fseft.data.nnunet_raw import load_dataset_json, write_dataset_json
    dataset_json = load_dataset_json(folder)
    dataset_json["description"] = text
    write_dataset_json(folder, dataset_json)


def build_datasets(work: Path, priors, args) -> None:
    from nnunetv2_fseft.data.assemble import assemble_datasets
    from nnunetv2_fseft.data.convert import convert_structures
    source = f"{TAG}: label maps of Learn2Reg 2020 task 3 (BTCV), images by benchmarks/abdomen_synth"
    for spec in CONVERTED:
        folder = convert_structures([work / "synth" / spec.domain / s for s in spec.subjects], spec.id, spec.name,
                                    structures=list(spec.organs), overwrite=args.overwrite)
        domain = priors.domain(spec.domain)
        describe(folder, f"{spec.role}. {source}; scanner domain {spec.domain}: {_domain_text(domain)}; "
                         f"{args.spacing:g} mm, seed {args.seed}, priors sha256 {priors.sha256[:12]}")
    folder = assemble_datasets([s.id for s in PARTIAL], ASSEMBLED[0], ASSEMBLED[1], overwrite=args.overwrite)
    describe(folder, f"the three partially labelled pre-training datasets ({', '.join(s.name for s in PARTIAL)}) "
                     f"assembled by nnUNetv2_fseft_assemble. {source}; scanner domain A")


def _domain_text(domain) -> str:
    return (f"noise {domain.noise_hu:g} HU, {domain.slice_thickness_mm:g} mm slices, in-plane PSF FWHM "
            f"{domain.inplane_fwhm_mm:g} mm, bias coefficient {domain.bias_coefficient:g}")


def main(argv=None):
    args = parse_args(argv)
    work = Path(args.workdir).resolve()
    labels = Path(args.labels).resolve()
    setup_env(work)  # before anything imports nnunetv2
    from nnunetv2_fseft.errors import FSEFTError
    from abdomen_synth import require_torchio
    from abdomen_synth.ct import read_organ_names
    from abdomen_synth.priors import load_priors
    try:
        priors = load_priors(args.priors)
        for domain in cases_by_domain():
            priors.domain(domain)
        organs = read_organ_names(labels / "labels.json") if labels.is_dir() else {}
        check_inputs(labels, organs)
        refuse_existing(work, args.overwrite)
        require_torchio()
        import torch
        torch.set_num_threads(max(1, args.threads))
        synthesise_cases(work, labels, organs, priors, args)
        build_datasets(work, priors, args)
    except FSEFTError as e:
        sys.exit(f"abdomen_data: error: {e}")
    (work / DATA_RECORD).write_text(json.dumps(settings_record(args, priors), indent=2) + "\n")
    print(f"wrote the abdominal benchmark's datasets ({TAG}) to {work / 'raw'}; next: "
          f"python benchmarks/abdomen.py {work} --experiment 1")


if __name__ == "__main__":
    main()
