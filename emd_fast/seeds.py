"""Every random stream of a run derives from its one ``--seed``: seed + a fixed offset per purpose, so that no two
streams coincide and each is the same in every run (and every resume) with that seed."""
from __future__ import annotations

from enum import IntEnum


class Stream(IntEnum):
    """The offset of each stream from the run's seed."""

    NETWORKS = 0  # network initialisation (torch's global generator), and the training iterations' own generator
    TEACHER_FIT = 1  # the regression of an MLP onto an analytic teacher
    EXACT_SAMPLES = 2  # exact teacher samples the mixture metrics compare with
    EVALUATION = 3  # the fixed (z, y) of every evaluation
    FLOOR = 4  # a second set of exact samples: what a perfect generator scores
    REFERENCE = 5  # the teacher's own many-step samples shown beside the generator's
    TEACHER_METRICS = 6  # the teacher samples whose metrics are the floor of a network teacher
    FID = 7  # the samples whose FID a run reports (``emd_fast.fid calc`` too, by default)
    LORA_GENERATOR = 8  # the A factors of the generator's LoRA adapters (--lora)
    LORA_STUDENT = 9  # the A factors of the student's


def seed_for(seed: int, stream: Stream) -> int:
    return seed + int(stream)
