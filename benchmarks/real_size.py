"""Iterations/s and peak GPU memory of whole distillation runs at real sizes, with random-weight teachers built from
their published configurations (nothing downloaded), one `python -m emd_fast.train` process per variant.

    python benchmarks/real_size.py edm-imagenet64 --batch 64 --steps 12                 # EDM's ImageNet-64 ADM (296 M)
    python benchmarks/real_size.py sd15 --batch 4 --steps 8 --variants eager-bf16 fast-bf16 checkpointed-bf16
    python benchmarks/real_size.py edm2-img512-s edm2-img512-xxl --batch 16 --variants eager-bf16 fast-bf16
    python benchmarks/real_size.py tiny-adm tiny-sd tiny-edm2 --device cpu --steps 2    # the CPU smoke sizes

Teachers: ``edm-imagenet64`` (UNET_CONFIGS["edm-imagenet64-adm"] as our .safetensors, run with
``--preset edm-imagenet64``); ``sd15``, a Stable-Diffusion-v1.5-sized pipeline folder: the UNet of SD v1.5's config
(4x64x64 latents, 859.5 M parameters, 768-wide cross attention), with a small VAE (4 latent channels, 8x down) and a
2-layer CLIP text encoder of SD's width (768) over a tiny written vocabulary, 77 tokens, guidance 3: the UNet is
what costs; the text encoder runs once per prompt and the VAE only for the end-of-run plot. ``edm2-img64-s``,
``edm2-img512-s``, ``edm2-img512-xxl``: EDM2's networks at their published sizes (``nets/edm2.py`` EDM2_CONFIGS;
280 M and 1523 M parameters) as our .safetensors, the latent ones without a VAE (the run does not decode; the VAE
would enter only the evaluations). ``tiny-adm``, ``tiny-sd`` and ``tiny-edm2`` are the same at toy sizes.
Each variant's iterations/s (whole loop and steady state: the loop's own
figures from summary.json), peak GPU memory (torch.cuda.max_memory_allocated), set-up time, or its failure (exit code
and last line) go to ``--out`` (JSON, written after every variant) and a markdown table. The end-of-run checkpoint is
written as in any run (not timed): point ``--workdir`` at a fast disk with room for it (an ImageNet-64 run's is
~13 GB); run directories are removed after each variant.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = {
    "eager-fp32": ["--precision", "fp32"],
    "eager-bf16": ["--precision", "bf16"],
    "fast-fp32": ["--fast", "--precision", "fp32"],
    "fast-bf16": ["--fast", "--precision", "bf16"],
    "checkpointed-bf16": ["--precision", "bf16", "--grad-checkpoint"],  # diffusers teachers only
}
DIFFUSERS_TEACHERS = {"sd15", "tiny-sd"}  # --grad-checkpoint applies to these
PROMPT_WORDS = ["a", "photo", "of", "red", "fox", "cat", "in", "the", "snow", "city", "at", "night"]


def write_adm_teacher(config: str, path: Path) -> list[str]:
    """Our .safetensors of a random ADM teacher; returns the train options that use it."""
    from emd_fast.nets.unet import UNET_CONFIGS, build_network
    from emd_fast.teachers.network_file import save_network

    torch.manual_seed(0)
    save_network(build_network(dict(UNET_CONFIGS[config])), path, config)
    return ["--teacher", str(path)] + (["--preset", "edm-imagenet64"] if config == "edm-imagenet64-adm" else [])


def write_tokenizer(directory: Path, max_length: int):
    """A CLIP tokenizer over PROMPT_WORDS (whole words, no merges), written here."""
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["<|startoftext|>", "<|endoftext|>", *(f"{w}</w>" for w in PROMPT_WORDS)]
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                                      model_max_length=max_length), len(vocab)


def write_sd_pipeline(full_size: bool, path: Path) -> list[str]:
    """A Stable-Diffusion-style pipeline folder with a random UNet (SD v1.5's config, or a toy one) and a prompts
    file; returns the train options that use them."""
    import diffusers
    import transformers

    torch.manual_seed(0)
    width, tokens = (768, 77) if full_size else (16, 8)
    unet = (diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768) if full_size else
            diffusers.UNet2DConditionModel(
                sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=4,
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16))
    levels = 4 if full_size else 2
    vae = diffusers.AutoencoderKL(latent_channels=4, block_out_channels=(8,) * levels, layers_per_block=1,
                                  down_block_types=("DownEncoderBlock2D",) * levels, norm_num_groups=4,
                                  up_block_types=("UpDecoderBlock2D",) * levels)
    tokenizer, vocab_size = write_tokenizer(path.parent / f"{path.name}-tokenizer", tokens)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tokens, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    scheduler = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                      safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False).save_pretrained(path)
    prompts = path.parent / "prompts.txt"
    prompts.write_text("a photo of a red fox in the snow\na cat in the city at night\n")
    return ["--teacher", str(path), "--prompts", str(prompts), "--guidance-scale", "3"]


def write_edm2_teacher(config: str, path: Path) -> list[str]:
    """Our .safetensors of a random EDM2 teacher (EDM2_CONFIGS[config], or TINY_EDM2); returns the train options."""
    from emd_fast.nets.edm2 import EDM2_CONFIGS
    from emd_fast.nets.unet import build_network
    from emd_fast.teachers.network_file import save_network

    torch.manual_seed(0)
    save_network(build_network(dict(EDM2_CONFIGS.get(config, TINY_EDM2))), path, config)
    return ["--teacher", str(path)] + (["--preset", "edm-imagenet64"] if config in EDM2_CONFIGS else [])


TINY_EDM2 = dict(network="edm2", img_channels=3, img_resolution=16, label_dim=10, model_channels=16,
                 channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], channels_per_head=16)
TEACHERS = {
    "edm-imagenet64": lambda d: write_adm_teacher("edm-imagenet64-adm", d / "teacher.safetensors"),
    "tiny-adm": lambda d: write_adm_teacher("tiny", d / "teacher.safetensors"),
    "sd15": lambda d: write_sd_pipeline(True, d / "pipeline"),
    "tiny-sd": lambda d: write_sd_pipeline(False, d / "pipeline"),
    **{name: (lambda d, name=name: write_edm2_teacher(name, d / "teacher.safetensors"))
       for name in ("edm2-img64-s", "edm2-img512-s", "edm2-img512-xxl", "tiny-edm2")},
}


def run_variant(teacher_args: list[str], variant: str, args, run_dir: Path) -> dict:
    """One train process; its summary's speed and memory figures, or how it failed."""
    cmd = [sys.executable, "-m", "emd_fast.train", *teacher_args, *VARIANTS[variant], "--batch", str(args.batch),
           "--steps", str(args.steps), "--eval-every", "0", "--ckpt-every", "0", "--plot-every", "0",
           "--eval-samples", "8", "--phase-every", "0", "--quiet", "--out", str(run_dir)]
    if args.K is not None:
        cmd += ["--K", str(args.K)]
    if args.device:
        cmd += ["--device", args.device]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "ok": False, "error": f"no result within --timeout {args.timeout} s"}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"variant": variant, "ok": False, "rc": proc.returncode, "error": last, "wall_s": round(wall, 1)}
    s = json.loads((run_dir / "summary.json").read_text())
    return {"variant": variant, "ok": True, "iters_per_s": s["iters_per_s"],
            "steady_iters_per_s": s["steady_iters_per_s"], "samples_per_s": s["samples_per_s"],
            "peak_gpu_memory_gib": s["peak_gpu_memory_gib"], "setup_s": s["setup_s"], "train_s": s["train_s"],
            "execution": s["execution"], "wall_s": round(wall, 1)}


def table(results: dict) -> str:
    lines = ["| teacher | variant | it/s | steady it/s | samples/s | peak GPU GiB | setup s | note |",
             "|---|---|---|---|---|---|---|---|"]
    for teacher, rows in results.items():
        for r in rows:
            if r["ok"]:
                lines.append(f"| {teacher} | {r['variant']} | {r['iters_per_s']} | {r['steady_iters_per_s'] or '-'} | "
                             f"{r['samples_per_s']} | {r['peak_gpu_memory_gib'] or '-'} | {r['setup_s']} | |")
            else:
                lines.append(f"| {teacher} | {r['variant']} | - | - | - | - | - | failed: {r['error']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("teachers", nargs="+", choices=sorted(TEACHERS))
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["eager-fp32", "eager-bf16", "fast-bf16"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=12, help="iterations per run (steady it/s needs more than 10)")
    p.add_argument("--K", type=int, default=None, help="Langevin steps (default: the preset's or the CLI's)")
    p.add_argument("--device", default=None, help="passed to the runs (default: theirs, the GPU if there is one)")
    p.add_argument("--timeout", type=float, default=600, help="seconds a variant may take, set-up included")
    p.add_argument("--workdir", type=Path, default=None, help="where teachers and runs go (default: a temporary one)")
    p.add_argument("--out", type=Path, default=Path("runs/real_size.json"))
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="real_size_", dir=args.workdir))
    results: dict[str, list[dict]] = {}
    facts = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
             "batch": args.batch, "steps": args.steps}
    try:
        for teacher in args.teachers:
            folder = work / teacher
            folder.mkdir()
            teacher_args = TEACHERS[teacher](folder)
            results[teacher] = []
            for variant in args.variants:
                if "--grad-checkpoint" in VARIANTS[variant] and teacher not in DIFFUSERS_TEACHERS:
                    continue
                row = run_variant(teacher_args, variant, args, folder / variant)
                shutil.rmtree(folder / variant, ignore_errors=True)
                results[teacher].append(row)
                print(f"{teacher} {variant}: " + (f"{row['iters_per_s']} it/s, peak {row['peak_gpu_memory_gib']} GiB"
                                                   if row["ok"] else f"failed: {row['error']}"), flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({**facts, "results": results}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(results))
    return 0 if all(r["ok"] for rows in results.values() for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
