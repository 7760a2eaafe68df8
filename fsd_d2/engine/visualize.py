"""``+stage=visualize``: the paper's Fig. 4 for chosen test images of a graph model.

Ground truth, predictions, and a line between every pair of predictions whose opacity is their learned
correlation (the graph module's enhanced adjacency between the final detections).
"""
import logging
import os
from typing import Dict, List

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import Instances
from omegaconf import DictConfig

from fsd_d2.data.mapper import DeepLesionMapper
from fsd_d2.engine.checkpoint import AtomicCheckpointer
from fsd_d2.engine.stages import register_stage
from fsd_d2.engine.train import setup_run
from fsd_d2.engine.wandb import log_to_wandb
from fsd_d2.viz.detections import draw_detections

logger = logging.getLogger(__name__)


def choose_images(dicts: List[Dict], image_ids: List[str], count: int, split: str) -> List[Dict]:
    if not image_ids:
        if len(dicts) < count:
            logger.warning(f"split {split} has only {len(dicts)} images; drawing those instead of {count}")
        return dicts[:count]
    by_id = {d["image_id"]: d for d in dicts}
    unknown = [i for i in image_ids if i not in by_id]
    if unknown:
        raise ValueError(f"stage.images: {unknown} are not in split {split}; ids look like {list(by_id)[:3]}")
    return [by_id[i] for i in image_ids]


def top_detections(instances: Instances, k: int) -> Instances:
    """The ``k`` highest-scoring detections with their relations cut on both axes (indexing ``Instances``
    would cut only the rows of the N x N ``pred_relations``)."""
    keep = instances.scores.argsort(descending=True)[:k]
    relations = instances.pred_relations[keep][:, keep]
    top = instances[keep]
    top.pred_relations = relations
    return top


@register_stage("visualize")
def visualize(cfg: CfgNode, hcfg: DictConfig) -> Dict:
    if not hcfg.checkpoint:
        raise ValueError("+stage=visualize needs checkpoint=<finetune_graph's model_final.pth>")
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = float(hcfg.stage.min_score)
    cfg = setup_run(cfg, hcfg, multitype=bool(hcfg.stage.multitype))
    model = build_model(cfg)
    AtomicCheckpointer(model).load_matching(str(hcfg.checkpoint))
    model.eval()
    split = cfg.DATASETS.TEST[0]
    records = choose_images(DatasetCatalog.get(split), list(hcfg.stage.images), int(hcfg.stage.num_images), split)
    class_names = MetadataCatalog.get(split).thing_classes
    mapper = DeepLesionMapper(cfg, is_train=False)
    paths = []
    for record in records:
        with torch.no_grad():
            instances = model([mapper(record)])[0]["instances"].to("cpu")
        if not instances.has("pred_relations"):
            raise ValueError("the model has no graph module to visualise: use model.roi_heads=GraphROIHeads "
                             "model.graph_enabled=true (as +stage=finetune_graph trains)")
        instances = top_detections(instances, int(hcfg.stage.max_predictions))
        path = draw_detections(
            mapper.load_image(record), [a["bbox"] for a in record["annotations"]], instances.pred_boxes.tensor,
            instances.scores, instances.pred_classes, os.path.join(cfg.OUTPUT_DIR, f"graph_{record['image_id']}.png"),
            relations=instances.pred_relations, class_names=class_names, score_thresh=float(hcfg.stage.score_thresh))
        logger.info(f"wrote {path}")
        paths.append(path)
    if cfg.WANDB.ENABLED:
        import wandb

        log_to_wandb({"graph_correlations": [wandb.Image(p, caption=os.path.basename(p)) for p in paths]})
    return {"images": paths}
