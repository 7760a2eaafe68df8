"""``+stage=export``: a trained detector as TorchScript and ONNX files, each checked against the eager model.

Any of the project's detectors (FPN-R50, FSD backbone + FC head, FSD; with or without the graph), from
``checkpoint=`` and the ``model=`` it was trained with, in the form ``+stage=eval`` runs (``model.deploy=true``:
BatchNorm folded into the FSD cells' convolutions), traced on the CPU (:mod:`fsd_d2.modeling.export`). The run
directory receives ``model.ts``, ``model.onnx``, ``predict.py`` (the example that runs them,
:mod:`fsd_d2.modeling.predict_exported`) and ``export.json`` (what the files carry). Every file is then run through
that example on the first ``stage.num_images`` images of ``dataset.test`` (the ONNX file in ONNX Runtime) and
compared with the eager model's detections on the same images: same count and classes, boxes within 1e-3
relative, scores within 1e-4; ``results.json`` holds the numbers, and a file that misses them stops the run.
"""
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog

from fsd_d2.data.mapper import DeepLesionMapper
from fsd_d2.engine.checkpoint import trained_model
from fsd_d2.engine.stages import StageArgs, register_stage
from fsd_d2.errors import ConfigError, ExportError
from fsd_d2.modeling import predict_exported
from fsd_d2.modeling.export import (FORMATS, detections, export_onnx, export_torchscript, parity, parity_problems,
                                    tracing_adapter)
from fsd_d2.modeling.predict_exported import ExportedDetector

logger = logging.getLogger(__name__)
EXPORTERS = {"torchscript": export_torchscript, "onnx": export_onnx}


@dataclass(frozen=True)
class ExportArgs(StageArgs):
    formats: Tuple[str, ...] = ("torchscript", "onnx")  # the files to write (and check)
    num_images: int = 4  # the first images of dataset.test each file is checked on
    opset: int = 16  # ONNX opset (16: the first with RoIAlign's half-pixel alignment)


def _metadata(cfg: CfgNode, split: str) -> Dict:
    """What the example needs beside the network: the resize, the classes; and what the file is."""
    return {"short_side": int(cfg.INPUT.MIN_SIZE_TEST), "max_size": int(cfg.INPUT.MAX_SIZE_TEST),
            "spacing_mm": float(cfg.DEEPLESION.SPACING_MM), "classes": list(MetadataCatalog.get(split).thing_classes),
            "backbone": cfg.MODEL.BACKBONE.NAME, "box_head": cfg.MODEL.ROI_BOX_HEAD.NAME,
            "graph": bool(cfg.MODEL.GRAPH.ENABLED and cfg.MODEL.ROI_HEADS.NAME == "GraphROIHeads"),
            "deployed": bool(cfg.MODEL.DEPLOY), "input": "3 x H x W uint8: previous, key, next slice, resized"}


@register_stage("export", args=ExportArgs, epoch_fraction=None, parallel=False)
def export(cfg: CfgNode, args: ExportArgs) -> Dict:
    if not args.checkpoint:
        raise ConfigError("+stage=export needs checkpoint=<path to model_final.pth> (and the model= it was trained "
                          "with; a graph model also model.roi_heads=GraphROIHeads model.graph_enabled=true)")
    unknown = sorted(set(args.formats) - set(FORMATS))
    if unknown or not args.formats:
        raise ConfigError(f"stage.formats={list(args.formats)}: choose from {list(FORMATS)}")
    if args.num_images < 1:
        raise ConfigError(f"stage.num_images={args.num_images}: each export is checked on at least one test image")
    cpu = cfg.clone()  # traced on the CPU, where ONNX Runtime runs them (a TorchScript trace keeps its device)
    cpu.defrost()
    cpu.MODEL.DEVICE = "cpu"
    model = trained_model(cpu, args.checkpoint)
    split = cfg.DATASETS.TEST[0]
    records = DatasetCatalog.get(split)[:args.num_images]
    if not records:
        raise ConfigError(f"dataset.test: split {split} has no image to trace and check the exports on; pass a split "
                          f"with images (dataset.test=[deeplesion_val])")
    mapper = DeepLesionMapper(cfg, is_train=False)
    out = Path(cfg.OUTPUT_DIR)
    shutil.copyfile(predict_exported.__file__, out / "predict.py")
    metadata = _metadata(cfg, split)
    (out / "export.json").write_text(json.dumps(metadata, indent=2))

    with torch.no_grad():
        expected = [detections(model([mapper(r)])[0]["instances"]) for r in records]
    adapter = tracing_adapter(model, mapper(records[0])["image"])
    results: Dict = {"checkpoint": args.checkpoint, "split": split, "example": str(out / "predict.py")}
    failed = []
    for fmt in args.formats:
        start = time.perf_counter()
        path = EXPORTERS[fmt](adapter, out / FORMATS[fmt], metadata, **({"opset": args.opset} if fmt == "onnx" else {}))
        seconds = time.perf_counter() - start
        detector = ExportedDetector(str(path))
        got = [detector(mapper.load_image(r), r["spacing_mm"][:2] if cfg.DEEPLESION.SPACING_MM > 0 else None)
               for r in records]
        check = parity(expected, got)
        problems = parity_problems(check)
        results[fmt] = {"file": str(path), "megabytes": path.stat().st_size / 2 ** 20, "export_seconds": seconds,
                        **check, "ok": not problems}
        logger.info(f"{fmt}: {path} ({results[fmt]['megabytes']:.1f} MB, {seconds:.1f} s); against the eager model on "
                    f"{check['images']} images ({check['detections']} detections): boxes within "
                    f"{check['max_box_rel_diff']:.2g} relative ({check['max_box_diff_px']:.2g} px), scores within "
                    f"{check['max_score_diff']:.2g}{'' if not problems else ' -- FAILS: ' + '; '.join(problems)}")
        if problems:
            failed.append(f"{path}: {'; '.join(problems)}")
    if failed:
        (out / "export_parity.json").write_text(json.dumps(results, indent=2, default=float))
        raise ExportError("an export disagrees with the eager model on the test images (numbers in "
                          f"{out / 'export_parity.json'}):\n  " + "\n  ".join(failed) +
                          "\nDo not deploy it; report it with the model's config (an operation that traces "
                          "differently from its eager code)")
    return results
