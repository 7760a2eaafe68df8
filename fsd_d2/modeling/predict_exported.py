"""Run an exported FSD-D2 detector (``+stage=export``'s ``model.ts`` or ``model.onnx``) on one image.

    python predict.py model.onnx image.png        # one JSON line per detection: box, score, class
    python predict.py model.ts image.npy          # an image of +stage=prepare's cache

In Python::

    from predict import ExportedDetector
    detector = ExportedDetector("model.onnx")
    found = detector(image)  # H x W x 3 uint8: the previous, key and next slice, windowed (+stage=prepare's .npy)
    found["boxes"], found["scores"], found["classes"]  # N x 4 (x1, y1, x2, y2 in the image's pixels), N, N
    detector.classes[found["classes"][0]]              # the class name (lesion type)

A graph model's files also give ``found["relations"]`` (N x N, the learned correlations between the detections).

This file stands alone (``+stage=export`` copies it beside the exports as ``predict.py``): it needs numpy and Pillow,
plus onnxruntime for ``.onnx`` or torch and torchvision for ``.ts`` (torchvision provides the NMS and RoIAlign the
file calls), and OpenCV only to read an image file on the command line. Each file carries what this script needs
(the resize, the class names, its outputs' order) as JSON: ``fsd_export`` in the ONNX metadata, an extra file of
that name in the TorchScript archive. The network in the file takes the resized image; around it this script does
what Detectron2 does around the eager model: resize as ``ResizeShortestEdge`` (Pillow's bilinear; or to a pixel
size for a model of ``dataset.spacing_mm``), and map the boxes back as ``detector_postprocess`` (scale, clip to the
image, drop empty boxes). ``+stage=export`` checks that the result is the eager model's.
"""
import argparse
import json
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

METADATA_KEY = "fsd_export"


def resized_shape(height: int, width: int, meta: Dict, spacing_xy: Optional[Sequence[float]] = None) -> Tuple[int, int]:
    """The network's input size for an image of ``height`` x ``width``: Detectron2's ResizeShortestEdge at test
    time, or the mapper's resize to ``spacing_mm`` per pixel (then ``spacing_xy``, the image's mm per pixel, is
    needed)."""
    if meta["spacing_mm"] > 0:
        if spacing_xy is None:
            raise ValueError(f"this model was trained at {meta['spacing_mm']} mm per pixel: pass the image's pixel "
                             f"spacing (spacing_xy=(x mm, y mm), --spacing X Y)")
        new_w, new_h = width * spacing_xy[0] / meta["spacing_mm"], height * spacing_xy[1] / meta["spacing_mm"]
        cap = min(1.0, meta["max_size"] / max(new_w, new_h))
        return max(1, round(new_h * cap)), max(1, round(new_w * cap))
    short = meta["short_side"]
    if short == 0:
        return height, width
    scale = short / min(height, width)
    new_h, new_w = (short, scale * width) if height < width else (scale * height, short)
    if max(new_h, new_w) > meta["max_size"]:
        cap = meta["max_size"] / max(new_h, new_w)
        new_h, new_w = new_h * cap, new_w * cap
    return int(new_h + 0.5), int(new_w + 0.5)


def _load_torchscript(path: str, threads: Optional[int]) -> Tuple[Callable, Dict]:
    import torch
    import torchvision  # noqa: F401  (registers torchvision::nms and torchvision::roi_align)

    if threads:
        torch.set_num_threads(threads)
    extra = {METADATA_KEY: ""}
    module = torch.jit.load(path, map_location="cpu", _extra_files=extra)

    def run(image_chw: np.ndarray) -> List[np.ndarray]:
        with torch.no_grad():
            return [t.numpy() for t in module(torch.from_numpy(image_chw))]

    return run, json.loads(extra[METADATA_KEY])


def _load_onnx(path: str, threads: Optional[int]) -> Tuple[Callable, Dict]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map[METADATA_KEY])
    name = session.get_inputs()[0].name

    def run(image_chw: np.ndarray) -> List[np.ndarray]:
        return session.run(meta["outputs"], {name: image_chw})

    return run, meta


class ExportedDetector:
    """One exported file, ready to run: ``detector(image)`` -> boxes, scores, classes (and relations).

    Args:
        path: ``model.onnx`` (ONNX Runtime, CPU) or ``model.ts`` (TorchScript, CPU).
        threads: CPU threads of the runtime (default: its own choice).
    """

    def __init__(self, path: str, threads: Optional[int] = None):
        loaders = {".onnx": _load_onnx, ".ts": _load_torchscript}
        suffix = next((s for s in loaders if path.endswith(s)), None)
        if suffix is None:
            raise ValueError(f"{path}: expected a .onnx or .ts file written by +stage=export")
        self._run, self.meta = loaders[suffix](path, threads)
        self.classes: List[str] = self.meta["classes"]

    def network(self, image_chw: np.ndarray) -> Dict[str, np.ndarray]:
        """The file's raw outputs for a resized 3 x H x W uint8 image: boxes in its pixels, before the mapping
        back; keys are Detectron2's field names (pred_boxes, scores, pred_classes, [pred_relations], image_size)."""
        return dict(zip(self.meta["outputs"], self._run(np.ascontiguousarray(image_chw, dtype=np.uint8))))

    def __call__(self, image: np.ndarray, spacing_xy: Optional[Sequence[float]] = None) -> Dict[str, np.ndarray]:
        """Detections in ``image`` (H x W x 3 uint8), highest score first."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an H x W x 3 uint8 image (3 slices), got {image.shape} {image.dtype}")
        height, width = image.shape[:2]
        new_h, new_w = resized_shape(height, width, self.meta, spacing_xy)
        if (new_h, new_w) != (height, width):
            image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
        out = self.network(image.transpose(2, 0, 1))
        boxes = out["pred_boxes"].astype(np.float32)  # as detector_postprocess: scale, clip, drop the empty
        boxes[:, 0::2] *= np.float32(width / new_w)
        boxes[:, 1::2] *= np.float32(height / new_h)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        found = {"boxes": boxes[keep], "scores": out["scores"][keep], "classes": out["pred_classes"][keep]}
        if "pred_relations" in out:
            found["relations"] = out["pred_relations"][keep][:, keep]
        return found


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="model.onnx or model.ts written by +stage=export")
    p.add_argument("image", help="an 8-bit 3-channel image (3 slices): an image file, or a .npy of +stage=prepare's "
                                 "cache")
    p.add_argument("--spacing", type=float, nargs=2, metavar=("X_MM", "Y_MM"),
                   help="the image's pixel spacing (only for a model trained with dataset.spacing_mm)")
    p.add_argument("--min-score", type=float, default=0.0, help="print only detections at or above this score")
    args = p.parse_args(argv)
    if args.image.endswith(".npy"):
        image = np.load(args.image, allow_pickle=False)
    else:
        import cv2  # read as +stage=export's checks and the data mapper read images: the channels as stored

        image = cv2.imread(args.image, cv2.IMREAD_UNCHANGED)
    if image is None or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        sys.exit(f"{args.image}: not an 8-bit 3-channel image")
    detector = ExportedDetector(args.model)
    found = detector(image, args.spacing)
    rows = [{"box": [round(float(v), 2) for v in box], "score": round(float(score), 4),
             "class": detector.classes[int(cls)]}
            for box, score, cls in zip(found["boxes"], found["scores"], found["classes"]) if score >= args.min_score]
    for row in rows:
        print(json.dumps(row))
    return rows


if __name__ == "__main__":
    main()
