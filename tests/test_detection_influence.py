"""DetectionInfluence against plain autograd through the WHOLE torchvision FCOS, on a tiny detector.

Tiny: 64 px images, a 4-channel FPN and one tower conv, random init, float64. The reference for
every check is torchvision's own train-mode forward (its matching and loss), so the cached-tower
shortcut and the re-implemented per-image loss are both under test.
"""

from __future__ import annotations

import pytest
import torch

from isal_backend.detection.detector import DetectorConfig, LiteFCOS, build_detector, train_detector
from isal_backend.detection.influence import DetectionInfluence
from isal_backend.influence.solvers import LissaConfig, SolverConfig, cg, solve_s_test


def _images(n: int, seed: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """64x64 noise with one or two bright squares (class 0 red, class 1 green)."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        im = (torch.rand(3, 64, 64, generator=g) * 60).to(torch.uint8)
        boxes, labels = [], []
        for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
            size = int(torch.randint(12, 30, (1,), generator=g))
            x0, y0 = (int(v) for v in torch.randint(0, 64 - size, (2,), generator=g))
            c = int(torch.randint(0, 2, (1,), generator=g))
            im[c, y0 : y0 + size, x0 : x0 + size] = 230
            boxes.append([x0, y0, x0 + size, y0 + size])
            labels.append(c)
        images.append(im)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)})
    return images, targets


TINY = DetectorConfig(num_classes=2, image_size=64, fpn_channels=4, head_convs=1, pretrained=False, freeze_blocks=0,
                      backbone="tiny")


@pytest.fixture(scope="module")
def tiny() -> tuple[LiteFCOS, list, list, list, list]:
    torch.manual_seed(0)
    images, targets = _images(10, seed=1)
    model = build_detector(TINY, seed=0)
    train_detector(model, images[:6], targets[:6], steps=25, batch_size=3, lr=3e-3, warmup=3, hflip=False)
    model = model.double().eval()
    return model, images[:4], targets[:4], images[4:6], targets[4:6]


def _full_model_loss(model: LiteFCOS, images: list, targets: list) -> torch.Tensor:
    """Mean over images of torchvision FCOS's own loss of each image alone."""
    model.train()
    losses = [sum(model([model.to_float([im])[0].double()], [{"boxes": t["boxes"].double(), "labels": t["labels"]}])
                  .values()) for im, t in zip(images, targets, strict=True)]
    model.eval()
    return torch.stack(losses).mean()


def _final(model: LiteFCOS, names: list[str]) -> list[torch.nn.Parameter]:
    named = dict(model.named_parameters())
    from isal_backend.detection.detector import FINAL_CONVS

    return [named[f"{FINAL_CONVS[n.split('.')[0]]}.{n.split('.')[1]}"] for n in names]


def _only_final_requires_grad(model: LiteFCOS, params: list[torch.nn.Parameter]) -> dict[str, bool]:
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    return before


def _restore(model: LiteFCOS, before: dict[str, bool]) -> None:
    for n, p in model.named_parameters():
        p.requires_grad_(before[n])


def test_per_image_loss_equals_torchvision_loss(tiny) -> None:
    model, images, targets, ref_images, ref_targets = tiny
    problem = DetectionInfluence(model, images, targets, ref_images, ref_targets, batch_size=3)
    ours = torch.cat([problem.losses(problem.params, c) for c in problem.train_chunks])
    theirs = torch.stack([_full_model_loss(model, [im], [t]) for im, t in zip(images, targets, strict=True)])
    assert ours.dtype == torch.float64
    assert torch.allclose(ours, theirs, rtol=1e-10, atol=0)


def test_hvp_equals_dense_hessian_of_the_full_model(tiny) -> None:
    model, images, targets, ref_images, ref_targets = tiny
    problem = DetectionInfluence(model, images, targets, ref_images, ref_targets, weight_decay=1e-3, batch_size=3)
    params = _final(model, problem.names)
    before = _only_final_requires_grad(model, params)
    try:
        loss = _full_model_loss(model, images, targets)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        eye = torch.eye(flat.numel(), dtype=flat.dtype)
        rows = torch.autograd.grad(flat, params, grad_outputs=eye, is_grads_batched=True)
        dense = torch.cat([r.reshape(flat.numel(), -1) for r in rows], dim=1)
    finally:
        _restore(model, before)
    dense = dense + 1e-3 * torch.eye(problem.dim, dtype=dense.dtype)
    ours = problem.dense_hessian()
    assert torch.allclose(ours[:, 5], problem.hvp(torch.eye(problem.dim, dtype=torch.float64)[5]), rtol=1e-9)
    assert problem.dim == 2 * 36 + 2 + 4 * 36 + 4 + 36 + 1
    assert torch.linalg.matrix_norm(ours - dense) <= 1e-5 * torch.linalg.matrix_norm(dense)
    # mini-batch HVPs (LiSSA's) average the per-image Hessians of the chosen images
    v = torch.randn(problem.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    pair = problem.hvp(v, torch.tensor([0, 3]))
    single = 0.5 * (problem.hvp(v, torch.tensor([0])) + problem.hvp(v, torch.tensor([3])))
    assert torch.allclose(pair, single, rtol=1e-9, atol=1e-12)


def test_reference_gradient_and_scores_match_explicit_autograd(tiny) -> None:
    model, images, targets, ref_images, ref_targets = tiny
    pool = images[:3]
    problem = DetectionInfluence(model, images, targets, ref_images, ref_targets, pool_images=pool,
                                 score_threshold=0.05, weighting="none", damping=0.1, batch_size=3)
    params = _final(model, problem.names)
    before = _only_final_requires_grad(model, params)
    try:
        ref = torch.autograd.grad(2 * _full_model_loss(model, ref_images, ref_targets), params)
        assert torch.allclose(problem.reference_gradient(), torch.cat([g.reshape(-1) for g in ref]), rtol=1e-9)
        s_test = torch.linalg.solve(problem.dense_hessian(), problem.reference_gradient())
        out = problem.score_images(s_test, pool)
        pseudo = problem.pseudo_targets(out.detections)
        assert sum(len(p["labels"]) for p in pseudo) > 0
        for i, p in enumerate(pseudo):
            g = torch.autograd.grad(_full_model_loss(model, [pool[i]], [p]), params)
            expected = -torch.dot(s_test, torch.cat([x.reshape(-1) for x in g]))
            assert out.scores[i].item() == pytest.approx(expected.item(), rel=1e-7, abs=1e-12)
            assert out.num_boxes[i] == len(p["labels"])
    finally:
        _restore(model, before)
    assert torch.equal(problem.score(s_test), out.scores)


def test_score_weighting_uses_box_scores(tiny) -> None:
    model, images, targets, ref_images, ref_targets = tiny
    kw = {"score_threshold": 0.05, "damping": 0.1, "batch_size": 4}
    hard = DetectionInfluence(model, images, targets, ref_images, ref_targets, weighting="none", **kw)
    soft = DetectionInfluence(model, images, targets, ref_images, ref_targets, weighting="score", **kw)
    s = torch.randn(hard.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a, b = hard.score_images(s, images[:2]), soft.score_images(s, images[:2])
    assert torch.equal(a.num_boxes, b.num_boxes) and a.num_boxes.sum() > 0
    assert not torch.allclose(a.scores, b.scores)  # the weights are < 1, so they change the gradient


def test_images_without_surviving_boxes_get_the_documented_fallback(tiny) -> None:
    model, images, targets, ref_images, ref_targets = tiny
    pool = images[:3]
    s = torch.randn(2 * 36 + 2 + 4 * 36 + 4 + 37, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    background = DetectionInfluence(model, images, targets, ref_images, ref_targets, score_threshold=1.0)
    out = background.score_images(s, pool)
    assert out.no_box.all() and out.num_boxes.sum() == 0 and len(out.scores) == 3
    params = _final(model, background.names)
    before = _only_final_requires_grad(model, params)
    try:
        for i in range(3):  # the all-background loss, i.e. torchvision's loss with no boxes
            empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
            g = torch.autograd.grad(_full_model_loss(model, [pool[i]], [empty]), params)
            assert out.scores[i].item() == pytest.approx(-torch.dot(s, torch.cat([x.reshape(-1) for x in g])).item(),
                                                         rel=1e-7)
    finally:
        _restore(model, before)
    zero = DetectionInfluence(model, images, targets, ref_images, ref_targets, score_threshold=1.0,
                              empty_policy="zero")
    assert torch.equal(zero.score_images(s, pool).scores, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty_policy"):
        DetectionInfluence(model, images, targets, ref_images, ref_targets, empty_policy="random")
    with pytest.raises(ValueError, match="subset"):
        DetectionInfluence(model, images, targets, ref_images, ref_targets, params=("backbone",))


def test_parameter_subset_and_lissa_paper_fixed_point(tiny) -> None:
    model, images, targets, ref_images, ref_targets = tiny
    problem = DetectionInfluence(model, images, targets, ref_images, ref_targets, params=("bbox_ctrness",))
    assert problem.dim == 37
    dense, v = problem.dense_hessian(), problem.reference_gradient()
    plain, report = solve_s_test(problem, SolverConfig("cg", "hessian", tol=1e-10, max_iter=500))
    assert report.relative_residual < 1e-9
    assert torch.allclose(plain, torch.linalg.solve(dense, v), rtol=1e-6, atol=1e-10)
    scale = max(10.0, 2.0 * torch.linalg.eigvalsh(dense).max().item())
    config = LissaConfig(damp=0.35, scale=scale, depth=60, repeats=1, batch_size=len(images))  # full batch
    estimate, _ = solve_s_test(problem, SolverConfig("lissa", lissa=config))
    exact = scale * torch.linalg.solve(dense + scale * 0.35 * torch.eye(37, dtype=torch.float64), v)
    assert torch.allclose(estimate, exact, rtol=1e-4, atol=1e-8)


def _dense_ggn_by_jacobians(problem: DetectionInfluence) -> torch.Tensor:
    """``(1/n) sum_chunks J^T P(H_out) J + weight_decay I`` from dense Jacobians and dense output Hessians."""
    flat0 = problem._flatten(problem.params)
    total = torch.zeros(problem.dim, problem.dim, dtype=torch.float64)
    for chunk in problem.train_chunks:
        shapes = {k: v.shape for k, v in LiteFCOS.final_outputs(problem.params | problem.fixed, chunk.cls,
                                                                 chunk.reg).items()}
        sizes = [s.numel() for s in shapes.values()]

        def outputs(flat: torch.Tensor, c=chunk) -> torch.Tensor:
            out = LiteFCOS.final_outputs({**problem.fixed, **problem._unflatten(flat)}, c.cls, c.reg)
            return torch.cat([t.reshape(-1) for t in out.values()])

        def loss(flat_out: torch.Tensor, c=chunk, shp=shapes, sz=sizes) -> torch.Tensor:
            parts = dict(zip(shp, torch.split(flat_out, sz), strict=True))
            return problem.losses_from_outputs({k: t.reshape(shp[k]) for k, t in parts.items()}, c).sum()

        jac = torch.func.jacrev(outputs)(flat0)
        h_out = torch.func.hessian(loss)(outputs(flat0))
        values, vectors = torch.linalg.eigh(0.5 * (h_out + h_out.T))  # the whole output Hessian, projected
        total += jac.T @ ((vectors * values.clamp_min(0)) @ vectors.T) @ jac
    return total / problem.num_train + problem.weight_decay * torch.eye(problem.dim, dtype=torch.float64)


def test_ggn_is_jt_projected_output_hessian_j_and_psd_where_the_hessian_is_not(tiny) -> None:
    model, images, targets, ref_images, ref_targets = tiny
    problem = DetectionInfluence(model, images, targets, ref_images, ref_targets, weight_decay=0.0, batch_size=3)
    ggn = problem.dense_ggn()
    expected = _dense_ggn_by_jacobians(problem)
    assert torch.linalg.matrix_norm(ggn - expected) <= 1e-10 * torch.linalg.matrix_norm(expected)
    # the per-conv blocks the preconditioner factors are all of G (nothing between convs)
    blocks = torch.block_diag(*problem.ggn_blocks().values())
    assert torch.linalg.matrix_norm(blocks - ggn) <= 1e-10 * torch.linalg.matrix_norm(ggn)
    ggn_eigs = torch.linalg.eigvalsh(ggn)
    assert ggn_eigs[0] >= -1e-10 * ggn_eigs[-1]  # PSD up to rounding, with no weight decay at all
    hessian_eigs = torch.linalg.eigvalsh(0.5 * (problem.dense_hessian() + problem.dense_hessian().T))
    assert hessian_eigs[0] < -0.1 * hessian_eigs[-1]  # why: the exact Hessian is far from definite


def test_ggn_solve_reaches_tolerance_within_the_bench_budget(tiny) -> None:
    model, images, targets, ref_images, ref_targets = tiny
    problem = DetectionInfluence(model, images, targets, ref_images, ref_targets, damping=0.01, batch_size=3)
    v = problem.reference_gradient()
    exact = torch.linalg.solve(problem.dense_ggn(), v)
    s_test, report = solve_s_test(problem, SolverConfig("cg", "ggn", tol=1e-6, max_iter=10))
    assert report.method == "pcg" and report.iterations <= 3  # preconditioned by the per-conv blocks
    assert report.relative_residual <= 1e-6
    assert torch.allclose(s_test, exact, rtol=1e-6, atol=1e-9)
    chol, report = solve_s_test(problem, SolverConfig("cholesky", "ggn"))
    assert report.relative_residual <= 1e-10 and torch.allclose(chol, exact, rtol=1e-8, atol=1e-12)
    # without the block preconditioner plain CG on the same PSD system is far from done after 10 products
    _, plain = cg(problem.ggn_vp, v, None, tol=1e-6, max_iter=10)
    assert plain.relative_residual > 10 * report.relative_residual
    with pytest.raises(ValueError, match="curvature"):
        SolverConfig("cg", curvature="fisher")


def test_warm_start_keeps_weights_and_continues() -> None:
    images, targets = _images(6, seed=5)
    model = build_detector(TINY, seed=0)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = train_detector(model, images, targets, steps=0)
    assert report.steps == 0
    assert all(torch.equal(fresh[k], v) for k, v in model.state_dict().items())
    first = train_detector(model, images, targets, steps=8, batch_size=3, lr=3e-3, warmup=2, hflip=False)
    after_first = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(not torch.equal(fresh[k], v) for k, v in after_first.items())
    second = train_detector(model, images, targets, steps=2, batch_size=3, lr=1e-5, warmup=1, hflip=False)
    # the second round starts where the first ended, not from scratch
    assert second.losses[0] < first.losses[0]
    drift = max((model.state_dict()[k].float() - v.float()).abs().max().item() for k, v in after_first.items())
    assert drift < 1e-3
    again = build_detector(TINY, seed=0)
    assert all(torch.equal(fresh[k], v) for k, v in again.state_dict().items())
