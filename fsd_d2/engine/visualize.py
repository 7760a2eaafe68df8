"""``+stage=visualize``: the paper's Fig. 4 for chosen test images of a graph model.

Ground truth, predictions, and a line between every pair of predictions whose opacity is their learned
correlation (the graph module's enhanced adjacency between the final detections).
"""
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Instances

from fsd_d2.data.mapper import DeepLesionMapper
from fsd_d2.engine.checkpoint import trained_model
from fsd_d2.engine.stages import StageArgs, register_stage
from fsd_d2.engine.wandb import log_images
from fsd_d2.errors import ConfigError
from fsd_d2.viz.detections import draw_detections

logger = logging.getLogger(__name__)


def choose_images(dicts: List[Dict], image_ids: List[str], count: int, split: str) -> List[Dict]:
    if not image_ids:
        if len(dicts) < count:
            logger.warning(f"split {split} has only {len(dicts)} images; drawing those instead of {count}")
        return dicts[:count]
    by_id = {str(d["image_id"]): d for d in dicts}  # a COCO dataset's ids are integers
    unknown = [i for i in image_ids if str(i) not in by_id]
    if unknown:
        raise ConfigError(f"stage.images: {unknown} are not in split {split}; ids look like {list(by_id)[:3]}")
    return [by_id[str(i)] for i in image_ids]


def top_detections(instances: Instances, k: int) -> Instances:
    """The ``k`` highest-scoring detections with their relations cut on both axes (indexing ``Instances``
    would cut only the rows of the N x N ``pred_relations``)."""
    keep = instances.scores.argsort(descending=True)[:k]
    relations = instances.pred_relations[keep][:, keep]
    top = instances[keep]
    top.pred_relations = relations
    return top


@dataclass(frozen=True)
class VisualizeArgs(StageArgs):
    images: Tuple[str, ...] = ()  # image ids (File_name stems, a COCO image's id); empty: the first num_images
    num_images: int = 4
    score_thresh: float = 0.5  # below: drawn as low-confidence (white); above: confident (green)
    max_predictions: int = 12  # the best this many predictions per image, and the lines between them


@register_stage("visualize", args=VisualizeArgs, epoch_fraction=None, parallel=False)
def visualize(cfg: CfgNode, args: VisualizeArgs) -> Dict:
    if not args.checkpoint:
        raise ConfigError("+stage=visualize needs checkpoint=<finetune_graph's model_final.pth>")
    model = trained_model(cfg, args.checkpoint)
    split = cfg.DATASETS.TEST[0]
    records = choose_images(DatasetCatalog.get(split), list(args.images), args.num_images, split)
    class_names = MetadataCatalog.get(split).thing_classes
    mapper = DeepLesionMapper(cfg, is_train=False)
    paths = []
    for record in records:
        with torch.no_grad():
            instances = model([mapper(record)])[0]["instances"].to("cpu")
        if not instances.has("pred_relations"):
            raise ConfigError("the model has no graph module to visualise: use model.roi_heads=GraphROIHeads "
                              "model.graph_enabled=true (as +stage=finetune_graph trains)")
        instances = top_detections(instances, args.max_predictions)
        path = draw_detections(
            mapper.load_image(record), [a["bbox"] for a in record["annotations"]], instances.pred_boxes.tensor,
            instances.scores, instances.pred_classes, os.path.join(cfg.OUTPUT_DIR, f"graph_{record['image_id']}.png"),
            relations=instances.pred_relations, class_names=class_names, score_thresh=args.score_thresh)
        logger.info(f"wrote {path}")
        paths.append(path)
    log_images({"graph_correlations": paths})
    return {"images": paths}
