"""``+stage=prepare``: cache the 3-slice images of the registered splits once (resumable; safe to run twice)."""
from typing import Dict

from detectron2.config import CfgNode

from fsd_d2.data.prepare import cache_images
from fsd_d2.engine.stages import StageArgs, register_stage


@register_stage("prepare", epoch_fraction=None, parallel=False)  # its own worker pool (num_workers)
def prepare(cfg: CfgNode, args: StageArgs) -> Dict:
    return cache_images(cfg)
