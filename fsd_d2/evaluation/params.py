"""Model size and cost as the paper's Table I reports them: millions of parameters, total and split backbone /
head, and the GFLOPs of one image."""
from typing import Dict, List

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


def one_image(size: int, device: str) -> List[Dict]:
    """A detector's input of one ``size`` x ``size`` 3-slice image (seeded noise: the cost does not depend on it)."""
    image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return [{"image": image.to(device), "height": size, "width": size}]


def gflops(model: torch.nn.Module, size: int) -> float:
    """fvcore's GFLOPs of ``model`` on one ``size`` x ``size`` image, in inference mode (a multiply-add counts 1)."""
    from detectron2.utils.analysis import FlopCountAnalysis

    model.eval()
    with torch.no_grad():
        count = FlopCountAnalysis(model, one_image(size, next(model.parameters()).device.type))
        return count.unsupported_ops_warnings(False).uncalled_modules_warnings(False).total() / 1e9
