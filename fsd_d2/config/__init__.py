"""FSD-D2 configuration: one path from the command line to the frozen Detectron2 ``CfgNode``, one module per job.

1. :mod:`~fsd_d2.config.keys` declares every key once (:data:`KEYS`): its default on top of Detectron2's own
   ``Base-RCNN-FPN.yaml`` (:func:`base_cfg`), the friendly name users set it by through Hydra groups
   (``solver.ims_per_batch`` -> ``SOLVER.IMS_PER_BATCH``), its check, and for a derived key what to set instead.
   :func:`add_fsd_config`, :data:`FRIENDLY_KEYS`, :data:`DERIVED_KEYS` and the value rules are generated from it.
2. :mod:`~fsd_d2.config.groups` generates the groups' base configs (``dataset/base``, ``model/base``, ...) from 1,
   so the YAML files in ``conf/`` list only what they change. :func:`register_config_groups` offers them (and the
   packaged operation pools) to Hydra; whatever composes ``conf/`` calls it first: the entry point
   (``fsd_d2/run.py``), ``tests/conftest.py`` and ``benchmarks/_models.py``. Importing this package registers
   nothing.
3. :mod:`~fsd_d2.config.build` (:func:`build_cfg`) applies, in order: the defaults, the friendly values, the raw ``d2``
   overrides, the checks (:mod:`~fsd_d2.config.validate`), then the derived values (:mod:`~fsd_d2.config.derive`).
   Derived values are computed last, so they follow their inputs however those were set; a derived key set by hand
   is an error naming the input to set instead.

The values that need the registered dataset (classes, iterations from epochs) are derived by
:func:`apply_dataset_size` and :func:`apply_num_classes` before the stage freezes the config.
"""
from fsd_d2.config.build import BASE_RCNN_FPN, base_cfg, build_cfg, flatten
from fsd_d2.config.derive import anchor_sizes, apply_dataset_size, apply_init, apply_num_classes
from fsd_d2.config.groups import register_config_groups
from fsd_d2.config.keys import D2, DERIVED_KEYS, FRIENDLY_KEYS, KEYS, VALUE_RULES, Check, Key, add_fsd_config
from fsd_d2.config.validate import IMAGENET_FORMAT_KEYS

__all__ = ["BASE_RCNN_FPN", "base_cfg", "build_cfg", "flatten", "anchor_sizes", "apply_dataset_size", "apply_init",
           "apply_num_classes", "register_config_groups", "D2", "DERIVED_KEYS", "FRIENDLY_KEYS", "KEYS", "VALUE_RULES",
           "Check", "Key", "add_fsd_config", "IMAGENET_FORMAT_KEYS"]
