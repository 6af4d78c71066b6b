"""Capturing torch modules as mbz graphs, and running the graphs with torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mbz.capture import CapturedModel, capture
from mbz.errors import MbzError
from mbz.fold import fold_batchnorm
from mbz.models import cifar_mobilenet_v2
from mbz.prune import prune_channels
from mbz.runtime import Program, validate_graph
from mbz.torch_graph import GraphModule, preprocess_images
from tests.helpers import CourseMobileNetV2

ATOL = 1e-4
SCRIPT_WARNING = "ignore:`torch.jit.*` is deprecated:FutureWarning"


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in eval mode with random BatchNorm statistics and affine parameters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                channels = module.num_features
                module.running_mean.copy_(torch.rand(channels, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
                if module.affine:
                    module.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
                    module.bias.copy_(torch.rand(channels, generator=generator) - 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def mobilenet() -> nn.Module:
    torch.manual_seed(0)
    return randomized(cifar_mobilenet_v2(width_mult=0.25))


@pytest.fixture(scope="module")
def course() -> nn.Module:
    torch.manual_seed(1)
    return randomized(CourseMobileNetV2(width=8), seed=1)


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def graph_output(captured: CapturedModel, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return GraphModule(captured.graph, captured.params).eval()(batch)


def assert_same_outputs(captured: CapturedModel, model: nn.Module, batch: torch.Tensor) -> None:
    with torch.no_grad():
        expected = model(batch)
    got = graph_output(captured, batch)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < ATOL


def ops(captured: CapturedModel) -> set[str]:
    return {node["op"] for node in captured.graph["nodes"]}


def test_mobilenet_matches_torch(mobilenet, batch):
    captured = capture(mobilenet)
    assert_same_outputs(captured, mobilenet, batch)
    assert ops(captured) == {
        "conv2d",
        "batchnorm",
        "relu6",
        "add",
        "global_avgpool",
        "flatten",
        "linear",
    }
    validate_graph(captured.graph, captured.params)


def test_graph_header_and_names(mobilenet):
    graph = capture(mobilenet).graph
    assert graph["input"] == "input"
    assert graph["input_shape"] == [3, 32, 32]
    assert graph["output"] == "classifier.1"
    first = graph["nodes"][0]
    assert first == {
        "name": "features.0.0",
        "op": "conv2d",
        "inputs": ["input"],
        "output": "features.0.0",
        "params": {"weight": "features.0.0.weight", "bias": "features.0.0.bias"},
        "attrs": {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1},
    }
    names = [node["name"] for node in graph["nodes"]]
    assert len(set(names)) == len(names)


def test_course_model_matches_torch(course, batch):
    captured = capture(course)
    assert_same_outputs(captured, course, batch)
    assert ops(captured) == {
        "conv2d",
        "batchnorm",
        "relu",
        "add",
        "avgpool2d",
        "flatten",
        "linear",
    }


def test_course_avg_pool_and_view(course):
    nodes = capture(course).graph["nodes"]
    pool = next(node for node in nodes if node["op"] == "avgpool2d")
    assert pool["attrs"] == {"kernel": [4, 4], "stride": [4, 4], "padding": [0, 0]}
    assert [node["op"] for node in nodes[-3:]] == ["avgpool2d", "flatten", "linear"]


def test_numpy_runtime_agrees(course, batch):
    captured = capture(course)
    preprocess = {"layout": "NHWC", "dtype": "uint8", "mean": [0.0] * 3, "std": [1.0] * 3}
    program = Program(captured.graph, captured.params, preprocess)
    expected = graph_output(captured, batch).numpy()
    np.testing.assert_allclose(program.run(batch.numpy()), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("fixture", ["mobilenet", "course"])
def test_bn_gamma_per_batchnorm_node(request, fixture):
    model = request.getfixturevalue(fixture)
    captured = capture(model)
    modules = dict(model.named_modules())
    bn_nodes = [node["name"] for node in captured.graph["nodes"] if node["op"] == "batchnorm"]
    assert sorted(captured.bn_gamma) == sorted(bn_nodes)
    assert len(bn_nodes) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for name in bn_nodes:
        np.testing.assert_array_equal(
            captured.bn_gamma[name], modules[name].weight.detach().numpy()
        )


def test_batchnorm_scale_and_shift(mobilenet):
    captured = capture(mobilenet)
    bn = mobilenet.features[0][1]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    params = captured.params
    np.testing.assert_allclose(params["features.0.1.scale"], scale.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(params["features.0.1.shift"], shift.detach().numpy(), atol=1e-6)
    assert all(value.dtype == np.float32 for value in params.values())


@pytest.mark.parametrize("fixture", ["mobilenet", "course"])
def test_fold_keeps_outputs(request, fixture, batch):
    model = request.getfixturevalue(fixture)
    captured = capture(model)
    before = graph_output(captured, batch)
    fold_batchnorm(captured.graph, captured.params)
    assert "batchnorm" not in ops(captured)
    assert (graph_output(captured, batch) - before).abs().max().item() < ATOL


def test_channel_pruning_runs_on_capture(course, batch):
    captured = capture(course)
    prune_channels(captured.graph, captured.params, captured.bn_gamma, 0.3)
    fold_batchnorm(captured.graph, captured.params)
    validate_graph(captured.graph, captured.params)
    assert graph_output(captured, batch).shape == (4, 10)


def test_conv_without_bias_gets_zero_bias(course):
    captured = capture(course)
    assert course.conv1.bias is None
    np.testing.assert_array_equal(captured.params["conv1.bias"], np.zeros(4, np.float32))


class Wrapped(nn.Module):
    """Conv blocks in a ``features`` Sequential, then an arbitrary head."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), *layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def test_unsupported_module_names_type_and_path():
    model = Wrapped(nn.Sequential(nn.BatchNorm2d(4), nn.GELU()))
    with pytest.raises(MbzError, match=r"'GELU' in module 'features\.1\.1'"):
        capture(model)


def test_unsupported_function_names_function_and_module():
    class GeluBlock(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.gelu(x)

    with pytest.raises(MbzError, match=r"'gelu' in module 'features\.1'"):
        capture(Wrapped(GeluBlock()))


@pytest.mark.parametrize(
    "layer, message",
    [
        (nn.AvgPool2d(2, ceil_mode=True), r"average pooling in module 'features\.1'"),
        (nn.AvgPool2d(2, count_include_pad=False), "count_include_pad=False"),
        (nn.MaxPool2d(2, dilation=2), r"max pooling in module 'features\.1'"),
        (nn.Conv2d(4, 4, 3, padding="same"), "numeric zero padding"),
        (nn.Conv2d(4, 4, 3, padding_mode="reflect"), "padding_mode='reflect'"),
        (nn.AdaptiveAvgPool2d(2), "output size 1"),
        (nn.Hardtanh(-1.0, 1.0), "'Hardtanh'"),
    ],
)
def test_unsupported_settings_are_named(layer, message):
    with pytest.raises(MbzError, match=message):
        capture(Wrapped(layer))


def test_untracked_batchnorm_statistics_are_refused():
    with pytest.raises(MbzError, match="track_running_stats=False"):
        capture(Wrapped(nn.BatchNorm2d(4, track_running_stats=False)))


class Functional(nn.Module):
    """The functional spellings of pooling, activations, adds and flattening."""

    def __init__(self, keepdim: bool) -> None:
        super().__init__()
        self.keepdim = keepdim
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.drop = nn.Dropout(0.5)
        self.linear = nn.Linear(4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.conv(x), 2)
        x = F.hardtanh(x, 0.0, 6.0) + torch.relu(x)
        x += F.dropout(F.relu6(x), 0.3, training=self.training)
        x = x.mean((2, 3), keepdim=self.keepdim)
        x = x.reshape(x.shape[0], -1)
        return self.linear(self.drop(x))


def test_module_spellings(batch):
    shared = nn.ReLU()
    layers = (shared, nn.MaxPool2d(2), shared, nn.AvgPool2d(3, stride=1, padding=1))
    head = (nn.Identity(), nn.Dropout2d(), nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten())
    model = randomized(Wrapped(nn.BatchNorm2d(4, affine=False), *layers, *head, nn.Linear(4, 2)))
    captured = capture(model)
    assert_same_outputs(captured, model, batch)
    assert [node["name"] for node in captured.graph["nodes"]] == [
        "features.0",
        "features.1",
        "features.2",
        "features.3",
        "features.2_1",
        "features.5",
        "features.8",
        "features.9",
        "features.10",
    ]
    np.testing.assert_array_equal(captured.bn_gamma["features.1"], np.ones(4, np.float32))


@pytest.mark.parametrize("keepdim", [True, False])
def test_functional_spellings(keepdim, batch):
    model = Functional(keepdim).eval()
    captured = capture(model)
    assert_same_outputs(captured, model, batch)
    assert ops(captured) == {
        "conv2d",
        "maxpool2d",
        "relu6",
        "relu",
        "add",
        "global_avgpool",
        "flatten",
        "linear",
    }
    np.testing.assert_array_equal(captured.params["linear.bias"], np.zeros(3, np.float32))


def test_capture_restores_training_mode(batch):
    model = randomized(CourseMobileNetV2(width=8))
    expected = model(batch).detach()
    model.train()
    captured = capture(model)
    assert model.training and model.layers[0].training
    assert (graph_output(captured, batch) - expected).abs().max().item() < ATOL


def test_other_input_shape(course):
    assert capture(course, input_shape=(3, 64, 64)).graph["input_shape"] == [3, 64, 64]


def test_two_outputs_are_refused():
    class TwoHeads(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    with pytest.raises(MbzError, match="one tensor of logits"):
        capture(TwoHeads())


def test_data_dependent_control_flow_is_refused():
    class Branchy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.sum() > 0 else -x

    with pytest.raises(MbzError, match="could not trace"):
        capture(Branchy())


@pytest.mark.filterwarnings(SCRIPT_WARNING)
def test_torchscript_mobilenet_is_rebuilt(mobilenet, batch):
    scripted = torch.jit.script(mobilenet)
    captured = capture(scripted)
    assert_same_outputs(captured, mobilenet, batch)
    fold_batchnorm(captured.graph, captured.params)
    assert "batchnorm" not in ops(captured)
    assert_same_outputs(captured, mobilenet, batch)


@pytest.mark.filterwarnings(SCRIPT_WARNING)
def test_torchscript_other_architecture_is_refused(course):
    with pytest.raises(MbzError, match="cannot trace TorchScript"):
        capture(torch.jit.script(course))


@pytest.mark.filterwarnings(SCRIPT_WARNING)
def test_torchscript_with_other_strides_is_refused(mobilenet):
    other = randomized(cifar_mobilenet_v2(width_mult=0.25))
    other.load_state_dict(mobilenet.state_dict())
    other.features[0][0].stride = (2, 2)  # torchvision's ImageNet stem
    with pytest.raises(MbzError, match="computes something else"):
        capture(torch.jit.script(other))


@pytest.mark.filterwarnings(SCRIPT_WARNING)
def test_torchscript_failing_on_the_input_shape_is_refused(mobilenet):
    with pytest.raises(MbzError, match=r"failed on a batch of shape \[2, 1, 32, 32\]"):
        capture(torch.jit.script(mobilenet), input_shape=(1, 32, 32))


def test_graph_module_rejects_unknown_ops_and_missing_tensors(course):
    captured = capture(course)
    with pytest.raises(MbzError, match="not among the params"):
        GraphModule(captured.graph, {})
    captured.graph["nodes"][0]["op"] = "gelu"
    with pytest.raises(MbzError, match="unknown op 'gelu'"):
        GraphModule(captured.graph, captured.params)


def test_quantize_node_is_fake_quantization():
    graph = {
        "input": "input",
        "input_shape": [1, 2, 2],
        "output": "q",
        "nodes": [
            {
                "name": "q",
                "op": "quantize",
                "inputs": ["input"],
                "output": "q",
                "params": {},
                "attrs": {"bits": 4, "scale": 0.5, "zero_point": 3},
            }
        ],
    }
    x = torch.tensor([[[[-5.0, 0.26], [0.74, 9.0]]]])
    expected = torch.tensor([[[[-1.5, 0.5], [0.5, 6.0]]]])
    torch.testing.assert_close(GraphModule(graph, {})(x), expected)


def test_preprocess_images_matches_numpy_formula():
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    preprocess = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}
    got = preprocess_images(images, preprocess, torch.device("cpu"))
    mean = np.array(preprocess["mean"], np.float32)
    std = np.array(preprocess["std"], np.float32)
    expected = ((images.astype(np.float32) / np.float32(255) - mean) / std).transpose(0, 3, 1, 2)
    assert got.dtype == torch.float32 and got.is_contiguous()
    np.testing.assert_array_equal(got.numpy(), expected)
    with pytest.raises(MbzError, match="uint8 images"):
        preprocess_images(images.astype(np.float32), preprocess, torch.device("cpu"))
