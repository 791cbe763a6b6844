from setuptools import find_packages, setup

# `trainers/` and `plans/` sit at the top level (the folder users point nnUNet_extTrainer at, and the
# JSON presets); they are installed as the packages below so that regular installs carry them too.
SCRIPTS = {
    "nnUNetv2_fseft_ext_path": "ext_path",
    "nnUNetv2_fseft_export": "export",
    "nnUNetv2_fseft_plan": "plan",
    "nnUNetv2_fseft_prepare_target": "prepare_target",
    "nnUNetv2_fseft_convert": "convert",
    "nnUNetv2_fseft_assemble": "assemble",
    "nnUNetv2_fseft_fewshot_splits": "fewshot_splits",
    "nnUNetv2_fseft_zeroshot": "zeroshot",
    "nnUNetv2_fseft_benchmark": "benchmark",
    "nnUNetv2_fseft_demo": "demo",
    "nnUNetv2_fseft_pseudolabel": "pseudolabel",
    "nnUNetv2_fseft_predict": "predict",
}

setup(
    name="nnunetv2-fseft",
    version="0.1.0",
    description="nnU-Net v2 plugin: partial-label foundation pre-training and few-shot "
                "parameter-efficient fine-tuning (FSEFT) for 3D segmentation",
    python_requires=">=3.10",
    packages=find_packages(include=["nnunetv2_fseft", "nnunetv2_fseft.*"])
    + ["nnunetv2_fseft_trainers", "nnunetv2_fseft_plans"],
    package_dir={"nnunetv2_fseft_trainers": "trainers", "nnunetv2_fseft_plans": "plans"},
    package_data={"nnunetv2_fseft_plans": ["*.json"]},
    install_requires=[
        "nnunetv2>=2.8.1,<2.9",
        "torch",
        "dynamic-network-architectures>=0.4.4,<0.5",
        "batchgenerators",
        "SimpleITK",
        "safetensors",  # adapter files that load without pickle (already pulled in by timm)
    ],
    # torchio synthesises the abdominal benchmark's CT images (benchmarks/abdomen_synth, not installed); the plugin
    # never imports it
    extras_require={"test": ["pytest"], "abdomen": ["torchio"]},
    entry_points={"console_scripts": [f"{k}=nnunetv2_fseft.cli.{v}:main" for k, v in SCRIPTS.items()]},
)
