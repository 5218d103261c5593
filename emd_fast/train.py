"""``python -m emd_fast.train``: distill a teacher into a one-step generator with EM Distillation.

With no arguments it distills the embedded default (an 8-mode 2-D Gaussian mixture with exact scores) on the GPU if
there is one, else the CPU, and writes a run directory (see ``emd_fast.training.rundir``):
    config.json  metrics.jsonl  checkpoints/step_*.{safetensors,json}  samples/*.png  summary.json
This module only parses the command line; ``emd_fast.training.loop.train`` does the work.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

from .cli import INCEPTION_TORCHSCRIPT_HELP, add_debug_flag, path_arg, run_as_process, run_command
from .emd import VARIANTS, Z_STEPS
from .execution.backends import BACKENDS
from .schedules import SCHEDULES, WEIGHTINGS
from .teachers.diffusers_folder import DEFAULT_GUIDANCE, FLUX_GUIDANCE
from .training.config import DIST_TIMEOUT_S, PRESET_DEFAULTS, PRESETS
from .training.distiller import FINITE_CHECKS, PRECISIONS
from .training.loggers import LOGGERS
from .training.loop import LOG_EVERY, WARM_ITERS, train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m emd_fast.train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="EM Distillation (Xie et al. 2024) of a diffusion teacher into a one-step generator. "
                    "Each iteration: K Langevin steps on (eps, z) targeting p_T(x_t) p_theta(z|x_t) (E-step), a "
                    "generator update on the noise-cancelled denoising loss (M-step), and a student score update.",
        epilog="preset defaults, used for the options not given: " + "; ".join(
            f"{name}: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in d.items())
            for name, d in PRESET_DEFAULTS.items()))
    a = p.add_argument_group("problem (the teacher)")
    a.add_argument("--preset", choices=PRESETS, default=None,
                   help="embedded teachers: ring2d (the default) = 8 unequal modes in 2-D; gmm16d = 10 modes in "
                        "16-D; digits = class-conditional U-Net on sklearn's 8x8 digits. Hyperparameters for a "
                        "--teacher file: edm-imagenet64, edm-cifar10 (docs/presets.md). Their defaults: see the end")
    a.add_argument("--teacher", type=path_arg, default=None,
                   help="a teacher network file: NVlabs/EDM's network pickle (.pkl: ADM, DDPM++, NCSN++ with EDM/VP/VE "
                        "preconditioning, read without EDM's code), NVlabs/EDM2's (docs/teachers_edm2.md), or its "
                        "emd_fast .safetensors conversion "
                        "(python -m emd_fast.edm_import); or a diffusers folder (a UNet2DModel folder with "
                        "scheduler_config.json, or a pipeline folder with model_index.json: pixel or latent "
                        "text-to-image; needs the diffusers extra); generator and student start from it")
    a.add_argument("--prompts", type=path_arg, default=None,
                   help="text-to-image diffusers teacher: a text file of prompts, one per line; their embeddings "
                        "are computed once and cached in the run directory (prompt_embeddings.safetensors)")
    a.add_argument("--guidance-scale", type=float, default=None,
                   help=f"guidance scale of a text-to-image teacher: classifier-free for SD, SDXL and SD3 (1: "
                        f"conditional, 0: unconditional; default {DEFAULT_GUIDANCE}, this project's choice: the EMD "
                        f"paper's value could not be read); FLUX.1-dev's embedded guidance (default {FLUX_GUIDANCE}, "
                        f"the pipeline's), given to generator and student too; none for FLUX.1-schnell")
    a.add_argument("--mixture", type=path_arg, default=None,
                   help="your own Gaussian mixture: .json or .npz with means (M, D), weights (M,) and covs (M, D, D) "
                        "or variances (M,) / (M, D); exact teacher, MLP networks")
    a.add_argument("--labels", type=int, nargs="+", default=None,
                   help="class-conditional teacher: train on these class labels only (default: all, uniformly)")
    a.add_argument("--schedule", choices=tuple(SCHEDULES), default=None,
                   help="noise schedule (default: a teacher file's own; vp_cosine for mixtures; edm for digits); flow: "
                        "rectified flow, x_t = (1 - s) x + s eps (docs/teachers.md)")
    a.add_argument("--hidden", type=int, default=128, help="MLP width of the generator / student")
    a.add_argument("--depth", type=int, default=3, help="residual blocks of the generator / student MLP")
    a.add_argument("--teacher-fit-steps", type=int, default=1500,
                   help="steps regressing an MLP onto the exact teacher denoiser; generator and student start "
                        "as copies of it (the paper initialises both from the teacher network)")
    d = p.add_argument_group("text-to-image diffusers teachers (SD, SDXL, SD3 / SD3.5, FLUX.1: docs/teachers.md)")
    d.add_argument("--resolution", type=int, nargs="+", default=None, metavar="PIXELS",
                   help="image size the generator makes: one number (square) or height width, a multiple of the VAE "
                        "factor (x 2 for SD3 and FLUX); default the pipeline's (e.g. 1024 for SDXL, SD3, FLUX)")
    d.add_argument("--max-sequence-length", type=int, default=None,
                   help="T5 tokens of each prompt for SD3 (default 256) and FLUX (default 512), as the pipelines' "
                        "max_sequence_length: part of the teacher's condition")
    e = p.add_argument_group("EMD")
    e.add_argument("--K", type=int, default=8, help="Langevin steps per E-step (EMD-K); 0 = no MCMC")
    e.add_argument("--gamma-eps", type=float, default=0.3, help="Langevin step size on eps")
    e.add_argument("--gamma-z", type=float, default=0.01,
                   help="Langevin step size on z (with --z-step scaled: its value at high noise)")
    e.add_argument("--z-step", choices=Z_STEPS, default="scaled",
                   help="scaled: gamma_z * sigma^2 / (sigma^2 + alpha^2 sigma_data^2) per example, the z-chain's "
                        "curvature ~ alpha^2/sigma^2 J^T J divided out, stable at every noise level; fixed: gamma_z "
                        "(diverges at low noise on ill-conditioned teachers)")
    e.add_argument("--variant", choices=VARIANTS, default="eps,z",
                   help="sampled variables: eps,z (reparametrized), x,z (joint), eps or x (z fixed)")
    e.add_argument("--cancel-noise", action=argparse.BooleanOptionalAction, default=True,
                   help="subtract the book-kept Langevin noise from the M-step residual")
    e.add_argument("--lambda-star", type=float, default=-4.0,
                   help="log-SNR at which the teacher denoiser becomes the generator: g(z) = D(sigma* z, t*)")
    e.add_argument("--gen-weighting", choices=WEIGHTINGS, default="inv_snr",
                   help="w(t) of the generator loss (noise-predicting teachers, epsilon diffusers and EDM VP/VE: "
                        "sqrt_inv_snr)")
    e.add_argument("--student-weighting", choices=WEIGHTINGS, default="edm",
                   help="w(t) of the student loss (noise-predicting teachers, epsilon diffusers and EDM VP/VE: snr)")
    e.add_argument("--t-min", type=float, default=None, help="smallest noise level t sampled (default: schedule's)")
    e.add_argument("--t-max", type=float, default=None, help="largest noise level t sampled (default: schedule's)")
    f = p.add_argument_group("speed (none changes what is computed beyond float rounding)")
    f.add_argument("--fast", action="store_true",
                   help="the fastest settings this machine supports, for the speed options not given: on a GPU "
                        "--backend triton --compile --cuda-graph --finite-check deferred --channels-last (images "
                        "only); on a CPU --compile --finite-check deferred. What is skipped is said")
    f.add_argument("--backend", choices=BACKENDS, default="reference",
                   help="elementwise work of the iteration: plain PyTorch, or the fused Triton kernels (Langevin "
                        "update with in-kernel Philox noise, noise-cancelled M-step loss, student DSM loss)")
    f.add_argument("--compile", nargs="?", const="default", default=None,
                   choices=("default", "max-autotune-no-cudagraphs"),
                   help="torch.compile the generator, student and teacher network (same results up to rounding; "
                        "checkpoints unchanged); what cannot be compiled here is said and left eager")
    f.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=False,
                   help="capture the whole iteration in one CUDA graph after 3 eager ones (needs a CUDA device and "
                        "--finite-check deferred)")
    f.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                   help="bf16: the network calls under autocast(bfloat16); fp32 master weights, optimizer state, "
                        "Langevin chain and losses; an analytic teacher stays exact fp32, a diffusers teacher is "
                        "kept in bf16")
    f.add_argument("--grad-checkpoint", action="store_true",
                   help="diffusers teachers: activation checkpointing in the generator's and student's UNets (less "
                        "memory, one more forward per backward; same results)")
    f.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="image networks and data in NHWC memory order")
    f.add_argument("--finite-check", choices=FINITE_CHECKS, default="sync",
                   help="sync: check every network output and gradient for nan/inf and stop at once (host syncs); "
                        "deferred: a device-side flag makes the fused Adam skip non-finite updates and the run "
                        "stops at the next log write (every %d steps), before any checkpoint" % LOG_EVERY)
    c = p.add_argument_group("compilation (with --compile or --fast)")
    c.add_argument("--compile-cache", type=path_arg, default=None,
                   help="directory of torch.compile's artefacts (default: <out>/compile_cache): a resume, or any run "
                        "given the same directory (the runs of a sweep), starts warm; $TORCHINDUCTOR_CACHE_DIR wins")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=1500, help="training iterations")
    o.add_argument("--batch", type=int, default=256, help="batch size")
    o.add_argument("--lr-g", type=float, default=1e-4, help="generator Adam learning rate")
    o.add_argument("--lr-s", type=float, default=1e-3, help="student score network Adam learning rate")
    o.add_argument("--betas-g", type=float, nargs=2, default=(0.0, 0.99), help="generator Adam betas")
    o.add_argument("--betas-s", type=float, nargs=2, default=(0.0, 0.99), help="student Adam betas")
    o.add_argument("--seed", type=int, default=0, help="seed of the run's single random stream")
    o.add_argument("--ema", type=float, default=500.0,
                   help="half-life of the generator's exponential moving average in thousands of samples, capped "
                        "at --ema-rampup x the samples seen (EDM's schedule); samples, metrics and "
                        "emd_fast.sample use the EMA; 0: no EMA")
    o.add_argument("--ema-rampup", type=float, default=0.05,
                   help="EMA half-life at most this fraction of the samples seen so far (0: no ramp-up)")
    r = p.add_argument_group("run")
    r.add_argument("--out", type=path_arg, default=None, help="run directory (default: runs/<preset>_K<K>_seed<seed>)")
    r.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    r.add_argument("--resume-from", type=path_arg, default=None,
                   help="continue from this checkpoint (.json) of the run in --out, e.g. when the newest is corrupt "
                        "(implies --resume)")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    r.add_argument("--eval-every", type=int, default=250, help="steps between metric evaluations")
    r.add_argument("--ckpt-every", type=int, default=500, help="steps between checkpoints")
    r.add_argument("--plot-every", type=int, default=0, help="steps between PNG plots (0: only the final one)")
    r.add_argument("--keep", type=int, default=3, help="checkpoints kept (0: all)")
    r.add_argument("--phase-every", type=int, default=50,
                   help="time the phases of every N-th iteration (synchronising the device; 0: never)")
    r.add_argument("--eval-samples", type=int, default=2000, help="samples used by the metrics")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--inception", type=path_arg, default=None,
                   help="image runs: Inception-v3 weights (NVlabs' inception-2015-12-05.pt: its tensors are read as "
                        "data, its code never runs; or its .safetensors from python -m emd_fast.fid convert; never "
                        "downloaded); digits: adds FID to the real digits to the metrics; with --fid-ref: FID")
    r.add_argument("--fid-ref", type=path_arg, default=None,
                   help="FID reference statistics in EDM's format (.npz with mu, sigma; e.g. EDM's "
                        "fid-refs/imagenet-64x64.npz): FID of --fid-samples EMA samples every --fid-every steps and "
                        "at the end")
    r.add_argument("--fid-every", type=int, default=0, help="steps between FID evaluations (0: only at the end)")
    r.add_argument("--fid-samples", type=int, default=50_000, help="generated samples per FID (EDM uses 50,000)")
    r.add_argument("--dist-timeout", type=float, default=DIST_TIMEOUT_S,
                   help="launched by torchrun (README: Several GPUs): seconds any collective waits before the run "
                        "stops with an error, when another process died or hangs")
    r.add_argument("--shard", action="store_true",
                   help="launched by torchrun: shard generator, student and EMA across the processes (FSDP2) for "
                        "networks that do not fit one GPU; the teacher stays whole on each. With --lora only the "
                        "adapters (and their gradients, Adam moments and EMA) are sharded: the frozen base stays "
                        "whole on each process (README: Several GPUs)")
    lg = p.add_argument_group("monitoring (docs/monitoring.md)")
    lg.add_argument("--log", nargs="+", choices=LOGGERS, default=None,
                    help="also log the curves, sample grids and config to TensorBoard (<out>/tensorboard) and/or "
                         "Weights & Biases (<out>/wandb; WANDB_MODE=offline works without a network); "
                         "metrics.jsonl is always written. Needs the extra: pip install 'emd_fast[tensorboard]'")
    lo = p.add_argument_group("LoRA (docs/lora.md)")
    lo.add_argument("--lora", type=int, default=None, metavar="RANK",
                    help="train LoRA adapters of this rank instead of full copies: generator and student are the "
                         "teacher's frozen network (stored once; bf16 for a diffusers teacher under --precision bf16) "
                         "plus their own adapters (peft: pip install 'emd_fast[lora]'); only the adapters have "
                         "gradients, Adam moments, an EMA and checkpoints")
    lo.add_argument("--lora-alpha", type=float, default=None,
                    help="the adapters' scale is alpha / rank (default: alpha = rank, scale 1)")
    lo.add_argument("--lora-dropout", type=float, default=0.0,
                    help="dropout on the adapters' input in training (0: none)")
    lo.add_argument("--lora-targets", default=None, metavar="NAMES",
                    help="comma-separated names or patterns (* ? [..]) of the nn.Linear / nn.Conv2d layers (EDM2: "
                         "MPConv) to adapt, each matching a module's full name or its ending after a '.' (e.g. "
                         "to_q,to_k,to_v,to_out.0); "
                         "default: the architecture's list (docs/lora.md)")
    v = p.add_argument_group("EDM2 teachers (docs/teachers_edm2.md)")
    v.add_argument("--vae", type=path_arg, default=None,
                   help="a latent teacher (EDM2's ImageNet-512 pickles): a local diffusers AutoencoderKL folder of the "
                        "VAE its samples are latents of (stabilityai/sd-vae-ft-mse; config.json and weights, never "
                        "downloaded) to decode them for metrics, plots, FID and emd_fast.sample; without it the run "
                        "trains on the latents and does not decode them")
    v.add_argument("--guide", type=path_arg, default=None,
                   help="guide the teacher with a second network file g of the same samples (EDM2's guidance: an "
                        "unconditional network, or a smaller, less trained one: autoguidance): the teacher becomes "
                        "g + w (D - g), w = --guide-weight; generator and student start from --teacher")
    v.add_argument("--guide-weight", type=float, default=None,
                   help="the guidance weight w of --guide (EDM2's presets: 1.2 to 2.9; 1: no guidance)")
    x = p.add_argument_group("files run as code (only for files you trust)")
    x.add_argument("--inception-torchscript", action="store_true", help=INCEPTION_TORCHSCRIPT_HELP)
    return add_debug_flag(p)


def _explicit(parser: argparse.ArgumentParser, argv) -> set[str]:
    """Names of the options given on the command line (not defaulted)."""
    bare = copy.deepcopy(parser)
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    return set(vars(bare.parse_args(argv)))


def format_summary(s: dict) -> str:
    return "\n".join([
        f"run directory: {s['out']}",
        f"steps {s['steps']} on {s['device']}" + (f" x {s['processes']} processes" if s["processes"] > 1 else "")
        + f": {s['iters_per_s']} it/s, {s['samples_per_s']} samples/s "
        f"(setup {s['setup_s']} s, training {s['train_s']} s"
        + (f"; after the first {WARM_ITERS} iterations {s['steady_iters_per_s']} it/s)" if s["steady_iters_per_s"]
           else ")"),
        "execution: " + ", ".join(f"{k} {v}" for k, v in s["execution"].items()),
        *s["summary_lines"],
        *(["time per iteration by phase (ms): " + ", ".join(f"{k} {v}" for k, v in s["phase_ms_per_iter"].items())]
          if s["phase_ms_per_iter"] else []),
        f"plot: {Path(s['out']) / 'samples' / 'final.png'}",
    ])


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = {k: v for k, v in vars(args).items() if k != "debug"}
    cfg["betas_g"], cfg["betas_s"] = tuple(cfg["betas_g"]), tuple(cfg["betas_s"])
    cfg["resume"] = cfg["resume"] or cfg["resume_from"] is not None
    explicit = _explicit(parser, argv) - {"debug"}

    def report(_):
        summary = train(cfg, explicit)
        if summary is not None:  # None: a rank other than 0 of a distributed run
            print(format_summary(summary))

    return run_command(report, args,
                       oom_hint="lower --batch, --eval-samples, --fid-samples or the network size (--hidden, --depth)")


def console() -> None:
    """The ``emd-train`` console script: ``python -m emd_fast.train``."""
    run_as_process(main)


if __name__ == "__main__":
    console()
