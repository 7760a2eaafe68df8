"""FSD backbones in ``BACKBONE_REGISTRY``: the searchable one (bi-level search) and the derived one (training).

Both keep ResNet-50's stem and first residual stage (``res2``, stride 4; the paper's "first two layers") and
replace res3-res5 by DARTS cells that produce stride 8/16/32 features under the same names, so Detectron2's
FPN, RPN and ROI heads work on them unchanged.
"""
from typing import Dict, List

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from fsd_d2.errors import ConfigError
from fsd_d2.nas.cells import DerivedCell, PlannedCell, SearchCell, chain_cells
from fsd_d2.nas.genotype import Genotype, load_genotype
from fsd_d2.nas.ops import validate_pool
from fsd_d2.nas.searchable import CellAlphas, Searchable

_STAGE_NAMES = ("res3", "res4", "res5")


def build_res2_trunk(cfg, input_shape: ShapeSpec) -> Backbone:
    """ResNet stem + res2 only (Detectron2 builds stages up to the deepest requested output)."""
    trunk_cfg = cfg.clone()
    trunk_cfg.defrost()
    trunk_cfg.MODEL.RESNETS.OUT_FEATURES = ["res2"]
    return build_resnet_backbone(trunk_cfg, input_shape)


class _CellBackbone(Backbone):
    """res2 trunk, then a chain of cells whose reduction cells give the stride 8/16/32 outputs."""

    def __init__(self, trunk: Backbone, make_cell, reductions: List[bool]):
        super().__init__()
        self.trunk = trunk
        self.cells = chain_cells(make_cell, trunk.output_shape()["res2"].channels, reductions)
        self._stage_ends = [i for i, r in enumerate(reductions) if r]
        assert len(self._stage_ends) == len(_STAGE_NAMES), reductions
        res2 = trunk.output_shape()["res2"]
        self._out_features = ["res2", *_STAGE_NAMES]
        self._out_feature_channels = {"res2": res2.channels,
                                      **{n: self.cells[i].out_channels for n, i in zip(_STAGE_NAMES, self._stage_ends)}}
        self._out_feature_strides = {"res2": res2.stride, "res3": 8, "res4": 16, "res5": 32}

    @property
    def size_divisibility(self) -> int:
        return 32  # every reduction must halve an even size (factorized reduce)

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
                for n in self._out_features}

    def forward(self, x: torch.Tensor, *cell_args: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``cell_args`` follow each cell's two inputs (a search cell's alpha weights; none for derived cells)."""
        s1 = self.trunk(x)["res2"]
        out, s0 = {"res2": s1}, s1
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, *cell_args)
            if i in self._stage_ends:
                out[_STAGE_NAMES[self._stage_ends.index(i)]] = s1
        return out


class SearchBackbone(Searchable, _CellBackbone):
    """Three searchable reduction cells sharing one set of alphas (the paper searches reduction cells only)."""

    CELL_TYPES = ("reduce",)  # the cell types of its genotype

    def __init__(self, trunk: Backbone, pool_name: str, pool: List[str], num_nodes: int, channels: int,
                 partial_channels: int = 1, batched_edges: bool = True):
        def make(i, c_pp, c_p, reduction, reduction_prev):
            return SearchCell(pool, num_nodes, c_pp, c_p, channels * 2 ** i, reduction=reduction,
                              reduction_prev=reduction_prev, partial_channels=partial_channels,
                              batched=batched_edges)

        super().__init__(trunk, make, [True] * len(_STAGE_NAMES))
        self.arch = CellAlphas(pool_name, pool, num_nodes, cell_types=self.CELL_TYPES)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        # The softmaxed alphas, once per forward, handed to the three cells (DARTS' Network.forward): no state kept.
        return super().forward(x, self.arch.weights()["reduce"])


class FSDBackbone(_CellBackbone):
    """The derived backbone: per stage, ``normal_cells`` copies of the searched cell at stride 1, then the
    searched reduction cell (the paper's augmentation); channels double from stage to stage.
    ``self.genotype`` is what checkpoints record and check."""

    def __init__(self, trunk: Backbone, genotype: Genotype, channels: int, normal_cells: int):
        plan = self.cell_plan(channels, normal_cells)

        def make(i, c_pp, c_p, reduction, reduction_prev):
            return DerivedCell(genotype.cells[plan[i].cell_type], c_pp, c_p, plan[i].channels, reduction=reduction,
                               reduction_prev=reduction_prev)

        super().__init__(trunk, make, [cell.reduction for cell in plan])
        self.genotype = genotype

    @staticmethod
    def cell_plan(channels: int, normal_cells: int) -> List[PlannedCell]:
        """The chain, res3 to res5: per stage ``normal_cells`` stride-1 copies of the searched (``reduce``) cell,
        then the cell itself as the reduction; C = ``channels`` in res3, doubling per stage."""
        return [PlannedCell(f"{stage}." + ("reduce" if k == normal_cells else f"normal{k}"), "reduce",
                            k == normal_cells, channels * 2 ** s)
                for s, stage in enumerate(_STAGE_NAMES) for k in range(normal_cells + 1)]


def _with_fpn(cfg, bottom_up: Backbone) -> Backbone:
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_fsd_search_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Searchable backbone + FPN, for ``+stage=search_bone``."""
    fsd = cfg.MODEL.FSD
    pool = validate_pool(list(fsd.BONE_POOL), fsd.BONE_POOL_NAME)
    bottom_up = SearchBackbone(build_res2_trunk(cfg, input_shape), fsd.BONE_POOL_NAME, pool, fsd.NUM_NODES,
                               fsd.BONE_CHANNELS, fsd.PARTIAL_CHANNELS, fsd.BATCHED_EDGES)
    return _with_fpn(cfg, bottom_up)


@BACKBONE_REGISTRY.register()
def build_fsd_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Derived FSD backbone (from ``MODEL.FSD.GENOTYPE_BONE``) + FPN."""
    fsd = cfg.MODEL.FSD
    if not fsd.GENOTYPE_BONE:
        raise ConfigError("build_fsd_backbone needs model.genotype_bone=<genotype_bone.yaml> (written by "
                          "+stage=search_bone), or a checkpoint=... that records it")
    genotype = load_genotype(fsd.GENOTYPE_BONE, pool_ops=list(fsd.BONE_POOL) or None,
                             model_pool=fsd.BONE_POOL_NAME or None, num_nodes=fsd.NUM_NODES,
                             cell_types=["reduce"])
    bottom_up = FSDBackbone(build_res2_trunk(cfg, input_shape), genotype, fsd.BONE_CHANNELS,
                            fsd.NORMAL_CELLS_PER_STAGE)
    return _with_fpn(cfg, bottom_up)
