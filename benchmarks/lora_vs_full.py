"""Does a LoRA run learn? LoRA EMD against full fine-tuning at the same number of steps, over seeds.

    python benchmarks/lora_vs_full.py digits --rank 8 --seeds 0 1 2 --workers 3
    python benchmarks/lora_vs_full.py diffusers --rank 8 --seeds 0 1 2 --workers 3

digits: the embedded preset (--preset digits: 300 steps, batch 64, K 4, its learning rates), full copies against
``--lora RANK`` (default alpha = rank) with everything else equal; the quality figures are the run's own final
metrics (summary.json: FD of the digits classifier's features to the 1797 real digits, recall, ...).

diffusers: a diffusers teacher folder made here (nothing is downloaded): a class-conditional ``UNet2DModel`` on the
8x8 digits (1 channel, block_out_channels (16, 32), one attention level, 10 class embeddings, 1000 DDPM timesteps
with linear betas, epsilon prediction; 177k parameters), trained with the DDPM loss by ``train_teacher`` below
(``--teacher-steps``, seeded, cached in ``<out>/teacher``). It is distilled with the digits preset's EMD settings
(K 4, lambda* -4, lr_g 1e-4, lr_s 1e-3, EMA 500 kimg) and the library's loss weightings for an epsilon-prediction
teacher (student snr, generator sqrt_inv_snr: docs/teachers.md), 300 steps of batch 32 (what this shared CPU
affords), full against LoRA; the quality figures are computed here from 1000 one-step samples of each run's
checkpoints at steps 100, 200, 300 (``emd_fast.sample``) with the digits classifier, as the digits preset computes
them: FD to the real digits and k-NN recall. The teacher's own figures (18 Heun steps, 1000 samples) are the floor;
the initial generator's (the teacher's denoiser at lambda*, the same for full and LoRA) the start.

Each run is one ``python -m emd_fast.train`` (one thread per process; skipped if its summary.json exists, resumed if
it has a checkpoint). Raw numbers per run, means and the LoRA / full ratios go to
benchmarks/results/lora_vs_full.json (the part of the problem asked for is replaced, the other kept).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "lora_vs_full.json"
FIGURES = ("fd_real", "recall", "precision", "class_accuracy", "fd_teacher")
DIFFUSERS_RUN = ["--K", "4", "--gamma-eps", "0.3", "--gamma-z", "0.01", "--lambda-star", "-4", "--lr-g", "1e-4",
                 "--lr-s", "1e-3", "--batch", "32", "--steps", "300", "--eval-every", "50", "--ckpt-every", "100",
                 "--keep", "0", "--eval-samples", "256"]


def train_teacher(folder: Path, steps: int, seed: int = 0) -> dict:
    """A class-conditional UNet2DModel DDPM on the digits, saved as a diffusers model folder."""
    import diffusers
    import torch

    from emd_fast.problems.digits import load_digits_data

    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                 attention_head_dim=8, num_class_embeds=10)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    x, y = load_digits_data()
    abar = scheduler.alphas_cumprod
    avg = diffusers.UNet2DModel.from_config(unet.config)
    avg.load_state_dict(unet.state_dict())
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.02)
    g = torch.Generator().manual_seed(seed)
    t0, losses = time.perf_counter(), []
    for _ in range(steps):
        i = torch.randint(len(x), (128,), generator=g)
        t = torch.randint(1000, (128,), generator=g)
        eps = torch.randn(128, 1, 8, 8, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        loss = (unet(a.sqrt() * x[i] + (1 - a).sqrt() * eps, t, class_labels=y[i]).sample - eps).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        with torch.no_grad():
            for p_avg, p in zip(avg.parameters(), unet.parameters()):
                p_avg.lerp_(p, 1 - 0.999)
    avg.save_pretrained(folder)
    scheduler.save_pretrained(folder)
    return {"steps": steps, "batch": 128, "lr": 2e-3, "ema": 0.999, "seed": seed,
            "parameters": sum(p.numel() for p in unet.parameters()),
            "loss_last10pct": statistics.mean(losses[-max(1, steps // 10):]), "train_s": time.perf_counter() - t0}


def digit_figures(x, y=None) -> dict:
    """The digits preset's quality figures of images x (N, 1, 8, 8) in [-1, 1]: FD to the real digits, recall,
    precision (and class accuracy when labels y are given)."""
    import torch

    from emd_fast.evaluation.image_metrics import frechet_distance, precision_recall
    from emd_fast.problems.digits import load_classifier, load_digits_data

    classifier = load_classifier()
    with torch.no_grad():
        real = classifier.features(load_digits_data()[0]).double()
        feats = classifier.features(torch.as_tensor(x).float().clamp(-1, 1))
        pred = classifier.head(feats).argmax(1)
    precision, recall = precision_recall(real, feats.double())
    out = {"fd_real": frechet_distance(feats.double(), real), "recall": recall, "precision": precision}
    if y is not None:
        out["class_accuracy"] = float((pred == torch.as_tensor(y)).double().mean())
    return out


def run_one(job: tuple[str, Path, list[str]]) -> tuple[str, dict]:
    """One training run (and, for a diffusers teacher, the figures of its samples): (run name, record)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import numpy as np
    import torch

    from emd_fast import sample, train
    from emd_fast.training.checkpoint import list_checkpoints

    name, run_dir, args = job
    torch.set_num_threads(1)
    summary_path = run_dir / "summary.json"
    t0 = time.perf_counter()
    if not summary_path.is_file():
        resume = ["--resume"] if list_checkpoints(run_dir / "checkpoints") else []
        if train.main(["--out", str(run_dir), "--quiet", "--device", "cpu", *args, *resume]) != 0:
            raise RuntimeError(f"run {run_dir} failed")
    summary = json.loads(summary_path.read_text())
    record = {"args": args, "steps": summary["steps"], "train_s": summary["train_s"],
              "iters_per_s": summary["iters_per_s"], "wall_s": round(time.perf_counter() - t0, 1)}
    if summary["problem"] == "DigitsProblem":
        record |= {k: summary["final"][k] for k in FIGURES}
    else:  # the figures of every checkpoint's samples; the last checkpoint's are the run's
        by_step = {}
        for ckpt in list_checkpoints(run_dir / "checkpoints"):
            step = int(json.loads(ckpt.read_text())["step"])
            npz = run_dir / f"samples_1000_step{step}.npz"
            if not npz.is_file():
                sample.main([str(ckpt), "--n", "1000", "--seed", "1", "--out", str(npz), "--device", "cpu"])
            data = np.load(npz)
            by_step[step] = digit_figures(data["images"], data["labels"])
        record |= by_step[max(by_step)] | {"fd_real_by_step": {s: f["fd_real"] for s, f in sorted(by_step.items())}}
    return name, record


def teacher_figures(folder: Path, lambda_star: float, n: int = 1000) -> tuple[dict, dict]:
    """The diffusers teacher's own figures (n samples of 18 Heun steps, balanced labels: the floor) and those of the
    initial generator (its denoiser at ``lambda_star``: the start)."""
    import torch

    from emd_fast.evaluation.heun import heun_sample
    from emd_fast.nets.generator import Generator
    from emd_fast.problems.diffusers_folder import DiffusersProblem

    problem = DiffusersProblem.from_config({"teacher": str(folder), "seed": 0, "eval_samples": n})
    schedule = problem.teacher.schedule
    y = torch.arange(n) % 10
    noise = torch.randn((n, 1, 8, 8), generator=torch.Generator().manual_seed(12345))
    x = heun_sample(problem.teacher.denoise, schedule, noise, y, 18)
    with torch.no_grad():
        x0 = Generator(problem.teacher.net, schedule.generator_t(lambda_star))(noise, y)
    return digit_figures(x, y), digit_figures(x0, y)


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(records: dict[str, dict], modes: list[str]) -> dict:
    """Means (and stds) over seeds of each mode's figures (and of FD by checkpoint step where the runs have it), and
    the LoRA / full ratio of the means."""
    out = {}
    for mode in modes:
        runs = [r for name, r in records.items() if name.startswith(mode + "_seed")]
        out[mode] = {k: mean_std([r[k] for r in runs])
                     for k in ("fd_real", "recall", "precision", "train_s") if all(k in r for r in runs)}
        if all("fd_real_by_step" in r for r in runs):
            steps = sorted(set.intersection(*(set(r["fd_real_by_step"]) for r in runs)))
            out[mode]["fd_real_by_step"] = {s: mean_std([r["fd_real_by_step"][s] for r in runs]) for s in steps}
    full, lora = out[modes[0]], out[modes[1]]
    out["lora_over_full"] = {k: lora[k]["mean"] / full[k]["mean"] for k in full
                             if k != "fd_real_by_step" and full[k]["mean"]}
    return out


def plot_diffusers(everything: dict, path: Path) -> None:
    """FD to the real digits against steps, mean ± std over seeds, of every diffusers comparison in ``everything``
    (full copies once, each LoRA setting), from the initial generator (step 0) toward the teacher's floor: a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [v for k, v in sorted(everything.items()) if k.startswith("diffusers_") and "initial_generator" in v]
    fig, ax = plt.subplots(figsize=(8.5, 4))
    drawn = set()
    for key, entry in everything.items():  # earlier runs kept for the record ("before"): their final figures only
        if key.startswith("diffusers_") and "before" in entry:
            steps = statistics.mean(r["steps"] for r in entry["runs"].values())
            for mode, fig_ in entry["summary"].items():
                if mode != "lora_over_full":
                    ax.errorbar([steps], [fig_["fd_real"]["mean"]], yerr=[fig_["fd_real"]["std"]], marker="x",
                                capsize=3, ls="none", label=f"{mode}, {entry['before']}")
    for entry in entries:
        start = entry["initial_generator"]["fd_real"]
        for mode, fig_ in entry["summary"].items():
            if mode in drawn or "fd_real_by_step" not in fig_:
                continue
            drawn.add(mode)
            steps = [0, *map(int, fig_["fd_real_by_step"])]
            mean = [start, *(v["mean"] for v in fig_["fd_real_by_step"].values())]
            std = [0.0, *(v["std"] for v in fig_["fd_real_by_step"].values())]
            ax.errorbar(steps, mean, yerr=std, marker="o", capsize=3, label=mode)
    if entries:
        ax.axhline(entries[0]["teacher_heun18"]["fd_real"], color="k", ls="--", label="teacher, 18 Heun steps")
    ax.set(xlabel="EMD steps (batch 32)", ylabel="FD to the real digits (3 seeds)", yscale="log",
           title="diffusers DDPM teacher: one-step generator")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("problem", choices=("digits", "diffusers"))
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=None, help="--lora-alpha (default: the rank)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--teacher-steps", type=int, default=4000)
    p.add_argument("--out", type=Path, default=Path("runs/lora_vs_full"))
    args = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    out = args.out / args.problem
    lora = ["--lora", str(args.rank)] + ([] if args.alpha is None else ["--lora-alpha", str(args.alpha)])
    lora_mode = f"lora{args.rank}" + ("" if args.alpha is None else f"_alpha{args.alpha:g}")
    result = {"problem": args.problem, "rank": args.rank, "alpha": args.alpha or args.rank}
    if args.problem == "digits":
        base = ["--preset", "digits"]
    else:
        folder = out / "teacher"
        if not (folder / "config.json").is_file():
            info = train_teacher(folder, args.teacher_steps)
            (out / "teacher_info.json").write_text(json.dumps(info, indent=1))
        result["teacher"] = json.loads((out / "teacher_info.json").read_text())
        lambda_star = float(DIFFUSERS_RUN[DIFFUSERS_RUN.index("--lambda-star") + 1])
        result["teacher_heun18"], result["initial_generator"] = teacher_figures(folder, lambda_star)
        base = ["--teacher", str(folder), *DIFFUSERS_RUN]
    jobs = [(f"{mode}_seed{seed}", out / f"{mode}_seed{seed}", [*base, "--seed", str(seed), *extra])
            for mode, extra in (("full", []), (lora_mode, lora)) for seed in args.seeds]
    with ProcessPoolExecutor(args.workers) as pool:
        records = dict(pool.map(run_one, jobs))
    result |= {"runs": records, "summary": summarise(records, ["full", lora_mode])}
    import torch

    result["machine"] = {"device": "cpu", "threads_per_run": 1, "torch": torch.__version__}
    everything = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    everything[f"{args.problem}_{lora_mode}"] = result
    RESULTS.write_text(json.dumps(everything, indent=1) + "\n")
    if args.problem == "diffusers":
        plot_diffusers(everything, RESULTS.with_name("lora_vs_full_diffusers.png"))
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
