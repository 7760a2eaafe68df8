"""The one dataset mapper for DeepLesion training and inference (and for COCO datasets, :mod:`fsd_d2.data.coco`).

dataset dict -> 3-slice uint8 image (from the ``prepare`` cache when present, else converted on the fly; a record
without "slices", an 8-bit colour image of a COCO dataset, is read as it is)
-> optional mm-per-pixel normalisation -> Detectron2 augmentations (ResizeShortestEdge to the short side)
-> CHW tensor + Instances with boxes (and RECIST axes) transformed exactly like the image.
"""
import copy
from typing import Dict, List, Sequence

import cv2
import numpy as np
import torch
from detectron2.config import CfgNode, configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from fsd_d2.data.cache import cache_dir_for, cache_path, read_cached
from fsd_d2.data.ct import HU_OFFSET, load_slice_mix
from fsd_d2.errors import DataError


def image_window(record: Dict, hu_window: Sequence[float], use_dicom_window: bool) -> List[float]:
    return list(record["dicom_window"]) if use_dicom_window else list(hu_window)


def spacing_transform(height: int, width: int, spacing_xy: Sequence[float], target_mm: float,
                      max_size: int) -> T.ResizeTransform:
    """Resize so a pixel covers ``target_mm`` (3DCE/MULAN), the long side capped at ``max_size``."""
    sx, sy = spacing_xy
    new_w, new_h = width * sx / target_mm, height * sy / target_mm
    cap = min(1.0, max_size / max(new_w, new_h))
    return T.ResizeTransform(height, width, max(1, round(new_h * cap)), max(1, round(new_w * cap)))


def _size_source(record: Dict) -> str:
    """Where the record's width and height come from (COCO records name their JSON entry)."""
    return f"width/height of {record['entry']}" if "entry" in record else "Image_size in DL_info.csv"


def _size_fix(record: Dict) -> str:
    if "entry" in record:
        return "Fix the entry's width/height (or the image files)"
    return "Fix Image_size or restore the slices from the Images_png archives"


class DeepLesionMapper:
    """Callable like Detectron2's ``DatasetMapper``: dataset dict -> model input dict.

    Output: "image" (3xHxW uint8 tensor; channels previous/key/next slice, the neighbours at the record's
    ``slice_interval_mm``, see :func:`fsd_d2.data.ct.channel_slices`), "height"/"width" (original
    size, for Detectron2's rescaling of predictions), "file_name", "image_id", and in training
    "instances" (gt_boxes, gt_classes, gt_recist Nx8). As in ``DatasetMapper``, "annotations" is removed.

    With ``spacing_mm > 0`` the image is scaled to that pixel size *instead of* to a fixed short side
    (scaling both ways would undo the normalisation for DeepLesion's square, isotropic slices).
    """

    @configurable
    def __init__(self, is_train: bool, *, augmentations: List, hu_window: Sequence[float] = (-1024, 3071),
                 use_dicom_window: bool = False, spacing_mm: float = 0.0, max_size: int = 1333,
                 cache_dir: str = "", input_format: str = "BGR"):
        self.is_train = is_train
        self.augmentations = [a for a in augmentations if not (spacing_mm > 0 and isinstance(a, T.ResizeShortestEdge))]
        self.hu_window, self.use_dicom_window = list(hu_window), use_dicom_window
        self.spacing_mm, self.max_size, self.cache_dir = spacing_mm, max_size, cache_dir
        self.input_format = input_format  # channel order of 8-bit colour images (CT channels are slices)

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool = True) -> Dict:
        return {"is_train": is_train, "augmentations": utils.build_augmentation(cfg, is_train),
                "hu_window": cfg.DEEPLESION.HU_WINDOW, "use_dicom_window": cfg.DEEPLESION.USE_DICOM_WINDOW,
                "spacing_mm": cfg.DEEPLESION.SPACING_MM, "cache_dir": cache_dir_for(cfg),
                "max_size": cfg.INPUT.MAX_SIZE_TRAIN if is_train else cfg.INPUT.MAX_SIZE_TEST,
                "input_format": cfg.INPUT.FORMAT}

    def load_image(self, record: Dict) -> np.ndarray:
        """HxWx3 uint8 of the record at its original size, from the cache if it holds it."""
        expected = (record["height"], record["width"], 3)
        if "slices" not in record:
            return self._read_colour(record, expected)
        if self.cache_dir:
            image = read_cached(cache_path(self.cache_dir, record, self.hu_window, self.use_dicom_window), expected)
            if image is not None:
                return image
        image = load_slice_mix(record["slices"], image_window(record, self.hu_window, self.use_dicom_window),
                               record.get("hu_offset", HU_OFFSET))
        if image.shape != expected:
            raise DataError(f"{record['file_name']}: the slices are {image.shape[1]}x{image.shape[0]} pixels but "
                            f"{_size_source(record)} says {record['width']}x{record['height']}. {_size_fix(record)}")
        return image

    def _read_colour(self, record: Dict, expected) -> np.ndarray:
        """An 8-bit colour (or grey) file as HxWx3 uint8 in ``input_format``'s channel order."""
        path = record["file_name"]
        image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        if image is None:
            raise DataError(f"{path}: image missing or unreadable ({record.get('entry', record['image_id'])}). Fix: "
                            f"restore the file or correct its file_name")
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        elif image.ndim == 3 and image.shape[2] == 4:
            image = image[:, :, :3]  # alpha carries no CT information
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise DataError(f"{path}: expected an 8-bit colour image (dataset.pixels=rgb8), got {image.dtype} of shape "
                            f"{image.shape}. Fix: for 16-bit single-channel CT slices set dataset.pixels=ct16")
        if image.shape != expected:
            raise DataError(f"{path}: the image is {image.shape[1]}x{image.shape[0]} pixels but {_size_source(record)} "
                            f"says {record['width']}x{record['height']}. {_size_fix(record)}")
        return image[:, :, ::-1].copy() if self.input_format == "RGB" else image  # cv2 reads BGR

    def __call__(self, dataset_dict: Dict) -> Dict:
        record = copy.deepcopy(dataset_dict)  # the dict is reused by the data loader; never modify it
        image = self.load_image(record)
        augs = list(self.augmentations)
        if self.spacing_mm > 0:
            augs.insert(0, spacing_transform(image.shape[0], image.shape[1], record["spacing_mm"][:2],
                                             self.spacing_mm, self.max_size))
        aug_input = T.AugInput(image)
        transforms = T.AugmentationList(augs)(aug_input)
        image = aug_input.image
        record["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        annotations = record.pop("annotations", None)
        if not self.is_train or annotations is None:
            return record
        shape = image.shape[:2]
        annos = [utils.transform_instance_annotations(a, transforms, shape) for a in annotations]
        instances = utils.annotations_to_instances(annos, shape)
        recist = [transforms.apply_coords(np.asarray(a["recist"], dtype=np.float64).reshape(4, 2)).reshape(8)
                  for a in annos]
        instances.gt_recist = torch.as_tensor(np.asarray(recist, dtype=np.float32).reshape(-1, 8))
        record["instances"] = instances
        return record
