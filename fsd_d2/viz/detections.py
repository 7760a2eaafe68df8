"""Pictures of detections on a CT slice: ground truth and predictions (the paper's Fig. 3) and, given the graph
module's relations, the learned correlations between the predictions (Fig. 4)."""
import os
from typing import Optional, Sequence

import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle


def _np(x, name: str, shape_tail: tuple = ()) -> np.ndarray:
    """Tensor/list -> numpy with a shape check, so a wrong argument fails with its name."""
    a = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    if shape_tail and (a.ndim != 1 + len(shape_tail) or a.shape[1:] != shape_tail):
        if a.size == 0:
            return a.reshape((0,) + shape_tail)
        raise ValueError(f"draw_detections: {name} must have shape (N, {', '.join(map(str, shape_tail))}), "
                         f"got {a.shape}")
    return a


def normalised_correlations(relations: np.ndarray) -> np.ndarray:
    """Symmetrise (A_e is not symmetric; a line has no direction) and min-max scale the off-diagonal to [0, 1].

    Min-max over the pairs shown, because A_e's absolute values shrink with the number of proposals; the
    figure is about which pairs relate more. With a single pair (or all equal) every line is opaque.
    """
    s = (relations + relations.T) / 2.0
    off = s[~np.eye(len(s), dtype=bool)]
    if off.size == 0 or off.max() == off.min():
        return np.ones_like(s)
    return np.clip((s - off.min()) / (off.max() - off.min()), 0.0, 1.0)


def draw_detections(image_hw3_uint8, gt_boxes, pred_boxes, pred_scores, pred_classes, path: str, *,
                    relations=None, class_names: Optional[Sequence[str]] = None, score_thresh: float = 0.5,
                    min_side: int = 512) -> str:
    """Draw ground truth (red), confident predictions (green), low-confidence ones (translucent white) and,
    with ``relations``, a white line between every pair of predictions whose opacity is their normalised
    learned correlation.

    Args:
        image_hw3_uint8: (H, W, 3) uint8 image (e.g. the 3-slice CT input).
        gt_boxes: (G, 4) XYXY pixels. pred_boxes: (P, 4) XYXY. pred_scores, pred_classes: (P,).
        path: PNG to write (its folder is created).
        relations: (P, P) correlations between the predictions, e.g. ``instances.pred_relations``; None: no lines.
        class_names: label of each class id (``MetadataCatalog.get(name).thing_classes``); ids if None.
        score_thresh: predictions below it are drawn as low-confidence (white).
        min_side: the PNG's shorter side is at least this many pixels (small slices are enlarged, pixels
            kept square and sharp, so boxes and lines stay readable).

    Returns:
        ``path``.
    """
    image = _np(image_hw3_uint8, "image_hw3_uint8")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"draw_detections: image_hw3_uint8 must be (H, W, 3), got {image.shape}")
    gt = _np(gt_boxes, "gt_boxes", (4,))
    boxes = _np(pred_boxes, "pred_boxes", (4,))
    scores, classes = _np(pred_scores, "pred_scores"), _np(pred_classes, "pred_classes")
    p = len(boxes)
    if len(scores) != p or len(classes) != p:
        raise ValueError(f"draw_detections: {p} pred_boxes need {p} scores and {p} classes; got {len(scores)} and "
                         f"{len(classes)}")
    rel = None if relations is None else _np(relations, "relations").astype(np.float64)
    if rel is not None and rel.shape != (p, p):
        raise ValueError(
            f"draw_detections: {p} pred_boxes need a ({p}, {p}) relations matrix; got {rel.shape} (if a filter "
            f"dropped detections after the ROI heads, index pred_relations by the kept rows and columns)")

    h, w = image.shape[:2]
    dpi, scale = 100, max(1.0, min_side / min(h, w))
    fig = Figure(figsize=(w * scale / dpi, h * scale / dpi), dpi=dpi)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(image.astype(np.uint8), interpolation="nearest")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.axis("off")
    lw, fs = max(0.8, scale * min(h, w) / 300), max(5.0, scale * min(h, w) / 60)

    if rel is not None and p > 1:
        strength = normalised_correlations(rel)
        centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)
        i, j = np.triu_indices(p, k=1)
        colors = np.ones((len(i), 4))
        colors[:, 3] = strength[i, j]
        ax.add_collection(LineCollection(np.stack([centres[i], centres[j]], axis=1), colors=colors, linewidths=lw))

    for x0, y0, x1, y1 in gt:
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="red", linewidth=lw))
    for (x0, y0, x1, y1), s, c in zip(boxes, scores, classes):
        confident = s >= score_thresh
        color, alpha = ("lime", 1.0) if confident else ("white", 0.5)
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, alpha=alpha, linewidth=lw))
        if confident:
            name = class_names[int(c)] if class_names is not None else str(int(c))
            ax.text(x0, y0, f"{name} {s:.2f}", color=color, fontsize=fs, va="bottom")

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
