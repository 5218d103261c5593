"""``python -m emd_fast.pretrain``: train the embedded digits teacher and the digits classifier into emd_fast/assets/.

Teacher (digits_teacher.safetensors): the class-conditional U-Net ``DIGITS_UNET`` trained on all 1797 of sklearn's
8x8 digits with EDM's denoising loss: sigma ~ exp(N(-1.2, 1.2^2)) clamped to [0.002, 80], weight
(sigma^2 + s_d^2) / (sigma s_d)^2, s_d = 0.5; Adam with a cosine learning-rate decay; an exponential moving average
(EMA) of the weights is what is shipped.
Classifier (digits_classifier.safetensors): ``DigitsClassifier`` on a stratified 80% of the digits, each shifted by
up to one pixel, its accuracy measured on the held-out 20%.
digits_info.json records the settings, final losses, held-out accuracy and the teacher's Heun-sample metrics;
digits_teacher_samples.png shows its Heun samples, one row per class.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .cli import add_debug_flag, path_arg, run_as_process, run_command
from .evaluation.image_metrics import DigitsClassifier
from .evaluation.images import class_rows, save_grid
from .files import make_dirs, write_text_atomic
from .nets.unet import UNET_CONFIGS, build_network
from .problems import digits
from .schedules import EDMSchedule, expand_like
from .seeds import Stream, seed_for
from .teachers.network_file import save_network
from .training.config import check_seed, parse_device

# UNET_CONFIGS["tiny"] at half the width (209k parameters): 2.5x faster on a CPU, where teacher, student and
# generator all run it; its 18-step Heun samples are recognisable digits of every class (digits_info.json).
DIGITS_UNET = UNET_CONFIGS["tiny"] | dict(model_channels=16)


def edm_loss(net, x: torch.Tensor, y: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """EDM's weighted denoising loss of ``net`` on clean images x (N, C, H, W) with labels y (N,): a scalar."""
    sch = net.schedule
    t = sch.sample_t(x.shape[0], rng, x.device)
    alpha, sigma = (expand_like(v, x) for v in sch.alpha_sigma(t))
    x_t = alpha * x + sigma * torch.randn(x.shape, generator=rng, device=x.device)
    w = expand_like(sch.weight("edm", t, net.sigma_data), x)
    return (w * (net(x_t, t, y) - x) ** 2).mean()


def shift(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Each image of x (N, C, H, W) moved by -1, 0 or 1 pixel along each axis, the background (-1) filled in."""
    n, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    di, dj = torch.randint(3, (2, n, 1), generator=rng, device=x.device)
    rows = (di + torch.arange(h, device=x.device))[:, :, None]  # (N, H, 1)
    cols = (dj + torch.arange(w, device=x.device))[:, None, :]  # (N, 1, W)
    return padded[torch.arange(n, device=x.device)[:, None, None], :, rows, cols].movedim(-1, 1)


def optimize(net: torch.nn.Module, loss_fn, steps: int, lr: float, desc: str, quiet: bool = False,
             after_step=None) -> float:
    """Adam on ``loss_fn()`` for ``steps`` steps, the learning rate warmed up over 2% of them, then cosine-decayed
    to 0. Returns the mean loss over the last 10% of the steps."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    warmup = max(1, steps // 50)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min((i + 1) / warmup, 0.5 * (1 + math.cos(math.pi * i / steps))))
    tail = []
    for i in (bar := tqdm(range(steps), desc=desc, disable=quiet, dynamic_ncols=True)):
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if after_step is not None:
            after_step()
        value = float(loss.detach())
        if i >= steps - max(1, steps // 10):
            tail.append(value)
        bar.set_postfix(loss=f"{value:.4f}", refresh=False)
    return sum(tail) / len(tail)


def train_teacher(x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, lr: float, ema: float, seed: int,
                  arch: dict = DIGITS_UNET, quiet: bool = False) -> tuple[torch.nn.Module, dict]:
    """An EMA U-Net trained with the EDM loss on images x (N, 1, 8, 8), labels y (N,); returns (net, losses)."""
    torch.manual_seed(seed)
    net = build_network(arch, EDMSchedule()).to(x.device).train()
    avg = copy.deepcopy(net).eval().requires_grad_(False)
    rng = torch.Generator(x.device).manual_seed(seed)

    def loss_fn():
        idx = torch.randint(len(x), (batch,), generator=rng, device=x.device)
        return edm_loss(net, x[idx], y[idx], rng)

    @torch.no_grad()
    def update_average():
        torch._foreach_lerp_(list(avg.parameters()), list(net.parameters()), 1 - ema)

    train_loss = optimize(net, loss_fn, steps, lr, "teacher", quiet, update_average)
    with torch.no_grad():  # the EMA net's loss on every image, 4 noise draws each
        rng.manual_seed(seed_for(seed, Stream.TEACHER_FIT))
        ema_loss = sum(float(edm_loss(avg, x, y, rng)) for _ in range(4)) / 4
    return avg, {"train_loss_last10pct": train_loss, "ema_loss_all_digits": ema_loss}


def train_classifier(x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, lr: float, seed: int,
                     held_out: float = 0.2, quiet: bool = False) -> tuple[DigitsClassifier, dict]:
    """A DigitsClassifier trained on a stratified (1 - held_out) of x (N, 1, 8, 8), y (N,); returns (net, info)."""
    torch.manual_seed(seed)
    rng = torch.Generator(x.device).manual_seed(seed)
    test = torch.zeros(len(y), dtype=torch.bool, device=x.device)
    for c in y.unique():
        idx = (y == c).nonzero()[:, 0]
        test[idx[torch.randperm(len(idx), generator=rng, device=x.device)[:round(held_out * len(idx))]]] = True
    xs, ys = x[~test], y[~test]
    net = DigitsClassifier().to(x.device).train()

    def loss_fn():
        idx = torch.randint(len(xs), (batch,), generator=rng, device=x.device)
        return F.cross_entropy(net(shift(xs[idx], rng)), ys[idx])

    loss = optimize(net, loss_fn, steps, lr, "classifier", quiet)
    net.eval().requires_grad_(False)
    accuracy = float((net(x[test]).argmax(1) == y[test]).double().mean())
    return net, {"train_loss_last10pct": loss, "held_out_accuracy": accuracy, "n_train": len(ys),
                 "n_held_out": int(test.sum())}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m emd_fast.pretrain", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher-steps", type=int, default=4000, help="teacher Adam steps")
    p.add_argument("--teacher-batch", type=int, default=128)
    p.add_argument("--teacher-lr", type=float, default=2e-3, help="teacher peak learning rate")
    p.add_argument("--ema", type=float, default=0.999, help="per-step decay of the teacher's weight average")
    p.add_argument("--classifier-steps", type=int, default=1500)
    p.add_argument("--classifier-batch", type=int, default=128)
    p.add_argument("--classifier-lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-samples", type=int, default=1000, help="teacher Heun samples scored at the end")
    p.add_argument("--out", type=path_arg, default=digits.ASSETS, help="where the weights and digits_info.json go")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return add_debug_flag(p)


def pretrain(args: argparse.Namespace) -> None:
    """Train the digits teacher and classifier and write them with their record to ``args.out``."""
    for key in ("teacher_steps", "teacher_batch", "classifier_steps", "classifier_batch", "eval_samples"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    for key in ("teacher_lr", "classifier_lr"):
        if not 0 < getattr(args, key) < math.inf:
            raise ValueError(f"--{key.replace('_', '-')} must be a positive number, got {getattr(args, key)}")
    if not 0 <= args.ema < 1:
        raise ValueError(f"--ema must be in [0, 1), got {args.ema}")
    check_seed(args.seed)
    device = parse_device(args.device)
    x, y = (v.to(device) for v in digits.load_digits_data())
    make_dirs(args.out)
    t0 = time.perf_counter()
    classifier, cls_info = train_classifier(x, y, args.classifier_steps, args.classifier_batch, args.classifier_lr,
                                            args.seed, quiet=args.quiet)
    t1 = time.perf_counter()
    teacher, losses = train_teacher(x, y, args.teacher_steps, args.teacher_batch, args.teacher_lr, args.ema,
                                    args.seed, quiet=args.quiet)
    t2 = time.perf_counter()
    teacher_file, classifier_file = args.out / digits.TEACHER_FILE.name, args.out / digits.CLASSIFIER_FILE.name
    save_network(teacher, teacher_file, "digits")
    digits.save_classifier(classifier, classifier_file)

    problem = digits.DigitsProblem(EDMSchedule(), {"seed": args.seed, "eval_samples": args.eval_samples},
                                   teacher_file, classifier_file)
    problem.teacher_network(device, fit=False)
    samples, labels = problem.teacher_samples(args.eval_samples, seed_for(args.seed, Stream.TEACHER_METRICS))
    heun = problem.metrics(samples, labels)
    save_grid(args.out / "digits_teacher_samples.png", class_rows(samples, labels, 10, digits.NUM_CLASSES), 10,
              f"teacher, Heun {digits.HEUN_STEPS} steps")
    info = {
        "data": "sklearn.datasets.load_digits: 1797 images 8x8, 10 classes; x = pixel / 8 - 1 in [-1, 1]",
        "teacher": {"file": teacher_file.name, "arch": teacher.arch, "schedule": teacher.schedule.config(),
                    "loss": "EDM (log-normal sigma, EDM weighting)", "steps": args.teacher_steps,
                    "batch": args.teacher_batch, "lr": args.teacher_lr, "lr_schedule": "2% warm-up, cosine to 0",
                    "ema": args.ema, "seed": args.seed, **losses, "train_s": round(t2 - t1, 1),
                    f"heun{digits.HEUN_STEPS}_metrics": heun},
        "classifier": {"file": classifier_file.name, "steps": args.classifier_steps, "batch": args.classifier_batch,
                       "lr": args.classifier_lr, "augmentation": "random shift by up to 1 pixel", "seed": args.seed,
                       **cls_info, "train_s": round(t1 - t0, 1)},
        "device": str(device), "torch": torch.__version__,
    }
    write_text_atomic(args.out / digits.INFO_FILE.name, json.dumps(info, indent=1) + "\n")
    print(f"teacher: EDM loss {losses['ema_loss_all_digits']:.4f} (EMA), Heun samples: class accuracy "
          f"{heun['class_accuracy']:.3f}, FD to real {heun['fd_real']:.2f}\n"
          f"classifier: held-out accuracy {cls_info['held_out_accuracy']:.4f}\nwrote {teacher_file}, "
          f"{classifier_file}, {args.out / digits.INFO_FILE.name}")


def main(argv=None) -> int:
    return run_command(pretrain, build_parser().parse_args(argv), oom_hint="lower --teacher-batch or "
                                                                         "--eval-samples")


def console() -> None:
    """The ``emd-pretrain`` console script: ``python -m emd_fast.pretrain``."""
    run_as_process(main)


if __name__ == "__main__":
    console()
