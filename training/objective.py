"""The DAPS objective: rewards and encoder log-probabilities in, sample weights, losses and the step size η out.

Pure tensor functions, one step of DAPS.md "One training step" each, plus the two ways of choosing η
("Automatic step size") and the β schedule. No model code: the caller samples K codes per image and hands over

    rewards  R (N, K)   r_ik = log p_φ(x_i | z_ik), summed over pixels (stop-gradient inside the weights)
    log_q    ℓ (N, K)   ℓ_ik = log q_θ(z_ik | x_i), summed over the L codes (with gradient for the encoder loss)

Pipeline (every function also accepts extra leading dimensions; K is always the last one):

    advantages(R)                 A_ik = R_ik − logsumexp_k R_ik
    log_weights(A, ℓ, β, η)       s_ik = (A_ik − β ℓ_ik) / (η + β)
    normalized_weights(s)         w_ik = softmax_k s_ik
    effective_sample_size(w)      ESS_i = 1 / Σ_k w_ik²
    encoder_loss(ℓ, w)            L_θ = −mean_i Σ_k sg(w_ik) ℓ_ik
    decoder_loss(r)               L_φ = −mean_{i,k} r_ik
    marginal_usage_loss(log q, w) log V − H(q̄), q̄ the batch's weighted average code distribution (optional)

Numerics. Everything runs in log space and in float32 at least (bf16/fp16 inputs are upcast), so rewards of
±1e6, all-equal rewards and η anywhere in [1e-6, 1e12] give finite weights. Non-finite inputs are defined, never
nan:
- a reward of −inf gives advantage −inf and weight 0; a row whose rewards are all −inf carries no information
  and gets advantages 0 (as if all rewards were equal); a nan reward counts as −inf; if a row has +inf rewards,
  those samples share the row's mass equally and the others get −inf (the limit of rewards growing without bound).
- a sample whose log q is not finite (−inf: its probability underflowed, it could not have been sampled) is
  masked out: weight 0, and it contributes nothing to the encoder loss (its gradient is undefined). Its
  −β·ℓ term would otherwise be +inf and take all the weight.
- a row with no usable sample (all log-weights −inf) gets uniform weights, so that every row sums to 1 and its
  ESS lies in [1, K].
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

ETA_MIN = 1e-6  # bounds of η for the bisection solve and for the Adam control's log η
ETA_MAX = 1e12
LOG_ETA_MIN = math.log(ETA_MIN)
LOG_ETA_MAX = math.log(ETA_MAX)

__all__ = [
    "ETA_MAX",
    "ETA_MIN",
    "AdamEtaControl",
    "BetaSchedule",
    "BisectionEtaControl",
    "EtaController",
    "advantages",
    "daps_weights",
    "decoder_loss",
    "effective_sample_size",
    "encoder_loss",
    "log_weights",
    "make_eta_control",
    "marginal_usage_loss",
    "mean_ess",
    "normalized_weights",
    "solve_eta",
    "enumerated_weights",
    "trust_region_kl",
    "solve_eta_kl",
]


# ----------------------------------------------------------------------------------------------- helpers
def _upcast(x: Tensor) -> Tensor:
    """float32 at least (float64 stays float64); bf16, fp16 and integer tensors become float32."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check_samples(name: str, x: Tensor) -> None:
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name} must have shape (N, K) with K >= 1 samples per image, got {tuple(x.shape)}.")


def _check_same_shape(a_name: str, a: Tensor, b_name: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{a_name} and {b_name} must have the same shape (N, K), "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}.")


def _check_beta_eta(beta, eta) -> None:
    """Validate β ≥ 0, η ≥ 0, η + β > 0 when they are python numbers (tensors are not checked: that would sync)."""
    for name, value in (("beta", beta), ("eta", eta)):
        if not isinstance(value, Tensor) and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}.")
    if not isinstance(beta, Tensor) and not isinstance(eta, Tensor) and eta + beta <= 0:
        raise ValueError(f"eta + beta must be > 0, got eta={eta}, beta={beta}.")


def _define_infinities(x: Tensor) -> Tensor:
    """Log-values over the last dim with nan → −inf, and rows holding +inf → 0 at the +inf entries, −inf elsewhere.

    The result has no nan and no +inf, so logsumexp/softmax over it are defined (an all −inf row is left to the
    caller)."""
    x = torch.where(torch.isnan(x), float("-inf"), x)
    positive = x == float("inf")
    infinite_row = positive.any(dim=-1, keepdim=True)
    return torch.where(infinite_row, torch.where(positive, 0.0, float("-inf")).to(x.dtype), x)


# ----------------------------------------------------------------------------------------------- one step, as functions
def advantages(rewards: Tensor) -> Tensor:
    """Step 3: advantages against the log-sum-exp baseline, A_ik = R_ik − logsumexp_k R_ik.

    Args:
        rewards: R, (N, K) (any leading dims), the per-sample log-likelihoods; pass them detached (stop-gradient).

    Returns:
        A, (N, K), float32 at least. A ≤ 0 and logsumexp_k A_ik = 0 on every row with a finite reward. A −inf reward
        gives −inf; a row of only −inf rewards gives zeros (no information: treated like all-equal rewards). nan
        counts as −inf; the m samples of a row with +inf rewards get −log m and the rest of the row −inf. Never nan.
    """
    _check_samples("rewards", rewards)
    rewards = _define_infinities(_upcast(rewards))
    # log_softmax subtracts the row maximum before the log-sum-exp: exact for rewards of 1e6 in float32, where
    # R − logsumexp R would round the baseline to the float spacing at 1e6 (1/16).
    scores = torch.log_softmax(rewards, dim=-1)
    empty_row = (rewards == float("-inf")).all(dim=-1, keepdim=True)  # b_i = −inf: nothing to compare
    return torch.where(empty_row, torch.zeros_like(scores), scores)


def log_weights(advantages: Tensor, log_q: Tensor, beta: float | Tensor, eta: float | Tensor,
                offset: Tensor | None = None) -> Tensor:
    """Step 4: log-weights s_ik = (A_ik − β·sg(ℓ_ik)) / (η + β), the log of q*/q_old at the sampled codes up to a
    per-image constant.

    Args:
        advantages: A, (N, K).
        log_q: ℓ, (N, K), log q_θ(z_ik | x_i); detached here.
        beta: β ≥ 0, the entropy weight (a float, or a tensor broadcasting against (N, K)).
        eta: η ≥ 0, the trust-region multiplier (a float, or a tensor broadcasting against (N, K), e.g. (G, 1, 1) to
            evaluate G values of η at once; gradients flow to a tensor η, which the Adam control uses).
        offset: *optional* (N, K), added to s after the scaling: log q_old(z) − log μ(z) for codes drawn from a
            proposal μ other than q_old (importance weights q*/μ instead of q*/q_old); None for on-policy samples.

    Returns:
        s, (N, K) (broadcast shape), float32 at least. Samples with non-finite ℓ, or −inf advantage, get −inf (weight
        0). No nan; +inf only where A is +inf.
    """
    _check_samples("advantages", advantages)
    _check_same_shape("advantages", advantages, "log_q", log_q)
    _check_beta_eta(beta, eta)
    advantages, log_q = _upcast(advantages), _upcast(log_q.detach())
    if isinstance(beta, Tensor):
        beta = beta.to(device=advantages.device, dtype=advantages.dtype)
    numerator = advantages - beta * log_q  # A − β ℓ
    # Masked samples: non-finite log q. Written with `where` on both sides of the division so that a tensor η
    # gets gradient 0 (not 0·inf = nan) from them.
    numerator = torch.where(torch.isfinite(log_q), numerator, float("-inf"))
    finite = torch.isfinite(numerator)
    temperature = eta + beta  # η + β
    if isinstance(temperature, Tensor):
        temperature = temperature.to(device=advantages.device, dtype=advantages.dtype)
    scaled = torch.where(finite, numerator, 0.0) / temperature
    infinite = torch.where(numerator == float("inf"), float("inf"), float("-inf")).to(scaled.dtype)
    if offset is not None:
        _check_same_shape("advantages", advantages, "offset", offset)
        offset = _upcast(offset.detach()).to(scaled.device)
        scaled = scaled + torch.where(torch.isfinite(offset), offset, 0.0)
    return torch.where(finite, scaled, infinite)


def normalized_weights(log_weights: Tensor) -> Tensor:
    """Step 4: self-normalised weights w_ik = softmax over k of s_ik.

    Args:
        log_weights: s, (N, K).

    Returns:
        w, (N, K), float32 at least; each row in [0, 1] and summing to 1. nan entries count as −inf; a row with +inf
        entries is uniform over them; a row of only −inf is uniform. Never nan.
    """
    _check_samples("log_weights", log_weights)
    s = _define_infinities(_upcast(log_weights))
    empty_row = (s == float("-inf")).all(dim=-1, keepdim=True)
    s = torch.where(empty_row, torch.zeros_like(s), s)
    return torch.softmax(s, dim=-1)


def effective_sample_size(weights: Tensor) -> Tensor:
    """Per-image effective sample size ESS_i = 1 / Σ_k w_ik².

    Args:
        weights: w, (N, K), rows summing to 1.

    Returns:
        ESS, (N,), float32 at least, clamped to [1, K] (rounding can otherwise leave it a hair outside).
    """
    _check_samples("weights", weights)
    weights = _upcast(weights)
    num_samples = weights.shape[-1]
    return (1.0 / weights.square().sum(dim=-1)).clamp(1.0, float(num_samples))


def daps_weights(rewards: Tensor, log_q: Tensor, beta: float | Tensor, eta: float | Tensor,
                 offset: Tensor | None = None) -> Tensor:
    """Steps 3-4 composed: w = softmax_k((A − β ℓ) / (η + β)) with A = R − logsumexp_k R, all stop-gradient.

    Args:
        rewards: R, (N, K). log_q: ℓ, (N, K). beta: β. eta: η (the value of this step: the Adam control's pre-update
            η, or the bisection's solve).

    Returns:
        w, (N, K), detached, float32 at least, rows summing to 1.
    """
    with torch.no_grad():
        _check_same_shape("rewards", rewards, "log_q", log_q)
        return normalized_weights(log_weights(advantages(rewards.detach()), log_q.detach(), beta, eta,
                                              offset)).detach()


def encoder_loss(log_q: Tensor, weights: Tensor) -> Tensor:
    """Step 5: weighted maximum likelihood, L_θ = −mean_i Σ_k sg(w_ik) ℓ_ik.

    Its gradient is −mean_i Σ_k w_ik ∇ℓ_ik, the projection of q* onto the network; no gradient reaches the weights.

    Args:
        log_q: ℓ, (N, K), with gradient. Entries that are not finite contribute nothing (value or gradient).
        weights: w, (N, K); detached here.

    Returns:
        L_θ, a scalar, float32 at least.
    """
    _check_samples("log_q", log_q)
    _check_same_shape("log_q", log_q, "weights", weights)
    weights = _upcast(weights.detach())
    log_q = _upcast(log_q)
    finite = torch.isfinite(log_q)
    terms = torch.where(finite, weights * torch.where(finite, log_q, 0.0), 0.0)
    return -terms.sum(dim=-1).mean()


def marginal_usage_loss(log_probs: Tensor, weights: Tensor, mutual_information: bool = False) -> Tensor:
    """KL(q̄ ‖ uniform) per token, of the batch's average code distribution q̄, weighted like the encoder loss.

    q̄(v) = Σ_ik w_ik Σ_t q(v | z_ik,<t, x_i) / (N·L) is the encoder's aggregate distribution over the V codes in
    this batch (every position, every image). The ELBO's KL term is the mutual information I(x; z) plus
    KL(q(z) ‖ p(z)); once β has annealed towards 0 nothing keeps the aggregate from settling on a few codes while each
    image's q becomes deterministic (the collapse measured in benchmarks/RESULTS.md). This term puts back the
    aggregate half only, for the uniform prior's per-token marginal: log V − H(q̄) (0 when every code is used
    equally, log V when one code takes everything). It is a differentiable function of the encoder's own
    probabilities: no sample, relaxation or straight-through estimate is involved.

    With `mutual_information`, the weighted mean entropy of the per-token distributions is added:
    log V − (H(q̄) − E H(q_t)) = log V − I, I the mutual information between a token and its image and prefix (the
    "entropy loss" of lookup-free quantisation). The aggregate is still pushed to even use, but each token's own
    distribution is pushed to be confident instead of uniform, so the greedy code stays a typical one.

    Args:
        log_probs: log q(· | z_<t, x) under teacher forcing, (N, K, L, V), with gradient.
        weights: w, (N, K), each row summing to 1; detached here.
        mutual_information: also add the mean per-token entropy (see above).

    Returns:
        A scalar in [0, log V] nats, float32 at least.
    """
    if log_probs.dim() != 4:
        raise ValueError(f"log_probs must be (N, K, L, V), got shape {tuple(log_probs.shape)}.")
    _check_same_shape("log_probs[..., 0, 0]", log_probs[..., 0, 0], "weights", weights)
    n, _, length, vocab = log_probs.shape
    weights = _upcast(weights.detach())
    probs = _upcast(log_probs).exp()
    aggregate = torch.einsum("nk,nklv->v", weights, probs) / (n * length)          # (V,), sums to 1
    entropy = -(aggregate * torch.log(aggregate.clamp_min(torch.finfo(aggregate.dtype).tiny))).sum()
    loss = math.log(vocab) - entropy
    if mutual_information:
        token_entropy = -(probs * torch.where(probs > 0, _upcast(log_probs), 0.0)).sum(-1)   # (N, K, L)
        loss = loss + torch.einsum("nk,nkl->", weights, token_entropy) / (n * length)
    return loss


def decoder_loss(rewards_with_grad: Tensor) -> Tensor:
    """Step 6: Monte Carlo maximum likelihood over all samples, L_φ = −mean_{i,k} r_ik.

    Args:
        rewards_with_grad: r, (N, K), the decoder's log-likelihoods with gradient.

    Returns:
        L_φ, a scalar, float32 at least. Not masked: a non-finite reward means a broken decoder, and the loss shows it
        (the trainer skips non-finite updates).
    """
    _check_samples("rewards_with_grad", rewards_with_grad)
    return -_upcast(rewards_with_grad).mean()


def mean_ess(rewards: Tensor, log_q: Tensor, beta: float | Tensor, eta: float | Tensor,
             offset: Tensor | None = None) -> Tensor:
    """Batch statistic of the trust region: mean_i ESS_i at the given η.

    No gradient reaches `rewards` or `log_q`; a tensor η keeps its gradient (the Adam control differentiates this).
    A tensor η of shape (G, 1, 1) gives the mean ESS at G values of η at once, shape (G,).

    Returns:
        mean ESS, a scalar (or (G,)), in [1, K].
    """
    _check_same_shape("rewards", rewards, "log_q", log_q)
    with torch.no_grad():
        scores = advantages(rewards.detach())
    return _mean_ess_of_advantages(scores, log_q.detach(), beta, eta, offset)


def _mean_ess_of_advantages(scores: Tensor, log_q: Tensor, beta: float | Tensor, eta: float | Tensor,
                            offset: Tensor | None = None) -> Tensor:
    return effective_sample_size(normalized_weights(log_weights(scores, log_q, beta, eta, offset))).mean(dim=-1)


# ----------------------------------------------------------------------------------------------- η: exact solve
def _solve_log_eta(rewards: Tensor, log_q: Tensor, beta: float, target_ess: float, tolerance: float,
                   grid_size: int = 17, max_rounds: int = 15, offset: Tensor | None = None,
                   statistic=_mean_ess_of_advantages) -> dict:
    """Find η with mean ESS(η) = target by a vectorised bisection on log η over [ETA_MIN, ETA_MAX].

    ESS depends on η only through the temperature η + β of a softmax, and grows monotonically with it. Each round
    evaluates `grid_size` evenly spaced log η in the current bracket at once and keeps the sub-interval where the
    ESS crosses the target: log2(grid_size − 1) = 4 bisection steps per host synchronisation, 15 rounds = 60 steps.
    `statistic(advantages, log_q, beta, etas (G, 1, 1), offset) → (G,)` may replace the mean ESS by any batch
    statistic that grows with η (`solve_eta_kl` passes minus the mean KL); "ess" in the result is its value.
    """
    _check_samples("rewards", rewards)
    _check_same_shape("rewards", rewards, "log_q", log_q)
    if rewards.numel() == 0:
        raise ValueError(f"Cannot solve for eta on an empty batch, got shape {tuple(rewards.shape)}.")
    with torch.no_grad():
        scores = advantages(rewards.detach())
        log_q = log_q.detach()
        low, high = LOG_ETA_MIN, LOG_ETA_MAX
        best_eta, best_ess, best_error = None, None, math.inf
        for round_ in range(1, max_rounds + 1):
            grid = torch.linspace(low, high, grid_size, dtype=torch.float64, device=scores.device)
            etas = grid.exp().view(-1, *([1] * scores.dim()))  # (G, 1, 1)
            ess = statistic(scores, log_q, beta, etas, offset)  # (G,)
            ess, grid = ess.tolist(), grid.tolist()  # the one synchronisation of the round
            if round_ == 1:
                if ess[0] >= target_ess - tolerance:  # already wide enough at the smallest η
                    return {"eta": ETA_MIN, "ess": ess[0], "rounds": round_, "converged": ess[0] <= target_ess + tolerance,
                            "at_lower_bound": True, "at_upper_bound": False}
                if ess[-1] < target_ess - tolerance:  # target unreachable (e.g. ρ = 1 with unequal weights)
                    return {"eta": ETA_MAX, "ess": ess[-1], "rounds": round_, "converged": False,
                            "at_lower_bound": False, "at_upper_bound": True}
            errors = [abs(value - target_ess) for value in ess]
            j = min(range(grid_size), key=errors.__getitem__)
            if errors[j] < best_error:
                best_eta, best_ess, best_error = math.exp(grid[j]), ess[j], errors[j]
            if best_error <= tolerance:
                break
            crossing = next((i for i, value in enumerate(ess) if value >= target_ess), grid_size - 1)
            crossing = min(max(crossing, 1), grid_size - 1)
            low, high = grid[crossing - 1], grid[crossing]
        return {"eta": min(max(best_eta, ETA_MIN), ETA_MAX), "ess": best_ess, "rounds": round_,
                "converged": best_error <= tolerance, "at_lower_bound": False, "at_upper_bound": False}


def solve_eta(rewards: Tensor, log_q: Tensor, beta: float, target_ess: float, tolerance: float | None = None,
              offset: Tensor | None = None) -> float:
    """η with mean ESS(η) = target_ess for this batch, to |ESS − target| ≤ tolerance (default 1e-3·K).

    Returns ETA_MIN when even the smallest η gives at least the target ESS (e.g. all rewards and log q equal), and
    ETA_MAX when even the largest falls short (target K with unequal samples). Always a finite float.
    """
    num_samples = rewards.shape[-1]
    tolerance = 1e-3 * num_samples if tolerance is None else tolerance
    return _solve_log_eta(rewards, log_q, beta, target_ess, tolerance, offset=offset)["eta"]


# ----------------------------------------------------------------------------------------------- enumerated options
# A step that enumerates a few options of one token (DapsMethod's proposal "local") knows their q exactly instead of
# sampling them: q* restricted to the options is then computed, not importance-weighted, and the trust region is its
# exact KL from q restricted to the same options.
def enumerated_weights(rewards: Tensor, log_q: Tensor, beta: float | Tensor, eta: float | Tensor) -> Tensor:
    """q* on enumerated options (N, K): softmax_k((A + η ℓ) / (η + β)) = q · exp((A − β ℓ)/(η + β)), normalised.

    The log-weights of `daps_weights` with the offset log q: those are q*/q for codes sampled from q; for codes that
    were listed rather than drawn, q* itself is the weight. Detached, float32 at least, rows summing to 1.
    """
    with torch.no_grad():
        _check_same_shape("rewards", rewards, "log_q", log_q)
        return normalized_weights(log_weights(advantages(rewards.detach()), log_q.detach(), beta, eta,
                                              offset=log_q.detach())).detach()


def _enumerated_kl(scores: Tensor, log_q: Tensor, beta: float | Tensor, eta: float | Tensor) -> Tensor:
    """KL(q* ‖ q) per row of enumerated options from advantages, (..., N, K) → (..., N); q renormalised per row."""
    log_star = torch.log_softmax(log_weights(scores, log_q, beta, eta, offset=log_q), dim=-1)
    log_base = torch.log_softmax(_upcast(log_q), dim=-1)
    return torch.where(torch.isfinite(log_star), log_star.exp() * (log_star - log_base), 0.0).sum(-1)


def _mean_neg_kl_of_advantages(scores: Tensor, log_q: Tensor, beta: float | Tensor, eta: float | Tensor,
                               offset: Tensor | None = None) -> Tensor:
    """−mean KL(q* ‖ q) over rows of enumerated options: the bisection's statistic for `solve_eta_kl` (grows with η)."""
    return -_enumerated_kl(scores, log_q, beta, eta).mean(-1)


def trust_region_kl(rewards: Tensor, log_q: Tensor, beta: float | Tensor, eta: float | Tensor) -> Tensor:
    """KL(q* ‖ q) per row of enumerated options (N, K) → (N,), in nats, q renormalised over each row's options."""
    _check_same_shape("rewards", rewards, "log_q", log_q)
    with torch.no_grad():
        return _enumerated_kl(advantages(rewards.detach()), log_q.detach(), beta, eta)


def solve_eta_kl(rewards: Tensor, log_q: Tensor, beta: float, target_kl: float, tolerance: float | None = None) -> float:
    """η with mean KL(q* ‖ q) = target_kl over rows of enumerated options (N, K), by the same bisection as
    `solve_eta` (the KL falls monotonically as η grows: q* moves along the geometric path from exp(A/β) to q).

    Returns ETA_MIN when even the smallest η keeps the mean KL within the target (the whole move fits).
    """
    if not (math.isfinite(target_kl) and target_kl > 0):
        raise ValueError(f"target_kl must be a finite number > 0, got {target_kl}.")
    tolerance = 1e-3 * target_kl if tolerance is None else tolerance
    return _solve_log_eta(rewards, log_q, beta, -target_kl, tolerance, statistic=_mean_neg_kl_of_advantages)["eta"]


# ----------------------------------------------------------------------------------------------- η: controllers
@runtime_checkable
class EtaController(Protocol):
    """What the trainer needs from an η control (DAPS.md step 8). Per step:

        eta = control.eta_for_step(rewards, log_q, beta)   # η for this step's weights
        weights = daps_weights(rewards, log_q, beta, eta)
        ... optimiser step ...
        control.after_step(rewards, log_q, beta)           # the Adam control's update of log η

    `rewards` and `log_q` are the detached (N, K) batch (gathered over processes so η is global).
    """

    rho: float  # ρ, target ESS as a fraction of K
    num_samples: int  # K

    @property
    def eta(self) -> float: ...

    @property
    def target_ess(self) -> float: ...

    def eta_for_step(self, rewards: Tensor, log_q: Tensor, beta: float, offset: Tensor | None = None) -> float: ...

    def after_step(self, rewards: Tensor, log_q: Tensor, beta: float, offset: Tensor | None = None) -> None: ...

    def update(self, rewards: Tensor, log_q: Tensor, beta: float, offset: Tensor | None = None) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def _check_control_args(rho: float, num_samples: int, initial_eta: float) -> None:
    if not 0 < rho <= 1:
        raise ValueError(f"rho (target ESS as a fraction of K) must be in (0, 1], got {rho}.")
    if int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"num_samples (K) must be an integer >= 1, got {num_samples}.")
    if not (math.isfinite(initial_eta) and initial_eta > 0):
        raise ValueError(f"initial_eta must be a finite number > 0, got {initial_eta}.")


def _check_batch(rewards: Tensor, log_q: Tensor, num_samples: int) -> None:
    _check_same_shape("rewards", rewards, "log_q", log_q)
    if rewards.dim() != 2 or rewards.shape[0] < 1 or rewards.shape[1] != num_samples:
        raise ValueError(f"Expected rewards and log_q of shape (N, K={num_samples}) with N >= 1, "
                         f"got {tuple(rewards.shape)}.")


class AdamEtaControl:
    """The reference control: one global log η moved by its own Adam on (mean ESS(η) − ρK)², one step per iteration.

    The weights of a step use the pre-update η (`eta_for_step` returns the current value; `after_step` then takes
    one Adam step on this batch). log η is a float64 scalar on the CPU, kept within [log ETA_MIN, log ETA_MAX];
    non-finite gradients skip the step.

    Args:
        rho: ρ, target ESS as a fraction of K (*ref*: 0.33; 0.25 on ImageNet).
        num_samples: K.
        initial_eta: η at the start (*ref*: 100, which keeps the trust region shut for a long time at small budgets).
        lr: Adam learning rate of log η (*ref*: 1e-3).
    """

    kind = "adam"

    def __init__(self, rho: float, num_samples: int, initial_eta: float = 100.0, lr: float = 1e-3):
        _check_control_args(rho, num_samples, initial_eta)
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr}.")
        self.rho, self.num_samples, self.lr = float(rho), int(num_samples), float(lr)
        log_eta = min(max(math.log(initial_eta), LOG_ETA_MIN), LOG_ETA_MAX)
        self.log_eta = torch.nn.Parameter(torch.tensor(log_eta, dtype=torch.float64))  # log η
        self.optimizer = torch.optim.Adam([self.log_eta], lr=self.lr)
        self.last_stats: dict = {}

    @property
    def eta(self) -> float:
        return math.exp(self.log_eta.item())

    @property
    def target_ess(self) -> float:
        return self.rho * self.num_samples  # ρK

    def eta_for_step(self, rewards: Tensor, log_q: Tensor, beta: float, offset: Tensor | None = None) -> float:
        return self.eta

    def after_step(self, rewards: Tensor, log_q: Tensor, beta: float, offset: Tensor | None = None) -> None:
        self.update(rewards, log_q, beta, offset)

    def update(self, rewards: Tensor, log_q: Tensor, beta: float, offset: Tensor | None = None) -> dict:
        """One Adam step on log η for the loss (mean ESS(η) − ρK)²; returns the statistics of the step."""
        _check_batch(rewards, log_q, self.num_samples)
        eta_before = self.eta
        self.optimizer.zero_grad(set_to_none=True)
        ess = mean_ess(rewards.detach(), log_q.detach(), beta, self.log_eta.exp().to(rewards.device), offset)
        loss = (ess - self.target_ess).square()
        loss.backward()
        stepped = bool(torch.isfinite(self.log_eta.grad).all())
        if stepped:
            self.optimizer.step()
            with torch.no_grad():
                self.log_eta.clamp_(LOG_ETA_MIN, LOG_ETA_MAX)
        self.optimizer.zero_grad(set_to_none=True)
        self.last_stats = {"eta_before": eta_before, "eta": self.eta, "ess": ess.item(), "ess_target": self.target_ess,
                           "eta_loss": loss.item(), "stepped": stepped}
        return self.last_stats

    def state_dict(self) -> dict:
        """log η and the Adam state (copied), so that a resumed run takes exactly the same next step."""
        def copy(value):
            if isinstance(value, Tensor):
                return value.detach().clone()
            if isinstance(value, dict):
                return {k: copy(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [copy(v) for v in value]
            return value

        return {"kind": self.kind, "rho": self.rho, "num_samples": self.num_samples,
                "log_eta": self.log_eta.detach().clone(), "optimizer": copy(self.optimizer.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"Expected an η-control state of kind {self.kind!r}, got {state.get('kind')!r}.")
        with torch.no_grad():
            self.log_eta.copy_(torch.as_tensor(state["log_eta"], dtype=torch.float64))
        self.optimizer.load_state_dict(state["optimizer"])


class BisectionEtaControl:
    """The exact alternative: per batch, solve mean ESS(η) = ρK by bisection on log η in [ETA_MIN, ETA_MAX], to
    |ESS − ρK| ≤ 1e-3·K (or 60 bisection steps), before the weights of the step are computed.

    If the smallest η already gives an ESS at or above the target, η = ETA_MIN; if the largest η cannot reach it,
    η = ETA_MAX; `last_stats` reports which (`at_lower_bound`, `at_upper_bound`, `converged`).

    Args:
        rho: ρ, target ESS as a fraction of K.
        num_samples: K.
        initial_eta: the value `eta` reports before the first solve (only for logging).
        tolerance: |ESS − ρK| accepted, as a fraction of K.
    """

    kind = "bisection"

    def __init__(self, rho: float, num_samples: int, initial_eta: float = 100.0, tolerance: float = 1e-3):
        _check_control_args(rho, num_samples, initial_eta)
        if not tolerance > 0:
            raise ValueError(f"tolerance must be > 0, got {tolerance}.")
        self.rho, self.num_samples, self.tolerance = float(rho), int(num_samples), float(tolerance)
        self._eta = float(initial_eta)
        self.last_stats: dict = {}

    @property
    def eta(self) -> float:
        return self._eta

    @property
    def target_ess(self) -> float:
        return self.rho * self.num_samples  # ρK

    def solve(self, rewards: Tensor, log_q: Tensor, beta: float, offset: Tensor | None = None) -> float:
        """η for this batch (also stored as `eta`, with the solve's statistics in `last_stats`)."""
        _check_batch(rewards, log_q, self.num_samples)
        stats = _solve_log_eta(rewards, log_q, beta, self.target_ess, self.tolerance * self.num_samples, offset=offset)
        self._eta = stats["eta"]
        self.last_stats = {**stats, "ess_target": self.target_ess}
        return self._eta

    def eta_for_step(self, rewards: Tensor, log_q: Tensor, beta: float, offset: Tensor | None = None) -> float:
        return self.solve(rewards, log_q, beta, offset)

    def after_step(self, rewards: Tensor, log_q: Tensor, beta: float, offset: Tensor | None = None) -> None:
        pass  # nothing carries over between steps

    def update(self, rewards: Tensor, log_q: Tensor, beta: float, offset: Tensor | None = None) -> dict:
        self.solve(rewards, log_q, beta, offset)
        return self.last_stats

    def state_dict(self) -> dict:
        return {"kind": self.kind, "rho": self.rho, "num_samples": self.num_samples, "eta": self._eta}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"Expected an η-control state of kind {self.kind!r}, got {state.get('kind')!r}.")
        self._eta = float(state["eta"])


def make_eta_control(kind: str = "bisection", *, rho: float, num_samples: int, initial_eta: float = 100.0,
                     lr: float = 1e-3) -> AdamEtaControl | BisectionEtaControl:
    """The η control named `kind`: "adam" (the reference) or "bisection" (exact per-batch solve; `lr` unused)."""
    if kind == "adam":
        return AdamEtaControl(rho, num_samples, initial_eta=initial_eta, lr=lr)
    if kind == "bisection":
        return BisectionEtaControl(rho, num_samples, initial_eta=initial_eta)
    raise ValueError(f"eta control must be 'adam' or 'bisection', got {kind!r}.")


# ----------------------------------------------------------------------------------------------- β schedule
class BetaSchedule:
    """Geometric decay of β from beta_start to beta_end: β(p) = β_start · (β_end / β_start)^p, p = step / total_steps
    clipped to [0, 1]. `schedule(step)` runs it on steps, `schedule.at_progress(p)` on any progress (e.g. wall-clock).

    *ref*: MNIST 0.5 → 0.01, CIFAR-10 6.0 → 0.01, ImageNet 50 → 1.0. Equal ends give a constant β.
    """

    def __init__(self, beta_start: float, beta_end: float, total_steps: int = 1):
        for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0 (the schedule is geometric), got {value!r}.")
        if int(total_steps) != total_steps or total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}.")
        self.beta_start, self.beta_end, self.total_steps = float(beta_start), float(beta_end), int(total_steps)

    def at_progress(self, progress: float) -> float:
        """β at progress p ∈ [0, 1] (values outside are clipped)."""
        if not math.isfinite(progress):
            raise ValueError(f"progress must be finite, got {progress}.")
        if progress <= 0 or self.beta_start == self.beta_end:
            return self.beta_start
        if progress >= 1:
            return self.beta_end
        return math.exp((1 - progress) * math.log(self.beta_start) + progress * math.log(self.beta_end))

    def __call__(self, step: int) -> float:
        return self.at_progress(step / self.total_steps)

    def __repr__(self) -> str:
        return f"BetaSchedule(beta_start={self.beta_start}, beta_end={self.beta_end}, total_steps={self.total_steps})"
