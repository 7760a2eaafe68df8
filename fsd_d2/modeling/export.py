"""A trained detector outside Python: TorchScript and ONNX files of its network, and how to check them.

What a file holds: Detectron2's ``model.inference(inputs, do_postprocess=False)`` for one image, traced through
Detectron2's ``TracingAdapter`` (inputs and outputs flattened to tensors): a 3 x H x W uint8 image, already
resized, in; pixel normalisation, padding, backbone, RPN, ROI heads (and graph), NMS and top-k inside; the
detections in the input's pixels out, as the tensors :func:`output_names` lists (Detectron2's field names:
``pred_boxes``, ``pred_classes``, ``pred_relations`` for a graph model, ``scores``, and ``image_size``). The
resize before and the mapping of the boxes back to the image after (Detectron2's ``detector_postprocess``) stay
outside the network, in :mod:`fsd_d2.modeling.predict_exported`, the example that runs both kinds of file.

Tracing records one image's path. Detectron2 writes its detectors so that the sizes in that path stay symbolic (the
image's height and width, the proposal and detection counts), so the files run on other image sizes; the graph
module takes a path of its own while traced (:mod:`fsd_d2.modeling.graph`: adaptive pooling as a gather, no
per-image split). Every operation of the search pools exports to ONNX opset 16 (tests/modeling/test_exportable.py runs
each in ONNX Runtime); opset 16 is the first whose RoIAlign has Detectron2's half-pixel alignment (ROIAlignV2).

Both files are traced on the CPU; TorchScript keeps that device. Each carries :data:`METADATA_KEY` JSON (the resize,
the classes, the order of its outputs) that the example reads.
"""
import contextlib
import json
import logging
import warnings
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
from detectron2.export import TracingAdapter
from detectron2.structures import Instances
from torch import nn

from fsd_d2.errors import ExportError
from fsd_d2.modeling.predict_exported import METADATA_KEY

__all__ = ["FORMATS", "ONNX_OPSET", "METADATA_KEY", "detections", "export_onnx", "export_torchscript",
           "output_names", "parity", "parity_problems", "raw_predictions", "tracing_adapter"]
logger = logging.getLogger(__name__)

FORMATS = {"torchscript": "model.ts", "onnx": "model.onnx"}  # stage.formats -> file name in the run directory
ONNX_OPSET = 16
BOX_RTOL, SCORE_ATOL = 1e-3, 1e-4  # what an export must meet against the eager model (same count, same classes)


@contextlib.contextmanager
def _quiet_trace():
    """No gradients, and none of the tracer's warnings about Python values: Detectron2's code asserts on shapes and
    branches on sizes fixed for one architecture; what the trace fixes wrongly, the parity check catches."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", module=r"torch\.onnx")
        yield


def raw_predictions(model: nn.Module, inputs: List[Dict]) -> Instances:
    """What the files compute: the detections of one image in the network input's pixels."""
    return model.inference(inputs, do_postprocess=False)[0]


def tracing_adapter(model: nn.Module, image: torch.Tensor) -> TracingAdapter:
    """``model`` (in eval mode) as a module of flat tensors, ``image`` (3 x H x W uint8) its example input.

    The adapter is put in eval mode too: ``torch.onnx.export`` restores the exported module's mode afterwards,
    and a fresh module's is training, which would switch the detector into training mode."""
    if model.training:
        raise ValueError("tracing_adapter: call model.eval() first (an export records inference)")
    return TracingAdapter(model, [{"image": image}], raw_predictions).eval()


def output_names(adapter: TracingAdapter) -> List[str]:
    """The order of the flat outputs: the Instances' fields as Detectron2 flattens them (sorted), then its
    ``image_size``. Known once the adapter has run (a trace runs it)."""
    schema = adapter.outputs_schema
    if schema is None:
        with torch.no_grad():
            adapter(*adapter.flattened_inputs)
        schema = adapter.outputs_schema
    return [*schema.keys, "image_size"]


def export_torchscript(adapter: TracingAdapter, path: Path, metadata: Dict) -> Path:
    """Trace ``adapter`` with ``torch.jit.trace`` and save it with ``metadata`` (and the output order) inside."""
    with _quiet_trace():
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
    meta = {**metadata, "outputs": output_names(adapter)}
    torch.jit.save(traced, str(path), _extra_files={METADATA_KEY: json.dumps(meta)})
    return path


def export_onnx(adapter: TracingAdapter, path: Path, metadata: Dict, opset: int = ONNX_OPSET) -> Path:
    """``torch.onnx.export`` of ``adapter`` with a free image height and width, ``metadata`` in the model's
    metadata properties. Needs the ``export`` extra (onnx)."""
    try:
        import onnx
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install -e '.[export]' (onnx==1.16.2, "
                          "onnxruntime==1.19.2, which keep numpy < 2 for Detectron2)") from None
    names = output_names(adapter)
    with _quiet_trace():
        torch.onnx.export(adapter, adapter.flattened_inputs, str(path), opset_version=opset,
                          input_names=["image"], output_names=names,
                          dynamic_axes={"image": {1: "height", 2: "width"}})
    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps({**metadata, "outputs": names})
    onnx.save(model, str(path))
    return path


def detections(instances: Instances) -> Dict[str, np.ndarray]:
    """An eager model's ``Instances`` in the example's form (boxes, scores, classes, relations)."""
    found = {"boxes": instances.pred_boxes.tensor.numpy(), "scores": instances.scores.numpy(),
             "classes": instances.pred_classes.numpy()}
    if instances.has("pred_relations"):
        found["relations"] = instances.pred_relations.numpy()
    return found


def parity(expected: Sequence[Dict[str, np.ndarray]], got: Sequence[Dict[str, np.ndarray]]) -> Dict:
    """How far an export's detections (``got``) are from the eager model's, image by image, in order.

    Boxes: the largest difference of a coordinate in pixels, and relative to that coordinate (at least 1 px, so a
    coordinate near 0 is not divided by ~0). Scores and relations: the largest absolute difference. Detections are
    compared in order (highest score first) where the counts agree."""
    box_px = box_rel = score = relation = 0.0
    counts_equal = classes_equal = True
    for e, g in zip(expected, got, strict=True):
        if len(e["scores"]) != len(g["scores"]):
            counts_equal = False
            continue
        if len(e["scores"]):
            diff = np.abs(e["boxes"].astype(np.float64) - g["boxes"])
            box_px = max(box_px, float(diff.max()))
            box_rel = max(box_rel, float((diff / np.maximum(np.abs(e["boxes"]), 1.0)).max()))
            score = max(score, float(np.abs(e["scores"].astype(np.float64) - g["scores"]).max()))
            classes_equal &= bool(np.array_equal(e["classes"], g["classes"]))
            if "relations" in e and e["relations"].shape == g["relations"].shape:  # (eager keeps columns of dropped)
                relation = max(relation, float(np.abs(e["relations"].astype(np.float64) - g["relations"]).max()))
    return {"images": len(expected), "detections": int(sum(len(e["scores"]) for e in expected)),
            "counts_equal": counts_equal, "classes_equal": classes_equal, "max_box_diff_px": box_px,
            "max_box_rel_diff": box_rel, "max_score_diff": score, "max_relation_diff": relation}


def parity_problems(result: Dict, box_rtol: float = BOX_RTOL, score_atol: float = SCORE_ATOL) -> List[str]:
    """What a :func:`parity` result fails of the export's bar (empty: it passes)."""
    problems = []
    if not result["counts_equal"]:
        problems.append("a different number of detections on some image")
    if not result["classes_equal"]:
        problems.append("other classes")
    if result["max_box_rel_diff"] > box_rtol:
        problems.append(f"boxes differ by {result['max_box_rel_diff']:.2g} relative (> {box_rtol})")
    if result["max_score_diff"] > score_atol:
        problems.append(f"scores differ by {result['max_score_diff']:.2g} (> {score_atol})")
    return problems
