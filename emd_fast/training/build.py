"""The objects of a run built from its config: problem, networks and Distiller; a saved run loaded back."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..emd import EMDConfig
from ..errors import CheckpointError
from ..execution.distributed import Ranks, data_parallel, fully_sharded, rank_seed
from ..problems import init_networks, make_problem
from ..seeds import Stream, seed_for
from .checkpoint import list_checkpoints, load_checkpoint, load_state_dict_strict
from .config import parse_device
from .distiller import Distiller, Execution


class Run:
    """Everything built from a config: the problem (teacher, metrics, plots), the networks and the Distiller.
    ``ranks``: this process's place in a distributed run (default: the only process): its share of the batch, its
    own random streams, data-parallel networks."""

    def __init__(self, cfg: dict, device: torch.device, fit_teacher: bool, ranks: Ranks = Ranks()):
        self.cfg, self.ranks, self.problem = cfg, ranks, make_problem(cfg)
        self.teacher = self.problem.teacher
        emd_cfg = EMDConfig(K=cfg["K"], gamma_eps=cfg["gamma_eps"], gamma_z=cfg["gamma_z"], z_step=cfg["z_step"],
                            variant=cfg["variant"], cancel_noise=cfg["cancel_noise"],
                            gen_weighting=cfg["gen_weighting"], student_weighting=cfg["student_weighting"],
                            t_min=cfg["t_min"], t_max=cfg["t_max"]).validate(self.teacher.schedule)  # before the fit
        self.t_star = self.teacher.schedule.t_at_lambda(cfg["lambda_star"])
        torch.manual_seed(cfg["seed"])  # network initialisation
        net, self.init_info = self.problem.teacher_network(device, fit=fit_teacher)
        generator, student = init_networks(net, self.t_star)
        # channels_last and finite_check are runtime options: a saved config (emd_fast.sample) has none
        shard = cfg.get("shard") and ranks.distributed
        execution = Execution(backend=cfg["backend"], precision=cfg["precision"],
                              channels_last=cfg.get("channels_last", False),
                              finite_check=cfg.get("finite_check", "sync"))
        self.distiller = Distiller(self.teacher, generator, student, emd_cfg,
                                   batch=ranks.per_rank_batch(cfg["batch"]), global_batch=cfg["batch"],
                                   lr_g=cfg["lr_g"], lr_s=cfg["lr_s"], betas_g=cfg["betas_g"], betas_s=cfg["betas_s"],
                                   seed=rank_seed(cfg["seed"], ranks.rank), sigma_data=self.problem.sigma_data,
                                   num_classes=self.problem.num_classes, classes=cfg.get("labels"),
                                   ema_halflife_kimg=cfg["ema"], ema_rampup=cfg["ema_rampup"],
                                   execution=execution, device=device,
                                   data_parallel=data_parallel(device) if ranks.distributed and not shard else None,
                                   shard=fully_sharded(device, ranks.world) if shard else None)

    def sample(self, n: int, rng: torch.Generator) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """n samples of the (EMA) generator from (z, y) drawn from ``rng``, the same whatever the number of
        processes: each rank generates its rows, rank 0 gathers them. (samples (n, ...) or None off rank 0, y)."""
        distiller, rows = self.distiller, self.ranks.rows(n)
        z, y = distiller.sample_inputs(n, rng)
        z_own, y_own = z[rows], None if y is None else y[rows]
        if distiller.sharded:  # all ranks call a sharded network together: as many rows (padding) on each
            longest = -(-n // self.ranks.world)
            z_own, y_own = (None if v is None else torch.cat([v, v.new_zeros((longest - len(v), *v.shape[1:]))])
                            for v in (z_own, y_own))
        return self.ranks.gather_rows(distiller.generate(z_own, y_own)[:rows.stop - rows.start], n), y

    def evaluate(self) -> tuple[dict | None, torch.Tensor | None, torch.Tensor | None]:
        """Metrics of eval_samples generator samples from a fixed (z, y) (the same every evaluation); in a
        distributed run every rank must call it and rank 0 gets them (the others: None, None, y)."""
        rng = torch.Generator(self.distiller.device).manual_seed(seed_for(self.cfg["seed"], Stream.EVALUATION))
        samples, y = self.sample(self.cfg["eval_samples"], rng)
        return None if samples is None else self.problem.metrics(samples, y), samples, y

    @property
    def fid_seed(self) -> int:
        """The seed of the samples whose FID a run reports (``emd_fast.fid calc`` uses it too, by default)."""
        return seed_for(self.cfg["seed"], Stream.FID)

    def sample_batches(self, n: int, seed: int, chunk: int = 250):
        """n samples of the (EMA) generator as images (decoded where the problem decodes its samples: latent
        teachers), ``chunk`` at a time, from a generator seeded with ``seed`` (made by all ranks of a distributed run,
        gathered on rank 0; None on the others)."""
        rng = torch.Generator(self.distiller.device).manual_seed(seed)
        decode = getattr(self.problem, "decode", None)
        for i in range(0, n, chunk):
            x = self.sample(min(chunk, n - i), rng)[0]
            yield x if x is None or decode is None else decode(x)


def find_checkpoint(path: Path) -> Path:
    """The checkpoint JSON ``path`` (or the one beside its .safetensors), or the newest in the run directory ``path``."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_file():
        return path.with_suffix(".json")
    found = list_checkpoints(path / "checkpoints")
    if not found:
        raise CheckpointError(f"no checkpoint in {path / 'checkpoints'}")
    return found[-1]


def load_run(path: str | Path, device, training_state: bool = False) -> tuple[Run, int, Path]:
    """A finished or running run, for sampling: (Run rebuilt from its config.json with the checkpoint's sampling
    generator loaded — the EMA if the run keeps one, else the generator —, the checkpoint's step, the checkpoint).
    ``training_state``: load everything the checkpoint holds instead (generator, student, EMA, optimizers, random
    state), for tools that look at the training itself."""
    ckpt = find_checkpoint(Path(path))
    tensors, state = load_checkpoint(ckpt)
    config_path = ckpt.parent.parent / "config.json"
    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read the run's config {config_path}: {e}") from None
    if not isinstance(cfg, dict) or not isinstance(state.get("config"), dict) or \
            {k: cfg.get(k) for k in state["config"]} != state["config"]:
        raise CheckpointError(f"{ckpt} was written by another config than {config_path}")
    cfg["out"] = str(ckpt.parent.parent)  # the run's directory (a diffusers run's prompt embeddings are there)
    run = Run(cfg, parse_device(device), fit_teacher=False)
    distiller = run.distiller
    if training_state:
        distiller.load_state_tensors(tensors, state["step"], str(ckpt))
    else:
        load_state_dict_strict(distiller.sampler, tensors, "ema." if distiller.ema is not None else "generator.", ckpt)
        distiller.sampler.eval()
    return run, state["step"], ckpt
