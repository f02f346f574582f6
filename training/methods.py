"""Training methods: each turns a batch into one scalar loss for the shared training loop.

A method is an `nn.Module` that wraps the `DapsModel`, so that Accelerate/DDP sees one forward per step and
synchronises every gradient the loss touches. `forward(pixel_values, targets, progress)` returns a dict with
`loss` (a scalar with gradient) and scalar statistics for the log. Given `polish_codes` (the frozen encoder's greedy
codes of the batch), every method instead returns the loss of a decoder-polish step (`decoder_polish_step`), the
last phase of a run with `--polish_fraction`.

- `DapsMethod` (daps, daps-na): DAPS.md "One training step", steps 1-8.
- `VqMethod` (vq): VQ-VAE with straight-through gradients, codebook and commitment losses, dead-code restart.
- `FsqMethod` (fsq): finite scalar quantisation with straight-through rounding.
- `GumbelMethod` (gumbel, gumbel-na): Gumbel-Softmax with straight-through one-hots and an annealed temperature.

All methods decode through the same decoder and score with the same likelihood, so they differ only in how the
encoder learns.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tokenizer.modeling_daps import DapsModelOutput, grid_colours, token_window_sums

from . import objective
from .warm_start import fit_kmeans, nearest_codes, token_cells


# Where a DAPS step's candidates come from (`DapsMethod(proposal=...)`).
PROPOSALS = ("sampled", "local")
# proposal "local": the code grid is coloured by (row mod 3, column mod 3); a token's reward is the log-likelihood of
# the 3 × 3 cells around it, which contain no other token of its colour.
LOCAL_STRIDE = 3


def _require_quantizer(model, quantizer: str, method: str) -> None:
    if model.config.quantizer != quantizer:
        raise ValueError(f"{method} needs quantizer={quantizer!r}, got {model.config.quantizer!r}.")


def _parallel_head(model, memory: torch.Tensor) -> torch.Tensor:
    """The parallel encoder's head outputs for every position, (B, L, head_size), from patch features (B, P, d)."""
    return model.code_transformer.parallel(memory.shape[0], model.code_transformer.memory_keys_values(memory))


def _reconstruction_log_likelihood(model, embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Decoder input embeddings (N, L, e) → log p(targets | z), (N,)."""
    return model.log_likelihood(targets, model.likelihood_parameters(embeddings))


def decoder_parameters(model) -> list[nn.Parameter]:
    """The parameters of the path from codes to images, which the decoder polish trains (`decoder_polish_step`):
    the decoder network and, for a categorical encoder, its code table unless that is fixed (the lattice input, or
    --fixed_code_blocks). VQ's codebook is also the table the encoder's nearest-neighbour assignment reads, so it stays
    with the encoder; FSQ's lattice has no parameters."""
    params = list(model.decoder.parameters())
    if model.config.quantizer == "categorical" and model.code_embedding.weight.requires_grad:
        params.append(model.code_embedding.weight)
    return params


def decoder_polish_step(model, codes: torch.Tensor, targets: torch.Tensor, touch_all: bool = False) -> dict:
    """The loss of a decoder-polish step: −log p(x | z) of the frozen encoder's greedy codes, mean over the batch.

    codes (B, L) are the encoder's greedy codes of the batch's images, targets (B, C, H, W) what the decoder scores.
    Only the code-to-image path gets a gradient. `touch_all` adds every other parameter to the graph with weight 0,
    so that DistributedDataParallel, which expects each parameter to receive a gradient, can reduce them (zeros; the
    trainer holds their learning rate at 0, so they do not move).
    """
    reward = _reconstruction_log_likelihood(model, model.embed_codes(codes), targets)
    loss = -reward.float().mean()
    statistics = {"decoder_loss": loss.detach(),
                  "code_usage": codes.unique().numel() / model.config.codebook_size}
    if touch_all:
        polished = {id(p) for p in decoder_parameters(model)}
        loss = loss + 0.0 * sum(p.sum() for p in model.parameters() if p.requires_grad and id(p) not in polished)
    return {"loss": loss, **statistics}


class DapsMethod(nn.Module):
    """One DAPS step: K codes per image without gradient, rewards, ESS-controlled weights, weighted ML + decoder ML.

    Args:
        model: a `DapsModel` with a categorical quantizer (autoregressive for "daps", parallel for "daps-na").
        num_samples: K.
        eta_control: an η controller from `training.objective.make_eta_control`.
        beta_schedule: a callable progress ∈ [0, 1] → β.
        gather: a callable that concatenates a (B, K) tensor over processes (identity on one process), so η is
            computed from the global batch and is the same on every process.
        decoder_weighting: "uniform" (the paper's Monte Carlo over all K) or "posterior" (weighted by w).
        greedy_candidate: score the greedy code as candidate K + 1.
        exploration: ε of the proposal (1 − ε)·q + ε·uniform, importance-weighted back to the same target.
        proposal_temperature: τ > 0 of the proposal: tokens are drawn from q at temperature τ (τ < 1: codes nearer
            the encoder's mode, the greedy code that evaluation reads), importance-weighted back by q/μ to the same
            target q*. Combines with `exploration` (the mixture is then taken with q at τ).
        update_samples: M ≤ K, how many of the K samples per image (heaviest first) the losses use; None or K: all
            (see `_forward_kept_samples`).
        usage_weight: λ ≥ 0, adds λ·L·(log V − H(q̄)) to the loss, q̄ the batch's average code distribution under
            teacher forcing on the samples the loss uses (`objective.marginal_usage_loss`).
        usage_mutual_information: the term becomes λ·L·(log V − I), also making each token's distribution confident.
        usage_weight_end: *optional* λ at the end of the run: λ moves linearly from `usage_weight` to it with the
            run's progress (None: constant). Lets the term act early, while codes collapse, and fade later.
        usage_margin: m ≥ 0 nats: only the term's excess counts, λ·L·max(0, term − m). With m > 0 the term is a
            guard that is silent while the batch uses its codes broadly and acts when they concentrate (a collapse);
            e.g. m = log V / 2 acts below a perplexity of √V.
        credit: "sequence" (the paper's: one weight per sample, from its whole log p(x | z)) or "token": the encoder's
            weighted ML gets one weight per sample *and token*, from the part of log p(x | z) located at that token's
            cell of the conv decoder's grid (see `_token_encoder_loss`). The decoder's loss and the kept samples
            stay those of the sequence weights.
        credit_window: with credit "token", the side (odd) of the square of grid cells whose log-likelihood is
            credited to a token: 1 is its own cell, 3 adds its 8 neighbours, which its code also shapes.
        warm_start_steps: *optional* number of first steps that fit the encoder (teacher-forced maximum likelihood)
            and the decoder to patch k-means codes instead of taking a DAPS step (`training.warm_start`); needs
            `fit_warm_start` to have been called on the training images. 0: none (the paper's start).
        kmeans_init: *optional*, needs a model with `pixel_paths`: before the first step, `fit_warm_start` also sets
            the pixel paths from the k-means codebook, so the model starts as a patch k-means tokenizer: the pixel
            head gives q(z_t = c | x) ∝ exp(−‖x_t − μ_c‖² / 2σ²) (σ² the mean within-cluster variance per pixel value)
            and code c decodes to its centroid μ_c, plus the decoder network's output scaled by its gate
            (`decoder_gate_init`: exactly μ_c when 0). DAPS then trains from there.
        kmeans_temperature: τ > 0, the k-means start's pixel head becomes the mixture posterior at temperature τ
            (σ² → τσ²): τ > 1 starts q broader, so the K samples of a step differ. 1: the posterior itself.
        proposal: where a step's candidates come from. "sampled" (the paper's): K whole code sequences drawn from q.
            "local": single-token changes of the encoder's greedy code, each weighed by the trust-region update of
            that token's conditional (see `_forward_local`); needs the conv decoder. K and M are then unused.
        local_candidates: with proposal "local", N: the N most probable codes other than the greedy one that are
            tried at a position.
        local_colours: with proposal "local", how many of the 9 colours of the (row mod 3, column mod 3) colouring
            of the code grid get candidates in a step (drawn afresh each step); 9: every position, every step.
        fixed_code_blocks: with `kmeans_init`, the decoder reads each code as its k-means pixel block and nothing
            else: the learned part of the code table is zeroed and the table is not trained, so the decoder network
            refines the k-means image instead of learning a free vector per code.
        local_kl: with proposal "local", ε of the trust region, in nats per credited token: η is solved so that the
            mean KL(q* ‖ q) over the credited positions' options is ε.
        sample_reuse: R ≥ 1 optimiser updates per draw of samples (see `_replay_step`; needs M < K).
        decoder_greedy_weight: α ∈ [0, 1], with M < K: the decoder's loss becomes (1 − α)·(the kept samples'
            weighted loss) + α·(−log p(x | greedy code)), the greedy code drawn without gradient and decoded in the
            same batch as the kept ones. The encoder's loss and the weights are unchanged. 0: the paper's decoder.
    """

    def __init__(self, model, num_samples: int, eta_control, beta_schedule, gather=None,
                 decoder_weighting: str = "uniform", greedy_candidate: bool = False, exploration: float = 0.0,
                 update_samples: int | None = None, usage_weight: float = 0.0,
                 usage_mutual_information: bool = False, credit: str = "sequence", credit_window: int = 1,
                 usage_weight_end: float | None = None, warm_start_steps: int = 0, kmeans_init: bool = False,
                 kmeans_temperature: float = 1.0, proposal: str = "sampled", local_candidates: int = 3,
                 local_colours: int = 3, local_kl: float = 1.0, fixed_code_blocks: bool = False,
                 usage_margin: float = 0.0, proposal_temperature: float = 1.0, sample_reuse: int = 1,
                 decoder_greedy_weight: float = 0.0):
        super().__init__()
        if isinstance(proposal_temperature, bool) or not isinstance(proposal_temperature, (int, float)) \
                or not (math.isfinite(proposal_temperature) and proposal_temperature > 0):
            raise ValueError(f"proposal_temperature must be a finite number > 0, got {proposal_temperature!r}.")
        self.proposal_temperature = float(proposal_temperature)
        off_policy = exploration > 0 or self.proposal_temperature != 1.0
        if fixed_code_blocks:
            if not kmeans_init:
                raise ValueError("fixed_code_blocks keeps the decoder's code table at the k-means blocks: it needs "
                                 "kmeans_init=True.")
            # Not trained from the first step on (and on resume, where the zeroed table comes from the checkpoint).
            model.code_embedding.weight.requires_grad_(False)
        self.fixed_code_blocks = bool(fixed_code_blocks)
        if proposal not in PROPOSALS:
            raise ValueError(f"proposal must be one of {', '.join(PROPOSALS)}, got {proposal!r}.")
        for name, value, high in (("local_candidates", local_candidates, model.config.codebook_size - 1),
                                  ("local_colours", local_colours, LOCAL_STRIDE**2)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
                raise ValueError(f"{name} must be an integer in [1, {high}], got {value!r}.")
        if proposal == "local":
            if credit != "sequence" or greedy_candidate or off_policy:
                raise ValueError("proposal='local' makes its own candidates and credits each token: it cannot be "
                                 "combined with credit='token', greedy_candidate, exploration or "
                                 "proposal_temperature.")
            model.check_token_cells()
        if not (math.isfinite(local_kl) and local_kl > 0):
            raise ValueError(f"local_kl must be a finite number > 0, got {local_kl}.")
        self.proposal, self.local_candidates, self.local_colours = proposal, local_candidates, local_colours
        self.local_kl = float(local_kl)
        if not (math.isfinite(kmeans_temperature) and kmeans_temperature > 0):
            raise ValueError(f"kmeans_temperature must be a finite number > 0, got {kmeans_temperature}.")
        self.kmeans_temperature = float(kmeans_temperature)
        if kmeans_init and not model.config.pixel_paths:
            raise ValueError("kmeans_init sets the model's pixel paths: it needs a model with pixel_paths=True.")
        self.kmeans_init = bool(kmeans_init)
        if isinstance(warm_start_steps, bool) or not isinstance(warm_start_steps, int) or warm_start_steps < 0:
            raise ValueError(f"warm_start_steps must be an integer >= 0, got {warm_start_steps!r}.")
        self.warm_start_steps = warm_start_steps
        self.warm_start_centroids: torch.Tensor | None = None   # (V, cell size), set by `fit_warm_start`
        self.steps_done = 0
        self._pending = None
        if usage_weight_end is not None and not (math.isfinite(usage_weight_end) and usage_weight_end >= 0):
            raise ValueError(f"usage_weight_end must be a finite number >= 0, got {usage_weight_end}.")
        if credit not in ("sequence", "token"):
            raise ValueError(f"credit must be 'sequence' or 'token', got {credit!r}.")
        if isinstance(credit_window, bool) or not isinstance(credit_window, int) or credit_window < 1 \
                or credit_window % 2 == 0:
            raise ValueError(f"credit_window must be an odd integer >= 1, got {credit_window!r}.")
        if credit == "token":
            if decoder_weighting != "posterior" or greedy_candidate or off_policy:
                raise ValueError("credit='token' needs decoder_weighting='posterior', no greedy_candidate, no "
                                 "exploration and proposal_temperature 1.")
            if model.config.quantizer != "categorical" or not model.code_transformer.autoregressive:
                raise ValueError("credit='token' needs the autoregressive categorical encoder (method 'daps').")
            model.check_token_cells()
        self.credit, self.credit_window = credit, credit_window
        if not (math.isfinite(usage_weight) and usage_weight >= 0):
            raise ValueError(f"usage_weight must be a finite number >= 0, got {usage_weight}.")
        if not (math.isfinite(usage_margin) and usage_margin >= 0):
            raise ValueError(f"usage_margin must be a finite number >= 0, got {usage_margin}.")
        self.usage_margin = float(usage_margin)
        if not 0.0 <= exploration < 1.0:
            raise ValueError(f"exploration must be in [0, 1), got {exploration}.")
        if update_samples is not None:
            if isinstance(update_samples, bool) or not isinstance(update_samples, int) or not 1 <= update_samples <= num_samples:
                raise ValueError(f"update_samples must be an integer in [1, num_samples={num_samples}], "
                                 f"got {update_samples!r}.")
            if update_samples < num_samples and decoder_weighting != "posterior":
                raise ValueError("update_samples < num_samples needs decoder_weighting='posterior': the decoder is "
                                 "fitted on the kept samples with their weights, not on all K uniformly.")
            if update_samples < num_samples and greedy_candidate:
                raise ValueError("update_samples < num_samples cannot be combined with greedy_candidate.")
        self.update_samples = None if update_samples in (None, num_samples) else update_samples
        if isinstance(sample_reuse, bool) or not isinstance(sample_reuse, int) or sample_reuse < 1:
            raise ValueError(f"sample_reuse must be an integer >= 1, got {sample_reuse!r}.")
        if sample_reuse > 1 and (self.update_samples is None or credit == "token" or proposal != "sampled"):
            raise ValueError("sample_reuse > 1 repeats the update on a step's kept samples: it needs update_samples "
                             "< num_samples, credit 'sequence' and proposal 'sampled'.")
        self.sample_reuse = sample_reuse
        if isinstance(decoder_greedy_weight, bool) or not isinstance(decoder_greedy_weight, (int, float)) \
                or not 0.0 <= decoder_greedy_weight <= 1.0:
            raise ValueError(f"decoder_greedy_weight must be a number in [0, 1], got {decoder_greedy_weight!r}.")
        if decoder_greedy_weight > 0 and (self.update_samples is None or credit == "token" or proposal != "sampled"
                                          or sample_reuse > 1):
            raise ValueError("decoder_greedy_weight > 0 adds the greedy code to the kept-samples step's decoder loss: "
                             "it needs update_samples < num_samples, credit 'sequence', proposal 'sampled' and "
                             "sample_reuse 1.")
        self.decoder_greedy_weight = float(decoder_greedy_weight)
        self._replay = None   # sample_reuse > 1: the last step's (pixel values, targets, kept codes, kept weights)
        self.usage_weight = float(usage_weight)
        self.usage_weight_end = self.usage_weight if usage_weight_end is None else float(usage_weight_end)
        self._usage_now = self.usage_weight
        self.usage_mutual_information = bool(usage_mutual_information)
        self.greedy_candidate = greedy_candidate
        self.exploration = float(exploration)
        self._off_policy = off_policy
        if decoder_weighting not in ("uniform", "posterior"):
            raise ValueError(f"decoder_weighting must be 'uniform' or 'posterior', got {decoder_weighting!r}.")
        self.decoder_weighting = decoder_weighting
        _require_quantizer(model, "categorical", "DAPS")
        self.model = model
        self.num_samples = num_samples
        self.eta_control = eta_control
        self.beta_schedule = beta_schedule
        self.gather = gather or (lambda tensor: tensor)
        self.generator: torch.Generator | None = None
        self.last_token_weights: torch.Tensor | None = None   # credit "token": the last step's (B, K, L) weights

    def forward(self, pixel_values: torch.Tensor, targets: torch.Tensor, progress: float,
                polish_codes: torch.Tensor | None = None, touch_all: bool = False, replay: bool = False) -> dict:
        if replay:
            return self._replay_step()
        self._replay = None
        if polish_codes is not None:
            self._pending = None   # no DAPS weights this step: nothing for the η control
            return decoder_polish_step(self.model, polish_codes, targets, touch_all)
        self._usage_now = self.usage_weight + (self.usage_weight_end - self.usage_weight) * min(max(progress, 0.0), 1.0)
        if self.steps_done < self.warm_start_steps:
            return self._warm_start_step(pixel_values, targets, progress)
        if self.proposal == "local":
            return self._forward_local(pixel_values, targets, progress)
        if self.update_samples is not None or self.credit == "token":
            return self._forward_kept_samples(pixel_values, targets, progress)
        # 1-2. K codes per image sampled without gradient (KV cache), then teacher-forced log q and rewards.
        offset, log_probs = None, None
        if self.greedy_candidate or self._off_policy or self._usage_now > 0:
            output, offset, log_probs = self._sample_and_score(pixel_values, targets)
        else:
            output = self.model(pixel_values, num_samples=self.num_samples, generator=self.generator, targets=targets)
        log_q = output.log_prob.float()                                  # ℓ_ik, (B, K), with gradient
        rewards = output.reconstruction_log_likelihood.float()           # r_ik, (B, K), with gradient
        beta, eta, weights = self._weigh(rewards.detach(), log_q.detach(), offset, progress)
        # 5-6. Weighted maximum likelihood for the encoder, Monte Carlo maximum likelihood for the decoder.
        encoder_loss = objective.encoder_loss(log_q, weights)
        extra = {}
        if log_probs is not None:
            encoder_loss, extra = self._add_usage_term(encoder_loss, log_probs, weights)
        if self.decoder_weighting == "uniform":
            decoder_loss = objective.decoder_loss(rewards)
        else:
            # Fit the decoder to the improved posterior q* (the same weights the encoder is pulled towards) rather
            # than to every sample of q: the decoder stops spending capacity on codes the encoder is leaving.
            decoder_loss = -(weights * rewards).sum(-1).mean()
        return self._statistics(encoder_loss, decoder_loss, weights, eta, beta, log_q, output.codes, **extra)

    def _add_usage_term(self, encoder_loss: torch.Tensor, log_probs: torch.Tensor, weights: torch.Tensor):
        """encoder loss + λ·L·usage term on teacher-forced log-probabilities (B, K, L, V) with weights (B, K)."""
        usage = objective.marginal_usage_loss(log_probs, weights, self.usage_mutual_information)
        stats = {"usage_kl": usage.detach(), "usage_weight": self._usage_now}
        if self.usage_margin > 0 and usage.item() <= self.usage_margin:
            return encoder_loss, stats   # under the margin: left out of the loss, so no backward pass runs through it
        return encoder_loss + self._usage_now * log_probs.shape[2] * (usage - self.usage_margin), stats

    def _weigh(self, rewards: torch.Tensor, log_q: torch.Tensor, offset: torch.Tensor | None, progress: float):
        """Steps 3-4 and 8 (first half) on detached (B, K) rewards and log q: β, η and the weights (B, K).

        η comes from the global batch (solved exactly, or the controller's current value); what the control's
        `after_step` needs is kept for it.
        """
        beta = self.beta_schedule(progress)
        all_rewards, all_log_q = self.gather(rewards), self.gather(log_q)
        all_offset = None if offset is None else self.gather(offset)
        eta = self.eta_control.eta_for_step(all_rewards, all_log_q, beta, all_offset)
        # Advantages against the log-sum-exp baseline, log-weights (A − β ℓ)/(η + β), softmax over K.
        weights = objective.daps_weights(rewards, log_q, beta, eta, offset)
        self._pending = (all_rewards, all_log_q, beta, all_offset)
        return beta, eta, weights

    def _statistics(self, encoder_loss, decoder_loss, weights, eta, beta, log_q, codes, **extra) -> dict:
        config = self.model.config
        return {
            "loss": encoder_loss + decoder_loss,
            "encoder_loss": encoder_loss.detach(),
            "decoder_loss": decoder_loss.detach(),
            "ess": objective.effective_sample_size(weights).mean().detach(),
            "ess_target": self.eta_control.target_ess,
            "eta": eta,
            "beta": beta,
            "kl_nats": (log_q.detach() + config.num_tokens * math.log(config.codebook_size)).mean(),
            "code_usage": codes.unique().numel() / config.codebook_size,
            **extra,
        }

    def _forward_kept_samples(self, pixel_values: torch.Tensor, targets: torch.Tensor, progress: float) -> dict:
        """A DAPS step whose losses use only the M = `update_samples` heaviest of the K samples per image.

        The K samples are drawn, decoded and weighted without gradient (log q from sampling, rewards from a no-grad
        decode), so η and the weights are exactly those of the plain step. Only the M codes of largest weight per
        image are then teacher-forced and decoded again with gradient, and their weights renormalised over the M:
        the weighted-ML projection onto q* with its lightest terms dropped. The backward passes, most of a step's
        cost, scale with M instead of K, so a step can look at more candidates for the same price. `kept_weight`
        in the log is the mean weight mass the M kept (1 means nothing was dropped).

        Credit "token" also takes this path (with M = K when `update_samples` is unset): the rewards are split over
        tokens, and the encoder's loss comes from `_token_encoder_loss` on all K samples instead of the M kept.
        """
        model = self.model
        k = self.num_samples
        m = self.update_samples or k
        token_credit = self.credit == "token"
        memory = model.encode_patches(pixel_values)                       # (B, P, d), with gradient
        with torch.no_grad():
            codes, sampled_log_q, log_proposal = model._sample_from_memory(
                memory.detach(), k, self.proposal_temperature, self.generator, exploration=self.exploration,
                return_proposal=True)
            sampled_log_q = sampled_log_q.float()
            offset = (sampled_log_q - log_proposal.float()) if self._off_policy else None
            rewards, _ = model._reconstruction_log_likelihood(targets, codes, per_token=token_credit)
            token_rewards = rewards.float() if token_credit else None     # (B, K, L)
            rewards = rewards.float().sum(-1) if token_credit else rewards.float()   # (B, K)
        beta, eta, weights = self._weigh(rewards, sampled_log_q, offset, progress)    # weights (B, K)
        kept_weights, kept = weights.topk(m, dim=1)                                     # (B, M)
        kept_mass = kept_weights.sum(dim=1, keepdim=True)
        kept_weights = kept_weights / kept_mass
        kept_codes = codes.gather(1, kept[..., None].expand(-1, -1, codes.shape[-1]))   # (B, M, L)
        extra = {}
        if token_credit:
            # The encoder is fitted on all K samples, token by token; the usage term sees them with their weights.
            encoder_loss, log_probs, extra = self._token_encoder_loss(memory, codes, token_rewards, beta)
            usage_weights = weights
        else:
            log_q, log_probs = self._update_log_q(memory, kept_codes)
            encoder_loss = objective.encoder_loss(log_q.float(), kept_weights)          # log q (B, M), with gradient
            usage_weights = kept_weights
        alpha = self.decoder_greedy_weight
        if alpha > 0:
            # The greedy code (B, 1, L) is decoded with the kept ones, one batched decode with gradient.
            greedy = model._sample_from_memory(memory.detach(), None, 1.0, None)[0]
            decoded, _ = model._reconstruction_log_likelihood(targets, torch.cat([kept_codes, greedy], dim=1))
            kept_rewards, greedy_rewards = decoded.float().split([m, 1], dim=1)          # (B, M), (B, 1)
        else:
            kept_rewards, _ = model._reconstruction_log_likelihood(targets, kept_codes)  # (B, M), with gradient
        if self._usage_now > 0:
            encoder_loss, usage = self._add_usage_term(encoder_loss, log_probs, usage_weights)
            extra.update(usage)
        decoder_loss = -(kept_weights * kept_rewards.float()).sum(-1).mean()
        if alpha > 0:
            decoder_loss = (1.0 - alpha) * decoder_loss - alpha * greedy_rewards.mean()
        if self.sample_reuse > 1:
            self._replay = (pixel_values, targets, kept_codes, kept_weights.detach())
        return self._statistics(encoder_loss, decoder_loss, weights, eta, beta, sampled_log_q, codes,
                                kept_weight=kept_mass.mean().detach(), **extra)

    def _update_log_q(self, memory: torch.Tensor, codes: torch.Tensor):
        """log q of the codes an update fits (B, M), with gradient, and every token's log q(· | z_<t, x)
        (B, M, L, V) where the usage term reads them (else None: the factorized head then sums coordinate
        log-probabilities only, without forming the V of every position)."""
        if self._usage_now > 0:
            return self.model._log_prob_from_memory(memory, codes, return_log_probs=True)
        return self.model._log_prob_from_memory(memory, codes), None

    @property
    def replay_ready(self) -> bool:
        """Whether the last forward kept its samples for `forward(..., replay=True)` (sample_reuse > 1)."""
        return self._replay is not None

    def _replay_step(self) -> dict:
        """One more update on the last step's kept samples (`sample_reuse` > 1): the same images, the same M codes
        and weights (so the same q* and η), their log q and rewards recomputed with gradient under the weights the
        previous update left. The K-sample draw and its no-grad decode, a large share of a step, are not repeated.
        Returns {"loss"}; the step's statistics are the sampling forward's."""
        if self._replay is None:
            raise RuntimeError("replay=True needs a DAPS step on kept samples just before it (sample_reuse > 1).")
        pixel_values, targets, kept_codes, kept_weights = self._replay
        model = self.model
        memory = model.encode_patches(pixel_values)
        log_q, log_probs = self._update_log_q(memory, kept_codes)
        encoder_loss = objective.encoder_loss(log_q.float(), kept_weights)
        if self._usage_now > 0:
            encoder_loss, _ = self._add_usage_term(encoder_loss, log_probs, kept_weights)
        kept_rewards, _ = model._reconstruction_log_likelihood(targets, kept_codes)
        decoder_loss = -(kept_weights * kept_rewards.float()).sum(-1).mean()
        return {"loss": encoder_loss + decoder_loss}

    def _forward_local(self, pixel_values: torch.Tensor, targets: torch.Tensor, progress: float) -> dict:
        """A DAPS step on single-token changes of the greedy code (proposal "local").

        The paper's step samples K whole sequences from q. Once q is sharp they are almost all the greedy code (a
        sample differs from it in under one token of 64 on the CIFAR-like crops; RESULTS.md, "Why a DAPS step cannot
        find these codes"), so the K rewards say little, and whatever they say is one number for all L tokens. Here
        the candidates are chosen instead, around the code evaluation uses:

        1. The greedy code g (B, L), and the teacher-forced log q(· | g_<t, x) at every position (with gradient).
        2. Options at position t: g_t, then the N most probable other codes there, (B, L, N + 1).
        3. `local_colours` of the 9 colours of the (row mod 3, column mod 3) grid colouring are drawn for the step.
           For each drawn colour and rank j = 1 … N, one candidate code is g with every position of that colour set
           to its j-th option: 1 + C·N decodes per image, no gradient.
        4. The reward of option j at position t is the log-likelihood of the 3 × 3 grid cells around t under the
           candidate that changed t (g's own for j = 0). No other token of t's colour lies in those cells, so the
           comparison isolates t's code (up to the decoder's receptive field beyond one cell).
        5. Each such position is one row of N + 1 options, and its target is DAPS's closed form for that token's
           conditional with the others held at g, restricted to the options: q*(j) ∝ q(j)·exp((A_j − β log q(j))/(η
           + β)), A against the row's log-sum-exp. The options are listed, not sampled, so q* itself (not q*/q) is the
           weight, and the trust region is its exact KL from q on the options: η is solved so that the mean over
           rows is `local_kl` nats (for sampled candidates the ESS target ρK plays this part).
        6. Encoder: weighted ML of the options, −Σ_rows Σ_j q*(j) log q(option_j | g_<t, x), per image.
           Decoder: ML on z ~ q* (g with each credited position's option drawn from its q*), one decode with gradient.

        The KL trust region and the weighted-ML projection are DAPS's; what changes is the candidate set and that
        each token gets its own weights. With the usage term on, it sees the teacher-forced distributions on g.
        """
        model = self.model
        n = self.local_candidates
        memory = model.encode_patches(pixel_values)                                        # (B, P, d), with grad
        with torch.no_grad():
            greedy = model._sample_from_memory(memory.detach(), None, 1.0, None)[0]        # (B, 1, L)
        log_probs = torch.log_softmax(model.code_logits(memory, greedy), dim=-1)         # (B, 1, L, V), with grad
        greedy, token_log_probs = greedy[:, 0], log_probs[:, 0]
        b = greedy.shape[0]
        with torch.no_grad():
            others = token_log_probs.detach().scatter(-1, greedy[..., None], float("-inf")).topk(n, dim=-1).indices
            options = torch.cat([greedy[..., None], others], dim=-1)                     # (B, L, N + 1)
            present = grid_colours(model.check_token_cells(), LOCAL_STRIDE, greedy.device).unique()   # < 9 on small grids
            drawn = present[torch.randperm(present.numel(), generator=self.generator,
                                           device=greedy.device)[:self.local_colours]]
            option_rewards, active = self._local_option_rewards(targets, options, drawn)  # (B, L, N + 1), (L,)
            rows_rewards = option_rewards[:, active].reshape(-1, n + 1)                    # (B·A, N + 1)
        rows_log_q = token_log_probs.gather(-1, options)[:, active].reshape(-1, n + 1)     # with gradient
        beta = self.beta_schedule(progress)
        eta = objective.solve_eta_kl(self.gather(rows_rewards), self.gather(rows_log_q.detach().float()), beta,
                                     self.local_kl)
        weights = objective.enumerated_weights(rows_rewards, rows_log_q.detach().float(), beta, eta)   # q*, (B·A, N + 1)
        self._pending = None                       # η is solved per step; nothing for a controller to learn
        encoder_loss = -(weights * rows_log_q.float()).sum() / b
        with torch.no_grad():
            # z ~ q*: each credited position's option drawn from its q*, the other positions at g.
            drawn_options = torch.multinomial(weights, 1, generator=self.generator).view(b, -1, 1)
            chosen = options[:, active].gather(-1, drawn_options)[..., 0]                 # (B, A)
            improved = greedy.clone()
            improved[:, active] = chosen
        rewards = model._reconstruction_log_likelihood(targets, improved[:, None])[0][:, 0]    # (B,), with grad
        decoder_loss = -rewards.float().mean()
        kl = objective.trust_region_kl(rows_rewards, rows_log_q.detach().float(), beta, eta)
        extra = {"local_moved": (chosen != greedy[:, active]).float().mean(), "local_kl": kl.mean(),
                 "local_weight_moved": 1 - weights[:, 0].mean()}
        if self._usage_now > 0:
            encoder_loss, usage = self._add_usage_term(encoder_loss, log_probs, log_probs.new_ones(b, 1))
            extra.update(usage)
        greedy_log_q = token_log_probs.detach().gather(-1, greedy[..., None]).sum((1, 2))[:, None]
        stats = self._statistics(encoder_loss, decoder_loss, weights, eta, beta, greedy_log_q, improved[:, None],
                                 **extra)
        # The trust region here is the KL (`local_kl` against its target), not an ESS target of sampled candidates;
        # `ess` stays as the effective number of options under q*.
        del stats["ess_target"]
        stats["local_kl_target"] = self.local_kl
        return stats

    def _local_option_rewards(self, targets: torch.Tensor, options: torch.Tensor, drawn: torch.Tensor):
        """Steps 3-4 of `_forward_local`: the reward of each option at each position of the drawn colours.

        Args:
            targets: images (B, C, H, W). options: (B, L, N + 1) codes, the current code first at every position.
            drawn: the colours of the (row mod 3, column mod 3) grid colouring that get candidates, (C,) in [0, 9).

        Returns:
            rewards (B, L, N + 1): at a position t of a drawn colour, entry j is the log-likelihood of the 3 × 3 grid
            cells around t under the code whose positions of t's colour are all at their option j (the others at
            option 0); meaningless elsewhere. active (L,): whether t's colour was drawn.
        """
        model = self.model
        grid = model.check_token_cells()
        b, length, width = options.shape
        n = width - 1
        current = options[..., 0]                                                          # (B, L)
        members = grid_colours(grid, LOCAL_STRIDE, options.device)[None] == drawn[:, None]  # (C, L)
        # Candidate (c, j): the current code with colour c's positions at their option j, (B, C·N, L); current first.
        changed = torch.where(members[None, :, None], options.permute(0, 2, 1)[:, None, 1:], current[:, None, None])
        candidates = torch.cat([current[:, None], changed.reshape(b, -1, length)], dim=1)
        token_rewards = model._reconstruction_log_likelihood(targets, candidates, per_token=True)[0]
        credited = token_window_sums(token_rewards.float(), grid, LOCAL_STRIDE)            # (B, 1 + C·N, L)
        slot = members.float().argmax(0)                                                   # (L,) t's drawn colour
        index = 1 + slot[:, None] * n + torch.arange(n, device=options.device)             # (L, N)
        index = torch.cat([torch.zeros_like(index[:, :1]), index], dim=1)                  # (L, N + 1)
        rewards = credited.gather(1, index.t()[None].expand(b, -1, -1)).permute(0, 2, 1)   # (B, L, N + 1)
        return rewards, members.any(0)

    def _token_encoder_loss(self, memory: torch.Tensor, codes: torch.Tensor, token_rewards: torch.Tensor,
                            beta: float):
        """The encoder's weighted ML with one weight per (image, token, sample): credit "token".

        The sequence step weighs sample k of image i by its whole log p(x_i | z_ik), so all L tokens of the sample
        are pulled up or down together by one comparison of K numbers. Here each token t is weighed by the part of
        log p(x | z) located at its grid cell (summed over a `credit_window` square of cells around it): the same
        trust-region weights, w_ikt = softmax_k((A_ikt − β ℓ_ikt) / (η_tok + β)) with A_ikt = R_ikt − logsumexp_k
        R_ikt and ℓ_ikt = log q(z_ikt | z_ik,<t, x_i), and η_tok solved so that the mean ESS over (image, token)
        rows is ρK. For an encoder that factorised over tokens and a reward that was a sum of per-token terms this is
        exactly the DAPS update of each token; the conv decoder's receptive field makes the split approximate
        (a token's cell also depends a little on its neighbours' codes).

        Args:
            memory: patch features (B, P, d), with gradient. codes: all K samples (B, K, L).
            token_rewards: (B, K, L), log p(x | z) split over tokens (`DapsModel.token_log_likelihood`), detached.

        Returns:
            (loss, teacher-forced log-probabilities (B, K, L, V), statistics).
        """
        b, k, length = codes.shape
        _, log_probs = self.model._log_prob_from_memory(memory, codes, return_log_probs=True)
        token_log_q = log_probs.gather(-1, codes[..., None]).squeeze(-1).float()        # (B, K, L), with gradient
        rows_rewards = self._credited_rewards(token_rewards).transpose(1, 2).reshape(b * length, k)   # (B·L, K)
        rows_log_q = token_log_q.detach().transpose(1, 2).reshape(b * length, k)
        token_eta = objective.solve_eta(self.gather(rows_rewards), self.gather(rows_log_q), beta,
                                        self.eta_control.target_ess)
        token_weights = objective.daps_weights(rows_rewards, rows_log_q, beta, token_eta)   # (B·L, K)
        self.last_token_weights = token_weights.view(b, length, k).transpose(1, 2)         # (B, K, L)
        loss = -(self.last_token_weights * token_log_q).sum(dim=(1, 2)).mean()
        stats = {"token_eta": token_eta,
                 "token_ess": objective.effective_sample_size(token_weights).mean().detach()}
        return loss, log_probs, stats

    def _credited_rewards(self, token_rewards: torch.Tensor) -> torch.Tensor:
        """(B, K, L) rewards located at each token → the reward credited to it: the sum over the `credit_window`
        square of grid cells centred on the token's cell (cells outside the grid count 0)."""
        return token_window_sums(token_rewards, self.model.check_token_cells(), self.credit_window)

    def _sample_and_score(self, pixel_values: torch.Tensor, targets: torch.Tensor):
        """The candidates of a step when they are not K plain samples of q, scored like samples.

        - `exploration` ε > 0: the K codes come from the proposal μ = (1 − ε)·q + ε·uniform per token (drawn
          ancestrally), and the weights become q*/μ instead of q*/q by the log-offset log q(z) − log μ(z): the same
          target q*, reached with codes q would rarely propose. `proposal_temperature` τ ≠ 1 does the same with q at
          temperature τ as the proposal.
        - `greedy_candidate`: the encoder's greedy code is added as candidate K + 1 (offset 0), so the decoder is also
          fitted on the code evaluation uses and the mode competes with the samples for weight.

        - `usage_weight` > 0: the teacher-forced log-probabilities of every token, (B, K', L, V), are returned as well
          for the usage term (log q is read from them).

        Returns the model output (codes (B, K', L), log q and rewards with gradient), the offset (B, K') or None, and
        the log-probabilities or None.
        """
        model = self.model
        memory = model.encode_patches(pixel_values)
        with torch.no_grad():
            codes, sampled_log_q, log_proposal = model._sample_from_memory(
                memory.detach(), self.num_samples, self.proposal_temperature, self.generator,
                exploration=self.exploration, return_proposal=True)
            offset = (sampled_log_q - log_proposal).float() if self._off_policy else None
            if self.greedy_candidate:
                greedy, _ = model._sample_from_memory(memory.detach(), None, 1.0, None)
                codes = torch.cat([codes, greedy], dim=1)
                if offset is not None:
                    offset = torch.cat([offset, offset.new_zeros(offset.shape[0], 1)], dim=1)
        log_prob, log_probs = self._update_log_q(memory, codes)
        reward, reconstruction = model._reconstruction_log_likelihood(targets, codes)
        output = DapsModelOutput(codes=codes, log_prob=log_prob, reconstruction_log_likelihood=reward,
                                 reconstruction=reconstruction)
        return output, offset, log_probs

    @property
    def warm_start_pending(self) -> bool:
        """True while `fit_warm_start` is still needed: warm-start steps remain, or the k-means initialisation has
        not been applied (it is applied before step one; a resumed run has it in its weights)."""
        return self.steps_done < self.warm_start_steps or (self.kmeans_init and self.steps_done == 0)

    def fit_warm_start(self, images: torch.Tensor, seed: int = 0, iterations: int = 15) -> None:
        """Fit the k-means codebook of the warm start on training images in the model's input space (N, C, H, W):
        V centroids of the pixel blocks under the tokens (`training.warm_start`). Deterministic for a seed. With
        `kmeans_init` (and no step taken yet), also set the model's pixel paths from it."""
        config = self.model.config
        cells = token_cells(images.float(), config.num_tokens)
        cells = cells.reshape(-1, cells.shape[-1])                     # every token's pixel block, (N·L, D)
        self.warm_start_centroids = fit_kmeans(cells, config.codebook_size, iterations=iterations, seed=seed)
        if self.kmeans_init and self.steps_done == 0:
            generator = torch.Generator().manual_seed(seed)
            sample = cells[torch.randperm(cells.shape[0], generator=generator)[:100_000]]
            self._set_pixel_paths(self.warm_start_centroids, sample)

    @torch.no_grad()
    def _set_pixel_paths(self, centroids: torch.Tensor, cells: torch.Tensor) -> None:
        """Pixel head and pixel blocks from k-means centroids (V, D): logits −‖x − μ_c‖² / 2σ² up to a constant in c,
        i.e. (μ_c·x − ‖μ_c‖²/2) / σ², with σ² the mean squared distance to the nearest centroid per value (the
        posterior of a Gaussian mixture with equal weights); block c = μ_c (Bernoulli: its logit); for a Gaussian
        decoder, the variance starts at σ²."""
        model = self.model
        nearest = nearest_codes(cells, centroids)
        variance = float(((cells - centroids[nearest]) ** 2).mean().clamp(min=1e-6))
        head = model.patch_encoder.pixel_head
        spread = variance * self.kmeans_temperature
        head.weight.copy_(centroids / spread)
        head.bias.copy_(-(centroids**2).sum(-1) / (2 * spread))
        blocks = centroids
        config = model.config
        if config.likelihood == "bernoulli":
            blocks = torch.logit(centroids.clamp(1e-3, 1 - 1e-3))
        else:
            # The variance channels' offset: the Gaussian's variance starts at the within-cluster variance.
            low, high = math.log(config.min_variance), math.log(config.max_variance)
            fraction = (math.log(min(max(variance, config.min_variance), config.max_variance)) - low) / (high - low)
            fraction = min(max(fraction, 1e-3), 1 - 1e-3)
            model.decoder.output_bias[config.num_channels:] = math.log(fraction / (1 - fraction))
        weight = model.code_embedding.weight
        weight[:, weight.shape[1] - blocks.shape[1]:] = blocks.to(weight.dtype)
        if self.fixed_code_blocks:
            weight[:, :weight.shape[1] - blocks.shape[1]] = 0.0   # the decoder reads the block and nothing else

    def _warm_start_step(self, pixel_values: torch.Tensor, targets: torch.Tensor, progress: float) -> dict:
        """A warm-start step: each image's k-means code z (B, L), the nearest centroid of each token's pixel block,
        is the target of both losses: −log q(z | x) for the encoder (teacher-forced) and −log p(x | z) for the
        decoder. No sampling, no trust region; `warm_start` = 1 in the log marks these steps."""
        if self.warm_start_centroids is None:
            raise RuntimeError("DapsMethod has warm_start_steps > 0 but no k-means codebook: call "
                               "fit_warm_start(training images) before training.")
        model = self.model
        centroids = self.warm_start_centroids.to(pixel_values.device)
        codes = nearest_codes(token_cells(pixel_values.detach().float(), model.config.num_tokens), centroids)
        codes = codes[:, None]                                                           # (B, 1, L)
        log_q = model._log_prob_from_memory(model.encode_patches(pixel_values), codes).float()   # (B, 1)
        rewards, _ = model._reconstruction_log_likelihood(targets, codes)                         # (B, 1)
        encoder_loss, decoder_loss = -log_q.mean(), -rewards.float().mean()
        self._pending = None
        config = model.config
        return {
            "loss": encoder_loss + decoder_loss,
            "encoder_loss": encoder_loss.detach(),
            "decoder_loss": decoder_loss.detach(),
            "beta": self.beta_schedule(progress),
            "kl_nats": (log_q.detach() + config.num_tokens * math.log(config.codebook_size)).mean(),
            "code_usage": codes.unique().numel() / config.codebook_size,
            "warm_start": 1.0,
        }

    def after_step(self) -> None:
        """8 (second half): the reference control's Adam step on log η, after the weights of this step were used."""
        self.steps_done += 1
        if self._pending is None:  # a warm-start step: no weights, nothing for the control
            return
        rewards, log_q, beta, offset = self._pending
        self.eta_control.after_step(rewards, log_q, beta, offset)

    def state_dict_extra(self) -> dict:
        return {"eta_control": self.eta_control.state_dict(), "steps_done": self.steps_done}

    def load_state_dict_extra(self, state: dict) -> None:
        self.eta_control.load_state_dict(state["eta_control"])
        self.steps_done = int(state.get("steps_done", 0))


class FsqMethod(nn.Module):
    """FSQ: bounded latents rounded per dimension, straight-through; the decoder's likelihood is the whole loss."""

    def __init__(self, model):
        super().__init__()
        _require_quantizer(model, "fsq", "FSQ")
        self.model = model

    def forward(self, pixel_values, targets, progress: float, polish_codes=None, touch_all: bool = False) -> dict:
        if polish_codes is not None:
            return decoder_polish_step(self.model, polish_codes, targets, touch_all)
        model = self.model
        memory = model.encode_patches(pixel_values)
        latents = _parallel_head(model, memory)
        values, codes = model.quantizer.quantize(latents)
        reward = _reconstruction_log_likelihood(model, values.to(latents.dtype), targets)
        loss = -reward.mean()
        return {"loss": loss, "decoder_loss": loss.detach(),
                "code_usage": codes.unique().numel() / model.config.codebook_size}

    def after_step(self) -> None:
        pass


class VqMethod(nn.Module):
    """VQ-VAE: nearest codebook vector, straight-through gradient, codebook + β_c·commitment losses (per element,
    as in van den Oord et al.), reconstruction as a per-pixel mean negative log-likelihood so the three terms keep
    the paper's relative weights. Optionally re-seeds codes unused for a while from current encoder outputs."""

    def __init__(self, model, commitment: float = 0.25, restart_dead_codes: bool = True, restart_after: int = 50):
        super().__init__()
        _require_quantizer(model, "vq", "VQ-VAE")
        self.model = model
        self.commitment = commitment
        self.restart_dead_codes = restart_dead_codes
        self.restart_after = restart_after
        self.register_buffer("steps_unused", torch.zeros(model.config.codebook_size, dtype=torch.long), persistent=False)
        self._latents = None

    def forward(self, pixel_values, targets, progress: float, polish_codes=None, touch_all: bool = False) -> dict:
        if polish_codes is not None:
            return decoder_polish_step(self.model, polish_codes, targets, touch_all)
        model = self.model
        memory = model.encode_patches(pixel_values)
        latents = _parallel_head(model, memory).float()
        quantized, codes = model.quantizer.quantize(latents)
        codebook_loss = F.mse_loss(quantized, latents.detach())
        commitment_loss = F.mse_loss(latents, quantized.detach())
        straight_through = latents + (quantized - latents).detach()
        reward = _reconstruction_log_likelihood(model, straight_through, targets)
        pixels = targets[0].numel()
        loss = -reward.mean() / pixels + codebook_loss + self.commitment * commitment_loss
        used = torch.zeros_like(self.steps_unused, dtype=torch.bool)
        used[codes.flatten()] = True
        self.steps_unused = torch.where(used, 0, self.steps_unused + 1)
        self._latents = latents.detach().reshape(-1, latents.shape[-1])
        return {"loss": loss, "decoder_loss": (-reward.mean()).detach(), "codebook_loss": codebook_loss.detach(),
                "commitment_loss": commitment_loss.detach(),
                "code_usage": codes.unique().numel() / model.config.codebook_size}

    @torch.no_grad()
    def after_step(self) -> None:
        if not self.restart_dead_codes or self._latents is None:
            return
        dead = (self.steps_unused >= self.restart_after).nonzero().flatten()
        if dead.numel() == 0:
            return
        # Same choice on every process: the latents differ per process, so seed the pick by the step counter.
        choice = torch.randint(0, self._latents.shape[0], (dead.numel(),),
                               generator=torch.Generator().manual_seed(int(self.steps_unused.sum())))
        self.model.quantizer.codebook.weight[dead] = self._latents[choice.to(self._latents.device)].to(
            self.model.quantizer.codebook.weight.dtype)
        self.steps_unused[dead] = 0


def conditional_gumbel_perturbation(logits: torch.Tensor, codes: torch.Tensor, generator=None) -> torch.Tensor:
    """Gumbel-perturbed logits (..., V) drawn conditionally on their argmax being `codes` (...): the "top-down"
    construction (Maddison et al. 2014): the maximum is Gumbel(logsumexp), the others Gumbels truncated below it.
    Differentiable in `logits`, so a relaxation of an already sampled code gets the right noise."""
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device).clamp(1e-20, 1 - 1e-7)
    gumbels = logits - torch.log(-torch.log(uniform))
    top = torch.logsumexp(logits, dim=-1, keepdim=True) - torch.log(-torch.log(uniform[..., :1]))
    truncated = -torch.logaddexp(-top.expand_as(gumbels), -gumbels)
    chosen = F.one_hot(codes, logits.shape[-1]).bool()
    return torch.where(chosen, top.expand_as(logits), truncated)


class GumbelMethod(nn.Module):
    """Gumbel-Softmax with straight-through one-hots (forward hard, backward soft), temperature annealed
    geometrically, and the β-weighted KL to the uniform prior computed analytically per token.

    Autoregressive variant: the hard codes are sampled with the KV cache (Gumbel-max, the same draw the relaxation
    uses), then one teacher-forced pass gives every position's logits with gradient. The gradient of a code's
    relaxation into the *later positions' inputs* is not propagated (the inputs are the hard codes): a truncation
    that keeps one pass per step instead of L sequential differentiable passes.
    """

    def __init__(self, model, beta_schedule, temperature_start: float = 1.0, temperature_end: float = 0.75):
        super().__init__()
        _require_quantizer(model, "categorical", "Gumbel-Softmax")
        self.model = model
        self.beta_schedule = beta_schedule
        self.temperature_start = temperature_start
        self.temperature_end = temperature_end
        self.generator: torch.Generator | None = None

    def forward(self, pixel_values, targets, progress: float, polish_codes=None, touch_all: bool = False) -> dict:
        if polish_codes is not None:
            return decoder_polish_step(self.model, polish_codes, targets, touch_all)
        model = self.model
        config = model.config
        temperature = self.temperature_start * (self.temperature_end / self.temperature_start) ** progress
        beta = self.beta_schedule(progress)
        memory = model.encode_patches(pixel_values)
        if model.code_transformer.autoregressive:
            codes, _ = model._sample_from_memory(memory.detach(), 1, 1.0, self.generator)
            logits = model.code_logits(memory, codes)[:, 0]                  # (B, L, V), with gradient
        else:
            logits = _parallel_head(model, memory).float()
        if model.code_transformer.autoregressive:
            hard_codes = codes[:, 0]
            perturbed = conditional_gumbel_perturbation(logits, hard_codes, self.generator)
        else:
            uniform = torch.rand(logits.shape, generator=self.generator, device=logits.device)
            perturbed = logits - torch.log(-torch.log(uniform.clamp(1e-20, 1 - 1e-7)))
            hard_codes = perturbed.argmax(-1)
        soft = torch.softmax(perturbed / temperature, dim=-1)
        hard = F.one_hot(hard_codes, config.codebook_size).to(soft.dtype)
        one_hot = hard + soft - soft.detach()
        table = model.code_embedding_weight
        embeddings = one_hot.to(table.dtype) @ table
        reward = _reconstruction_log_likelihood(model, embeddings, targets)
        log_probs = torch.log_softmax(logits, dim=-1)
        kl = (log_probs.exp() * log_probs).sum(-1).sum(-1) + config.num_tokens * math.log(config.codebook_size)
        loss = (-reward + beta * kl).mean()
        return {"loss": loss, "decoder_loss": (-reward.mean()).detach(), "kl_nats": kl.mean().detach(),
                "temperature": temperature, "beta": beta,
                "code_usage": hard_codes.unique().numel() / config.codebook_size}

    def after_step(self) -> None:
        pass
