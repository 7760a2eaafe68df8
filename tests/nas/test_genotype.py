"""Genotype derivation, YAML round trip and validation errors, and the alpha / cell plots."""
import os
from pathlib import Path

import pytest
import torch

from fsd_d2.nas.genotype import (CellGenotype, Genotype, derive, edge_sources, kept_share, load_genotype, num_edges,
                                 op_counts, save_genotype, strongest_edges)
from fsd_d2.nas.ops import load_pool
from fsd_d2.viz.alphas import plot_alphas
from fsd_d2.viz.cells import draw_cell

BONE8, HEAD13 = load_pool("bone8"), load_pool("head13")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def hand_made_alphas():
    """Logits whose top-2 edges per node are known; some edges are dominated by 'none'."""
    a, op = torch.zeros(14, len(BONE8)), BONE8.index
    a[0, op("none")], a[0, op("conv_3x3")] = 10.0, 1.0  # node 0 keeps both inputs; conv wins over none
    a[1, op("dw_sep_conv_3x3")] = 2.0
    a[3, op("dil_conv_3x3_d3")], a[4, op("res2conv_3x3")] = 3.0, 2.0  # node 1: inputs 1 and 2
    a[5, op("none")], a[5, op("conv_3x3")] = 10.0, 5.0  # largest op logit of node 2, but none dominates: weak
    a[7, op("fac_conv_5x5")], a[8, op("skip_connect")] = 1.5, 1.0  # node 2: inputs 2 and 3
    a[9, op("dil_conv_3x3_d5")], a[13, op("conv_3x3")] = 4.0, 3.0  # node 3: inputs 0 and 4
    return a


def test_derive_keeps_two_strongest_edges_without_none():
    cell = derive(hand_made_alphas(), BONE8, 4)
    assert cell.edges == (
        (("dw_sep_conv_3x3", 1), ("conv_3x3", 0)),
        (("dil_conv_3x3_d3", 1), ("res2conv_3x3", 2)),
        (("fac_conv_5x5", 2), ("skip_connect", 3)),
        (("dil_conv_3x3_d5", 0), ("conv_3x3", 4)),
    )


def test_strongest_edges_keeps_each_nodes_two_strongest_strongest_first():
    """The one top-2 choice (derive and the latency table's cheapest genotype both call it), on hand-set strengths."""
    strength = torch.tensor([0.1, 0.3, 0.2, 0.9, 0.5])  # node 0: edges 0, 1; node 1: edges 2, 3, 4 (inputs 0, 1, 2)
    best_op = torch.tensor([0, 1, 2, 0, 1])
    assert edge_sources(2) == [0, 1, 0, 1, 2]
    assert strongest_edges(strength, best_op, ["a", "b", "c"], 2).edges == (
        (("b", 1), ("a", 0)),
        (("a", 1), ("b", 2)))


def test_kept_share_is_how_often_strongest_edges_keeps_an_edge():
    """An edge's expected cost in the derived cell (the latency target) is scaled by kept_share: with strengths
    alike in distribution, that is the frequency with which strongest_edges keeps the edge."""
    torch.manual_seed(0)
    nodes, draws = 3, 3000
    sources, kept = edge_sources(nodes), torch.zeros(len(edge_sources(nodes)))
    for _ in range(draws):
        cell = strongest_edges(torch.rand(len(sources)), torch.zeros(len(sources), dtype=torch.long), ["op"], nodes)
        for i, node in enumerate(cell.edges):
            for _, j in node:
                kept[num_edges(i) + j] += 1  # node i's edges follow the num_edges(i) edges of the nodes before it
    torch.testing.assert_close(kept / draws, torch.tensor(kept_share(nodes)), atol=0.03, rtol=0)


def skip_heavy_alphas():
    """Logits where 5 of the 14 edges lead with skip_connect, each with a known runner-up; the other edges lead with
    a weak dw_sep_conv_3x3. Softmaxed skip weights: edge 12 0.94, 3 0.87, 0 0.59, 1 0.57, 4 0.25."""
    a, op = torch.zeros(14, len(BONE8)), BONE8.index
    a[:, op("dw_sep_conv_3x3")] = 0.5
    for edge, (skip, runner_up, second) in {0: (3.0, "conv_3x3", 2.0), 1: (2.5, "fac_conv_5x5", 1.0),
                                            3: (4.0, "res2conv_3x3", 0.6), 4: (1.0, "dw_sep_conv_3x3", 0.8),
                                            12: (5.0, "dil_conv_3x3_d5", 0.9)}.items():
        a[edge, op("skip_connect")], a[edge, op(runner_up)] = skip, second
    return a


def test_the_skip_cap_keeps_the_strongest_skips_and_gives_the_others_their_next_op():
    plain = derive(skip_heavy_alphas(), BONE8, 4)
    assert [op for node in plain.edges for op, _ in node].count("skip_connect") == 5
    # P-DARTS drops the weakest edge-leading skip over all 14 edges (4, then 1, then 0) until 2 lead with it
    assert derive(skip_heavy_alphas(), BONE8, 4, max_skip=2).edges == (
        (("conv_3x3", 0), ("fac_conv_5x5", 1)),  # their runners-up, the edges ranked by them
        (("skip_connect", 1), ("dw_sep_conv_3x3", 2)),  # edge 4's runner-up now outranks edge 2
        (("dw_sep_conv_3x3", 0), ("dw_sep_conv_3x3", 1)),
        (("skip_connect", 3), ("dw_sep_conv_3x3", 0)))
    none = derive(skip_heavy_alphas(), BONE8, 4, max_skip=0)
    assert all(op != "skip_connect" for node in none.edges for op, _ in node)
    assert none.edges[1] == (("dw_sep_conv_3x3", 2), ("dw_sep_conv_3x3", 0))  # edge 3 is weak without its skip
    assert derive(skip_heavy_alphas(), BONE8, 4, max_skip=9) == plain  # a cap above the count changes nothing


def test_the_skip_cap_needs_another_op_and_a_count():
    with pytest.raises(ValueError, match=r"needs another op than 'none' and 'skip_connect'"):
        derive(torch.zeros(14, 2), ["none", "skip_connect"], 4, max_skip=1)
    with pytest.raises(ValueError, match=r"max_skip must be >= 0"):
        derive(skip_heavy_alphas(), BONE8, 4, max_skip=-2)


def test_op_counts_count_skips_and_parameter_free_ops_over_every_cell():
    cells = {"normal": CellGenotype([[("skip_connect", 0), ("max_pool_3x3", 1)], [("se", 2), ("conv_3x3", 0)]]),
             "reduce": CellGenotype([[("avg_pool_3x3", 0), ("skip_connect", 1)], [("skip_connect", 2), ("se", 0)]])}
    assert op_counts(Genotype("head13", cells)) == {"edges": 8, "skip_connections": 3, "parameter_free_ops": 5}


def test_derive_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"alphas have shape \(14, 13\), expected \(14, 8\)"):
        derive(torch.zeros(14, 13), BONE8, 4)


def test_str_is_readable():
    text = str(Genotype("bone8", {"reduce": derive(hand_made_alphas(), BONE8, 4)}))
    assert "genotype (pool bone8)" in text and "node 0 <- dw_sep_conv_3x3(c_{k-1}) + conv_3x3(c_{k-2})" in text


def test_yaml_round_trip(tmp_path):
    normal = CellGenotype([[["se", 0], ["non_local", 1]], [["max_pool_3x3", 2], ["dw_sep_conv_5x5", 0]],
                           [["avg_pool_3x3", 3], ["skip_connect", 1]], [["conv_3x3", 4], ["dw_sep_conv_3x3", 2]]])
    g = Genotype("head13", {"normal": normal, "reduce": derive(hand_made_alphas(), BONE8, 4)})
    path = save_genotype(g, tmp_path / "out" / "genotype_head.yaml")
    assert list(path.parent.iterdir()) == [path]  # the temp file was renamed, not left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable as any file written here, not mkstemp's 0600
    text = path.read_text()
    assert "pool: head13" in text and "- [[se, 0], [non_local, 1]]  # node 0" in text
    assert load_genotype(path, pool_ops=HEAD13, num_nodes=4, cell_types=["normal", "reduce"]) == g
    assert load_genotype(path) == g


def test_save_refuses_invalid_genotype(tmp_path):
    g = Genotype("bone8", {"reduce": CellGenotype([[("conv_7x7", 0), ("conv_3x3", 1)]])})
    with pytest.raises(ValueError, match="op 'conv_7x7' is not in pool bone8"):
        save_genotype(g, tmp_path / "g.yaml")
    assert not list(tmp_path.iterdir())


GOOD_NODES = """\
    - [[conv_3x3, 0], [dw_sep_conv_3x3, 1]]
    - [[conv_3x3, 2], [skip_connect, 0]]
"""


@pytest.mark.parametrize("text, kwargs, message", [
    ("pool: bone8\ncells:\n  reduce:\n" + GOOD_NODES + "    - [[conv_3x3, 0], [conv_7x7, 3]]\n", {},
     r"genotype_bone.yaml: cells.reduce node 2 edge 1: op 'conv_7x7' is not in pool bone8 \(known: none, "),
    ("pool: bone8\ncells:\n  reduce:\n" + GOOD_NODES + "    - [[conv_3x3, 0], [se, 3]]\n", {},
     "node 2 edge 1: op 'se' is not in pool bone8"),
    ("pool: bone8\ncells:\n  reduce:\n" + GOOD_NODES + "    - [[conv_3x3, 0], [conv_3x3, 4]]\n", {},
     r"cells.reduce node 2 edge 1: input 4 is out of range; node 2 reads 0 \(c_\{k-2\}\), 1 \(c_\{k-1\}\) or "
     r"earlier nodes 2..3"),
    ("pool: bone8\ncells:\n  reduce:\n" + GOOD_NODES, {"num_nodes": 4},
     r"cells.reduce: has 2 nodes but the model's cells have 4"),
    ("pool: bone8\ncells:\n  reduce:\n    - [[conv_3x3, 0], [conv_3x3, 1], [conv_3x3, 1]]\n", {},
     "cells.reduce node 0: has 3 edges; every node takes exactly 2"),
    ("pool: bone8\ncells:\n  reduce:\n    - [conv_3x3, [conv_3x3, 1]]\n", {},
     r"cells.reduce node 0 edge 0: expected \[op, input\]"),
    ("pool: bone8\ncells:\n  reduce:\n    - [[none, 0], [conv_3x3, 1]]\n", {},
     "node 0 edge 0: op 'none' cannot be an edge"),
    ("pool: bone8\ncells:\n  reduce:\n" + GOOD_NODES, {"cell_types": ["normal", "reduce"]},
     r"genotype_bone.yaml: missing cell type 'normal' \(has \['reduce'\]\)"),
    ("pool: bone8\ncells:\n  reduction:\n" + GOOD_NODES, {},
     r"unknown cell type 'reduction' \(known: normal, reduce\)"),
    ("pool: bone8\ncells: {}\n", {}, "'cells:' must map cell types"),
    ("cells:\n  reduce:\n" + GOOD_NODES, {}, "missing 'pool:'"),
    ("pool: bone8\nalphas: 1\ncells:\n  reduce:\n" + GOOD_NODES, {}, r"unknown top-level key\(s\) \['alphas'\]"),
    ("pool: bone8\ncells: [unclosed\n", {}, "genotype_bone.yaml: not valid YAML"),
    ("- just\n- a list\n", {}, "genotype_bone.yaml: expected a mapping with 'pool:' and 'cells:', got list"),
])
def test_load_genotype_errors(tmp_path, text, kwargs, message):
    path = tmp_path / "genotype_bone.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_genotype(path, **kwargs)


def test_explicit_pool_ops_and_missing_file(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("pool: custom\ncells:\n  reduce:\n" + GOOD_NODES)
    assert load_genotype(path).pool == "custom"  # unknown pool name: any registered op is accepted
    with pytest.raises(ValueError, match=r"op 'dw_sep_conv_3x3' is not in pool custom \(known: none, conv_3x3, "):
        load_genotype(path, pool_ops=["none", "conv_3x3", "skip_connect"])
    with pytest.raises(FileNotFoundError, match="missing.yaml: genotype file not found"):
        load_genotype(tmp_path / "missing.yaml")


def test_plots_write_png(tmp_path):
    torch.manual_seed(0)
    alphas = {"normal": torch.randn(14, len(HEAD13)), "reduce": torch.randn(14, len(HEAD13))}
    heatmap = plot_alphas(alphas, HEAD13, tmp_path / "alphas.png", "head search, iter 10")
    cell = draw_cell(derive(hand_made_alphas(), BONE8, 4), tmp_path / "cell.png", "FSD backbone reduce cell")
    for png in (heatmap, cell):
        assert png.stat().st_size > 1000 and png.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match=r"alphas\['reduce'\] has shape \(14, 8\), expected \(edges, 13\)"):
        plot_alphas({"reduce": torch.zeros(14, 8)}, HEAD13, tmp_path / "bad.png")


def test_a_head_genotype_given_as_the_backbone_is_named_as_such(compose_cfg):
    """The backbone builds from the model's pool: the error names that pool and the file's, not the file's pool
    with the model's op list."""
    from detectron2.modeling import build_model

    from fsd_d2.config import build_cfg

    head = Path(__file__).parents[2] / "projects/DeepLesion/genotypes/example_head.yaml"
    cfg = build_cfg(compose_cfg("train", "model=fsd_bone", f"model.genotype_bone={head}"))
    with pytest.raises(ValueError, match=r"example_head.yaml: cells.normal node \d edge \d: op '\w+' is not in pool "
                                         r"bone8, the model's \(the file was searched in head13: a genotype of the "
                                         r"other search, backbone vs head\?\) \(known: none, skip_connect"):
        build_model(cfg)
