"""Importing this registers the FSD backbones, box heads and graph ROI heads with Detectron2."""
from fsd_d2.modeling import architecture, backbone, box_head, roi_heads  # noqa: F401
