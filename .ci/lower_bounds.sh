#!/usr/bin/env bash
# The oldest versions setup.py claims, in a fresh venv, with the version-sensitive part of the suite: the Triton kernels
# in the interpreter and their ahead-of-time compile check, and the diffusers/transformers teachers (loading, folder
# inspection, tokenizers and text encoders, one end-to-end latent text-to-image run) without the slow end-to-end
# runs that exercise nothing version-specific beyond that. torch is pinned to the CPU wheel CI has (2.13.0): older
# torch releases on PyPI are CUDA builds of several GB; the GPU machines run torch 2.11. Usage: .ci/lower_bounds.sh VENV
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python3 -m venv "$1"
source "$1/bin/activate"
python -m pip install -q --upgrade pip
pip install -q torch==2.13.0 diffusers==0.33.0 transformers==4.40.0 huggingface-hub==0.27.0 tokenizers==0.19.0 \
    triton==3.6.0 numpy==1.23.5 safetensors==0.4.1 nvtx==0.2.8 tqdm==4.64.1 matplotlib==3.6.3 scikit-learn==1.2.2 \
    pytest pytest-benchmark
pip install -q --no-deps -e "$repo"
cd "$repo"
pip list 2>/dev/null | grep -iE "^(torch|diffusers|transformers|triton|numpy|safetensors|matplotlib|scikit-learn) "
python -m pytest -q -p no:cacheprovider tests/test_kernels_langevin.py tests/test_kernels_losses.py \
    benchmarks/test_aot_check.py tests/test_diffusers*.py tests/test_flow_matching.py tests/test_sd3.py tests/test_flux.py \
    tests/test_sdxl.py tests/test_teacher_refusals.py \
    -k "not bf16_teacher_and_gradient_checkpointing and not a_new_prompt_samples \
        and not pixel_folder_trains_resumes_exactly and not class_conditional_pixel_unet \
        and not grayscale_non_square and not fp16_variant_weights_only and not deferred_step"
