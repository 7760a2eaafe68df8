"""Model size as the paper's Table I reports it: millions of parameters, total and split backbone / head."""
from typing import Dict

import torch

from fsd_d2.modeling.architecture import unwrap


def count_parameters(model: torch.nn.Module) -> Dict[str, float]:
    """Millions of parameters: ``total``, ``backbone`` (``model.backbone``, FPN included) and ``head`` (the rest:
    proposal generator and ROI heads, graph module included).

    Frozen parameters count (they are part of the network's size); a (Distributed)DataParallel wrapper is
    unwrapped and a parameter shared between modules is counted once.
    """
    model = unwrap(model)
    if not isinstance(getattr(model, "backbone", None), torch.nn.Module):
        raise ValueError(f"count_parameters: {type(model).__name__} has no .backbone module; expected a Detectron2 "
                         f"meta-architecture such as GeneralizedRCNN (pass the model, not a sub-module)")
    total = sum(p.numel() for p in model.parameters())
    backbone = sum(p.numel() for p in model.backbone.parameters())
    return {"total": total / 1e6, "backbone": backbone / 1e6, "head": (total - backbone) / 1e6}
