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
    # lower bounds tested in CI (.ci/lower_bounds.sh: the oldest of each beside torch 2.13); torch 2.11 on the GPU
    # machines (benchmarks/run_gpu.sh), 2.13 in CI; user files are read with weights_only loads, hardened in 2.10
    install_requires=[
        "torch>=2.11",
        "numpy>=1.23.5",
        "safetensors>=0.4.1",
        "nvtx>=0.2.8",
        "tqdm>=4.64.1",  # progress bars with live postfix: not worth rewriting
        "matplotlib>=3.6.3",  # PNG plots of samples against the teacher
        "scikit-learn>=1.2.2",  # ships the 8x8 handwritten digits (sklearn.datasets.load_digits) the digits preset uses
    ],
    extras_require={
        "triton": ["triton>=3.6"],
        # diffusers teachers (--teacher DIR): the UNets, VAE and schedulers; transformers for the text encoders
        "diffusers": ["diffusers>=0.33", "transformers>=4.40"],
        # --lora: LoRA adapters from peft (diffusers' own LoRA format is peft's); tested with peft 0.21.2. peft 0.21
        # imports transformers' EncoderDecoderCache (4.43 on): with an older transformers, diffusers fails to import
        "lora": ["peft>=0.21", "transformers>=4.43"],
        # --log tensorboard / --log wandb: the run's curves, images and config where people look at them
        "tensorboard": ["tensorboard>=2.10"],
        "wandb": ["wandb>=0.19"],
        "test": ["pytest", "pytest-benchmark", "triton>=3.6", "diffusers>=0.33", "transformers>=4.43", "peft>=0.21",
                 "tensorboard>=2.10", "wandb>=0.19"],
    },
    # every command also as a console script: emd-train == python -m emd_fast.train, ... (through emd_fast.entry:
    # stop signals handled before the command imports torch)
    entry_points={"console_scripts": [f"emd-{name.replace('_', '-')}=emd_fast.entry:{name}"
                                      for name in ("train", "sample", "fid", "pretrain", "edm_import", "report",
                                                   "export")]},
)
