"""Iterations per second of every teacher family on the CPU, with the tests' tiny random models: full copies against
``--lora 4``, one training process, one thread.

    python benchmarks/tiny_families.py                       # every family; benchmarks/results/tiny_families_cpu.json
    python benchmarks/tiny_families.py --families sd3.5 flux-dev --steps 10

Families: a pixel ``UNet2DModel``, an SD-1.x-style latent pipeline, SDXL, SD3.5 and FLUX.1-dev (the tiny folders of
tests/diffusers_models.py and tests/tiny_pipelines.py, built here: nothing is downloaded) and an EDM2 network
(a 2-level class-conditional magnitude-preserving U-Net on 3 x 8 x 8 images, random weights, as an emd_fast network
file). Each is ``python -m emd_fast.train`` with batch 8, K 4, ``--steps`` iterations and no evaluation; the figure
is summary.json's training iterations per second (set-up, prompt encoding and the reference samples left out).
These models are a few ten thousand parameters: the figures measure the host work of an iteration (Python,
operator dispatch) of each family's network, not its arithmetic, and say how long the tests of a family take.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "tiny_families_cpu.json"
FAMILIES = ("pixel", "sd", "sdxl", "sd3.5", "flux-dev", "edm2")
RUN = ["--batch", "8", "--K", "4", "--eval-every", "1000000", "--ckpt-every", "1000000", "--eval-samples", "8",
       "--quiet", "--device", "cpu"]


def teacher_args(family: str, tmp: Path) -> list[str]:
    """Build the tiny teacher of ``family`` under ``tmp``; the train arguments that name it."""
    sys.path.insert(0, str(ROOT / "tests"))
    tmp.mkdir(parents=True)
    import diffusers_models
    import tiny_pipelines

    if family == "pixel":
        return ["--teacher", str(diffusers_models.pixel_folder(tmp / "pixel"))]
    if family == "sd":
        return ["--teacher", str(diffusers_models.latent_pipeline(tmp / "sd")),
                "--prompts", str(diffusers_models.prompts_file(tmp))]
    if family == "edm2":
        import torch

        from emd_fast.nets.edm2 import EDM2Denoiser
        from emd_fast.schedules import EDMSchedule
        from emd_fast.teachers.network_file import save_network

        torch.manual_seed(0)
        net = EDM2Denoiser(3, 8, EDMSchedule(), label_dim=10, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                           attn_resolutions=(4,), channels_per_head=8)
        with torch.no_grad():
            net.out_gain.fill_(1.0)  # EDM2 starts at a zero output gain; a trained network has another
        save_network(net, tmp / "edm2.safetensors", "edm2-tiny")
        return ["--teacher", str(tmp / "edm2.safetensors")]
    build = {"sdxl": lambda p: tiny_pipelines.sdxl_pipeline(p),
             "sd3.5": lambda p: tiny_pipelines.sd3_pipeline(p, sd35=True),
             "flux-dev": lambda p: tiny_pipelines.flux_pipeline(p, dev=True)}[family]
    return ["--teacher", str(build(tmp / family)), "--prompts", str(tiny_pipelines.prompts_file(tmp)),
            "--resolution", str(tiny_pipelines.PIXELS)]


def measure(family: str, teacher: list[str], lora: bool, steps: int, tmp: Path) -> dict:
    """One training run of ``family``'s tiny teacher (``teacher``: its train arguments), full or ``--lora 4``."""
    out = tmp / f"{family}-{'lora' if lora else 'full'}"
    args = [*teacher, *RUN, "--steps", str(steps), "--out", str(out), *(["--lora", "4"] if lora else [])]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "emd_fast.train", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"ok": False, "error": (proc.stderr.strip().splitlines() or ["(no output)"])[-1]}
    cost = json.loads((out / "summary.json").read_text())["cost"]
    return {"ok": True, "it_per_s": cost["iters_per_s"]["training"], "train_s": cost["train_s"],
            "setup_s": cost["setup_s"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    import torch

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in a.families:
            teacher = teacher_args(family, Path(tmp) / f"{family}-teacher")  # built once, read by both runs
            rows[family] = {mode: measure(family, teacher, mode == "lora", a.steps, Path(tmp))
                            for mode in ("full", "lora")}
            cells = [f"{r['it_per_s']:.2f} it/s" if r["ok"] else f"failed: {r['error']}" for r in rows[family].values()]
            print(f"| {family} | {' | '.join(cells)} |", flush=True)
    result = {"machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                          "load_avg_1min": os.getloadavg()[0], "threads_per_run": 1},
              "batch": 8, "K": 4, "steps": a.steps, "families": rows}
    a.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
