"""The DAPS objective (training/objective.py): weights, ESS, losses, the two η controls and the β schedule."""

import copy
import io
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from training import objective
from training.objective import (
    ETA_MAX,
    ETA_MIN,
    AdamEtaControl,
    BetaSchedule,
    BisectionEtaControl,
    EtaController,
    advantages,
    daps_weights,
    decoder_loss,
    effective_sample_size,
    encoder_loss,
    log_weights,
    make_eta_control,
    mean_ess,
    normalized_weights,
    solve_eta,
)

INF = float("inf")


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The tensors here are tiny: one thread avoids OpenMP start-up and contention costs on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tensor(rows):
    return torch.tensor(rows, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------- hand-computed values
def test_advantages_subtract_log_sum_exp_baseline():
    # R = [log 1, log 3]: logsumexp = log 4, so exp(A) = [1/4, 3/4].
    a = advantages(tensor([[0.0, math.log(3.0)]]))
    torch.testing.assert_close(a, tensor([[-math.log(4.0), math.log(3.0 / 4.0)]]))
    # Equal rewards of any size: A = −log K.
    torch.testing.assert_close(advantages(tensor([[1e6, 1e6, 1e6, 1e6]])), torch.full((1, 4), -math.log(4.0)))


def test_advantages_of_minus_infinite_rewards():
    # R = [log 1, −inf, log 3]: the −inf sample gets −inf, the others as without it.
    a = advantages(tensor([[0.0, -INF, math.log(3.0)]]))
    assert a[0, 1] == -INF
    torch.testing.assert_close(a[0, [0, 2]], tensor([-math.log(4.0), math.log(0.75)]))
    # A row of only −inf rewards carries no information: zeros, not nan.
    assert torch.equal(advantages(tensor([[-INF, -INF]])), torch.zeros(1, 2))
    # nan counts as −inf; +inf rewards share the row equally: A = −log 2 for two of them.
    torch.testing.assert_close(advantages(tensor([[float("nan"), 0.0]])), tensor([[-INF, 0.0]]))
    torch.testing.assert_close(advantages(tensor([[INF, 5.0, INF]])), tensor([[-math.log(2.0), -INF, -math.log(2.0)]]))


def test_weights_and_ess_hand_computed():
    # β = 1, η = 0, ℓ = 0: w = exp(A) = [1/4, 3/4]; ESS = 1 / (1/16 + 9/16) = 1.6.
    w = daps_weights(tensor([[0.0, math.log(3.0)]]), torch.zeros(1, 2), beta=1.0, eta=0.0)
    torch.testing.assert_close(w, tensor([[0.25, 0.75]]))
    torch.testing.assert_close(effective_sample_size(w), tensor([1.6]))

    # β = 1, η = 1, ℓ = 0, R = [0, 2 log 2]: s = A / 2, so w ∝ [1, 2] = [1/3, 2/3]; ESS = 1 / (1/9 + 4/9) = 1.8.
    rewards = tensor([[0.0, 2 * math.log(2.0)]])
    s = log_weights(advantages(rewards), torch.zeros(1, 2), beta=1.0, eta=1.0)
    # A = [−log 5, log 4 − log 5] (logsumexp of [0, log 4] is log 5), s = A / (η + β) = A / 2.
    torch.testing.assert_close(s, tensor([[-math.log(5.0) / 2, math.log(0.8) / 2]]))
    torch.testing.assert_close(normalized_weights(s), tensor([[1 / 3, 2 / 3]]))
    torch.testing.assert_close(effective_sample_size(normalized_weights(s)), tensor([1.8]))

    # Equal rewards, β = 1, η = 1, ℓ = [−2 log 2, 0, 0]: s = −β ℓ / (η + β) + const = [log 2, 0, 0] + const,
    # so w = [1/2, 1/4, 1/4] (the entropy bonus favours the unlikely sample); ESS = 1 / (6/16) = 8/3.
    w = daps_weights(torch.zeros(1, 3), tensor([[-2 * math.log(2.0), 0.0, 0.0]]), beta=1.0, eta=1.0)
    torch.testing.assert_close(w, tensor([[0.5, 0.25, 0.25]]))
    torch.testing.assert_close(effective_sample_size(w), tensor([8 / 3]))


def test_log_weights_formula():
    # s = (A − β ℓ) / (η + β) with A = [−1, −2], ℓ = [−3, −1], β = 2, η = 3: [(−1 + 6)/5, (−2 + 2)/5] = [1, 0].
    s = log_weights(tensor([[-1.0, -2.0]]), tensor([[-3.0, -1.0]]), beta=2.0, eta=3.0)
    torch.testing.assert_close(s, tensor([[1.0, 0.0]]))


def test_non_finite_log_q_gets_zero_weight_and_empty_rows_are_uniform():
    # ℓ = −inf would make −β ℓ = +inf; the sample is masked out instead: w = [1/2, 0, 1/2].
    w = daps_weights(torch.zeros(1, 3), tensor([[0.0, -INF, 0.0]]), beta=1.0, eta=1.0)
    torch.testing.assert_close(w, tensor([[0.5, 0.0, 0.5]]))
    # No usable sample in the row: uniform weights, ESS = K.
    w = daps_weights(tensor([[0.0, 1.0]]), tensor([[-INF, float("nan")]]), beta=1.0, eta=1.0)
    torch.testing.assert_close(w, tensor([[0.5, 0.5]]))
    # A −inf reward with a −inf log q (−inf + inf) is masked too, not nan.
    w = daps_weights(tensor([[-INF, 0.0]]), tensor([[-INF, -1.0]]), beta=1.0, eta=1.0)
    torch.testing.assert_close(w, tensor([[0.0, 1.0]]))


def test_weights_are_float32_for_bf16_inputs():
    rewards = torch.randn(4, 8).bfloat16() * 1000
    log_q = -torch.rand(4, 8).bfloat16() * 50
    w = daps_weights(rewards, log_q, beta=0.5, eta=10.0)
    assert w.dtype == torch.float32 and not w.requires_grad
    torch.testing.assert_close(w.sum(-1), torch.ones(4))
    assert encoder_loss(log_q, w).dtype == torch.float32


def test_shape_mismatch_is_a_value_error():
    with pytest.raises(ValueError, match="same shape"):
        daps_weights(torch.zeros(2, 3), torch.zeros(2, 4), 1.0, 1.0)
    with pytest.raises(ValueError, match="eta"):
        daps_weights(torch.zeros(2, 3), torch.zeros(2, 3), 1.0, -1.0)
    with pytest.raises(ValueError, match="eta \\+ beta"):
        daps_weights(torch.zeros(2, 3), torch.zeros(2, 3), 0.0, 0.0)


# ----------------------------------------------------------------------------------------------- losses
def test_encoder_loss_gradient_is_weighted_score_function():
    torch.manual_seed(0)
    n, k, v = 3, 5, 4
    logits = torch.randn(n, v, requires_grad=True)
    codes = torch.randint(v, (n, k))
    log_q = torch.log_softmax(logits, -1).gather(1, codes)  # ℓ_ik = log q(z_ik | x_i)
    weight_logits = torch.randn(n, k, requires_grad=True)
    weights = torch.softmax(weight_logits, -1)  # carries a graph: encoder_loss must not backpropagate into it
    encoder_loss(log_q, weights).backward()

    # ∇_logits_i log q(z | x_i) = onehot(z) − softmax(logits_i), so ∇L_θ = −(1/N) Σ_i Σ_k w_ik (onehot(z_ik) − p_i).
    p = torch.softmax(logits.detach(), -1)
    expected = torch.zeros(n, v)
    for i in range(n):
        for j in range(k):
            expected[i] -= weights[i, j].detach() * (torch.nn.functional.one_hot(codes[i, j], v).float() - p[i]) / n
    torch.testing.assert_close(logits.grad, expected)
    assert weight_logits.grad is None


def test_encoder_loss_value_and_masking():
    # −mean_i Σ_k w ℓ = −((0.5·−2 + 0.5·−4) + (1·−1)) / 2 = 2.
    loss = encoder_loss(tensor([[-2.0, -4.0], [-1.0, -3.0]]), tensor([[0.5, 0.5], [1.0, 0.0]]))
    torch.testing.assert_close(loss, torch.tensor(2.0))
    # A −inf log q contributes nothing, and no nan gradient.
    log_q = tensor([[-2.0, -INF]]).requires_grad_()
    loss = encoder_loss(log_q, tensor([[0.5, 0.5]]))
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(1.0))
    torch.testing.assert_close(log_q.grad, tensor([[-0.5, 0.0]]))


def test_decoder_loss_is_negative_mean_reward():
    rewards = tensor([[-1.0, -3.0], [-5.0, -7.0]]).requires_grad_()
    loss = decoder_loss(rewards)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(4.0))
    torch.testing.assert_close(rewards.grad, torch.full((2, 2), -0.25))


# ----------------------------------------------------------------------------------------------- ESS as a function of η
def random_batch(seed, n=16, k=8, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    rewards = scale * torch.randn(n, k, generator=generator)
    log_q = -20.0 - 10.0 * torch.rand(n, k, generator=generator)
    return rewards, log_q


def test_ess_is_monotone_in_eta():
    rewards, log_q = random_batch(0, scale=30.0)
    etas = torch.logspace(-6, 12, 200).tolist()
    ess = [mean_ess(rewards, log_q, 0.5, eta).item() for eta in etas]
    assert all(b >= a - 1e-5 for a, b in zip(ess, ess[1:]))
    assert ess[0] < 2.0 and ess[-1] > 8 - 1e-3  # spans most of [1, K]


def test_large_eta_gives_uniform_weights_and_full_ess():
    rewards, log_q = random_batch(1, scale=30.0)
    w = daps_weights(rewards, log_q, beta=1.0, eta=1e12)
    torch.testing.assert_close(w, torch.full_like(w, 1 / 8), atol=1e-6, rtol=0)
    torch.testing.assert_close(effective_sample_size(w), torch.full((16,), 8.0), atol=1e-4, rtol=0)


def test_small_eta_with_beta_one_gives_posterior_importance_weights():
    # η → 0, β = 1: w ∝ exp(R − ℓ) = p(x|z) / q(z|x), the self-normalised importance weights of the posterior.
    rewards, log_q = random_batch(2, scale=3.0)
    posterior = torch.softmax(rewards - log_q, -1)
    torch.testing.assert_close(daps_weights(rewards, log_q, beta=1.0, eta=0.0), posterior)
    torch.testing.assert_close(daps_weights(rewards, log_q, beta=1.0, eta=1e-9), posterior)


def test_mean_ess_has_gradient_only_wrt_eta():
    rewards, log_q = random_batch(3, scale=3.0)
    rewards.requires_grad_(), log_q.requires_grad_()
    log_eta = torch.tensor(0.0, requires_grad=True)
    ess = mean_ess(rewards, log_q, 1.0, log_eta.exp())
    ess.backward()
    assert log_eta.grad > 0  # ESS grows with η
    assert rewards.grad is None and log_q.grad is None


# ----------------------------------------------------------------------------------------------- η controls
def test_make_eta_control_gives_both_kinds_with_the_same_interface():
    for kind, cls in (("adam", AdamEtaControl), ("bisection", BisectionEtaControl)):
        control = make_eta_control(kind, rho=0.33, num_samples=8, initial_eta=100.0, lr=1e-3)
        assert isinstance(control, cls) and isinstance(control, EtaController)
        assert control.eta == pytest.approx(100.0) and control.target_ess == pytest.approx(0.33 * 8)
    with pytest.raises(ValueError, match="adam"):
        make_eta_control("sgd", rho=0.33, num_samples=8)
    with pytest.raises(ValueError, match="rho"):
        make_eta_control("adam", rho=0.0, num_samples=8)


def test_adam_control_uses_pre_update_eta_and_steps_once():
    rewards, log_q = random_batch(4, scale=10.0)
    control = AdamEtaControl(rho=0.33, num_samples=8, initial_eta=100.0, lr=1e-3)
    assert control.eta_for_step(rewards, log_q, 1.0) == pytest.approx(100.0)
    control.after_step(rewards, log_q, 1.0)
    # One Adam step moves log η by about lr (the first Adam step is ±lr exactly, up to eps).
    assert math.log(control.eta) == pytest.approx(math.log(100.0) - 1e-3, abs=1e-6)


def test_adam_control_lowers_eta_when_ess_is_above_target():
    rewards, log_q = random_batch(5, scale=10.0)
    control = AdamEtaControl(rho=0.33, num_samples=8, initial_eta=100.0, lr=0.05)
    assert mean_ess(rewards, log_q, 1.0, control.eta) > control.target_ess
    etas = [control.eta]
    for _ in range(20):
        control.update(rewards, log_q, 1.0)
        etas.append(control.eta)
    assert all(b < a for a, b in zip(etas, etas[1:]))


def test_adam_control_raises_eta_when_ess_is_below_target():
    rewards, log_q = random_batch(6, scale=10.0)
    control = AdamEtaControl(rho=0.75, num_samples=8, initial_eta=1.0, lr=0.05)
    assert mean_ess(rewards, log_q, 1.0, control.eta) < control.target_ess
    etas = [control.eta]
    for _ in range(20):
        control.update(rewards, log_q, 1.0)
        etas.append(control.eta)
    assert all(b > a for a, b in zip(etas, etas[1:]))


def test_adam_control_brings_ess_to_target_on_a_fixed_batch():
    rewards, log_q = random_batch(7, scale=10.0)
    control = AdamEtaControl(rho=0.33, num_samples=8, initial_eta=100.0, lr=0.05)
    start = abs(mean_ess(rewards, log_q, 1.0, control.eta).item() - control.target_ess)
    for _ in range(300):
        stats = control.update(rewards, log_q, 1.0)
    end = abs(mean_ess(rewards, log_q, 1.0, control.eta).item() - control.target_ess)
    assert start > 2.0 and end < 0.1
    assert stats["stepped"] and math.isfinite(stats["eta_loss"])


@pytest.mark.parametrize("scale", [1.0, 1e3, 1e6])
def test_bisection_hits_ess_target(scale):
    rewards, log_q = random_batch(8, n=64, scale=scale)
    log_q = log_q * min(scale, 1e3)  # the entropy term at a comparable scale too
    control = BisectionEtaControl(rho=0.33, num_samples=8)
    eta = control.eta_for_step(rewards, log_q, 1.0)
    ess = mean_ess(rewards, log_q, 1.0, eta).item()
    assert abs(ess - 0.33 * 8) <= 1e-3 * 8
    assert control.eta == eta and control.last_stats["converged"]
    assert ETA_MIN < eta < ETA_MAX
    # The weights the trainer computes with this η have that ESS.
    w = daps_weights(rewards, log_q, 1.0, eta)
    assert abs(effective_sample_size(w).mean().item() - 0.33 * 8) <= 1e-3 * 8
    assert solve_eta(rewards, log_q, 1.0, 0.33 * 8) == pytest.approx(eta)


def test_bisection_returns_bounds_when_target_is_out_of_reach():
    # All rewards and log q equal: ESS = K for every η ≥ target, so the smallest η.
    control = BisectionEtaControl(rho=0.5, num_samples=4)
    eta = control.solve(torch.full((3, 4), -7.0), torch.full((3, 4), -2.0), 1.0)
    assert eta == ETA_MIN and control.last_stats["at_lower_bound"]
    # ρ = 1 with rewards so far apart that even η = 1e12 leaves ESS < K − tolerance: the largest η, still finite.
    rewards, log_q = random_batch(9, k=4, scale=1e30)
    control = BisectionEtaControl(rho=1.0, num_samples=4)
    eta = control.solve(rewards, log_q, 1.0)
    assert eta == ETA_MAX and control.last_stats["at_upper_bound"]


def test_bisection_control_after_step_is_a_no_op():
    rewards, log_q = random_batch(10)
    control = BisectionEtaControl(rho=0.33, num_samples=8)
    eta = control.eta_for_step(rewards, log_q, 1.0)
    control.after_step(rewards * 100, log_q, 1.0)
    assert control.eta == eta
    restored = BisectionEtaControl(rho=0.33, num_samples=8)
    restored.load_state_dict(copy.deepcopy(control.state_dict()))
    assert restored.eta == eta


def test_adam_state_dict_round_trip_reproduces_next_update():
    rewards, log_q = random_batch(11, scale=10.0)
    control = AdamEtaControl(rho=0.33, num_samples=8, initial_eta=100.0, lr=0.01)
    for _ in range(5):
        control.update(rewards, log_q, 1.0)
    state = control.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)  # also loads without pickled objects
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    control.update(rewards * 1.5, log_q, 0.7)
    control.update(rewards, log_q, 0.7)
    expected = control.eta

    restored = AdamEtaControl(rho=0.33, num_samples=8, initial_eta=3.0, lr=0.01)
    restored.load_state_dict(loaded)
    restored.update(rewards * 1.5, log_q, 0.7)
    restored.update(rewards, log_q, 0.7)
    assert restored.eta == expected

    with pytest.raises(ValueError, match="adam"):
        restored.load_state_dict(BisectionEtaControl(rho=0.33, num_samples=8).state_dict())


def test_adam_state_dict_is_a_copy():
    rewards, log_q = random_batch(12, scale=10.0)
    control = AdamEtaControl(rho=0.33, num_samples=8)
    control.update(rewards, log_q, 1.0)
    state = control.state_dict()
    snapshot = copy.deepcopy(state)
    control.update(rewards, log_q, 1.0)
    assert torch.equal(state["log_eta"], snapshot["log_eta"])
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"], snapshot["optimizer"]["state"][0]["exp_avg"])


# ----------------------------------------------------------------------------------------------- properties
special_rewards = st.sampled_from([0.0, 1.0, -1.0, 1e6, -1e6, -INF])
finite_rewards = st.floats(-1e6, 1e6, allow_nan=False)
special_log_q = st.sampled_from([0.0, -1e-8, -1.0, -1e6, -INF])
finite_log_q = st.floats(-1e6, 0.0, allow_nan=False)


@st.composite
def batches(draw, allow_infinite_rewards=True):
    n = draw(st.integers(1, 8))
    k = draw(st.integers(1, 16))
    reward_values = st.one_of(special_rewards, finite_rewards) if allow_infinite_rewards else st.one_of(
        st.sampled_from([0.0, 1.0, 1e6, -1e6]), finite_rewards)
    # Few distinct values so that repeats are common.
    pool_r = draw(st.lists(reward_values, min_size=1, max_size=4))
    pool_q = draw(st.lists(st.one_of(special_log_q, finite_log_q), min_size=1, max_size=4))
    rewards = [[draw(st.sampled_from(pool_r)) for _ in range(k)] for _ in range(n)]
    log_q = [[draw(st.sampled_from(pool_q)) for _ in range(k)] for _ in range(n)]
    beta = draw(st.floats(1e-3, 50.0))
    eta = draw(st.floats(1e-6, 1e6))
    return tensor(rewards), tensor(log_q), beta, eta


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_weights_ess_and_losses_are_always_defined(batch):
    rewards, log_q, beta, eta = batch
    k = rewards.shape[1]
    assert torch.isfinite(advantages(rewards)).logical_or(advantages(rewards) == -INF).all()
    w = daps_weights(rewards, log_q, beta, eta)
    assert torch.isfinite(w).all() and (w >= 0).all() and (w <= 1).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[0]), atol=1e-5, rtol=0)
    ess = effective_sample_size(w)
    assert torch.isfinite(ess).all() and (ess >= 1).all() and (ess <= k).all()

    leaf = log_q.clone().requires_grad_()
    loss = encoder_loss(leaf, w)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(leaf.grad).all()

    log_eta = torch.tensor(math.log(eta), requires_grad=True)
    batch_ess = mean_ess(rewards, log_q, beta, log_eta.exp())
    batch_ess.backward()
    assert 1 <= batch_ess.item() <= k and math.isfinite(log_eta.grad.item())


@settings(max_examples=100, deadline=None)
@given(batches(allow_infinite_rewards=False))
def test_decoder_loss_is_finite_for_finite_rewards(batch):
    rewards = batch[0].requires_grad_()
    loss = decoder_loss(rewards)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(rewards.grad).all()


@settings(max_examples=60, deadline=None)
@given(batches(), st.floats(0.05, 1.0))
def test_controls_always_give_finite_eta_in_bounds(batch, rho):
    rewards, log_q, beta, _ = batch
    k = rewards.shape[1]
    bisection = BisectionEtaControl(rho=rho, num_samples=k)
    eta = bisection.eta_for_step(rewards, log_q, beta)
    assert ETA_MIN <= eta <= ETA_MAX and math.isfinite(bisection.last_stats["ess"])
    adam = AdamEtaControl(rho=rho, num_samples=k, lr=0.1)
    adam.update(rewards, log_q, beta)
    assert ETA_MIN <= adam.eta <= ETA_MAX


# ----------------------------------------------------------------------------------------------- β schedule
def test_beta_schedule_endpoints_and_geometric_midpoint():
    schedule = BetaSchedule(6.0, 0.01, total_steps=100)
    assert schedule(0) == 6.0 and schedule(100) == 0.01 and schedule(1000) == 0.01 and schedule(-5) == 6.0
    assert schedule(50) == pytest.approx(math.sqrt(6.0 * 0.01))
    assert schedule.at_progress(0.5) == pytest.approx(math.sqrt(6.0 * 0.01))
    assert schedule(25) == pytest.approx(6.0 * (0.01 / 6.0) ** 0.25)
    values = [schedule(step) for step in range(101)]
    assert all(b < a for a, b in zip(values, values[1:]))


def test_beta_schedule_constant_and_validation():
    constant = BetaSchedule(0.5, 0.5, total_steps=10)
    assert {constant(step) for step in range(12)} == {0.5}
    for bad in ((0.0, 1.0), (1.0, -1.0), (float("nan"), 1.0)):
        with pytest.raises(ValueError, match="beta"):
            BetaSchedule(*bad, total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        BetaSchedule(1.0, 0.1, total_steps=0)


def test_module_exports_what_it_documents():
    for name in objective.__all__:
        assert hasattr(objective, name)


def test_importance_offset_shifts_the_log_weights_and_the_eta_solve_still_hits_the_target():
    """Codes from a proposal μ: the log-weights gain log q − log μ, and the bisection solves ESS = ρK on them."""
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(64, 6, generator=generator, dtype=torch.float64) * 20
    log_q = -torch.rand(64, 6, generator=generator, dtype=torch.float64) * 30
    offset = torch.randn(64, 6, generator=generator, dtype=torch.float64) * 2
    beta, eta = 0.3, 2.0
    plain = objective.log_weights(objective.advantages(rewards), log_q, beta, eta)
    shifted = objective.log_weights(objective.advantages(rewards), log_q, beta, eta, offset)
    torch.testing.assert_close(shifted, plain + offset)
    torch.testing.assert_close(objective.daps_weights(rewards, log_q, beta, eta, offset),
                               torch.softmax(plain + offset, dim=-1))
    target = 0.33 * 6
    solved = objective.solve_eta(rewards, log_q, beta, target, offset=offset)
    assert abs(objective.mean_ess(rewards, log_q, beta, solved, offset).item() - target) <= 1e-2
    # The offset matters: the same η without it gives another ESS.
    assert abs(objective.mean_ess(rewards, log_q, beta, solved).item() - target) > 0.1
    control = objective.make_eta_control("bisection", rho=0.33, num_samples=6)
    assert control.eta_for_step(rewards, log_q, beta, offset) == pytest.approx(solved)
    adam = objective.make_eta_control("adam", rho=0.33, num_samples=6)
    adam.after_step(rewards, log_q, beta, offset)
    assert adam.last_stats["ess"] == pytest.approx(objective.mean_ess(rewards, log_q, beta, 100.0, offset).item())


# ----------------------------------------------------------------------------------------------- marginal usage
def test_marginal_usage_loss_is_zero_for_even_use_and_log_v_for_one_code():
    n, k, length, vocab = 3, 2, 4, 8
    weights = torch.full((n, k), 1 / k)
    uniform = torch.full((n, k, length, vocab), -math.log(vocab))
    assert objective.marginal_usage_loss(uniform, weights).item() == pytest.approx(0.0, abs=1e-6)
    # Every image deterministic, but on different codes that together cover the codebook evenly: still 0.
    spread = torch.full((n * k * length, vocab), -1e4)
    spread[torch.arange(n * k * length), torch.arange(n * k * length) % vocab] = 0.0
    spread = torch.log_softmax(spread, -1).view(n, k, length, vocab)
    assert objective.marginal_usage_loss(spread, weights).item() == pytest.approx(0.0, abs=1e-5)
    # Everything on code 3: the aggregate is one-hot, KL from uniform is log V.
    collapsed = torch.full((n, k, length, vocab), -1e4)
    collapsed[..., 3] = 0.0
    collapsed = torch.log_softmax(collapsed, -1)
    assert objective.marginal_usage_loss(collapsed, weights).item() == pytest.approx(math.log(vocab), abs=1e-5)


def test_marginal_usage_loss_uses_the_weights_and_its_gradient_spreads_the_overused_code():
    torch.manual_seed(0)
    n, k, length, vocab = 4, 3, 5, 6
    logits = torch.randn(n, k, length, vocab)
    logits[..., 0] += 3.0                                            # code 0 overused
    weights = torch.softmax(torch.randn(n, k), -1)
    log_probs = torch.log_softmax(logits, -1)
    # Against a direct computation of log V − H(q̄).
    aggregate = (weights[..., None, None] * log_probs.exp()).sum((0, 1, 2)) / (n * length)
    expected = math.log(vocab) + (aggregate * aggregate.log()).sum()
    assert objective.marginal_usage_loss(log_probs, weights).item() == pytest.approx(expected.item(), rel=1e-5)
    # A sample with weight 0 does not count.
    zero_last = weights.clone()
    zero_last[:, -1] = 0
    changed = log_probs.clone()
    changed[:, -1] = torch.log_softmax(torch.randn(n, length, vocab), -1)
    assert objective.marginal_usage_loss(changed, zero_last).item() == pytest.approx(
        objective.marginal_usage_loss(log_probs, zero_last).item(), rel=1e-6)
    # Descending the loss lowers the overused code's logit relative to the others; the weights get no gradient.
    logits.requires_grad_(True)
    weights.requires_grad_(True)
    objective.marginal_usage_loss(torch.log_softmax(logits, -1), weights).backward()
    assert (logits.grad[..., 0] > 0).all() and (logits.grad[..., 1:] < 0).all()
    assert weights.grad is None


def test_mutual_information_usage_loss_also_asks_each_token_to_be_confident():
    n, k, length, vocab = 3, 2, 4, 8
    weights = torch.full((n, k), 1 / k)
    # Uniform tokens: the aggregate is even, but no token carries information: log V − I = log V.
    uniform = torch.full((n, k, length, vocab), -math.log(vocab))
    assert objective.marginal_usage_loss(uniform, weights, mutual_information=True).item() == pytest.approx(
        math.log(vocab), abs=1e-5)
    # Confident tokens spread evenly over the codebook: I = log V, loss 0.
    spread = torch.full((n * k * length, vocab), -1e4)
    spread[torch.arange(n * k * length), torch.arange(n * k * length) % vocab] = 0.0
    spread = torch.log_softmax(spread, -1).view(n, k, length, vocab)
    assert objective.marginal_usage_loss(spread, weights, mutual_information=True).item() == pytest.approx(
        0.0, abs=1e-5)
    # In general it is the marginal term plus the weighted mean token entropy, and never below it.
    torch.manual_seed(1)
    log_probs = torch.log_softmax(2 * torch.randn(n, k, length, vocab), -1)
    weights = torch.softmax(torch.randn(n, k), -1)
    token_entropy = -(log_probs.exp() * log_probs).sum(-1)
    expected = objective.marginal_usage_loss(log_probs, weights) + (weights[..., None] * token_entropy).sum() / (
        n * length)
    both = objective.marginal_usage_loss(log_probs, weights, mutual_information=True)
    assert both.item() == pytest.approx(expected.item(), rel=1e-5)
    assert 0 <= both.item() <= math.log(vocab) + 1e-5


def test_marginal_usage_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="N, K, L, V"):
        objective.marginal_usage_loss(torch.zeros(2, 3, 4), torch.ones(2, 3) / 3)
    with pytest.raises(ValueError):
        objective.marginal_usage_loss(torch.zeros(2, 3, 4, 5), torch.ones(2, 2) / 2)


def test_enumerated_options_get_q_star_itself_within_the_exact_kl_trust_region():
    torch.manual_seed(0)
    rewards = torch.randn(64, 4) * 20
    log_q = torch.log_softmax(torch.randn(64, 4) * 5, -1)
    beta = 0.5
    eta = objective.solve_eta_kl(rewards, log_q, beta, target_kl=0.3)
    weights = objective.enumerated_weights(rewards, log_q, beta, eta)
    # q*(j) ∝ q(j)·exp((A_j − β log q(j))/(η + β)), written out; its mean KL from q is the target.
    expected = torch.softmax(log_q + (rewards - beta * log_q) / (eta + beta), -1)
    torch.testing.assert_close(weights, expected)
    kl = (expected * (expected.log() - log_q)).sum(-1)
    torch.testing.assert_close(objective.trust_region_kl(rewards, log_q, beta, eta), kl)
    assert abs(float(kl.mean()) - 0.3) < 1e-3
    # Larger η, smaller step: the KL falls monotonically towards 0 (q* → q).
    kls = [float(objective.trust_region_kl(rewards, log_q, beta, value).mean()) for value in (0.1, 1.0, 10.0, 1e6)]
    assert kls == sorted(kls, reverse=True) and kls[-1] < 1e-4
    # A target wider than the whole move gives the smallest η.
    assert objective.solve_eta_kl(rewards, log_q, beta, target_kl=1e3) == objective.ETA_MIN
    with pytest.raises(ValueError, match="target_kl"):
        objective.solve_eta_kl(rewards, log_q, beta, target_kl=0.0)
