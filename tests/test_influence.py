"""The ISAL maths: closed forms against autograd, solvers against their definitions, the sign."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr
from torch import nn

from isal_backend.influence import (
    PAPER,
    PAPER_LISSA,
    AutogradInfluence,
    HeadInfluence,
    LissaConfig,
    TopKError,
    cholesky_solve,
    conjugate_gradient,
    fit_linear_head,
    lissa,
    lissa_fixed_point,
    select_parameters,
    solve_s_test,
)
from isal_backend.influence.head import augment

WD = 1e-2


def blobs(n: int, num_classes: int, dim: int, seed: int, spread: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64) * 2
    y = torch.randint(0, num_classes, (n,), generator=gen)
    return centers[y] + spread * torch.randn(n, dim, generator=gen, dtype=torch.float64), y


@pytest.fixture(scope="module")
def problem() -> HeadInfluence:
    x, y = blobs(240, 4, 6, seed=0)
    xr, yr = blobs(60, 4, 6, seed=1)
    pool, _ = blobs(200, 4, 6, seed=2)
    head = fit_linear_head(x, y, 4, weight_decay=WD)
    return HeadInfluence(head, x, xr, yr, pool, weight_decay=WD)


def objective(weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The training objective fit_linear_head minimises, written out for autograd."""
    return F.cross_entropy(augment(x) @ weight.T, y) + 0.5 * WD * weight.pow(2).sum()


def test_head_is_at_the_optimum(problem: HeadInfluence) -> None:
    """Influence assumes a stationary point of the training objective."""
    x, y = blobs(240, 4, 6, seed=0)
    w = problem.head.weight.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(objective(w, x, y), w)
    assert g.abs().max() < 1e-6


def test_closed_form_hvp_and_gradient_match_autograd(problem: HeadInfluence) -> None:
    x, y = blobs(240, 4, 6, seed=0)
    xr, yr = blobs(60, 4, 6, seed=1)
    w = problem.head.weight.clone()
    hessian = torch.autograd.functional.hessian(lambda v: objective(v.view_as(w), x, y), w.reshape(-1))
    vec = torch.randn(problem.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(problem.hvp(vec), hessian @ vec, rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(problem.dense_hessian(), hessian, rtol=1e-5, atol=1e-10)

    wr = w.clone().requires_grad_(True)
    ref_loss = F.cross_entropy(augment(xr) @ wr.T, yr, reduction="sum")
    (g_ref,) = torch.autograd.grad(ref_loss, wr)
    torch.testing.assert_close(problem.reference_gradient(), g_ref.reshape(-1), rtol=1e-5, atol=1e-10)


def test_closed_form_score_matches_autograd_expected_gradient(problem: HeadInfluence) -> None:
    s_test, _ = conjugate_gradient(problem, problem.reference_gradient())
    w = problem.head.weight
    for top_k in (1, 2, 3):
        expected = []
        for z in problem.pool_features[:25]:
            wz = w.clone().requires_grad_(True)
            logits = augment(z[None]) @ wz.T
            p = torch.softmax(logits, 1).detach()[0]
            pk, ks = p.topk(top_k)
            g_exp = torch.zeros_like(w)
            for pkk, k in zip(pk, ks, strict=True):
                (g,) = torch.autograd.grad(F.cross_entropy(logits, k[None]), wz, retain_graph=True)
                g_exp += pkk * g
            expected.append(-(s_test * g_exp.reshape(-1)).sum())
        got = problem.score_features(s_test, problem.pool_features[:25], top_k)
        torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-12)


def test_exact_solvers_reach_tolerance_and_agree(problem: HeadInfluence) -> None:
    v = problem.reference_gradient()
    x_cg, report = conjugate_gradient(problem, v, tol=1e-10)
    assert report.relative_residual is not None and report.relative_residual <= 1e-9
    x_ch, report_ch = cholesky_solve(problem, v)
    assert report_ch.relative_residual < 1e-10
    torch.testing.assert_close(x_cg, x_ch, rtol=1e-6, atol=1e-10)


def test_lissa_reaches_its_fixed_point(problem: HeadInfluence) -> None:
    """With full-batch HVPs and enough depth the recursion lands on scale*(H + scale*damp I)^-1 v."""
    v = problem.reference_gradient()
    config = LissaConfig(damp=0.05, scale=20.0, depth=1500, repeats=1, batch_size=problem.num_train)
    estimate, _ = lissa(problem, v, config)
    torch.testing.assert_close(estimate, lissa_fixed_point(problem, v, config), rtol=1e-6, atol=1e-9)


def test_paper_lissa_ranks_like_the_exact_solver(problem: HeadInfluence) -> None:
    """The paper preset is a stochastic, depth-250 solve of the system damped by scale*damp = 100.

    Against the exact solve of that same system the rankings agree; against the exact solve of the
    undamped system they need not (the damping of 100 dominates a small head's curvature), which
    is why the product's ``isal`` uses the exact solver.
    """
    v = problem.reference_gradient()
    exact = lissa_fixed_point(problem, v, PAPER_LISSA)
    paper, _ = solve_s_test(problem, PAPER)
    rho = spearmanr(problem.score(exact).numpy(), problem.score(paper).numpy()).statistic
    assert rho >= 0.99


def test_top_k_at_or_above_classes_is_refused(problem: HeadInfluence) -> None:
    s_test, _ = conjugate_gradient(problem, problem.reference_gradient())
    with pytest.raises(TopKError, match="smaller than the number of classes"):
        problem.score(s_test, top_k=4)
    with pytest.raises(TopKError):
        problem.score(s_test, top_k=0)


def test_results_are_reproducible_under_a_seed(problem: HeadInfluence) -> None:
    a, _ = solve_s_test(problem, PAPER.with_seed(7))
    b, _ = solve_s_test(problem, PAPER.with_seed(7))
    c, _ = solve_s_test(problem, PAPER.with_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sign_most_negative_lowers_the_reference_loss_most() -> None:
    """Up-weighting z by eps and retraining changes L(R) by eps * I(z) (true-label influence)."""
    x, y = blobs(150, 3, 4, seed=10, spread=2.5)
    xr, yr = blobs(80, 3, 4, seed=11, spread=2.5)
    cand, cand_y = blobs(12, 3, 4, seed=12, spread=2.5)
    head = fit_linear_head(x, y, 3, weight_decay=WD)
    problem = HeadInfluence(head, x, xr, yr, cand, weight_decay=WD)
    s_test, _ = conjugate_gradient(problem, problem.reference_gradient(), tol=1e-12)
    s = s_test.view_as(head.weight)
    p = head.probs(cand)
    residual = p - F.one_hot(cand_y, 3).double()
    predicted = -((residual @ s) * augment(cand)).sum(1)  # -s^T (p - e_y) x^T

    def ref_loss(w: torch.Tensor) -> float:
        return F.cross_entropy(augment(xr) @ w.T, yr, reduction="sum").item()

    base = ref_loss(head.weight)
    eps = 1e-3
    actual = []
    for z, yz in zip(cand, cand_y, strict=True):
        w = head.weight.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([w], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                                line_search_fn="strong_wolfe")

        def closure(w=w, z=z, yz=yz, opt=opt) -> torch.Tensor:
            opt.zero_grad()
            loss = objective(w, x, y) + eps * F.cross_entropy(augment(z[None]) @ w.T, yz[None])
            loss.backward()
            return loss

        opt.step(closure)
        actual.append((ref_loss(w.detach()) - base) / eps)
    actual_t = torch.tensor(actual, dtype=torch.float64)
    assert pearsonr(predicted.numpy(), actual_t.numpy()).statistic > 0.99
    assert torch.equal(torch.sign(predicted), torch.sign(actual_t))
    assert actual_t[predicted.argmin()] == actual_t.min()


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


@pytest.fixture(scope="module")
def net_problem() -> AutogradInfluence:
    torch.manual_seed(0)
    net = TinyNet().double().eval()
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(70, 1, 4, 4, dtype=torch.float64, generator=gen)
    ys = torch.randint(0, 3, (70,), generator=gen)
    names = select_parameters(net, "all-conv-linear")
    return AutogradInfluence(
        net, names, xs[:40], ys[:40], xs[40:55], ys[40:55], xs[55:], weight_decay=WD, batch_size=16
    )


def test_all_conv_linear_selects_weights_only() -> None:
    assert select_parameters(TinyNet(), "all-conv-linear") == ["conv.weight", "fc.weight"]
    assert select_parameters(TinyNet(), "last-linear") == ["fc.weight", "fc.bias"]
    assert select_parameters(TinyNet(), ["conv"]) == ["conv.weight", "conv.bias"]
    with pytest.raises(ValueError, match="no parameters match"):
        select_parameters(TinyNet(), ["nope"])


def test_autograd_hvp_matches_dense_hessian(net_problem: AutogradInfluence) -> None:
    params = net_problem.params
    flat = torch.cat([p.reshape(-1) for p in params.values()])

    def loss(theta: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(net_problem._logits(net_problem._unflatten(theta), net_problem.train_inputs),
                               net_problem.train_labels) + 0.5 * WD * theta.pow(2).sum()

    hessian = torch.autograd.functional.hessian(loss, flat)
    vec = torch.randn(flat.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(net_problem.hvp(vec), hessian @ vec, rtol=1e-5, atol=1e-10)


def test_jvp_scores_equal_per_sample_gradient_scores(net_problem: AutogradInfluence) -> None:
    s_test, report = conjugate_gradient(net_problem, net_problem.reference_gradient(), tol=1e-8)
    assert report.relative_residual <= 1e-8
    fast = net_problem.score(s_test, top_k=2)
    net_problem.method = "per_sample"
    try:
        slow = net_problem.score(s_test, top_k=2)
    finally:
        net_problem.method = "jvp"
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-10)


def test_last_linear_autograd_equals_head_closed_form() -> None:
    """The same head, once through torch.func on the model and once in closed form on features."""
    torch.manual_seed(0)
    net = TinyNet().double().eval()
    gen = torch.Generator().manual_seed(5)
    xs = torch.randn(60, 1, 4, 4, dtype=torch.float64, generator=gen)
    ys = torch.randint(0, 3, (60,), generator=gen)
    with torch.no_grad():
        feats = torch.relu(net.bn(net.conv(xs))).flatten(1)
    head = fit_linear_head(feats[:30], ys[:30], 3, weight_decay=WD)
    with torch.no_grad():
        net.fc.weight.copy_(head.weight[:, :-1])
        net.fc.bias.copy_(head.weight[:, -1])
    auto = AutogradInfluence(net, ["fc.weight", "fc.bias"], xs[:30], ys[:30], xs[30:45], ys[30:45], xs[45:],
                             weight_decay=WD)
    closed = HeadInfluence(head, feats[:30], feats[30:45], ys[30:45], feats[45:], weight_decay=WD)
    # parameter order differs (weight block then bias vs bias column): compare through scores
    s_closed, _ = conjugate_gradient(closed, closed.reference_gradient(), tol=1e-12)
    s_auto, _ = conjugate_gradient(auto, auto.reference_gradient(), tol=1e-12)
    torch.testing.assert_close(auto.score(s_auto), closed.score(s_closed), rtol=1e-5, atol=1e-10)
