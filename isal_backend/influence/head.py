"""Closed-form influence for a softmax linear head on fixed features.

With features ``h`` and the augmented input ``x = [h; 1]`` (bias folded in), a head
``W`` (C x D, D = d + 1) and softmax cross-entropy:

* per-sample gradient for label k: ``(p - e_k) x^T``;
* training Hessian: ``(1/n) sum_i (diag p_i - p_i p_i^T) (x) x_i x_i^T + weight_decay I``;
* ISAL score with ``S`` = s_test reshaped to C x D and ``q = S x``:
  ``-sum_{k in topK} p_k (p . q - q_k)``.

No autograd anywhere: one matrix product per batch, so scoring is as fast as reading the
features. Parameters are flattened row-major (class by class).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from isal_backend.influence.base import InfluenceProblem, check_top_k


def augment(features: torch.Tensor) -> torch.Tensor:
    """Append the constant 1 that carries the bias."""
    ones = torch.ones(features.shape[0], 1, dtype=features.dtype, device=features.device)
    return torch.cat([features, ones], dim=1)


@dataclass
class LinearHead:
    """A trained softmax head; ``weight`` is C x (d + 1), its last column the bias."""

    weight: torch.Tensor

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @property
    def feature_dim(self) -> int:
        return self.weight.shape[1] - 1

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(features.dtype)
        return features @ w[:, :-1].T + w[:, -1]

    def probs(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(features), dim=1)


def fit_linear_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    weight_decay: float = 1e-3,
    max_iter: int = 200,
    init: LinearHead | None = None,
    sample_weight: torch.Tensor | None = None,
) -> LinearHead:
    """Minimise mean cross-entropy + ``weight_decay/2 ||W||^2`` (bias included) by L-BFGS.

    The problem is strictly convex, so the optimum is unique and the Hessian at it is exactly
    the one :class:`HeadInfluence` uses; ``init`` warm-starts from a previous round.
    """
    if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"features must be n x d and labels n, got {tuple(features.shape)} and {tuple(labels.shape)}"
        )
    if features.shape[0] == 0:
        raise ValueError("cannot fit a head on zero labeled samples")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    x = augment(features)
    if init is not None and init.weight.shape == (num_classes, x.shape[1]):
        weight = init.weight.detach().to(x.dtype).clone()
    else:
        weight = torch.zeros(num_classes, x.shape[1], dtype=x.dtype)
    weight.requires_grad_(True)
    w_samples = None if sample_weight is None else sample_weight.to(x.dtype)
    optimizer = torch.optim.LBFGS(
        [weight], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
        history_size=20, line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        per_sample = F.cross_entropy(x @ weight.T, labels, reduction="none")
        data = per_sample.mean() if w_samples is None else (per_sample * w_samples).sum() / w_samples.sum()
        loss = data + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return LinearHead(weight.detach())


class HeadInfluence(InfluenceProblem):
    """Influence over the parameters of a :class:`LinearHead`, in closed form."""

    def __init__(
        self,
        head: LinearHead,
        train_features: torch.Tensor,
        reference_features: torch.Tensor,
        reference_labels: torch.Tensor,
        pool_features: torch.Tensor,
        weight_decay: float,
        reference_weights: torch.Tensor | None = None,
        score_batch_size: int = 65536,
    ) -> None:
        dtype = head.weight.dtype
        self.head = head
        self.weight_decay = weight_decay
        self.train_x = augment(train_features.to(dtype))
        self.train_p = head.probs(train_features.to(dtype))
        self.ref_x = augment(reference_features.to(dtype))
        self.ref_y = reference_labels
        self.ref_w = None if reference_weights is None else reference_weights.to(dtype)
        self.pool_features = pool_features
        self.score_batch_size = score_batch_size

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def dim(self) -> int:
        return self.head.weight.numel()

    @property
    def num_train(self) -> int:
        return self.train_x.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    def _shape(self, vector: torch.Tensor) -> torch.Tensor:
        return vector.reshape(self.head.weight.shape)

    def reference_gradient(self) -> torch.Tensor:
        probs = torch.softmax(self.ref_x @ self.head.weight.T, dim=1)
        residual = probs - F.one_hot(self.ref_y, self.num_classes).to(probs.dtype)
        if self.ref_w is not None:
            residual = residual * self.ref_w[:, None]
        return (residual.T @ self.ref_x).reshape(-1)

    def hvp(self, vector: torch.Tensor, batch: torch.Tensor | None = None) -> torch.Tensor:
        x = self.train_x if batch is None else self.train_x[batch]
        p = self.train_p if batch is None else self.train_p[batch]
        v = self._shape(vector)
        z = x @ v.T  # n x C: V x_i
        y = p * z - p * (p * z).sum(dim=1, keepdim=True)  # (diag p - p p^T) V x_i
        out = (y.T @ x) / x.shape[0]
        return out.reshape(-1) + self.weight_decay * vector

    def ggn_vp(self, vector: torch.Tensor) -> torch.Tensor:
        """The Gauss-Newton matrix IS the Hessian here: the loss is convex in the logits, which are linear in W."""
        return self.hvp(vector)

    def dense_curvature(self, curvature: str = "hessian") -> torch.Tensor:
        """Closed form of the dense Hessian (= Gauss-Newton), block (a, b) = mean_i A_i[a,b] x_i x_i^T."""
        x, p = self.train_x, self.train_p
        c, d = self.head.weight.shape
        hessian = torch.zeros(c, d, c, d, dtype=x.dtype)
        for a in range(c):
            for b in range(a, c):
                w = p[:, a] * (float(a == b) - p[:, b])
                block = (x * w[:, None]).T @ x
                hessian[a, :, b, :] = block
                hessian[b, :, a, :] = block.T
        hessian = hessian.reshape(c * d, c * d) / x.shape[0]
        return hessian + self.weight_decay * torch.eye(c * d, dtype=hessian.dtype)

    def score_features(self, s_test: torch.Tensor, features: torch.Tensor, top_k: int = 1) -> torch.Tensor:
        """ISAL scores of arbitrary feature rows (new tasks are scored this way)."""
        check_top_k(top_k, self.num_classes)
        s = self._shape(s_test).to(self.dtype)
        out = []
        for start in range(0, features.shape[0], self.score_batch_size):
            chunk = features[start : start + self.score_batch_size].to(self.dtype)
            out.append(score_head(self.head, s, chunk, top_k))
        if not out:
            return torch.zeros(0, dtype=self.dtype)
        return torch.cat(out)

    def score(self, s_test: torch.Tensor, top_k: int = 1) -> torch.Tensor:
        return self.score_features(s_test, self.pool_features, top_k)


def score_head(head: LinearHead, s_matrix: torch.Tensor, features: torch.Tensor, top_k: int) -> torch.Tensor:
    """``-sum_{k in topK} p_k (p . q - q_k)`` with ``q = S [h; 1]``: the hot loop of head ISAL."""
    w = head.weight.to(features.dtype)
    s = s_matrix.to(features.dtype)
    logits = torch.addmm(w[:, -1], features, w[:, :-1].T)
    probs = torch.softmax(logits, dim=1)
    q = torch.addmm(s[:, -1], features, s[:, :-1].T)
    pq = (probs * q).sum(dim=1, keepdim=True)
    if top_k == 1:
        pk, k = probs.max(dim=1, keepdim=True)
        return -(pk * (pq - q.gather(1, k))).squeeze(1)
    pk, k = probs.topk(top_k, dim=1)
    return -(pk * (pq - q.gather(1, k))).sum(dim=1)
