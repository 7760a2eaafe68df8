"""Make the configured dataset available: generate the synthetic set if chosen, then register the splits."""
import os
from typing import List

from detectron2.config import CfgNode
from detectron2.utils import comm

from fsd_d2.data.deeplesion import CSV_NAME, IMAGES_DIR, register_deeplesion
from fsd_d2.data.synthetic import generate_synthetic
from fsd_d2.errors import ConfigError, MissingFileError


def setup_datasets(cfg: CfgNode) -> List[str]:
    """Generate (``DEEPLESION.SOURCE`` synthetic) or check (deeplesion) ``DEEPLESION.ROOT``, then register.

    Returns the registered split names (see :func:`fsd_d2.data.deeplesion.register_deeplesion`).
    """
    d = cfg.DEEPLESION
    root, source = d.ROOT, d.SOURCE
    if source == "synthetic":
        if not root:
            raise ConfigError("dataset.root is empty: set the folder the synthetic set is generated into")
        params = {k.lower(): v for k, v in d.SYNTHETIC.items()}
        if comm.is_main_process():
            generate_synthetic(root, **params)
        comm.synchronize()  # the other processes of a launch then find the set written and reuse it
        if not comm.is_main_process():
            generate_synthetic(root, **params)
    elif source == "deeplesion":
        if not root or not os.path.isfile(os.path.join(root, CSV_NAME)):
            where = f"'{root}' has no {CSV_NAME}" if root else "dataset.root is not set"
            raise MissingFileError(f"DeepLesion not found: {where}. Download DeepLesion (DL_info.csv and the "
                                   f"{IMAGES_DIR}/ archives, unzipped) and set dataset.root=/path/to/DeepLesion")
    else:
        raise ConfigError(f"dataset.name '{source}' is not known; use dataset=synthetic or dataset=deeplesion")
    return register_deeplesion(root, drop_noisy=d.DROP_NOISY, patients=tuple(d.PATIENTS),
                               skip_bad_rows=d.SKIP_BAD_ROWS, hu_window=tuple(d.HU_WINDOW),
                               use_dicom_window=d.USE_DICOM_WINDOW, check_boxes=d.BOX_PAD_CHECK,
                               slice_interval_mm=d.SLICE_INTERVAL_MM, spacing_mm=d.SPACING_MM,
                               coordinate_origin=d.COORDINATE_ORIGIN)
