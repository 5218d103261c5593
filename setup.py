from setuptools import find_packages, setup

setup(
    name="emd_fast",
    version="0.1.0",
    description="EM Distillation (EMD) of diffusion models into one-step generators, with fused Triton kernels",
    python_requires=">=3.10",
    # `kernels/` is a top-level folder of the repo (modules without __init__.py) installed as `emd_fast.kernels`:
    # the bare name `kernels` belongs to another PyPI package, and the folder must never shadow it
    packages=[*find_packages(include=["emd_fast", "emd_fast.*"]), "emd_fast.kernels"],
    package_dir={"emd_fast": "emd_fast", "emd_fast.kernels": "kernels"},
    # the digits teacher and classifier that `python -m emd_fast.pretrain` trains (a few MB; nothing is downloaded)
    package_data={"emd_fast": ["assets/*"]},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors",
        "einops",
        "nvtx",
        "tqdm",  # progress bars with live postfix: not worth rewriting
        "matplotlib",  # PNG plots of samples against the teacher
        "scikit-learn",  # ships the 8x8 handwritten digits (sklearn.datasets.load_digits) the digits preset uses
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        # diffusers teachers (--teacher DIR): the UNets, VAE and schedulers; transformers for the CLIP text encoder
        "diffusers": ["diffusers>=0.30", "transformers>=4.40"],
        # --lora: LoRA adapters from peft (diffusers' own LoRA format is peft's); tested with peft 0.21.2
        "lora": ["peft>=0.21"],
        "test": ["pytest", "pytest-benchmark", "triton>=3.0", "diffusers>=0.30", "transformers>=4.40", "peft>=0.21"],
    },
    # every command also as a console script: emd-train == python -m emd_fast.train, ...
    entry_points={"console_scripts": [f"emd-{name.replace('_', '-')}=emd_fast.{name}:console"
                                      for name in ("train", "sample", "fid", "pretrain", "edm_import", "export")]},
)
