"""Capture a PyTorch module as mbz's graph IR (SPEC.md section 6) by tracing it with torch.fx.

Every module call and function call of ``forward`` becomes a graph node (or disappears, for
dropout and identities); anything mbz's runtimes cannot execute raises MbzError naming it and
the module it sits in (every unsupported operation of the model at once). TorchScript cannot be
traced: a scripted MobileNet-v2 is rebuilt from its weights and captured instead.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from mbz.errors import MbzError
from mbz.models import ARCHS, infer_arch

SUPPORTED = "Conv2d, BatchNorm2d, ReLU, ReLU6, add, pooling, flatten, dropout, Linear"
INPUT = "input"
_SCRIPT_CHECK_ATOL = 1e-4  # how close a rebuilt TorchScript model's logits must be


@dataclass
class CapturedModel:
    """A captured model: the graph IR, its float32 tensors, and each BatchNorm's raw gamma."""

    graph: dict
    params: dict[str, np.ndarray]
    bn_gamma: dict[str, np.ndarray]  # batchnorm node name -> BN weight (gamma)


def capture(module: nn.Module, input_shape: tuple[int, ...] = (3, 32, 32)) -> CapturedModel:
    """The graph IR of ``module``'s inference (eval mode), for inputs ``[N, *input_shape]``.

    The module's training flags are restored afterwards; its weights are read, not changed.
    """
    if isinstance(module, torch.jit.ScriptModule):
        module = _rebuild_scripted(module, input_shape)
    with _eval_mode(module):
        traced = _trace(module)
    builder = _Builder(dict(traced.named_modules()), input_shape)
    for node in traced.graph.nodes:
        builder.visit(node)
    if builder.unsupported:
        raise MbzError(_unsupported_summary(builder.unsupported))
    return CapturedModel(builder.graph, builder.params, builder.bn_gamma)


def _unsupported_summary(found: list[_Unsupported]) -> str:
    """Every unsupported operation, each with the modules it sits in."""
    places: dict[str, list[str]] = {}
    for each in found:
        places.setdefault(each.op, []).append(each.where)
    listed = "; ".join(f"{op!r} in {', '.join(where)}" for op, where in places.items())
    count = f"{len(places)} unsupported operation{'s' if len(places) > 1 else ''}"
    return f"the model uses {count}: {listed}. mbz supports {SUPPORTED}"


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, then every submodule's own training flag back."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _trace(module: nn.Module) -> fx.GraphModule:
    """``symbolic_trace`` with its failures (data-dependent control flow) as MbzError."""
    try:
        traced = fx.symbolic_trace(module)
    except Exception as exc:  # fx reports untraceable Python in many exception types
        raise MbzError(
            f"could not trace the model's forward with torch.fx ({type(exc).__name__}: {exc}); "
            "mbz captures models whose forward has no control flow that depends on tensor values"
        ) from exc
    traced.graph.eliminate_dead_code()
    return traced


def _rebuild_scripted(module: torch.jit.ScriptModule, input_shape: tuple[int, ...]) -> nn.Module:
    """The MobileNet-v2 (one of ARCHS) with the weights of a scripted one that computes the
    same as it."""
    state_dict = dict(module.state_dict())
    device = next(module.parameters()).device
    batch = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0)).to(device)
    with _eval_mode(module), torch.no_grad():
        expected = _run_scripted(module, batch)
        for name in ARCHS.values():
            rebuilt = _rebuilt(state_dict, name).to(device).eval()
            if torch.allclose(expected, rebuilt(batch), rtol=1e-3, atol=_SCRIPT_CHECK_ATOL):
                return rebuilt.cpu()
    raise MbzError(
        "the TorchScript model has the weights of a MobileNet-v2 but computes something else "
        f"than {' and '.join(ARCHS.values())} (other strides or layers), and torch.fx cannot trace "
        "TorchScript; save the nn.Module itself with torch.save(model) and pass --trust-pickle"
    )


def _rebuilt(state_dict: dict[str, torch.Tensor], name: str) -> nn.Module:
    """The architecture ``name`` with a scripted model's weights."""
    try:
        rebuilt = infer_arch(state_dict, name).build()
    except MbzError as exc:
        raise MbzError(
            "torch.fx cannot trace TorchScript, so mbz captures a TorchScript model only when its "
            f"weights are a MobileNet-v2 mbz can rebuild, and these are not: {exc}"
        ) from exc
    rebuilt.load_state_dict(state_dict, strict=False)  # infer_arch checked keys and shapes
    return rebuilt


def _run_scripted(module: torch.jit.ScriptModule, batch: torch.Tensor) -> torch.Tensor:
    """The scripted model's output, its failures as MbzError."""
    try:
        return module(batch)
    except Exception as exc:  # TorchScript raises its interpreter's errors as RuntimeError & co
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise MbzError(
            f"the TorchScript model failed on a batch of shape {list(batch.shape)} ({reason}); "
            "mbz captures models that take images of the given input shape"
        ) from exc


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().astype(np.float32)


def _weight_and_bias(layer: nn.Conv2d | nn.Linear) -> dict[str, np.ndarray]:
    """A layer's weight and bias, the bias zero when the layer has none."""
    weight = _numpy(layer.weight)
    bias = _numpy(layer.bias) if layer.bias is not None else np.zeros(weight.shape[0], np.float32)
    return {"weight": weight, "bias": bias}


def _pair(value: object, what: str, where: str) -> list[int]:
    """An int or a pair of ints as ``[a, b]``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value, value]
    if isinstance(value, tuple | list) and len(value) == 2 and all(type(v) is int for v in value):
        return list(value)
    raise MbzError(f"unsupported {what}={value!r} in {where}; use an int or a pair of ints")


class _Unsupported(MbzError):
    """An operation mbz's runtimes cannot execute; capture collects them all before failing."""

    def __init__(self, op: str, where: str) -> None:
        super().__init__(f"unsupported operation {op!r} in {where}; mbz supports {SUPPORTED}")
        self.op, self.where = op, where


def _unsupported(name: str, where: str) -> _Unsupported:
    return _Unsupported(name, where)


def _where(node: fx.Node) -> str:
    """The module a traced node sits in, for messages."""
    if node.op == "call_module":
        return f"module {node.target!r}"
    stack = node.meta.get("nn_module_stack") or {}
    return f"module {list(stack)[-1]!r}" if stack else "the top-level forward"


def _bind(signature: Callable, node: fx.Node) -> dict:
    """A call's arguments by parameter name, defaults filled in (``signature`` is a stand-in
    with the real function's parameters)."""
    try:
        bound = inspect.signature(signature).bind(*node.args, **node.kwargs)
    except TypeError as exc:
        raise MbzError(f"unexpected arguments to {node.target!r} in {_where(node)}: {exc}") from exc
    bound.apply_defaults()
    return dict(bound.arguments)


# Stand-ins with the parameters of the functions and tensor methods mbz maps.
def _sig_unary(input, inplace=False): ...
def _sig_hardtanh(input, min_val=-1.0, max_val=1.0, inplace=False): ...
def _sig_add(input, other, alpha=1): ...
def _sig_avg_pool(
    input,
    kernel_size,
    stride=None,
    padding=0,
    ceil_mode=False,
    count_include_pad=True,
    divisor_override=None,
): ...
def _sig_max_pool(
    input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False
): ...
def _sig_adaptive(input, output_size): ...
def _sig_flatten(input, start_dim=0, end_dim=-1): ...
def _sig_dropout(input, p=0.5, training=True, inplace=False): ...
def _sig_mean(input, dim=None, keepdim=False, dtype=None): ...
def _sig_reshape(input, *shape): ...
def _sig_size(input, dim=None): ...


@dataclass
class _Builder:
    """Turns traced fx nodes, in order, into graph IR nodes and float32 parameters."""

    modules: dict[str, nn.Module]
    input_shape: tuple[int, ...]
    nodes: list[dict] = field(default_factory=list)
    params: dict[str, np.ndarray] = field(default_factory=dict)
    bn_gamma: dict[str, np.ndarray] = field(default_factory=dict)
    values: dict[fx.Node, str] = field(default_factory=dict)  # fx node -> IR value name
    sizes: dict[fx.Node, tuple[fx.Node, int | None]] = field(default_factory=dict)
    names: set[str] = field(default_factory=lambda: {INPUT})
    output: str | None = None
    unsupported: list[_Unsupported] = field(default_factory=list)

    @property
    def graph(self) -> dict:
        """The graph IR captured so far."""
        return {
            "input": INPUT,
            "input_shape": list(self.input_shape),
            "output": self.output,
            "nodes": self.nodes,
        }

    def visit(self, node: fx.Node) -> None:
        """Translate one fx node; an unsupported operation is noted (its output stands in as a
        value, so that the rest of the model is still read) for ``capture`` to report."""
        handlers = {
            "placeholder": self._placeholder,
            "get_attr": self._get_attr,
            "call_module": self._call_module,
            "call_function": self._call_function,
            "call_method": self._call_method,
            "output": self._output,
        }
        try:
            handlers[node.op](node)
        except _Unsupported as unsupported:
            self.unsupported.append(unsupported)
            self.values[node] = f"<{unsupported.op}>"

    # Bookkeeping.

    def unique(self, name: str) -> str:
        """``name``, or ``name_1``, ``name_2``... when already taken."""
        candidate, count = name, 0
        while candidate in self.names:
            count += 1
            candidate = f"{name}_{count}"
        self.names.add(candidate)
        return candidate

    def value(self, arg: object, node: fx.Node) -> str:
        """The IR value name of a tensor argument."""
        if isinstance(arg, fx.Node) and arg in self.values:
            return self.values[arg]
        raise MbzError(
            f"unsupported argument {arg!r} to {node.target!r} in {_where(node)}: mbz graphs pass "
            "only tensors computed by the supported operations"
        )

    def emit(
        self,
        node: fx.Node,
        op: str,
        inputs: list[str],
        tensors: dict[str, np.ndarray] | None = None,
        name: str | None = None,
        **attrs: object,
    ) -> str:
        """Append an IR node computing ``node``, its ``tensors`` stored as ``<name>.<role>``;
        returns the node's (and its output's) name."""
        name = self.unique(name or (str(node.target) if node.op == "call_module" else node.name))
        roles = {role: f"{name}.{role}" for role in tensors or {}}
        self.params.update({roles[r]: v.astype(np.float32) for r, v in (tensors or {}).items()})
        self.nodes.append(
            {
                "name": name,
                "op": op,
                "inputs": inputs,
                "output": name,
                "params": roles,
                "attrs": attrs,
            }
        )
        self.values[node] = name
        return name

    def alias(self, node: fx.Node, source: object) -> None:
        """``node`` computes the identity of ``source``."""
        self.values[node] = self.value(source, node)

    # fx node kinds.

    def _placeholder(self, node: fx.Node) -> None:
        if self.values:
            raise MbzError(
                f"the model's forward takes more than one input (extra {node.target!r}); mbz "
                "captures models called as model(images)"
            )
        self.values[node] = INPUT

    def _get_attr(self, node: fx.Node) -> None:
        raise MbzError(
            f"unsupported direct use of tensor attribute {node.target!r} in {_where(node)}; "
            f"mbz supports {SUPPORTED}"
        )

    def _output(self, node: fx.Node) -> None:
        result = node.args[0]
        if not isinstance(result, fx.Node) or result not in self.values:
            raise MbzError(
                f"the model's forward must return one tensor of logits, got {type(result).__name__}"
            )
        self.output = self.values[result]

    def _call_module(self, node: fx.Node) -> None:
        module = self.modules[str(node.target)]  # a call_module's target is the module's name
        for kind, handler in _MODULE_HANDLERS:
            if isinstance(module, kind):
                handler(self, node, module)
                return
        raise _unsupported(type(module).__name__, _where(node))

    def _call_function(self, node: fx.Node) -> None:
        handler = _FUNCTION_HANDLERS.get(node.target)
        if handler is None:
            raise _unsupported(getattr(node.target, "__name__", str(node.target)), _where(node))
        handler(self, node)

    def _call_method(self, node: fx.Node) -> None:
        handler = _METHOD_HANDLERS.get(str(node.target))  # a call_method's is the method's
        if handler is None:
            raise _unsupported(f"Tensor.{node.target}", _where(node))
        handler(self, node)


# Modules.


def _conv(b: _Builder, node: fx.Node, conv: nn.Conv2d) -> None:
    where = _where(node)
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise MbzError(
            f"unsupported Conv2d in {where} (padding={conv.padding!r}, padding_mode="
            f"{conv.padding_mode!r}); mbz supports numeric zero padding"
        )
    b.emit(
        node,
        "conv2d",
        [b.value(node.args[0], node)],
        _weight_and_bias(conv),
        stride=_pair(conv.stride, "stride", where),
        padding=_pair(conv.padding, "padding", where),
        dilation=_pair(conv.dilation, "dilation", where),
        groups=int(conv.groups),
    )


def _batchnorm(b: _Builder, node: fx.Node, bn: nn.BatchNorm2d) -> None:
    if bn.running_mean is None or bn.running_var is None:
        raise MbzError(
            f"BatchNorm2d in {_where(node)} has no running statistics "
            "(track_running_stats=False); mbz needs eval-mode statistics to capture it"
        )
    channels = bn.num_features
    gamma = bn.weight.detach().double().cpu() if bn.affine else torch.ones(channels).double()
    beta = bn.bias.detach().double().cpu() if bn.affine else torch.zeros(channels).double()
    mean, var = bn.running_mean.double().cpu(), bn.running_var.double().cpu()
    scale = gamma / torch.sqrt(var + bn.eps)
    tensors = {"scale": scale.numpy(), "shift": (beta - mean * scale).numpy()}
    name = b.emit(node, "batchnorm", [b.value(node.args[0], node)], tensors)
    b.bn_gamma[name] = gamma.numpy().astype(np.float32)


def _hardtanh_module(b: _Builder, node: fx.Node, module: nn.Hardtanh) -> None:
    if (module.min_val, module.max_val) != (0.0, 6.0):
        raise _unsupported(type(module).__name__, _where(node))
    b.emit(node, "relu6", [b.value(node.args[0], node)])


def _avgpool_module(b: _Builder, node: fx.Node, pool: nn.AvgPool2d) -> None:
    options = (pool.ceil_mode, pool.count_include_pad, pool.divisor_override)
    _avgpool(b, node, node.args[0], pool.kernel_size, pool.stride, pool.padding, *options)


def _maxpool_module(b: _Builder, node: fx.Node, pool: nn.MaxPool2d) -> None:
    options = (pool.dilation, pool.ceil_mode, pool.return_indices)
    _maxpool(b, node, node.args[0], pool.kernel_size, pool.stride, pool.padding, *options)


def _adaptive_module(b: _Builder, node: fx.Node, pool: nn.AdaptiveAvgPool2d) -> None:
    _global_avgpool(b, node, node.args[0], pool.output_size)


def _flatten_module(b: _Builder, node: fx.Node, module: nn.Flatten) -> None:
    _flatten(b, node, node.args[0], module.start_dim, module.end_dim)


def _linear(b: _Builder, node: fx.Node, linear: nn.Linear) -> None:
    b.emit(node, "linear", [b.value(node.args[0], node)], _weight_and_bias(linear))


def _activation(op: str) -> Callable:
    """A handler emitting ``op`` on a module's or function's first argument."""

    def handler(b: _Builder, node: fx.Node, *_: object) -> None:
        b.emit(node, op, [b.value(node.args[0], node)])

    return handler


def _identity(b: _Builder, node: fx.Node, *_: object) -> None:
    b.alias(node, node.args[0])


# Order matters: ReLU6 is a Hardtanh.
_MODULE_HANDLERS: list[tuple[type | tuple[type, ...], Callable]] = [
    (nn.Conv2d, _conv),
    (nn.BatchNorm2d, _batchnorm),
    (nn.ReLU, _activation("relu")),
    (nn.ReLU6, _activation("relu6")),
    (nn.Hardtanh, _hardtanh_module),
    (nn.AvgPool2d, _avgpool_module),
    (nn.MaxPool2d, _maxpool_module),
    (nn.AdaptiveAvgPool2d, _adaptive_module),
    (nn.Flatten, _flatten_module),
    ((nn.Dropout, nn.Dropout2d), _identity),
    (nn.Identity, _identity),
    (nn.Linear, _linear),
]


# Shared by modules, functions and methods.


def _avgpool(
    b: _Builder,
    node: fx.Node,
    x: object,
    kernel: object,
    stride: object,
    padding: object,
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: object,
) -> None:
    where = _where(node)
    if ceil_mode or not count_include_pad or divisor_override is not None:
        raise MbzError(
            f"unsupported average pooling in {where} (ceil_mode={ceil_mode}, count_include_pad="
            f"{count_include_pad}, divisor_override={divisor_override}); mbz supports "
            "ceil_mode=False, count_include_pad=True and no divisor_override"
        )
    _emit_pool(b, node, "avgpool2d", x, (kernel, stride, padding))


def _maxpool(
    b: _Builder,
    node: fx.Node,
    x: object,
    kernel: object,
    stride: object,
    padding: object,
    dilation: object,
    ceil_mode: bool,
    return_indices: bool,
) -> None:
    where = _where(node)
    if _pair(dilation, "dilation", where) != [1, 1] or ceil_mode or return_indices:
        raise MbzError(
            f"unsupported max pooling in {where} (dilation={dilation}, ceil_mode={ceil_mode}, "
            f"return_indices={return_indices}); mbz supports dilation 1 and ceil_mode=False"
        )
    _emit_pool(b, node, "maxpool2d", x, (kernel, stride, padding))


def _emit_pool(b: _Builder, node: fx.Node, op: str, x: object, window: tuple) -> None:
    """A pooling node from torch's (kernel_size, stride, padding); stride defaults to kernel."""
    where = _where(node)
    kernel, stride, padding = window
    kernel_pair = _pair(kernel, "kernel_size", where)
    stride_pair = _pair(stride, "stride", where) if stride else kernel_pair
    padding_pair = _pair(padding, "padding", where)
    b.emit(
        node, op, [b.value(x, node)], kernel=kernel_pair, stride=stride_pair, padding=padding_pair
    )


def _global_avgpool(b: _Builder, node: fx.Node, x: object, output_size: object) -> None:
    if output_size not in (1, (1, 1), [1, 1]):
        raise MbzError(
            f"unsupported adaptive average pooling to {output_size!r} in {_where(node)}; mbz "
            "supports output size 1 (global average pooling)"
        )
    b.emit(node, "global_avgpool", [b.value(x, node)])


def _flatten(b: _Builder, node: fx.Node, x: object, start_dim: int, end_dim: int) -> None:
    if (start_dim, end_dim) != (1, -1):
        raise MbzError(
            f"unsupported flatten(start_dim={start_dim}, end_dim={end_dim}) in {_where(node)}; "
            "mbz supports flattening all but the batch dimension (torch.flatten(x, 1))"
        )
    b.emit(node, "flatten", [b.value(x, node)])


def _add(b: _Builder, node: fx.Node, x: object, other: object, alpha: object) -> None:
    if alpha != 1:
        raise MbzError(f"unsupported add with alpha={alpha!r} in {_where(node)}; use x + y")
    b.emit(node, "add", [b.value(x, node), b.value(other, node)])


def _mean(b: _Builder, node: fx.Node, x: object, dim: object, keepdim: bool, _: object) -> None:
    dims = dim if isinstance(dim, tuple | list) else (dim,)
    if not all(type(d) is int for d in dims) or sorted(d % 4 for d in dims) != [2, 3]:
        raise MbzError(
            f"unsupported mean over dims {dim!r} in {_where(node)}; mbz supports the mean "
            "over height and width (x.mean((2, 3)))"
        )
    pooled = b.emit(node, "global_avgpool", [b.value(x, node)])
    if not keepdim:
        b.emit(node, "flatten", [pooled], name=f"{pooled}_flatten")


def _reshape(b: _Builder, node: fx.Node, x: object, shape: tuple) -> None:
    """``x.view(x.size(0), -1)`` (or reshape) is a flatten; other shapes are refused."""
    shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple | list) else shape
    batch = b.sizes.get(shape[0]) if len(shape) == 2 and isinstance(shape[0], fx.Node) else None
    if batch is None or batch[1] != 0 or shape[1] != -1:
        raise MbzError(
            f"unsupported {node.target} to shape {shape!r} in {_where(node)}; mbz supports "
            "x.view(x.size(0), -1) and torch.flatten(x, 1)"
        )
    b.emit(node, "flatten", [b.value(x, node)])


def _size(b: _Builder, node: fx.Node) -> None:
    """``x.size(d)`` or ``x.shape`` / ``x.size()``: a shape query, used only by ``_reshape``."""
    args = _bind(_sig_size, node)
    b.sizes[node] = (args["input"], args["dim"])


def _getattr(b: _Builder, node: fx.Node) -> None:
    source, attribute = node.args
    if attribute != "shape" or not isinstance(source, fx.Node):
        raise _unsupported(f"Tensor.{attribute}", _where(node))
    b.sizes[node] = (source, None)


def _getitem(b: _Builder, node: fx.Node) -> None:
    source, index = node.args
    query = b.sizes.get(source) if isinstance(source, fx.Node) else None
    if query is None or query[1] is not None or type(index) is not int:
        raise _unsupported("getitem", _where(node))
    b.sizes[node] = (query[0], index)


def _bound(signature: Callable, act: Callable) -> Callable:
    """A handler calling ``act(builder, node, *arguments)`` with the call's bound arguments."""

    def handler(b: _Builder, node: fx.Node) -> None:
        act(b, node, *_bind(signature, node).values())

    return handler


def _hardtanh(b: _Builder, node: fx.Node, x: object, low: float, high: float, _: bool) -> None:
    if (low, high) != (0.0, 6.0):
        raise _unsupported("hardtanh", _where(node))
    b.emit(node, "relu6", [b.value(x, node)])


def _unary(op: str) -> Callable:
    """A bound handler emitting ``op`` on the call's tensor."""
    return _bound(_sig_unary, lambda b, node, x, _: b.emit(node, op, [b.value(x, node)]))


_FLATTEN = _bound(_sig_flatten, _flatten)
_ADD = _bound(_sig_add, _add)

_FUNCTION_HANDLERS: dict[object, Callable] = {
    F.relu: _unary("relu"),
    torch.relu: _unary("relu"),
    F.relu6: _unary("relu6"),
    F.hardtanh: _bound(_sig_hardtanh, _hardtanh),
    operator.add: _ADD,
    operator.iadd: _ADD,
    torch.add: _ADD,
    F.avg_pool2d: _bound(_sig_avg_pool, _avgpool),
    F.max_pool2d: _bound(_sig_max_pool, _maxpool),
    F.adaptive_avg_pool2d: _bound(_sig_adaptive, _global_avgpool),
    torch.flatten: _FLATTEN,
    torch.mean: _bound(_sig_mean, _mean),
    F.dropout: _bound(_sig_dropout, lambda b, node, x, *_: b.alias(node, x)),
    getattr: _getattr,
    operator.getitem: _getitem,
}

_METHOD_HANDLERS: dict[str, Callable] = {
    "relu": _unary("relu"),
    "add": _ADD,
    "mean": _FUNCTION_HANDLERS[torch.mean],
    "flatten": _FLATTEN,
    "view": _bound(_sig_reshape, _reshape),
    "reshape": _bound(_sig_reshape, _reshape),
    "size": _size,
}
