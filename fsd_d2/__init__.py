"""FSD-D2: importing the package registers its backbones, heads, stages and evaluator with Detectron2."""
from fsd_d2 import config  # noqa: F401
from fsd_d2 import modeling  # noqa: F401  (BACKBONE / ROI_BOX_HEAD / ROI_HEADS registrations)
from fsd_d2.engine import pipeline, search, train, visualize  # noqa: F401  (stage registrations)
from fsd_d2.data import prepare  # noqa: F401  (the prepare stage)
