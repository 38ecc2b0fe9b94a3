"""A prior on each layer's boundary rate: the binomial prior of Nawrot et al. 2023 ("Efficient Transformers with
Dynamic Token Pooling", section 3.2), an option that is off by default (the paper's HM-LSTM has none).

For a lower layer l and a sequence of n steps, with p_t the soft probability that the layer closes a segment at
step t and k = sum_t p_t, the term is

    -log Binomial(k; n, r) / n  = -(lgamma(n+1) - lgamma(k+1) - lgamma(n-k+1) + k log r + (n-k) log(1-r)) / n

averaged over the batch, times the layer's weight: it is smallest when the layer fires on a fraction r of the
steps, and grows the further the count strays (the binomial's spread, not a hinge). lgamma makes it defined for a
count that is not a whole number.

p_t = keep_t * sigm(a * zhat_t): the logistic counterpart of the hard sigmoid ztilde = hard_sigm(a * zhat), with
the same crossing of 1/2 at zhat = 0 (where the step boundary switches), but never flat, so the prior can still
move a layer that has stopped firing, or fires everywhere (hard_sigm's gradient is 0 there). keep_t = 1 - copy_t
(a boundary can only open on a step that is not a COPY: docs/design.md, "Choices made here") comes from the hard
boundaries and is a constant here: the prior's gradient goes only through zhat. The term is a training loss only:
BPC stays the LM loss alone.

What k counts (`prior.count`):
- "hard" (the default): k is the number of boundaries the layer actually drew, with the gradient of the soft
  count (straight-through: z + p - p.detach(), per step), as Nawrot et al. count their hard boundaries.
- "soft": k = sum_t p_t itself. Measured on the synthetic corpus (docs/boundary-study.md), the model then meets
  the prior with every p_t near the rate and few zhat above 0: the soft count is on target while the layer
  fires far less often than asked.

`start` and `ramp` delay the prior and grow its weights linearly, a function of the step alone (so a resume
repeats it). They test whether a layer that first fires freely keeps its word ends when the budget arrives:
measured on the synthetic corpus (docs/boundary-study.md), it does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hmlm.model import ModelConfig

COUNTS = ("hard", "soft")


@dataclass
class PriorConfig:
    rates: list[float] = field(default_factory=list)  # target boundary rate per lower layer, e.g. [0.2, 0.03]; []: off
    weights: list[float] = field(default_factory=list)  # weight of each layer's term; []: 1 for every layer
    count: str = "hard"  # hard: the boundaries drawn, with the soft probabilities' gradient; soft: sum of p_t
    start: int = 0  # the first training step with the prior; before it the boundaries are free
    ramp: int = 0  # steps from `start` over which the weights grow from 0 to their full value (0: at once)

    @property
    def enabled(self) -> bool:
        return bool(self.rates)

    def layer_weights(self) -> list[float]:
        return list(self.weights) if self.weights else [1.0] * len(self.rates)

    def scale_at(self, step: int) -> float:
        """The share of the weights that applies at training step `step` (0 before `start`, 1 after the ramp)."""
        if not self.enabled or step < self.start:
            return 0.0
        return min(1.0, (step - self.start + 1) / self.ramp) if self.ramp else 1.0

    def validate(self, model: ModelConfig) -> None:
        """Raise ValueError naming the key when the prior cannot apply to `model`."""
        if self.count not in COUNTS:
            raise ValueError(f"prior.count must be one of {', '.join(COUNTS)}, not {self.count!r}")
        if not self.rates:  # off: whatever the weights say (so that -s prior.rates=[] turns a config's prior off)
            return
        lower = len(model.hidden_sizes) - 1
        if model.kind != "hmlstm" or lower < 1:
            raise ValueError(
                "prior.rates: a boundary-rate prior needs an HM-LSTM of two layers or more (model.kind: hmlstm); "
                "set prior.rates=[] for this model"
            )
        if len(self.rates) != lower:
            raise ValueError(
                f"prior.rates must hold one rate per lower layer ({lower} for {len(model.hidden_sizes)} layers), "
                f"not {len(self.rates)}"
            )
        for i, rate in enumerate(self.rates):
            if not 0.0 < rate < 1.0:
                raise ValueError(f"prior.rates[{i}] must lie strictly between 0 and 1, not {rate}")
        if self.weights and len(self.weights) != lower:
            raise ValueError(f"prior.weights must hold one weight per lower layer ({lower}), not {len(self.weights)}")
        for i, weight in enumerate(self.weights):
            if weight < 0 or not math.isfinite(weight):
                raise ValueError(f"prior.weights[{i}] must be zero or positive, not {weight}")


def soft_boundaries(
    zhat: Tensor, boundaries: Tensor, z0: list[Tensor] | None, slope: float, count: str = "soft", cell: str = "hmlm"
) -> Tensor:
    """p (B, T, L-1): keep * sigm(slope * zhat), keep = 1 - copy from the hard boundaries (detached); keep = 1 under
    the seed's cell, whose boundaries can open on a COPY step too (hmlm/cell.py). With count="hard", the values are
    the boundaries themselves and the gradient is p's (straight-through).

    zhat, boundaries: (B, T, L-1) from one forward pass; z0: the z of every layer it started from (L x (B, 1)), or
    None for the zero state."""
    z = boundaries.detach()
    if cell == "seed":
        p = torch.sigmoid(slope * zhat)
        return z + (p - p.detach()) if count == "hard" else p
    B, _, lower = z.shape
    first = torch.cat(z0[:lower], dim=-1)[:, None] if z0 is not None else z.new_zeros(B, 1, lower)  # (B, 1, L-1)
    z_prev = torch.cat([first.to(z.dtype), z[:, :-1]], dim=1)  # z^l_{t-1}
    z_below = torch.cat([torch.ones_like(z[..., :1]), z[..., :-1]], dim=-1)  # z^{l-1}_t, z^0 = 1
    keep = z_prev + (1 - z_prev) * z_below  # flush or update: 1 - copy
    p = keep * torch.sigmoid(slope * zhat)
    return z + (p - p.detach()) if count == "hard" else p


def binomial_nll(count: Tensor, n: int, rate: float) -> Tensor:
    """-log Binomial(count; n, rate) for a real count in [0, n] (lgamma in place of the factorials)."""
    log_choose = math.lgamma(n + 1) - torch.lgamma(count + 1) - torch.lgamma(n - count + 1)
    return -(log_choose + count * math.log(rate) + (n - count) * math.log1p(-rate))


def boundary_prior(
    config: PriorConfig, zhat: Tensor, boundaries: Tensor, z0: list[Tensor] | None, slope: float, scale: float = 1.0,
    cell: str = "hmlm",
) -> tuple[Tensor, list[Tensor]]:  # fmt: skip
    """The weighted prior term (a scalar; `scale` multiplies every weight) and each layer's unweighted term."""
    p = soft_boundaries(zhat, boundaries, z0, slope, config.count, cell).double()  # lgamma near n wants the precision
    n = p.shape[1]
    terms = [binomial_nll(p[..., layer].sum(1), n, rate).mean() / n for layer, rate in enumerate(config.rates)]
    total = sum(scale * w * term for w, term in zip(config.layer_weights(), terms, strict=True))
    return total.to(torch.promote_types(zhat.dtype, torch.float32)), [term.detach() for term in terms]
