"""The objects of a run built from its config: problem, networks and Distiller; a saved run loaded back."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..emd import EMDConfig
from ..errors import CheckpointError, FileRefused
from ..execution.distributed import Ranks, data_parallel, fully_sharded, rank_seed
from ..files import read_json
from ..nets.lora import LoraSettings, check_adapters_run, lora_networks
from ..problems import init_networks, make_problem
from ..seeds import Stream, seed_for
from .checkpoint import checkpoint_record, list_checkpoints, load_checkpoint
from .config import RUN_CONFIG_BYTES, parse_device
from .distiller import Distiller, Execution, checkpoint_bytes


class Run:
    """Everything built from a config: the problem (teacher, metrics, plots), the networks and the Distiller.
    ``ranks``: this process's place in a distributed run (default: the only process): its share of the batch, its
    own random streams, data-parallel networks."""

    def __init__(self, cfg: dict, device: torch.device, fit_teacher: bool, ranks: Ranks = Ranks(), before_fit=None):
        """``before_fit(checkpoint_bytes)``: called with the estimated size of one checkpoint once the teacher's
        network is built, before a problem fits it to the teacher (the one expensive set-up: e.g. the free-disk
        check)."""
        self.cfg, self.ranks, self.problem = cfg, ranks, make_problem(cfg)
        self.teacher = self.problem.teacher
        emd_cfg = EMDConfig(K=cfg["K"], gamma_eps=cfg["gamma_eps"], gamma_z=cfg["gamma_z"], z_step=cfg["z_step"],
                            variant=cfg["variant"], cancel_noise=cfg["cancel_noise"],
                            gen_weighting=cfg["gen_weighting"], student_weighting=cfg["student_weighting"],
                            t_min=cfg["t_min"], t_max=cfg["t_max"]).validate(self.teacher.schedule)  # before the fit
        # a saved run keeps the t* it was trained at (config.json): runs of a diffusers teacher made before t* was
        # rounded to a timestep have a fractional one
        self.t_star = cfg["t_star"] if cfg.get("t_star") is not None else \
            self.teacher.schedule.generator_t(cfg["lambda_star"])
        torch.manual_seed(cfg["seed"])  # network initialisation
        net, self.init_info = self.problem.teacher_network(device, fit=False)
        if before_fit is not None:  # at most: generator, student (and EMA) copies of net, Adam on generator, student
            copies = 3 if cfg["ema"] else 2
            before_fit(checkpoint_bytes([*net.state_dict().values()] * copies, [*net.parameters()] * 2))
        if fit_teacher and hasattr(self.problem, "fit_teacher_network"):
            self.init_info = self.problem.fit_teacher_network(net)
        lora = LoraSettings.from_config(cfg)
        if lora:  # the base: the teacher's own network, else (an analytic teacher) the network fitted to it
            base = self.teacher.net if isinstance(getattr(self.teacher, "net", None), nn.Module) else net
            seeds = (seed_for(cfg["seed"], Stream.LORA_GENERATOR), seed_for(cfg["seed"], Stream.LORA_STUDENT))
            generator, student, info = lora_networks(base, self.t_star, lora, seeds)
            self.init_info = {**self.init_info, **info}
        else:
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
        if lora:
            d = self.distiller
            z, y = d.sample_inputs(1, torch.Generator(device).manual_seed(0))
            check_adapters_run(d.generator.denoiser, lambda: d.emd._net(None, d.generator, z, y))

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
    """The checkpoint JSON ``path`` (or the one beside its .safetensors), or the newest in the run directory
    ``path``."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if not path.is_dir():
        return checkpoint_record(path, "run")
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
        cfg = read_json(config_path, "the run's config", RUN_CONFIG_BYTES)
    except FileRefused as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(cfg, dict) or not isinstance(state.get("config"), dict) or \
            {k: cfg.get(k) for k in state["config"]} != state["config"]:
        raise CheckpointError(f"{ckpt} was written by another config than {config_path}")
    cfg["out"] = str(ckpt.parent.parent)  # the run's directory (a diffusers run's prompt embeddings are there)
    run = Run(cfg, parse_device(device), fit_teacher=False)
    distiller = run.distiller
    if training_state:
        distiller.load_state_tensors(tensors, state["step"], str(ckpt))
    else:
        distiller.load_network_state("ema" if distiller.ema is not None else "generator", tensors, str(ckpt))
        distiller.sampler.eval()
    return run, state["step"], ckpt
