"""ISAL influence for FCOS: over the final prediction convs, with everything below them cached.

The influence parameters are FCOS's final convs (``cls_logits``, ``bbox_reg``, ``bbox_ctrness``,
weights and biases; any subset via ``params``), as in the ISAL paper's detection runs. Everything
under them (backbone, FPN, head towers) does not depend on those parameters, so it is computed ONCE
per image: the training and reference images' towers are cached at construction, and a pool image's
towers come from the same forward pass that produces its detections. Gradients and Hessian-vector
products then only re-run three small convs and the loss, which is why scoring costs about one bare
forward pass (the issue measured 1.03-1.15x; recomputing the whole forward costs 2.1x).

Loss. ``l(z)`` is the detector's full FCOS loss (sigmoid focal + GIoU + centerness BCE, each summed
and divided by ``max(1, #foreground locations)``) of image ``z`` ALONE, with torchvision's location
matching. The training loss is ``(1/n) sum_i l(z_i)`` plus ``weight_decay/2 |theta|^2``: per-image
normalisation, which is what LiSSA's batches of one see; training itself runs batches of 4
normalised by the batch's foreground count, a small difference. Targets (matching, one-hot classes,
box and centerness targets) depend only on boxes and locations, so they are precomputed too.

Pseudo-labels. For a pool image the detector's own post-NMS boxes with score >= ``score_threshold``
are the ground truth (the paper's recipe). Default 0.5, not the paper's 0.1: measured on BCCD, a
young model keeps so many weak boxes at 0.1 that every image hit the 100-detection cap, while at 0.5
it kept about 17 boxes against 13 true ones; the gradient of a loss against 100 junk boxes says
little about the labels a person would draw.

Expected gradient. ``weighting="score"`` (default) treats each pseudo box as present with
probability equal to its score: a foreground location matched to box b contributes
``w_b * [focal(positive) + GIoU + centerness] + (1 - w_b) * focal(background)``; locations matched to
nothing are background as usual. That is the expectation of the loss gradient over independent box
presence, the detection analogue of classification's posterior-weighted gradient. ``"none"`` uses the
boxes as hard ground truth.

Images with no surviving box (fallback, documented). ``empty_policy="background"`` (default): the
pseudo-label is "nothing here" and the image is scored with the all-background loss, like any other;
a young detector that is unsure of an image still gets a real, usually small, score, so these images
interleave with the others instead of being lost. ``"zero"``: score 0, i.e. ranked after every image
predicted to help and before every image predicted to hurt. Either way :class:`DetectionScores`
flags them (``no_box``). The paper filled them at random.

Curvature. The Hessian of this loss is INDEFINITE away from a minimum, and a small diagonal damping
does not fix that: measured on a round-sized problem (20 BCCD images at 320 px, 4,616 parameters,
damping 0.01) CG on ``H + damping I`` ended 30 iterations at a relative residual of about 3, i.e. its
"s_test" solved nothing. The exact solve therefore uses the generalised Gauss-Newton matrix (GGN)
``G = (1/n) sum_i J_i^T P(H_out,i) J_i``: ``J_i`` the Jacobian of image i's head outputs with respect
to the final convs, ``H_out,i`` the Hessian of its loss with respect to those outputs, ``P`` the
projection onto the PSD cone (negative eigenvalues set to 0). ``G`` is PSD by construction, so
``G + (weight_decay + damping) I`` is positive definite and CG on it converges. It equals the Hessian
where the loss is convex in the outputs and drops the rest, the standard fix for influence on
non-convex losses (Martens 2014; Bae et al. 2022), and it is cheap here because:

* the outputs are LINEAR in the final convs (the box branch's ReLU only masks ``J``; its second
  derivative is zero almost everywhere), so ``J v`` is the convs run with ``v`` as weights and
  ``J^T u`` one backward through them; no loss graph is rebuilt per product;
* ``H_out`` is block diagonal: focal loss per logit and centerness BCE per foreground location are
  scalars, GIoU a 4x4 block per foreground location (its 4 box distances). It is computed once per
  chunk by 4 double-backward passes and projected block by block (``P`` of a block-diagonal matrix
  is the blockwise ``P``). Where focal loss or GIoU are locally concave those directions get zero
  curvature instead of negative.

G has no entries between the three convs (separate loss terms), and inside the classification and
centerness convs none between output channels either, so its diagonal blocks per conv (at most
``4 * (9C + 1)`` = 2,308 rows for the box conv at C = 64) ARE G. They are assembled once from the
towers' 3x3 patches weighted by ``P(H_out)`` and Cholesky-factored in float64; CG is preconditioned
by that block solve, so it converges in one or two matrix-free products, and each product re-checks
the assembly: the reported residual is the TRUE ``|v - (G + lambda I) s| / |v|`` through ``ggn_vp``,
of the best iterate. Measured on the round-sized problem above: 1 iteration, relative residual
3.4e-7 (float32 products), where plain CG on G reached 0.10 and diagonal-preconditioned CG 0.04 after
30 (G's largest eigenvalue 132, its mean 0.07); building the blocks took about 24 s on 2 busy cores,
against 192 s for the 30 Hessian products of the old solve.

Solving is not done here: :func:`isal_backend.influence.solvers.solve_s_test` with
``SolverConfig(curvature="ggn")`` runs the shared CG on :meth:`DetectionInfluence.ggn_vp`, preconditioned by
:meth:`DetectionInfluence.preconditioner`; the LiSSA "paper" preset keeps the exact Hessian, as the
authors ran it (its own damping of 100); ``curvature="hessian"`` gives plain CG on H for comparison.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, jvp, vjp
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from isal_backend.detection.detector import FINAL_CONVS, LiteFCOS
from isal_backend.influence.base import InfluenceProblem

WEIGHTINGS = ("score", "none")
EMPTY_POLICIES = ("background", "zero")
DEFAULT_SCORE_THRESHOLD = 0.5


def match_locations(
    model: LiteFCOS, anchors: Tensor, boxes: Tensor, num_per_level: Sequence[int]
) -> Tensor:
    """Index of the box each location is responsible for, -1 for background (torchvision FCOS's rule).

    Centre sampling within ``center_sampling_radius`` strides, inside the box, in the level's size
    range; ties go to the smallest box.
    """
    if boxes.numel() == 0:
        return torch.full((anchors.shape[0],), -1, dtype=torch.int64)
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2
    anchor_centers = (anchors[:, :2] + anchors[:, 2:]) / 2
    sizes = anchors[:, 2] - anchors[:, 0]
    match = (anchor_centers[:, None, :] - centers[None]).abs().max(dim=2).values < (
        model.center_sampling_radius * sizes[:, None]
    )
    x, y = anchor_centers.unsqueeze(2).unbind(1)
    x0, y0, x1, y1 = boxes.unsqueeze(0).unbind(2)
    dist = torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=2)
    match &= dist.min(dim=2).values > 0
    lower = sizes * 4
    lower[: num_per_level[0]] = 0
    upper = sizes * 8
    upper[-num_per_level[-1] :] = float("inf")
    far = dist.max(dim=2).values
    match &= (far > lower[:, None]) & (far < upper[:, None])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    # Same arithmetic as torchvision (float32 mask times box-dtype areas), so ties break alike.
    weighted = match.to(torch.float32) * (1e8 - areas[None, :])
    best, idx = weighted.max(dim=1)
    idx[best < 1e-5] = -1
    return idx


@dataclass
class _Chunk:
    """Cached towers and fixed targets of a group of images of equal padded size."""

    cls: list[Tensor]
    reg: list[Tensor]
    onehot: Tensor  # (n, A, K)
    fg_index: Tensor  # (F,) flat location index into n*A
    fg_image: Tensor  # (F,) image within the chunk
    fg_label: Tensor  # (F,)
    fg_anchor: Tensor  # (F, 4)
    fg_box: Tensor  # (F, 4)
    fg_ctr: Tensor  # (F,)
    fg_weight: Tensor  # (F,)
    norm: Tensor  # (n,)

    @property
    def size(self) -> int:
        return self.onehot.shape[0]

    def select(self, rows: Tensor) -> _Chunk:
        """The sub-chunk of the given local image rows (for LiSSA's mini-batches)."""
        rows = rows.to(torch.int64)
        remap = torch.full((self.size,), -1, dtype=torch.int64)
        remap[rows] = torch.arange(len(rows))
        keep = remap[self.fg_image] >= 0
        locations = self.onehot.shape[1]
        new_image = remap[self.fg_image[keep]]
        new_index = new_image * locations + self.fg_index[keep] % locations
        return _Chunk(
            [t[rows] for t in self.cls], [t[rows] for t in self.reg], self.onehot[rows], new_index, new_image,
            self.fg_label[keep], self.fg_anchor[keep], self.fg_box[keep], self.fg_ctr[keep], self.fg_weight[keep],
            self.norm[rows],
        )


@dataclass
class _OutputCurvature:
    """``P(H_out)`` of a chunk, block by block, and the box branch's ReLU mask (all fixed per chunk)."""

    cls: Tensor  # (n, A, K) focal-loss curvature per logit, >= 0
    reg: Tensor  # (F, 4, 4) GIoU curvature per foreground location, PSD
    ctr: Tensor  # (F,) centerness BCE curvature per foreground location, >= 0
    mask: Tensor  # (n, A, 4) 1 where the box branch's ReLU passes


@dataclass
class DetectionScores:
    """What one scoring pass over pool images gives: ISAL scores and the detections it used."""

    scores: Tensor  # (n,) -s^T G_z; most negative = most valuable
    no_box: Tensor  # (n,) bool: no pseudo box survived the threshold (fallback applied)
    num_boxes: Tensor  # (n,) pseudo boxes used
    mean_confidence: Tensor  # (n,) mean detection score over all post-NMS boxes, 0 if none
    detections: list[dict[str, Tensor]] = field(default_factory=list)  # in input pixels, all scores


class DetectionInfluence(InfluenceProblem):
    """ISAL over FCOS's final prediction convs; see the module docstring for every definition."""

    def __init__(
        self,
        model: LiteFCOS,
        train_images: Sequence[Tensor],
        train_targets: Sequence[Mapping[str, Tensor]],
        reference_images: Sequence[Tensor],
        reference_targets: Sequence[Mapping[str, Tensor]],
        pool_images: Sequence[Tensor] = (),
        params: Sequence[str] = tuple(FINAL_CONVS),
        score_threshold: float = DEFAULT_SCORE_THRESHOLD,
        weighting: str = "score",
        weight_decay: float = 1e-4,
        damping: float = 0.0,
        empty_policy: str = "background",
        batch_size: int = 8,
    ) -> None:
        unknown = [p for p in params if p not in FINAL_CONVS]
        if unknown or not params:
            raise ValueError(f"influence params must be a non-empty subset of {list(FINAL_CONVS)}, got {list(params)}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if empty_policy not in EMPTY_POLICIES:
            raise ValueError(f"empty_policy must be one of {EMPTY_POLICIES}, got {empty_policy!r}")
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
        self.model = model.eval()
        self.groups = list(params)
        all_params = {k: v.detach() for k, v in model.final_params().items()}
        self.names = [f"{g}.{w}" for g in self.groups for w in ("weight", "bias")]
        self.params = {n: all_params[n] for n in self.names}
        self.fixed = {n: v for n, v in all_params.items() if n not in self.params}
        self.shapes = [p.shape for p in self.params.values()]
        self.sizes = [p.numel() for p in self.params.values()]
        self.score_threshold = score_threshold
        self.weighting = weighting
        self.weight_decay = weight_decay + damping
        self.empty_policy = empty_policy
        self.batch_size = batch_size
        self.pool_images = list(pool_images)
        self.train_chunks = self._encode(train_images, train_targets)
        self.ref_chunks = self._encode(reference_images, reference_targets)
        self._num_train = len(train_images)
        self._ref_grad: Tensor | None = None
        self._curvature: dict[int, _OutputCurvature] = {}
        self._blocks: dict[str, Tensor] | None = None

    # -- flat <-> dict ---------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return sum(self.sizes)

    @property
    def num_train(self) -> int:
        return self._num_train

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    def _unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        parts = torch.split(flat.to(self.dtype), self.sizes)
        return {n: p.reshape(s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}

    @staticmethod
    def _flatten(tensors: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1) for t in tensors.values()])

    # -- caching ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _encode(self, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]]) -> list[_Chunk]:
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images for {len(targets)} targets")
        chunks = []
        for start in range(0, len(images), self.batch_size):
            floats = [im.to(self.dtype) for im in self.model.to_float(images[start : start + self.batch_size])]
            tg = [{"boxes": t["boxes"].to(self.dtype), "labels": t["labels"]} for t in
                  targets[start : start + self.batch_size]]
            image_list, resized = self.model.transform(floats, tg)
            cls, reg = self.model.towers(image_list)
            anchors, per_level = self.model.anchors_for(image_list, cls)
            weights = [torch.ones(len(t["labels"]), dtype=self.dtype) for t in resized]
            chunks.append(self._targets(cls, reg, anchors, per_level, resized, weights))
        return chunks

    def _targets(
        self,
        cls: list[Tensor],
        reg: list[Tensor],
        anchors: Sequence[Tensor],
        per_level: Sequence[int],
        targets: Sequence[Mapping[str, Tensor]],
        weights: Sequence[Tensor],
    ) -> _Chunk:
        """Fixed loss targets of a chunk: matching, one-hot classes, box and centerness targets."""
        n, locations, k = len(targets), anchors[0].shape[0], self.model.config.num_classes
        onehot = torch.zeros(n, locations, k, dtype=self.dtype)
        fg_index, fg_image, fg_label, fg_anchor, fg_box, fg_weight = [], [], [], [], [], []
        norm = torch.ones(n, dtype=self.dtype)
        for i, (a, t, w) in enumerate(zip(anchors, targets, weights, strict=True)):
            matched = match_locations(self.model, a, t["boxes"], per_level)
            fg = torch.nonzero(matched >= 0).flatten()
            labels = t["labels"][matched[fg]]
            onehot[i, fg, labels] = 1.0
            fg_index.append(i * locations + fg)
            fg_image.append(torch.full((len(fg),), i, dtype=torch.int64))
            fg_label.append(labels)
            fg_anchor.append(a[fg])
            fg_box.append(t["boxes"][matched[fg]])
            fg_weight.append(w[matched[fg]])
            norm[i] = max(1, len(fg))
        fg_anchor_t = torch.cat(fg_anchor).to(self.dtype).reshape(-1, 4)
        fg_box_t = torch.cat(fg_box).to(self.dtype).reshape(-1, 4)
        codes = self.model.box_coder.encode(fg_anchor_t, fg_box_t) if len(fg_box_t) else fg_box_t
        lr, tb = codes[:, [0, 2]], codes[:, [1, 3]]
        ctr = torch.sqrt((lr.min(-1).values / lr.max(-1).values) * (tb.min(-1).values / tb.max(-1).values))
        return _Chunk(
            cls, reg, onehot, torch.cat(fg_index), torch.cat(fg_image), torch.cat(fg_label), fg_anchor_t, fg_box_t,
            ctr, torch.cat(fg_weight).to(self.dtype), norm,
        )

    # -- the loss --------------------------------------------------------------------------------
    def losses(self, params: Mapping[str, Tensor], chunk: _Chunk) -> Tensor:
        """Per-image loss ``l(z_i)`` of a chunk as a function of the influence params, shape ``(n,)``."""
        return self.losses_from_outputs(LiteFCOS.final_outputs({**self.fixed, **params}, chunk.cls, chunk.reg), chunk)

    def losses_from_outputs(self, out: Mapping[str, Tensor], chunk: _Chunk) -> Tensor:
        """Per-image loss from the head outputs (cls_logits, bbox_regression, bbox_ctrness)."""
        logits = out["cls_logits"]
        k = logits.shape[-1]
        total = sigmoid_focal_loss(logits, chunk.onehot, reduction="none").sum(dim=(1, 2))
        if chunk.fg_index.numel():
            w = chunk.fg_weight
            fg_logit = logits.reshape(-1, k)[chunk.fg_index, chunk.fg_label]
            ones = torch.ones_like(fg_logit)
            switch = sigmoid_focal_loss(fg_logit, 0 * ones, reduction="none") - sigmoid_focal_loss(
                fg_logit, ones, reduction="none"
            )
            pred = self.model.box_coder.decode(out["bbox_regression"].reshape(-1, 4)[chunk.fg_index], chunk.fg_anchor)
            giou = generalized_box_iou_loss(pred, chunk.fg_box, reduction="none")
            ctr = F.binary_cross_entropy_with_logits(
                out["bbox_ctrness"].reshape(-1)[chunk.fg_index], chunk.fg_ctr, reduction="none"
            )
            per_fg = (1 - w) * switch + w * (giou + ctr)
            total = total + torch.zeros_like(total).index_add(0, chunk.fg_image, per_fg)
        return total / chunk.norm

    # -- the InfluenceProblem contract -----------------------------------------------------------
    def reference_gradient(self) -> Tensor:
        if self._ref_grad is None:
            total = torch.zeros(self.dim, dtype=self.dtype)
            for chunk in self.ref_chunks:
                g = grad(lambda p, c=chunk: self.losses(p, c).sum())(self.params)
                total += self._flatten(g)
            self._ref_grad = total
        return self._ref_grad

    def hvp(self, vector: Tensor, batch: Tensor | None = None) -> Tensor:
        tangent = self._unflatten(vector)
        total = torch.zeros(self.dim, dtype=self.dtype)
        count = 0
        offset = 0
        for chunk in self.train_chunks:
            part = chunk
            if batch is not None:
                local = batch[(batch >= offset) & (batch < offset + chunk.size)] - offset
                offset += chunk.size
                if local.numel() == 0:
                    continue
                part = chunk.select(local)
            count += part.size
            _, hv = jvp(lambda p, c=part: grad(lambda q: self.losses(q, c).sum())(p), (self.params,), (tangent,))
            total += self._flatten(hv)
        return total / max(count, 1) + self.weight_decay * vector.to(self.dtype)

    def preconditioner(self, curvature: str = "hessian") -> Callable[[Tensor], Tensor] | None:
        """The exact per-conv block solve of ``G + weight_decay I`` (see the module docstring); none for H."""
        return self.ggn_block_solve() if curvature == "ggn" else None

    def dense_curvature(self, curvature: str = "hessian") -> Tensor:
        if curvature == "ggn":
            return self.dense_ggn()
        return self.dense_hessian()

    def dense_hessian(self) -> Tensor:
        """``H + weight_decay I`` by ``torch.func.hessian`` per chunk (vectorised; for small ``dim`` only)."""
        flat0 = self._flatten(self.params)
        total = torch.zeros(self.dim, self.dim, dtype=self.dtype)
        for chunk in self.train_chunks:
            total += torch.func.hessian(lambda f, c=chunk: self.losses(self._unflatten(f), c).sum())(flat0)
        return total / max(self.num_train, 1) + self.weight_decay * torch.eye(self.dim, dtype=self.dtype)

    # -- generalised Gauss-Newton curvature (PSD; what the exact solve uses) -----------------------
    def _linear_outputs(
        self, params: Mapping[str, Tensor], cls: Sequence[Tensor], reg: Sequence[Tensor], mask: Tensor
    ) -> dict[str, Tensor]:
        """``J v`` with ``v = params``: the final convs with the other final params zeroed, the ReLU as a fixed mask."""
        zero = {n: torch.zeros_like(t) for n, t in self.fixed.items()}
        out = LiteFCOS.final_outputs({**zero, **params}, cls, reg, raw_reg=True)
        out["bbox_regression"] = out["bbox_regression"] * mask
        return out

    def output_curvature(self, chunk: _Chunk) -> _OutputCurvature:
        """``P(H_out)`` of a chunk's loss with respect to its head outputs, by blocks (see the module docstring)."""
        with torch.no_grad():
            raw = LiteFCOS.final_outputs({**self.fixed, **self.params}, chunk.cls, chunk.reg, raw_reg=True)
        mask = (raw["bbox_regression"] > 0).to(self.dtype)
        leaves = {"cls_logits": raw["cls_logits"], "bbox_regression": F.relu(raw["bbox_regression"]),
                  "bbox_ctrness": raw["bbox_ctrness"]}
        leaves = {k: t.detach().requires_grad_(True) for k, t in leaves.items()}
        fg = chunk.fg_index
        with torch.enable_grad():
            loss = self.losses_from_outputs(leaves, chunk).sum()
            names = ["cls_logits", "bbox_regression", "bbox_ctrness"] if fg.numel() else ["cls_logits"]
            firsts = torch.autograd.grad(loss, [leaves[k] for k in names], create_graph=True)

            def second(i: int, cotangent: Tensor) -> Tensor:
                if not firsts[i].requires_grad:  # constant first derivative: no curvature
                    return torch.zeros_like(cotangent)
                (out,) = torch.autograd.grad(firsts[i], leaves[names[i]], cotangent, retain_graph=True,
                                             allow_unused=True, materialize_grads=True)
                return out.detach()

            # focal loss and BCE act on each output alone: one pass with a cotangent of ones is the diagonal
            cls = second(0, torch.ones_like(leaves["cls_logits"])).clamp_min(0)
            if not fg.numel():
                empty = torch.zeros(0, dtype=self.dtype)
                return _OutputCurvature(cls, empty.reshape(0, 4, 4), empty, mask)
            ctr = second(2, torch.ones_like(leaves["bbox_ctrness"])).reshape(-1)[fg].clamp_min(0)
            # GIoU couples the 4 distances of a location: column j of every 4x4 block in one pass
            columns = []
            for j in range(4):
                e = torch.zeros_like(leaves["bbox_regression"])
                e[..., j] = 1.0
                columns.append(second(1, e).reshape(-1, 4)[fg])
        blocks = torch.stack(columns, dim=2)
        blocks = 0.5 * (blocks + blocks.transpose(1, 2))
        values, vectors = torch.linalg.eigh(blocks)
        reg = (vectors * values.clamp_min(0).unsqueeze(1)) @ vectors.transpose(1, 2)
        return _OutputCurvature(cls, reg, ctr, mask)

    def _chunk_curvature(self, index: int) -> _OutputCurvature:
        if index not in self._curvature:
            self._curvature[index] = self.output_curvature(self.train_chunks[index])
        return self._curvature[index]

    def _apply_output_curvature(self, curv: _OutputCurvature, jv: Mapping[str, Tensor], chunk: _Chunk) -> dict:
        fg = chunk.fg_index
        reg = torch.zeros_like(jv["bbox_regression"]).reshape(-1, 4)
        ctr = torch.zeros_like(jv["bbox_ctrness"]).reshape(-1)
        if fg.numel():
            reg[fg] = (curv.reg @ jv["bbox_regression"].reshape(-1, 4)[fg].unsqueeze(2)).squeeze(2)
            ctr[fg] = curv.ctr * jv["bbox_ctrness"].reshape(-1)[fg]
        return {"cls_logits": curv.cls * jv["cls_logits"], "bbox_regression": reg.reshape(jv["bbox_regression"].shape),
                "bbox_ctrness": ctr.reshape(jv["bbox_ctrness"].shape)}

    def ggn_vp(self, vector: Tensor) -> Tensor:
        """``(G + weight_decay I) vector`` with G the PSD Gauss-Newton matrix of the training loss (all images)."""
        tangent = self._unflatten(vector)
        total = torch.zeros(self.dim, dtype=self.dtype)
        for index, chunk in enumerate(self.train_chunks):
            curv = self._chunk_curvature(index)
            jv, pull = vjp(lambda p, c=chunk, m=curv.mask: self._linear_outputs(p, c.cls, c.reg, m), tangent)
            total += self._flatten(pull(self._apply_output_curvature(curv, jv, chunk))[0])
        return total / max(self.num_train, 1) + self.weight_decay * vector.to(self.dtype)

    def ggn_blocks(self) -> dict[str, Tensor]:
        """``G + weight_decay I`` restricted to each final conv (weights then bias, in the flat order), float64.

        G has no entries BETWEEN the convs (their outputs enter separate loss terms), so these blocks are
        all of G. Output o at location l is ``mask[l,o] * (W_o . patch_l + b_o)``, so the block of a conv is
        ``sum_l sum_{o,p} H_l[o,p] m_lo m_lp (patch_l;1)(patch_l;1)^T`` at rows (o, .) and columns (p, .).
        """
        if self._blocks is None:
            n = max(self.num_train, 1)
            blocks: dict[str, Tensor] = {}
            for group in self.groups:
                weight = self.params[f"{group}.weight"]
                outs, width = weight.shape[0], weight[0].numel()
                total = torch.zeros(outs, width + 1, outs, width + 1, dtype=torch.float64)
                for index, chunk in enumerate(self.train_chunks):
                    curv = self._chunk_curvature(index)
                    towers = chunk.cls if group == "cls_logits" else chunk.reg
                    patches = torch.cat([F.unfold(t, 3, padding=1).transpose(1, 2) for t in towers], dim=1)
                    patches = torch.cat([patches, torch.ones_like(patches[..., :1])], dim=2).double()
                    patches = patches.reshape(-1, width + 1)
                    if group == "cls_logits":  # diagonal output curvature at every location
                        h = curv.cls.reshape(-1, outs).double()
                        for o in range(outs):
                            total[o, :, o] += patches.T @ (h[:, o : o + 1] * patches)
                        continue
                    rows = patches[chunk.fg_index]
                    if group == "bbox_reg":
                        m = curv.mask.reshape(-1, 4)[chunk.fg_index].double()
                        h = curv.reg.double() * m[:, :, None] * m[:, None, :]
                    else:
                        h = curv.ctr.double().reshape(-1, 1, 1)
                    for o in range(outs):
                        for q in range(outs):
                            total[o, :, q] += rows.T @ (h[:, o, q : q + 1] * rows)
                # (o, j) with j = width the bias -> the flat order: all weights (o-major), then the biases
                order = [o * (width + 1) + j for o in range(outs) for j in range(width)]
                order += [o * (width + 1) + width for o in range(outs)]
                dense = total.reshape(outs * (width + 1), -1)[order][:, order] / n
                blocks[group] = dense + self.weight_decay * torch.eye(len(order), dtype=torch.float64)
            self._blocks = blocks
        return self._blocks

    def ggn_block_solve(self) -> Callable[[Tensor], Tensor]:
        """``x -> (G + weight_decay I)^-1 x`` by a Cholesky factor of each conv's block (float64)."""
        factors = [torch.linalg.cholesky(0.5 * (m + m.T)) for m in self.ggn_blocks().values()]
        sizes = [f.shape[0] for f in factors]

        def solve(x: Tensor) -> Tensor:
            parts = torch.split(x.double(), sizes)
            out = [torch.cholesky_solve(p.unsqueeze(1), f).squeeze(1) for p, f in zip(parts, factors, strict=True)]
            return torch.cat(out).to(x.dtype)

        return solve

    def dense_ggn(self) -> Tensor:
        """``G + weight_decay I`` as a dense matrix from ``dim`` products (small problems only)."""
        eye = torch.eye(self.dim, dtype=self.dtype)
        matrix = torch.stack([self.ggn_vp(eye[i]) for i in range(self.dim)], dim=1)
        return 0.5 * (matrix + matrix.T)

    def score(self, s_test: Tensor, top_k: int = 1) -> Tensor:
        """Scores of the constructor's pool; ``top_k`` has no meaning here (every surviving box is used)."""
        return self.score_images(s_test, self.pool_images).scores

    @torch.no_grad()
    def pseudo_targets(self, detections: Sequence[Mapping[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Post-NMS boxes with score >= threshold (degenerate ones dropped): the pseudo ground truth."""
        out = []
        for det in detections:
            keep = det["scores"] >= self.score_threshold
            boxes = det["boxes"][keep]
            keep2 = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            out.append({"boxes": boxes[keep2], "labels": det["labels"][keep][keep2],
                        "scores": det["scores"][keep][keep2]})
        return out

    def score_images(self, s_test: Tensor, images: Sequence[Tensor]) -> DetectionScores:
        """One forward pass per batch gives detections, pseudo-labels and ``-s^T G_z`` for each image."""
        tangent = self._unflatten(s_test)
        scores, no_box, counts, confidence, detections = [], [], [], [], []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            with torch.no_grad():
                image_list, sizes = self.model.prepare(batch)
                cls, reg = self.model.towers(image_list)
                anchors, per_level = self.model.anchors_for(image_list, cls)
                outputs = LiteFCOS.final_outputs({**self.fixed, **self.params}, cls, reg)
                dets = self.model.detect(outputs, anchors, per_level, image_list)
                pseudo = self.pseudo_targets(dets)
                weights = [
                    p["scores"].to(self.dtype) if self.weighting == "score" else torch.ones(len(p["scores"]))
                    for p in pseudo
                ]
                chunk = self._targets(cls, reg, anchors, per_level, pseudo, weights)
            directional = self._directional(outputs, cls, reg, tangent, chunk)
            empty = torch.tensor([len(p["labels"]) == 0 for p in pseudo])
            value = -directional.detach()
            if self.empty_policy == "zero":
                value = torch.where(empty, torch.zeros_like(value), value)
            scores.append(value)
            no_box.append(empty)
            counts.append(torch.tensor([len(p["labels"]) for p in pseudo]))
            confidence.append(torch.stack([d["scores"].mean() if len(d["scores"]) else torch.zeros((), dtype=self.dtype)
                                           for d in dets]).to(self.dtype))
            detections += self.model.transform.postprocess(dets, image_list.image_sizes, sizes)
        if not scores:
            empty_t = torch.zeros(0, dtype=self.dtype)
            none = torch.zeros(0, dtype=torch.int64)
            return DetectionScores(empty_t, none.bool(), none, empty_t)
        return DetectionScores(torch.cat(scores), torch.cat(no_box), torch.cat(counts), torch.cat(confidence),
                               detections)


    def _directional(
        self, outputs: Mapping[str, Tensor], cls: Sequence[Tensor], reg: Sequence[Tensor],
        tangent: Mapping[str, Tensor], chunk: _Chunk,
    ) -> Tensor:
        """``s^T grad l(z_i)`` for each image, reusing the detection pass's outputs.

        The outputs are linear in the final convs' parameters, so their derivative along ``s`` is the
        same convs run with ``s`` as weights (masked by the ReLU of the box branch); the loss is
        differentiated once with respect to the outputs. No second pass through the primal convs.
        """
        zero = {n: torch.zeros_like(v) for n, v in self.fixed.items()}
        with torch.no_grad():
            d_out = LiteFCOS.final_outputs({**zero, **tangent}, cls, reg, raw_reg=True)
            d_out["bbox_regression"] = d_out["bbox_regression"] * (outputs["bbox_regression"] > 0)
        leaves = {k: v.detach().requires_grad_(True) for k, v in outputs.items()}
        with torch.enable_grad():
            loss = self.losses_from_outputs(leaves, chunk)
            grads = torch.autograd.grad(loss.sum(), list(leaves.values()), allow_unused=True, materialize_grads=True)
        return sum((g * d_out[k]).flatten(1).sum(dim=1) for g, k in zip(grads, leaves, strict=True))
