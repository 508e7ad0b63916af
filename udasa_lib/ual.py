"""UAL's uncertainty-aware label smoothing (Wang et al., ACL 2024, arXiv 2406.04854) as pure torch.

UAL sets each training sample's label-smoothing value from that sample's uncertainty; the map
from uncertainty to epsilon is this project's (docs/method.md, "UAL"):

    epsilon_i = clip(a + b * u_i, epsilon_min, epsilon_max),   b >= 0,   mean_i epsilon_i = target

Two losses take the per-sample epsilon:

- SFT: token cross-entropy with label smoothing as torch defines it (mass epsilon spread uniformly
  over the vocabulary), per sample.
- DPO: the conservative-DPO loss of Mitchell's "A note on DPO with noisy preferences & relationship
  to IPO" (2023), per pair: -(1 - eps) log sigma(beta h) - eps log sigma(-beta h), with
  h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) (DPO, Rafailov et
  al. 2023, Eq. 7, whose loss is the eps = 0 case).
"""
from __future__ import annotations

from typing import Sequence


def ual_epsilons(uncertainty: Sequence[float], mean_epsilon: float, slope: float, low: float, high: float,
                 direction: str = "uncertain_smoother") -> list[float]:
    """epsilon_i = clip(a + slope * u_i, low, high) for u: [N] in [0, 1], with the intercept a solved
    by bisection so the mean of epsilon is `mean_epsilon`; `certain_smoother` uses 1 - u instead.

    Returns [N] floats. Raises ValueError for slope < 0 or a target mean outside [low, high]."""
    if not uncertainty:
        return []
    if slope < 0:
        raise ValueError(f"train.ual.slope must be >= 0 (the direction knob flips it), got {slope}")
    if not low <= mean_epsilon <= high:
        raise ValueError(f"train.ual.mean_epsilon {mean_epsilon} is outside [{low}, {high}]")
    u = [1.0 - x if direction == "certain_smoother" else x for x in uncertainty]

    def values(a: float) -> list[float]:
        return [min(high, max(low, a + slope * x)) for x in u]

    lo_a, hi_a = low - slope * max(u), high - slope * min(u)
    for _ in range(200):  # the clipped mean is monotone in a
        mid = (lo_a + hi_a) / 2
        if sum(values(mid)) / len(u) < mean_epsilon:
            lo_a = mid
        else:
            hi_a = mid
    return values((lo_a + hi_a) / 2)


def ual_dpo_loss(logratio_margin, beta: float, epsilon):
    """Per-pair conservative DPO, averaged over the batch.

    logratio_margin h: [B] (policy-minus-reference log-ratio of chosen minus that of rejected,
    summed over completion tokens); beta: float; epsilon: [B] in [0, 0.5).
    Returns a scalar: mean_i of -(1 - eps_i) log sigma(beta h_i) - eps_i log sigma(-beta h_i)."""
    import torch.nn.functional as F

    logits = beta * logratio_margin
    per_pair = -(1 - epsilon) * F.logsigmoid(logits) - epsilon * F.logsigmoid(-logits)
    return per_pair.mean()


def ual_sft_loss(logits, labels, epsilon, num_tokens=None):
    """Token cross-entropy with per-sample label smoothing, averaged over completion tokens.

    logits: [B, T, V]; labels: [B, T] with -100 where nothing is trained (prompt, padding); the
    prediction at position t is scored against labels[:, t + 1]. epsilon: [B]. num_tokens: the
    target tokens of the whole accumulated batch (transformers' num_items_in_batch), so gradient
    accumulation sums micro-batches into one token mean as trl's own SFT loss does; default: this
    batch's. At epsilon = 0 this equals torch's cross_entropy; at constant epsilon, cross_entropy
    with label_smoothing=epsilon. Returns a scalar."""
    import torch
    import torch.nn.functional as F

    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    log_probs = F.log_softmax(shift_logits, dim=-1)
    nll = -log_probs.gather(-1, shift_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    uniform = -log_probs.mean(dim=-1)
    eps = epsilon.to(log_probs.dtype).unsqueeze(1)
    per_token = (1 - eps) * nll + eps * uniform
    denominator = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, device=mask.device)
    return (per_token * mask).sum() / denominator.clamp(min=1)
