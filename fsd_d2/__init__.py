"""FSD-D2: importing the package registers its backbones, box heads and ROI heads with Detectron2.

The stages (``fsd_d2.engine``) and the entry point (``fsd_d2.run``) are imported on their own; each layer
imports only those below it: ``nas`` -> ``modeling`` -> ``data``, ``evaluation``, ``viz`` -> ``engine`` -> ``run``.
"""
from fsd_d2 import modeling  # noqa: F401  (BACKBONE / ROI_BOX_HEAD / ROI_HEADS registrations)
