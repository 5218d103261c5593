"""The run's health: early warning of a diverging run from the logged losses, gradient norms and E-step moves."""
from __future__ import annotations

import statistics
from collections import deque


class DivergenceError(FloatingPointError):
    """A run is diverging: a monitored quantity exploded (raised before it turns into nan)."""


class DivergenceGuard:
    """Stops a diverging run early, naming the quantity, the step, the noise level and the knob to turn.

    The E-step moves x_t = alpha g(z) + sigma eps from the generator's sample towards the teacher's: both lie within
    the data's range plus noise, so a batch-mean move of more than MAX_MOVE data scales (alpha sigma_data + sigma
    per element) is an unstable chain, not a long way to go (z and eps themselves may legitimately move far at low
    noise: eps by the distance to a teacher mode over sigma). A gradient norm above GRAD_JUMP times its running
    median (last WINDOW checked steps, after MIN_HISTORY of them) is a blow-up in progress. The history is not
    checkpointed: after a resume it starts again.
    """

    MAX_MOVE, GRAD_JUMP, WINDOW, MIN_HISTORY = 10.0, 1e3, 200, 20
    KNOB = ("use the noise-scaled z step (--z-step scaled), lower gamma_z / gamma_eps (--gamma-z, --gamma-eps) or "
            "raise --t-min")

    def __init__(self):
        self.history = {key: deque(maxlen=self.WINDOW) for key in ("grad_g", "grad_s")}

    def _where(self, rec: dict[str, float]) -> str:
        return (f"largest x_t move {rec['x_move_max']:.3g} data scales at noise level t = {rec['t_move_max']:.3g}; "
                f"mean moves of z {rec['z_move']:.3g}, eps {rec['eps_move']:.3g} per element")

    def check(self, step: int, rec: dict[str, float]) -> None:
        """rec: one step's values from ``Distiller.step`` as floats. DivergenceError if one exploded."""
        if not rec["x_move"] <= self.MAX_MOVE:
            raise DivergenceError(f"E-step diverging at step {step}: the K Langevin steps moved x_t by "
                                  f"{rec['x_move']:.3g} data scales on average ({self._where(rec)}); {self.KNOB}")
        for key, who in (("grad_g", "generator"), ("grad_s", "student")):
            hist, norm = self.history[key], rec[key]
            if len(hist) >= self.MIN_HISTORY:
                median = statistics.median(hist)
                if not norm <= self.GRAD_JUMP * median:
                    raise DivergenceError(
                        f"{who} gradient norm jumped to {norm:.3g} at step {step}, {norm / median:.3g}x its running "
                        f"median {median:.3g} ({self._where(rec)}); lower the learning rate, or {self.KNOB}")
            hist.append(norm)
