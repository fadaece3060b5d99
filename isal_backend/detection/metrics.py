"""mAP@0.5, Pascal VOC style (all-point interpolation, as VOC2010 onwards).

torchvision ships no mAP and pycocotools/torchmetrics are not dependencies, so it is implemented
here, small and tested on hand-made cases. Per class: detections of all images sorted by score
(stable, so ties keep input order), each matched greedily to the unmatched ground-truth box of the
same image with the highest IoU >= threshold; a second detection of a matched box is a false
positive; AP is the area under the precision envelope. mAP averages over the classes that have at
least one ground-truth box (a class never present has undefined recall and is left out).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the monotone precision envelope (VOC 2010+ all-point interpolation)."""
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    steps = np.flatnonzero(r[1:] != r[:-1])
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def mean_average_precision(
    predictions: Sequence[Mapping[str, torch.Tensor]],
    ground_truth: Sequence[Mapping[str, torch.Tensor]],
    num_classes: int,
    iou_threshold: float = 0.5,
) -> dict[str, object]:
    """``{"map": float, "ap": [per class or None], "num_gt": [...]}``.

    ``predictions[i]``: boxes (n, 4), scores (n,), labels (n,); ``ground_truth[i]``: boxes, labels
    and optionally ``difficult`` (bool; neither a hit nor a miss, as in VOC).
    """
    if len(predictions) != len(ground_truth):
        raise ValueError(f"{len(predictions)} predictions for {len(ground_truth)} ground-truth images")
    aps: list[float | None] = []
    counts: list[int] = []
    for c in range(num_classes):
        records: list[tuple[float, int, int]] = []  # (score, image, detection index)
        gts: list[torch.Tensor] = []
        difficult: list[torch.Tensor] = []
        npos = 0
        for i, (pred, gt) in enumerate(zip(predictions, ground_truth, strict=True)):
            gmask = torch.as_tensor(gt["labels"]) == c
            gboxes = torch.as_tensor(gt["boxes"], dtype=torch.float64).reshape(-1, 4)[gmask]
            diff = torch.as_tensor(gt.get("difficult", torch.zeros(len(gmask), dtype=torch.bool)), dtype=torch.bool)
            diff = diff[gmask]
            gts.append(gboxes)
            difficult.append(diff)
            npos += int((~diff).sum())
            pmask = torch.as_tensor(pred["labels"]) == c
            scores = torch.as_tensor(pred["scores"], dtype=torch.float64)[pmask]
            idx = torch.nonzero(pmask).flatten()
            records += [(float(s), i, int(j)) for s, j in zip(scores.tolist(), idx.tolist(), strict=True)]
        counts.append(npos)
        if npos == 0:
            aps.append(None)
            continue
        order = sorted(range(len(records)), key=lambda k: -records[k][0])
        used = [torch.zeros(len(g), dtype=torch.bool) for g in gts]
        tp = np.zeros(len(order))
        fp = np.zeros(len(order))
        for rank, k in enumerate(order):
            _, i, j = records[k]
            box = torch.as_tensor(predictions[i]["boxes"], dtype=torch.float64).reshape(-1, 4)[j : j + 1]
            if len(gts[i]) == 0:
                fp[rank] = 1
                continue
            ious = box_iou(box, gts[i])[0]
            best = int(torch.argmax(ious))
            if float(ious[best]) < iou_threshold:
                fp[rank] = 1
            elif difficult[i][best]:
                continue  # neither
            elif used[i][best]:
                fp[rank] = 1
            else:
                used[i][best] = True
                tp[rank] = 1
        ctp, cfp = np.cumsum(tp), np.cumsum(fp)
        recall = ctp / npos
        precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
        aps.append(average_precision(recall, precision) if len(order) else 0.0)
    valid = [a for a in aps if a is not None]
    return {"map": float(np.mean(valid)) if valid else float("nan"), "ap": aps, "num_gt": counts}
