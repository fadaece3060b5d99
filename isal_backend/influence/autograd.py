"""Influence over any named parameter subset of a torch model, with ``torch.func``.

This is the authors' setting ("all conv and linear weights, not BN, not biases") and anything
smaller. Two ways to get ``s^T G_z``, equal in exact arithmetic:

* ``"jvp"`` (default): ``s^T grad L(z, k) = p . dl - dl_k`` with ``dl`` the forward-mode
  directional derivative of the logits along ``s``; one forward-mode pass per batch gives it
  for every sample and every pseudo-label;
* ``"per_sample"``: explicit per-sample gradients with ``vmap(grad)``, the authors' way, kept
  as a reference and for checking.

The Hessian-vector product is forward-over-reverse (``jvp`` of ``grad``) on the mean training
loss, in batches, plus the weight decay.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from isal_backend.influence.base import InfluenceProblem, check_top_k

#: Parameter-set names understood by :func:`select_parameters`.
PARAMETER_SETS = ("all-conv-linear", "last-linear")


def select_parameters(model: nn.Module, spec: str | Sequence[str]) -> list[str]:
    """Names of the parameters influence is taken over.

    ``"all-conv-linear"``: every conv and linear WEIGHT (the ISAL authors' choice);
    ``"last-linear"``: weight and bias of the last ``nn.Linear``; a list: parameter names or
    module-name prefixes.
    """
    if spec == "all-conv-linear":
        names = [
            f"{mod_name}.weight" if mod_name else "weight"
            for mod_name, module in model.named_modules()
            if isinstance(module, nn.Conv2d | nn.Linear) and module.weight.requires_grad
        ]
    elif spec == "last-linear":
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linear:
            raise ValueError("the model has no nn.Linear layer for parameter set 'last-linear'")
        names = [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[0] == linear[-1]]
    elif isinstance(spec, str):
        raise ValueError(f"unknown parameter set {spec!r}: use one of {PARAMETER_SETS} or a list of names")
    else:
        all_names = [n for n, _ in model.named_parameters()]
        names = [n for n in all_names if any(n == s or n.startswith(s.rstrip(".") + ".") for s in spec)]
        missing = [s for s in spec if not any(n == s or n.startswith(s.rstrip(".") + ".") for n in all_names)]
        if missing:
            raise ValueError(f"no parameters match {missing}; the model has e.g. {all_names[:5]}")
    if not names:
        raise ValueError(f"parameter set {spec!r} selects no parameter of the model")
    return names


class AutogradInfluence(InfluenceProblem):
    """Influence of pool samples on a reference loss over ``param_names`` of ``model``."""

    def __init__(
        self,
        model: nn.Module,
        param_names: Sequence[str],
        train_inputs: torch.Tensor,
        train_labels: torch.Tensor,
        reference_inputs: torch.Tensor,
        reference_labels: torch.Tensor,
        pool_inputs: torch.Tensor,
        weight_decay: float = 0.0,
        batch_size: int = 128,
        method: str = "jvp",
    ) -> None:
        if method not in ("jvp", "per_sample"):
            raise ValueError(f"unknown scoring method {method!r}: use 'jvp' or 'per_sample'")
        self.model = model.eval()
        named = dict(model.named_parameters())
        self.names = list(param_names)
        self.params = {n: named[n].detach() for n in self.names}
        self.frozen = {n: p.detach() for n, p in named.items() if n not in self.params}
        self.frozen.update({n: b for n, b in model.named_buffers()})
        self.shapes = [p.shape for p in self.params.values()]
        self.sizes = [p.numel() for p in self.params.values()]
        self.weight_decay = weight_decay
        self.train_inputs, self.train_labels = train_inputs, train_labels
        self.ref_inputs, self.ref_labels = reference_inputs, reference_labels
        self.pool_inputs = pool_inputs
        self.batch_size = batch_size
        self.method = method
        self.num_classes = int(self._logits(self.params, pool_inputs[:1]).shape[1]) if len(pool_inputs) else 0

    # -- flat <-> dict -------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return sum(self.sizes)

    @property
    def num_train(self) -> int:
        return self.train_inputs.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    def _unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(flat, self.sizes)
        return {n: part.reshape(shape) for n, part, shape in zip(self.names, parts, self.shapes, strict=True)}

    @staticmethod
    def _flatten(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors.values()])

    def _logits(self, params: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, {**self.frozen, **params}, (inputs,))

    def _batches(self, n: int):
        for start in range(0, n, self.batch_size):
            yield slice(start, start + self.batch_size)

    # -- the InfluenceProblem contract ---------------------------------------------------------
    def reference_gradient(self) -> torch.Tensor:
        def summed_loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self._logits(params, x), y, reduction="sum")

        total = torch.zeros(self.dim, dtype=self.dtype)
        for sl in self._batches(self.ref_inputs.shape[0]):
            g = grad(summed_loss)(self.params, self.ref_inputs[sl], self.ref_labels[sl])
            total += self._flatten(g)
        return total

    def hvp(self, vector: torch.Tensor, batch: torch.Tensor | None = None) -> torch.Tensor:
        inputs = self.train_inputs if batch is None else self.train_inputs[batch]
        labels = self.train_labels if batch is None else self.train_labels[batch]
        n = inputs.shape[0]
        tangent = self._unflatten(vector)

        def summed_loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self._logits(params, x), y, reduction="sum")

        total = torch.zeros_like(vector)
        for sl in self._batches(n):
            _, hv = jvp(
                lambda p, x=inputs[sl], y=labels[sl]: grad(summed_loss)(p, x, y), (self.params,), (tangent,)
            )
            total += self._flatten(hv)
        return total / n + self.weight_decay * vector

    def score(self, s_test: torch.Tensor, top_k: int = 1) -> torch.Tensor:
        return self.score_inputs(s_test, self.pool_inputs, top_k)

    def score_inputs(self, s_test: torch.Tensor, inputs: torch.Tensor, top_k: int = 1) -> torch.Tensor:
        """ISAL scores of arbitrary inputs."""
        check_top_k(top_k, self.num_classes)
        tangent = self._unflatten(s_test.to(self.dtype))
        out = []
        for sl in self._batches(inputs.shape[0]):
            x = inputs[sl]
            if self.method == "jvp":
                logits, dl = jvp(lambda p, x=x: self._logits(p, x), (self.params,), (tangent,))
                probs = torch.softmax(logits, dim=1)
                pk, k = probs.topk(top_k, dim=1)
                directional = (probs * dl).sum(dim=1, keepdim=True) - dl.gather(1, k)
            else:
                with torch.no_grad():
                    probs = torch.softmax(self._logits(self.params, x), dim=1)
                pk, k = probs.topk(top_k, dim=1)
                directional = torch.stack(
                    [self._per_sample_dot(tangent, x, k[:, j]) for j in range(top_k)], dim=1
                )
            out.append(-(pk * directional).sum(dim=1).detach())
        return torch.cat(out) if out else torch.zeros(0, dtype=self.dtype)

    def _per_sample_dot(self, tangent: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        def one_loss(params: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self._logits(params, xi[None]), yi[None])

        grads = vmap(grad(one_loss), in_dims=(None, 0, 0))(self.params, x, y)
        return sum((g.reshape(g.shape[0], -1) * tangent[n].reshape(1, -1)).sum(dim=1) for n, g in grads.items())
