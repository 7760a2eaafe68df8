"""Op-latency tables: the expected latency and its gradient, the architect's latency term, the table file, and
the cell positions it is measured at (checked against the built FSD), and the latency target."""
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from torch import nn

from fsd_d2.config import build_cfg
from fsd_d2.engine.timing import measure_cells, profile_ops
from fsd_d2.errors import ConfigError, MissingFileError
from fsd_d2.modeling.cell_layout import cell_positions
from fsd_d2.nas.architect import Architect
from fsd_d2.nas.cells import DerivedCell
from fsd_d2.nas.genotype import CellGenotype, Genotype, derive, edge_sources
from fsd_d2.nas.latency import CellLatency, CellPosition, LatencyObjective, LatencyTable, expected_latency
from fsd_d2.nas.latency_io import load_table, save_table
from fsd_d2.nas.latency_repair import meet_latency_target
from fsd_d2.nas.searchable import CellAlphas
from test_architect import ETA, loss_fn, make, sgd

EXAMPLES = Path(__file__).resolve().parents[2] / "projects" / "DeepLesion" / "genotypes"
POOL = ["none", "skip_connect", "conv_3x3", "dw_sep_conv_3x3"]
NODES = 2  # 5 edges: node 0 <- inputs 0, 1; node 1 <- inputs 0, 1 and node 0
# (edge leaving an input, edge leaving a node) in ms: dw_sep cheapest on input edges, skip on node edges
COSTS = {"none": (0.0, 0.0), "skip_connect": (5.0, 0.5), "conv_3x3": (3.0, 3.0), "dw_sep_conv_3x3": (1.0, 2.0)}


def _position(name, cell_type, reduction):
    return CellPosition(name, cell_type, reduction, False, 4, ((1, 8, 8, 8), (1, 8, 8, 8)))


def _table(kind="head"):
    cells = [CellLatency(_position("a", "normal", False), 0.25, {op: (c[0] + 1, c[1] + 1) for op, c in COSTS.items()}),
             CellLatency(_position("b", "reduce", True), 0.5, dict(COSTS))]
    return LatencyTable(kind, "tiny", POOL, NODES, cells, {"device": "cpu"})


def _alphas(pool=POOL):
    torch.manual_seed(0)
    return CellAlphas("tiny", pool, NODES, cell_types=("normal", "reduce"))


def test_expected_latency_is_the_hand_sum_for_one_hot_alphas():
    table, alphas = _table(), _alphas()
    choice = {"normal": [2, 3, 1, 2, 1], "reduce": [3, 3, 2, 1, 1]}  # one op per edge (pool index)
    with torch.no_grad():
        for t, ops in choice.items():
            alphas.logits[t].copy_(100.0 * F.one_hot(torch.tensor(ops), len(POOL)))
    hand = sum(table.cells[i].ms[POOL[op]][0 if j < 2 else 1]
               for i, t in enumerate(("normal", "reduce")) for op, j in zip(choice[t], edge_sources(NODES)))
    matrices = {t: m.float() for t, m in table.edge_matrices(POOL).items()}
    assert expected_latency(alphas.weights(), matrices).item() == pytest.approx(hand, rel=1e-6)


def test_expected_latency_is_differentiable_in_the_alphas():
    table, alphas = _table(), _alphas()
    matrices = table.edge_matrices(POOL)
    logits = {t: a.detach().double().requires_grad_() for t, a in alphas.logits.items()}

    def f(normal, reduce):
        return expected_latency({"normal": normal.softmax(-1), "reduce": reduce.softmax(-1)}, matrices)

    assert torch.autograd.gradcheck(f, (logits["normal"], logits["reduce"]))
    grad = torch.autograd.grad(f(logits["normal"], logits["reduce"]), logits["reduce"])[0]
    w = logits["reduce"].softmax(-1)
    m = matrices["reduce"]
    torch.testing.assert_close(grad, w * (m - (w * m).sum(-1, keepdim=True)))  # d/da_o = w_o (lat_o - E)


def test_objective_is_normalised_to_one_at_uniform_alphas():
    alphas = _alphas()
    with torch.no_grad():
        for a in alphas.logits.values():
            a.zero_()
    objective = LatencyObjective(_table(), alphas, weight=0.3)
    assert objective().item() == pytest.approx(0.3)
    assert objective.expected_ms().item() == pytest.approx(objective.uniform_ms)


def test_predicted_latency_of_a_genotype_is_overhead_plus_chosen_ops():
    cell = CellGenotype([[("conv_3x3", 0), ("skip_connect", 1)], [("dw_sep_conv_3x3", 2), ("conv_3x3", 0)]])
    predicted = _table().predict(Genotype("tiny", {"normal": cell, "reduce": cell}))
    assert predicted == [0.25 + 4 + 6 + 3 + 4, 0.5 + 3 + 5 + 2 + 3]


@pytest.mark.parametrize("order", [1, 2])
def test_penalty_gradient_is_added_exactly_outside_the_finite_difference(order):
    """The term depends on the alphas only: hypergradient with it = hypergradient without it + its gradient."""
    model, plain, (train, val, warm) = make(order=order)
    opt = sgd(model, 0.9, warm)

    def penalty():
        return 3.0 * (model.alpha ** 2).sum()

    with_penalty = Architect(model, loss_fn, arch_params=model.arch(), weight_params=model.weights(), lr=3e-3,
                             weight_decay=1e-3, order=order, arch_penalty=penalty)
    torch.manual_seed(5)
    want = plain.arch_gradient(train, val, eta=ETA, weight_optimizer=opt)
    torch.manual_seed(5)
    got = with_penalty.arch_gradient(train, val, eta=ETA, weight_optimizer=opt)
    torch.testing.assert_close(got[0], want[0] + 6.0 * model.alpha.detach(), rtol=1e-12, atol=1e-12)
    assert torch.equal(got[1], want[1])  # an alpha the penalty does not touch
    value = penalty().item()
    assert with_penalty.step(train, val, eta=ETA, weight_optimizer=opt)["arch_penalty"] == value


def _indifferent_search(weight, steps=60):
    """Alphas of a model whose loss ignores them: only the latency term can move them."""
    torch.manual_seed(0)
    net, alphas = nn.Linear(3, 1), _alphas()
    batch = (torch.randn(4, 3), torch.randn(4, 1))
    objective = LatencyObjective(_table(), alphas, weight) if weight else None
    arch = Architect(net, lambda m, b: F.mse_loss(m(b[0]), b[1]), arch_params=list(alphas.parameters()),
                     weight_params=list(net.parameters()), lr=0.05, weight_decay=0.0, order=1, arch_penalty=objective)
    for _ in range(steps):
        arch.step(batch, batch, eta=0.01, weight_optimizer=None)
    return alphas


def test_a_large_latency_weight_picks_the_cheapest_op_where_the_loss_is_indifferent():
    genotype = _indifferent_search(weight=10.0).genotype()
    for cell_type, cheapest in (("reduce", {0: "dw_sep_conv_3x3", 1: "skip_connect"}),
                                ("normal", {0: "dw_sep_conv_3x3", 1: "skip_connect"})):
        for node in genotype.cells[cell_type].edges:
            for op, j in node:
                assert op == cheapest[0 if j < 2 else 1], (cell_type, node)


def test_without_the_latency_weight_the_alphas_do_not_move():
    before = _alphas()
    after = _indifferent_search(weight=0.0)
    for t in before.logits:
        assert torch.equal(after.logits[t], before.logits[t])  # no latency term, no alpha gradient


# --- the table file ---

def _profiled(tmp_path):
    positions = [CellPosition("x.normal0", "reduce", False, False, 4, ((1, 8, 8, 8), (1, 8, 8, 8))),
                 CellPosition("x.reduce", "reduce", True, False, 4, ((1, 8, 8, 8), (1, 16, 8, 8)))]
    table = profile_ops("bone", "tiny", POOL, NODES, positions, warmup=0, repeats=1, meta={"image_size": 32})
    return table, save_table(table, tmp_path / "op_latency_bone.yaml")


def test_table_round_trip_and_measured_cells(tmp_path):
    table, path = _profiled(tmp_path)
    loaded = load_table(path)
    assert loaded.kind == "bone" and loaded.ops == POOL and loaded.num_nodes == NODES
    assert loaded.meta["device"] == "cpu" and loaded.meta["image_size"] == 32 and "torch" in loaded.meta
    assert [c.position for c in loaded.cells] == [c.position for c in table.cells]
    for got, want in zip(loaded.cells, table.cells):
        assert got.ms.keys() == want.ms.keys() and got.ms["none"] == (0.0, 0.0)
        for op in POOL:
            assert got.ms[op] == pytest.approx(want.ms[op], abs=1e-4)
    alphas = torch.randn(5, len(POOL))
    genotype = Genotype("tiny", {"reduce": derive(alphas, POOL, NODES)})
    measured = measure_cells(genotype, [c.position for c in loaded.cells], warmup=0, repeats=1)
    assert len(measured) == 2 and all(m > 0 for m in measured)


def test_missing_and_corrupt_tables_name_the_file(tmp_path):
    with pytest.raises(MissingFileError, match=r"nothere.yaml: op-latency table not found.*\+stage=profile_ops"):
        load_table(tmp_path / "nothere.yaml")
    _, path = _profiled(tmp_path)
    text = path.read_text()
    for bad in ("cells: [\n", text.replace("format: 1", "format: 7"),
                text.replace("conv_3x3: [", "conv_3x3: [-1, ", 1), text.replace("kind: bone", "kind: neck")):
        path.write_text(bad)
        with pytest.raises(ConfigError, match=rf"{path}: not a valid op-latency table .*\+stage=profile_ops"):
            load_table(path)


def test_a_table_that_does_not_fit_the_search_names_the_file_and_the_fix(tmp_path):
    _, path = _profiled(tmp_path)
    table = load_table(path)
    table.check(str(path), "bone", POOL[:3], NODES)  # a sub-pool is priced by the table
    with pytest.raises(ConfigError, match=rf"{path} is the op-latency table of the bone search but this is the head"):
        table.check(str(path), "head", POOL, NODES)
    with pytest.raises(ConfigError, match=rf"{path} has no latencies for \['se'\].*model=fsd_search_bone"):
        table.check(str(path), "bone", POOL + ["se"], NODES)
    with pytest.raises(ConfigError, match=rf"{path} was measured for cells of 2 nodes.*model.num_nodes"):
        table.check(str(path), "bone", POOL, 4)


# --- where the table is measured: the derived FSD's cells ---

def test_cell_positions_are_those_of_the_built_fsd(compose_cfg):
    cfg = build_cfg(compose_cfg("train_fsd", f"model.genotype_bone={EXAMPLES / 'example_bone.yaml'}",
                                f"model.genotype_head={EXAMPLES / 'example_head.yaml'}", "model.normal_cells_per_stage=2"))
    model = build_model(cfg).eval()
    seen = []
    for module in model.modules():
        if isinstance(module, DerivedCell):
            module.register_forward_pre_hook(lambda m, args: seen.append((m, [tuple(a.shape) for a in args])))
    with torch.no_grad():
        model([{"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8), "height": 64, "width": 64}])
    bone, head = cell_positions(cfg, "bone"), cell_positions(cfg, "head")
    assert len(seen) == len(bone) + len(head) == 9 + 3
    for i, ((cell, shapes), position) in enumerate(zip(seen, bone + head)):
        assert cell.reduction == position.reduction
        assert cell.preprocess1[1].out_channels == position.channels
        if i >= len(bone):  # as many ROIs as this untrained RPN proposed; the table uses POST_NMS_TOPK_TEST
            shapes = [(position.inputs[0][0], *s[1:]) for s in shapes]
        assert shapes == list(position.inputs), position.name
    assert head[0].inputs[0][0] == cfg.MODEL.RPN.POST_NMS_TOPK_TEST


def test_the_cheapest_genotype_is_the_floor_of_the_table():
    table = _table()
    cheapest = table.cheapest()
    assert cheapest.cells["reduce"].edges == ((("dw_sep_conv_3x3", 0), ("dw_sep_conv_3x3", 1)),
                                              (("skip_connect", 2), ("dw_sep_conv_3x3", 0)))
    floor = sum(table.predict(cheapest))
    slower = _indifferent_search(weight=0.0).genotype()  # near-uniform alphas: some dearer choice
    assert floor < sum(table.predict(slower))


def test_the_safe_target_is_met_by_the_repair_whatever_edges_a_search_derives():
    """Every genotype of the tiny space (each node any two distinct inputs, any ops) is repaired to the safe target,
    and one genotype needs all of it: a tighter target fails for it."""
    import itertools

    table = _table()
    safe = table.safe_target_ms(POOL)
    assert safe == pytest.approx(12.75)  # 0.25 + 4 x 2 (normal: inputs at dw_sep) + 0.5 + 4 x 1 (reduce)
    node1_inputs = list(itertools.combinations(range(3), 2))
    for a, b in itertools.product(node1_inputs, repeat=2):
        cells = {t: CellGenotype([[("conv_3x3", 0), ("conv_3x3", 1)], [("conv_3x3", j) for j in pair]])
                 for t, pair in zip(("normal", "reduce"), (a, b))}
        assert sum(table.predict(meet_latency_target(table, Genotype("tiny", cells), safe, POOL))) <= safe
    assert table.floor_ms(POOL) < safe
    with pytest.raises(ConfigError, match="search.latency_target_ms=12.7"):
        cell = CellGenotype([[("conv_3x3", 0), ("conv_3x3", 1)], [("conv_3x3", 0), ("conv_3x3", 1)]])
        meet_latency_target(table, Genotype("tiny", {"normal": cell, "reduce": cell}), safe - 0.05, POOL)


# --- the latency target (TuNAS' absolute-value term, the derivation's repair) ---

def test_a_target_makes_the_term_tunas_absolute_value_of_the_derived_latency():
    table, alphas = _table(), _alphas()
    with torch.no_grad():
        alphas.logits["normal"].copy_(100.0 * F.one_hot(torch.tensor([2, 2, 2, 2, 2]), len(POOL)))  # conv_3x3
        alphas.logits["reduce"].copy_(100.0 * F.one_hot(torch.tensor([1, 1, 1, 1, 1]), len(POOL)))  # skip
    # a derived node keeps 2 of its 2 + i edges: node 0 counts its 2 edges whole, node 1 two thirds of its 3
    derived = (0.25 + 4 * 2 + 4 * 3 * 2 / 3) + (0.5 + 5 * 2 + (5 + 5 + 0.5) * 2 / 3)
    objective = LatencyObjective(table, alphas, weight=0.5, target_ms=20.0)
    assert objective.expected_derived_ms().item() == pytest.approx(derived, rel=1e-5)
    assert objective().item() == pytest.approx(0.5 * abs(derived / 20.0 - 1), rel=1e-5)
    far_under = LatencyObjective(table, alphas, weight=0.5, target_ms=4 * derived)
    assert far_under().item() == pytest.approx(0.5 * 0.75, rel=1e-5)  # steered up to the target too (TuNAS)
    plain = LatencyObjective(table, alphas, weight=0.5)
    mixture = 5 * 4 + 4 * 5 + 0.5  # every edge of the mixture: 5 conv edges of 4 ms; skip: 4 input edges, 1 node edge
    assert plain().item() == pytest.approx(0.5 * mixture / plain.uniform_ms)  # no target: the term of before


def _conv_everywhere():
    cell = CellGenotype([[("conv_3x3", 0), ("conv_3x3", 1)], [("conv_3x3", 2), ("conv_3x3", 0)]])
    return Genotype("tiny", {"normal": cell, "reduce": cell})


def test_a_genotype_above_the_target_is_repaired_dearest_edge_first_keeping_its_inputs():
    table, genotype = _table(), _conv_everywhere()
    before = sum(table.predict(genotype))  # 0.25 + 16 + 0.5 + 12 = 28.75
    lines = []
    repaired = meet_latency_target(table, genotype, before - 1.0, POOL, log=lines.append)
    assert sum(table.predict(repaired)) <= before - 1.0
    # the dearest edges are the normal cell's (4 ms); of those, the node edge saves most (skip: 1.5 ms)
    assert repaired.cells["normal"].edges[1] == (("skip_connect", 2), ("conv_3x3", 0))
    assert repaired.cells["reduce"] == genotype.cells["reduce"]
    for t in genotype.cells:  # every node keeps its inputs
        assert [[j for _, j in node] for node in repaired.cells[t].edges] == \
               [[j for _, j in node] for node in genotype.cells[t].edges]
    assert "predicted at 28.75 ms" in lines[0] and "search.latency_target_ms is 27.75 ms" in lines[0]
    assert lines[1:] == ["latency target: normal node 1: conv_3x3 -> skip_connect on its edge from node 0 (-2.50 ms), "
                         "now 26.25 ms"]
    assert meet_latency_target(table, genotype, before, POOL) == genotype  # met: nothing to repair


def test_the_repair_keeps_the_skip_cap_and_refuses_an_unreachable_target_naming_the_key():
    table, genotype = _table(), _conv_everywhere()
    capped = meet_latency_target(table, genotype, 20.0, POOL, max_skip=0)
    assert all(op != "skip_connect" for cell in capped.cells.values() for node in cell.edges for op, _ in node)
    assert sum(table.predict(capped)) <= 20.0
    floor = sum(table.predict(table.cheapest(POOL)))
    with pytest.raises(ConfigError, match=r"search.latency_target_ms=5: the derived head cells are predicted at "
                                          rf"\d+\.\d\d ms even with the cheapest op .* at least {floor:.2f} "):
        meet_latency_target(table, genotype, 5.0, POOL)
    # the floor (11.75 ms) meets 12 ms, but not cells fed by their inputs alone: 0.25 + 4 x 2 + 0.5 + 4 x 1 = 12.75 ms
    inputs_only = CellGenotype([[("conv_3x3", 0), ("conv_3x3", 1)], [("conv_3x3", 0), ("conv_3x3", 1)]])
    with pytest.raises(ConfigError, match=re.escape(
            "search.latency_target_ms=12: the derived head cells are predicted at 12.75 ms even with the cheapest op "
            "of the pool on every edge they keep; other edges reach it (the table's cheapest genotype: 11.75 ms): "
            "search with search.latency_weight > 0, or set search.latency_target_ms to at least 12.75")):
        meet_latency_target(table, Genotype("tiny", {"normal": inputs_only, "reduce": inputs_only}), 12.0, POOL)
