"""Export a finished run's one-step generator to the tools its teacher came from (``python -m emd_fast.export``).

    diffusers_pipeline  a diffusers teacher's run: a stock pipeline folder (merged weights, or a LoRA file)
    network_file        an EDM / emd_fast U-Net teacher's run (and the digits preset): a safetensors generator
    samples             samples for FID tools (EDM's fid.py, the guided-diffusion evaluator)

``export_run`` checks the run and the output folder first (one-line ValueErrors), writes everything into a temporary
folder beside the output, checks that what it wrote computes the run's generator (relative error <= 1e-5 in fp32,
else nothing is kept) and writes a model card (README.md): the teacher and its SHA-256, the EMD settings, the steps
and the run's last metrics. Then the folder is renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..errors import CheckpointError
from ..nets.unet import ImageDenoiser
from ..problems.diffusers_folder import DiffusersProblem
from ..training.build import find_checkpoint, load_run
from ..training.checkpoint import list_checkpoints
from .network_file import GENERATOR_FILE, sample_kind

TOLERANCE = 1e-5  # largest relative error of an export against the run's generator (fp32)
CARD_SETTINGS = ("K", "gamma_eps", "gamma_z", "z_step", "variant", "cancel_noise", "lambda_star", "gen_weighting",
                 "student_weighting", "lr_g", "lr_s", "betas_g", "betas_s", "batch", "ema", "seed", "precision",
                 "guidance_scale", "lora", "lora_alpha", "lora_dropout", "lora_targets")


def check_run(path: Path) -> Path:
    """The checkpoint to export: a checkpoint JSON as given, or a finished run directory's last checkpoint
    (ValueError, one line, for a folder that is not an emd_fast run or a run that has not finished)."""
    if path.is_file():
        return find_checkpoint(path)
    if not (path / "config.json").is_file() or not list_checkpoints(path / "checkpoints"):
        raise ValueError(f"{path} is not an emd_fast run directory (no config.json and checkpoints/step_*.json)")
    summary, last = path / "summary.json", find_checkpoint(path)
    steps = json.loads(summary.read_text()).get("steps") if summary.is_file() else None
    if steps != json.loads(last.read_text()).get("step"):
        raise ValueError(f"{path}: the run has not finished (its last checkpoint {last.name} is not the step of its "
                         f"summary.json); finish it with --resume, or export that checkpoint: {last}")
    return last


def check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty folder: give a new one")


def export_run(path: Path, out: Path, lora_file: bool = False, samples: int = 0, seed: int = 0, batch: int = 250,
               device=None) -> list[str]:
    """Export the run (directory or checkpoint JSON) ``path`` into the new folder ``out``; returns lines to print."""
    from . import diffusers_pipeline, network_file
    from .samples import write_samples

    check_out(out)
    checkpoint = check_run(Path(path))
    if samples < 0 or batch < 1:
        raise ValueError(f"--samples must be >= 0 and --batch >= 1, got {samples} and {batch}")
    try:
        run, step, ckpt = load_run(checkpoint, device)
    except CheckpointError as e:
        raise ValueError(str(e)) from None
    kind = ("pipeline" if isinstance(run.problem, DiffusersProblem) else
            "network" if isinstance(run.distiller.sampler.denoiser, ImageDenoiser) else None)
    if kind is None:
        raise ValueError(f"{path}: a {type(run.problem).__name__} run's generator is an emd_fast MLP, which no other "
                         f"tool reads; sample it with python -m emd_fast.sample {path} --out samples.npz")
    if lora_file and kind != "pipeline":
        raise ValueError("--lora-file applies to diffusers teachers (pipe.load_lora_weights); this run's generator "
                         "is exported as a network file")
    if samples and kind == "network":
        network_file.check_samples(run)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if kind == "pipeline":
            written = diffusers_pipeline.write_pipeline(run, tmp, lora_file)
            error = diffusers_pipeline.pipeline_error(run, tmp, lora_file, seed=seed)
        else:
            written = network_file.write_generator(run, tmp)
            error = network_file.generator_error(run, tmp, seed=seed)
        if not error <= TOLERANCE:
            raise RuntimeError(f"the exported generator does not compute the run's: relative error {error:.2e} > "
                               f"{TOLERANCE:g}; nothing was written")
        if samples:
            write_samples(run, tmp, samples, seed, batch)
        (tmp / "README.md").write_text(model_card(run, step, ckpt, kind, written, error, samples))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [f"wrote {out} (step {step} of {ckpt}; relative error of the export against the run's generator "
            f"{error:.1e})"]


def model_card(run, step: int, ckpt: Path, kind: str, written: dict, error: float, samples: int) -> str:
    """README.md of an export: what the generator is, how to sample it, where it came from."""
    cfg = json.loads((ckpt.parent.parent / "config.json").read_text())
    summary_path = ckpt.parent.parent / "summary.json"
    final = json.loads(summary_path.read_text()).get("final") if summary_path.is_file() else None
    teacher = cfg.get("teacher_info", {})
    settings = {k: cfg[k] for k in CARD_SETTINGS if cfg.get(k) is not None}
    sigma_star = float(run.distiller.sampler.sigma_star)
    lines = [
        "---", "tags: [emd, em-distillation, one-step, diffusion-distillation]",
        *(["library_name: diffusers"] if kind == "pipeline" else []), "---", "",
        "# One-step generator distilled with EM Distillation (emd_fast)", "",
        f"g(z, y) = D(sigma* z, t*, y): the teacher's denoiser architecture at one noise level, t* = {run.t_star:g} "
        f"(lambda* = {cfg['lambda_star']:g}, sigma* = {sigma_star:.6g}), trained for {step} steps by EMD "
        f"(Xie et al. 2024) from the teacher below. z ~ N(0, I) of shape {tuple(run.distiller.shape)}.", "",
        "## Teacher", "",
        f"- source: `{teacher.get('folder') or teacher.get('file') or cfg.get('preset')}`",
        f"- SHA-256: `{teacher.get('sha256') or cfg.get('teacher_sha256') or 'the digits teacher of emd_fast'}`",
        "", "## EMD settings", "",
        *[f"- {k}: {v}" for k, v in settings.items()],
        f"- steps: {step}", f"- checkpoint: `{ckpt}`", "",
        "## Metrics of the run at its last evaluation", "",
        *([f"- {k}: {v:.6g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in final.items()
           if not isinstance(v, (list, dict))] if final else ["- (no summary.json: an unfinished run's checkpoint)"]),
        "", "## Use", "",
    ]
    if kind == "pipeline":
        lines += [
            f"A stock diffusers `{written['pipeline']}` ({written['weights']}) {written['how']}", "",
            "```python", "import torch", "from diffusers import DiffusionPipeline", "",
            "folder = '.'  # this folder", *written["code"], "```",
        ]
    else:
        labels = run.distiller.num_classes
        lines += [
            f"`{GENERATOR_FILE}`: an emd_fast U-Net file (EDM's parameter names; a LoRA run's adapters merged).",
            "", "```python", "import torch", "from emd_fast.nets.generator import Generator",
            "from emd_fast.teachers.network_file import load_network", "",
            f"g = Generator(load_network('{GENERATOR_FILE}'), t_star={run.t_star!r})  # sigma* = {sigma_star!r}",
            f"z = torch.randn(16, {', '.join(map(str, run.distiller.shape))}, "
            f"generator=torch.Generator().manual_seed(0))",
            *([f"y = torch.randint({labels}, (16,))"] if labels else ["y = None"]),
            "with torch.no_grad():", f"    x = g(z, y)  # {sample_kind(run)}", "```",
        ]
    if samples:
        lines += ["", f"`samples.zip`, `samples.npz`: {samples} samples (seed of z and labels: see the export "
                      f"command). EDM: `python fid.py calc --images=samples.zip --ref=<reference .npz>`; the "
                      f"guided-diffusion evaluator reads `samples.npz` (`arr_0`)."]
    lines += ["", f"Checked on export: relative error {error:.1e} against the run's generator on 3 inputs (fp32).",
              ""]
    return "\n".join(lines)
