"""Mixed precision to a byte budget (``--target-ratio``/``--target-size``, ``mbz.budget``), on a
narrow MobileNet-v2 and synthetic images."""

import itertools
import json
import re

import numpy as np
import pytest

import mbz
from mbz.budget import (
    AUTO_PRUNE_BITS,
    CANDIDATE_BITS,
    CANDIDATE_SPARSITIES,
    HEADROOM,
    MAX_AUTO_PRUNE,
    BudgetError,
    Candidate,
    Divergence,
    allocations,
    auto_prune,
    candidate_codings,
    candidate_masks,
    encoded_candidates,
    fisher_diagonal,
    fit,
    knapsack,
    rescaled,
    undominated,
)
from mbz.capture import capture
from mbz.config import PackConfig
from mbz.data import load_split
from mbz.fold import fold_batchnorm
from mbz.format import DenseTensor, UniformTensor, encode_mbz, read_mbz
from mbz.graph_ops import weight_nodes
from mbz.inspect import describe
from mbz.pack import quantize_graph
from mbz.quantize import STEP_CODES, Coding, quantize_weight, step_bits
from tests.helpers import invoke, narrow_mobilenet, save_mbz_checkpoint


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "data.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8),
        y_train=rng.integers(0, 10, 64),
        x_test=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
        y_test=rng.integers(0, 10, 16),
    )
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_mbz_checkpoint(tmp_path_factory.mktemp("model") / "model.pt", narrow_mobilenet())


def layer_bits(path) -> dict[str, int]:
    return {name: facts["bits"] for name, facts in read_mbz(path).metadata["layers"].items()}


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [5.0, 9.5])
def test_the_file_meets_the_ratio_in_real_bytes(tmp_path, model, data, ratio):
    out = tmp_path / "m.mbz"
    result = mbz.pack(model, out, data=str(data), target_ratio=ratio, calib_images=32)
    assert out.stat().st_size == result.file_bytes
    assert result.fp32_bytes / out.stat().st_size >= ratio
    assert read_mbz(out).metadata["pack_config"]["target_ratio"] == ratio
    bits = set(layer_bits(out).values())
    allowed = set(CANDIDATE_BITS) | {step_bits(m) for m in STEP_CODES}
    assert bits <= allowed and len(bits) > 1  # mixed precision, not one width


@pytest.mark.slow
def test_target_size_pins_and_inspect(tmp_path, model, data):
    out = tmp_path / "m.mbz"
    target = 160_000
    invoke("pack", model, "--data", data, "--calib-images", 32, "--target-size", target,
           "--bits", "fc=8,first=6", "-o", out)
    assert out.stat().st_size <= target
    rows = {row["layer"]: row for row in describe(out)["layers"]}
    assert rows["features.0.0"]["bits"] == 6 and rows["classifier.1"]["bits"] == 8
    assert {rows[name]["bits"] for name in rows} - {6, 8}  # the others were chosen
    assert layer_bits(out) == {name: row["bits"] for name, row in rows.items()}


@pytest.mark.slow
def test_an_impossible_budget_names_the_smallest_size_that_works(tmp_path, model, data):
    out = tmp_path / "m.mbz"
    refused = invoke("pack", model, "--data", data, "--calib-images", 32, "--target-ratio", 100,
                     "-o", out, expect=1)
    assert not out.exists() and "Traceback" not in refused.output
    errors = [line for line in refused.output.splitlines() if "budget" in line]
    assert len(errors) == 1 and errors[0].startswith("Error: ")
    smallest = int(re.search(r"--target-size (\d+)", refused.output).group(1))
    invoke("pack", model, "--data", data, "--calib-images", 32, "--target-size", smallest,
           "-o", out)
    # the named size is tight: the file is within the headroom kept for late metadata
    assert smallest - 2 * HEADROOM < out.stat().st_size <= smallest
    assert min(layer_bits(out).values()) == 2


def test_auto_prune_leaves_the_kept_weights_the_bits_it_aims_at():
    weights = 10_000
    enough = weights * AUTO_PRUNE_BITS / 8  # bytes for every weight at the aimed-at bits
    assert auto_prune(round(enough), weights) == 0.0
    assert auto_prune(round(4 * enough), weights) == 0.0  # more room: nothing pruned
    assert auto_prune(round(enough / 2), weights) == pytest.approx(0.5, abs=0.01)
    assert auto_prune(round(enough / 4), weights) == pytest.approx(0.75, abs=0.01)
    assert auto_prune(1, weights) == MAX_AUTO_PRUNE


@pytest.mark.slow
def test_prune_auto_reaches_a_ratio_the_unpruned_layers_cannot(tmp_path, model, data):
    common = ("--data", data, "--calib-images", 32, "--target-ratio", 15)
    refused = invoke("pack", model, *common, "-o", tmp_path / "a.mbz", expect=1)
    assert "--prune auto" in refused.output  # the error says what to do
    out = tmp_path / "b.mbz"
    packed = invoke("pack", model, *common, "--prune", "auto", "-o", out)
    share = read_mbz(out).metadata["pack_config"]["prune"]
    assert 0 < share <= MAX_AUTO_PRUNE
    assert f"--prune auto: removing {share:.0%}" in packed.output
    result = json.loads(invoke("pack", model, *common, "--prune", "auto", "-o", out,
                               "--json").output)
    assert result["prune"] == share and result["ratio"] >= 15
    captured, packed_file = capture(narrow_mobilenet()), read_mbz(out)

    def weights(graph: dict, shapes: dict) -> int:
        return sum(int(np.prod(shapes[n["params"]["weight"]].shape)) for n in weight_nodes(graph))

    before = weights(captured.graph, captured.params)
    after = weights(packed_file.metadata["graph"], packed_file.tensors)
    assert after == pytest.approx((1 - share) * before, rel=0.05)  # channels removed


def test_prune_auto_needs_a_budget_and_other_words_are_refused(model):
    refused = invoke("pack", model, "--prune", "auto", expect=2)
    assert "--target-ratio" in refused.output and "Traceback" not in refused.output
    refused = invoke("pack", model, "--prune", "most", "--target-ratio", 20, expect=2)
    assert "neither a number nor 'auto'" in refused.output
    refused = invoke("pack", model, "--prune", "1.5", expect=2)
    assert "not in [0, 1)" in refused.output


def test_a_budget_needs_data(model):
    refused = invoke("pack", model, "--target-ratio", 10, expect=2)
    assert "--data" in refused.output


def test_knapsack_finds_the_exhaustive_optimum():
    rng = np.random.default_rng(3)
    options = [
        [Candidate(b, DenseTensor(np.zeros(1, np.float32)), int(c), float(s))
         for b, (c, s) in enumerate(zip(rng.integers(1, 40, 4), rng.random(4), strict=True))]
        for _ in range(5)
    ]
    for room in (20, 60, 100, 150):
        fitting = [
            combo for combo in itertools.product(range(4), repeat=5)
            if sum(options[i][p].cost for i, p in enumerate(combo)) <= room
        ]
        picks = knapsack(options, room, bucket=1)
        if not fitting:
            assert picks is None
            continue
        best = min(sum(options[i][p].sensitivity for i, p in enumerate(c)) for c in fitting)
        assert sum(options[i][p].cost for i, p in enumerate(picks)) <= room
        assert sum(options[i][p].sensitivity for i, p in enumerate(picks)) == pytest.approx(best)
        # coarse buckets round costs up: the choice still fits in real bytes
        coarse = knapsack(options, room, bucket=7)
        if coarse is not None:
            assert sum(options[i][p].cost for i, p in enumerate(coarse)) <= room


def test_tighter_budgets_never_cost_more_bytes_nor_lose_less(data):
    captured = capture(narrow_mobilenet())
    graph, params = captured.graph, dict(captured.params)
    fold_batchnorm(graph, params)
    config = PackConfig()
    names = [node["params"]["weight"] for node in weight_nodes(graph)]
    fisher = fisher_diagonal(graph, params, names, config, load_split(str(data), "train"))
    codings = [Coding.of(config, bits) for bits in CANDIDATE_BITS]
    options = {
        n: undominated(encoded_candidates(n, params[n], fisher[n], codings, [None])) for n in names
    }

    def size_of(choice):
        tensors, layers = quantize_graph(graph, params, config, {}, choice)
        return len(encode_mbz({"layers": layers}, tensors))

    high = size_of({n: max(c, key=lambda c: c.cost) for n, c in options.items()})
    low = size_of({n: min(c, key=lambda c: c.cost) for n, c in options.items()})
    previous = None
    for target in np.linspace(high + 2000, low + 1100, 7).astype(int):
        choice = fit(options, int(target), size_of)
        size, loss = size_of(choice), sum(c.sensitivity for c in choice.values())
        assert size <= target
        if previous is not None:
            assert size <= previous[0] and loss >= previous[1]
        previous = (size, loss)
    assert previous[1] > 0


def test_sparsity_candidates_start_from_the_prune_floor_and_nest():
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    floor = np.abs(weight) > np.quantile(np.abs(weight), 0.3)
    masks = candidate_masks(weight, floor)
    assert masks[0] is floor
    sparsities = [1 - m.mean() for m in masks]
    assert sparsities == pytest.approx([0.3, 0.5, 0.75], abs=1e-3)
    for wider, narrower in itertools.pairwise(masks):
        assert not (narrower & ~wider).any()  # what one prunes, the sparser ones prune too
        # what a sparser mask drops on top is smaller than anything it keeps
        assert np.abs(weight[wider & ~narrower]).max() <= np.abs(weight[narrower]).min()
    assert len(candidate_masks(weight, None)) == len(CANDIDATE_SPARSITIES)  # 0.0: the floor


def test_the_budget_prunes_where_that_is_cheaper_than_fewer_bits():
    # Half of each weight is near zero: pruning the smallest magnitudes loses less than the
    # coarser codes the same bytes buy without pruning, and reaches sizes they cannot.
    rng = np.random.default_rng(5)
    weights = {}
    for i in range(3):
        weight = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
        weight[rng.random(weight.shape) < 0.5] *= 1e-3
        weights[f"w{i}"] = weight

    def masks(weight, prune):
        return candidate_masks(weight, None) if prune else [None]

    def options(prune):
        codings = [Coding.of(PackConfig(), bits) for bits in CANDIDATE_BITS]
        return {
            n: undominated(encoded_candidates(n, w, None, codings, masks(w, prune)))
            for n, w in weights.items()
        }

    def choose(prune, target):
        return fit(options(prune), target + HEADROOM, cost)

    def cost(choice):
        return sum(x.cost for x in choice.values())

    def loss(choice):
        return sum(c.sensitivity for c in choice.values())

    def summary(choices):
        return [{n: (c.bits, c.sparsity, c.cost) for n, c in choice.items()} for choice in choices]

    dense, sparse = choose(False, 2700), choose(True, 2700)
    assert cost(dense) <= 2700 and cost(sparse) <= 2700
    assert all(c.sparsity == 0 for c in dense.values())
    assert any(c.sparsity > 0 for c in sparse.values()) and loss(sparse) < loss(dense)
    floors = dict.fromkeys(weights, 0.0)
    codings = [Coding.of(PackConfig(), bits) for bits in CANDIDATE_BITS]
    found = {n: encoded_candidates(n, w, None, codings, candidate_masks(w, None))
             for n, w in weights.items()}
    # both are offered for measuring (the pruned one's estimate is the less reliable)
    offered = allocations(found, floors, 2700 + HEADROOM, cost)
    assert summary(offered) == summary([sparse, dense])
    with pytest.raises(BudgetError):  # below the smallest dense choice: only pruning fits
        choose(False, 2550)
    smaller = choose(True, 2550)
    assert summary(allocations(found, floors, 2550 + HEADROOM, cost)) == summary([smaller])
    assert cost(smaller) <= 2550
    for name, candidate in smaller.items():  # pruned positions decode to exactly zero
        mask = candidate.tensor.mask
        assert candidate.sparsity > 0 and np.all(candidate.tensor.decode()[~mask] == 0.0), name


def test_the_divergence_measures_the_whole_choice(data):
    captured = capture(narrow_mobilenet())
    graph, params = captured.graph, dict(captured.params)
    fold_batchnorm(graph, params)
    names = [node["params"]["weight"] for node in weight_nodes(graph)]
    divergence = Divergence(graph, params, PackConfig(), load_split(str(data), "train"))

    def choice(bits):
        coding = Coding.of(PackConfig(), bits)
        return {n: Candidate(bits, quantize_weight(params[n], coding), 0, 0.0) for n in names}

    coarse, fine = choice(2), choice(8)
    assert divergence({}) == 0.0
    assert divergence(fine) < divergence({names[0]: coarse[names[0]]}) < divergence(coarse)


@pytest.mark.slow
def test_a_budget_with_weight_pruning_fits_and_records_the_sparsity(tmp_path, model, data):
    out = tmp_path / "m.mbz"
    result = mbz.pack(model, out, data=str(data), target_ratio=12.0, calib_images=32)
    assert result.fp32_bytes / out.stat().st_size >= 12.0
    layers = read_mbz(out).metadata["layers"]
    assert any(facts["sparsity"] >= 0.25 for facts in layers.values())
    rows = {row["layer"]: row for row in describe(out)["layers"]}
    for name, facts in layers.items():
        assert rows[name]["sparsity"] == pytest.approx(facts["sparsity"], abs=1e-6)


def test_uniform_budgets_have_steps_between_whole_bits():
    uniform = PackConfig(method="uniform")
    steps = [c.max_code for c in candidate_codings(uniform, CANDIDATE_BITS, None) if c.max_code]
    assert steps == list(STEP_CODES)
    pinned = candidate_codings(uniform, (4,), None)  # a --bits rule: steps stored in 4 bits only
    assert [(c.bits, c.max_code) for c in pinned] == [(4, None), (4, 5), (4, 7)]
    per_tensor = PackConfig(method="uniform", per_channel=False)
    assert not any(c.max_code for c in candidate_codings(per_tensor, CANDIDATE_BITS, None))
    # the finer steps let a budget lose less than whole bits alone at the same bytes
    rng = np.random.default_rng(6)
    weights, gains = {}, {}
    for i in range(3):
        gains[f"w{i}"] = rng.uniform(0.2, 3.0, 32).astype(np.float32)
        weights[f"w{i}"] = rng.standard_normal((32, 48, 1, 1)).astype(np.float32) * gains[
            f"w{i}"][:, None, None, None]

    def loss(codings_of, target):
        options = {
            n: undominated(encoded_candidates(n, w, None, codings_of(n), [None]))
            for n, w in weights.items()
        }
        choice = fit(options, target + HEADROOM, lambda c: sum(x.cost for x in c.values()))
        assert sum(c.cost for c in choice.values()) <= target
        return sum(c.sensitivity for c in choice.values())

    def whole(name):
        return [Coding.of(uniform, bits) for bits in CANDIDATE_BITS]

    def fine(name):
        return candidate_codings(uniform, CANDIDATE_BITS, gains[name])

    gaps = [loss(whole, t) - loss(fine, t) for t in range(2400, 5000, 200)]
    assert min(gaps) >= -1e-9 and max(gaps) > 0


@pytest.mark.slow
def test_a_uniform_budget_fits_with_step_codes(tmp_path, model, data):
    out = tmp_path / "m.mbz"
    result = mbz.pack(model, out, data=str(data), target_ratio=9.0, method="uniform",
                      calib_images=32)
    assert result.fp32_bytes / out.stat().st_size >= 9.0
    steps = []  # largest codes of tensors with the symmetric zero point
    for tensor in read_mbz(out).tensors.values():
        zero = 2 ** (getattr(tensor, "bits", 1) - 1)
        if isinstance(tensor, UniformTensor) and np.all(tensor.zero_point == zero):
            largest = int(np.abs(tensor.qdata.astype(int) - zero).max())
            steps += [largest] if largest != zero - 1 else []
    assert set(steps) & {2, 5, 10, 22, 45}  # step-size codes no whole-bit code has
    # the numpy runtime, torch and ONNX Runtime agree on them as on any uniform codes
    report = json.loads(invoke("eval", out, "--data", data, "--runtime", "all", "--json").output)
    assert report["ok"], report["failures"]


def test_two_probes_map_the_estimates_onto_measured_growth():
    tensor = DenseTensor(np.zeros(1, np.float32))
    layer = [Candidate(b, tensor, 100 * b, s) for b, s in ((2, 8.0), (3, 2.0), (4, 0.5))]
    # measured: 0.4 at 2 bits, 0.01 at 4 bits, a 40x growth where the estimate grows 16x
    mapped = rescaled(layer, [(layer[0], 0.4), (layer[2], 0.01)])
    assert [c.sensitivity for c in mapped][::2] == pytest.approx([0.4, 0.01])
    assert 0.01 < mapped[1].sensitivity < 0.4
    assert mapped[1].sensitivity < 0.4 * 2.0 / 8.0  # below the linear map of the 2-bit probe
    linear = rescaled(layer, [(layer[1], 0.1)])  # one probe: proportional
    assert [c.sensitivity for c in linear] == pytest.approx([0.4, 0.1, 0.025])
