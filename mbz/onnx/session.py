"""Run an exported model in onnxruntime, with the numpy runtime's ``predict`` interface.

Imports numpy, onnx, onnxruntime and ``mbz.runtime`` (its batch loop), never torch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort

from mbz.runtime.program import predict_in_batches

from .export import INPUT_NAME, OUTPUT_NAME

DEFAULT_BATCH_SIZE = 64
# rewrites that fold a Mul / Add by constants into the Conv before them (its weights and bias),
# which would change the exact layers' epilogue (SPEC.md 7.3 and 8)
EPILOGUE_FUSIONS = ("ConvMulFusion", "ConvAddFusion")


def onnx_session(model: onnx.ModelProto, threads: int = 1) -> ort.InferenceSession:
    """An onnxruntime CPU session for an exported model, ``threads`` intra-op threads.

    Session options, chosen for parity with the numpy and torch runtimes:

    - ``session.disable_quant_qdq = 1``. With onnxruntime's QDQ optimisations on, it keeps every
      ``DequantizeLinear`` of a weight out of constant folding (the weights are decoded again on
      every run: issue 5 measured 2.2x slower with onnxruntime 1.31; 1.32 on our 2-core machine
      showed no clear difference), and it may fuse ``DequantizeLinear -> Conv ->
      QuantizeLinear`` into int8 kernels (QLinearConv) whose u8 x s8 arithmetic saturates on
      CPUs without VNNI (issue 5: 14% of predictions changed with full-range 8-bit codes). With
      them off, the whole weight decoding (Cast, Gather, DequantizeLinear, CumSum...) is
      constant-folded once when the session opens, the graph then holds plain float Convs like
      the ``dense=True`` export, and activation Q/DQ pairs run as float fake quantization,
      exactly as SPEC.md section 7 specifies, so parity does not depend on the CPU.
    - ``EPILOGUE_FUSIONS`` off: they fold the ``Mul`` and ``Add`` after a float ``Conv`` into
      its weights and bias, which would change the epilogue of exact layers that run as float
      ``Conv`` on integer-valued tensors (SPEC.md 8.1).
    - all other graph optimisations on (``ORT_ENABLE_ALL``: constant folding, Conv+activation
      fusion, NCHWc layouts), which keep float32 arithmetic.
    - sequential execution with one inter-op thread, so ``threads`` is the whole thread budget.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(
        model.SerializeToString(),
        options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=list(EPILOGUE_FUSIONS),
    )


class OnnxProgram:
    """An exported model in onnxruntime, with ``Program.predict``'s interface."""

    def __init__(self, model: onnx.ModelProto, threads: int = 1) -> None:
        """Open ``model`` with ``onnx_session``; remember its image and output shapes."""
        self.session = onnx_session(model, threads)
        self.image_shape = _static_dims(model.graph.input[0])
        self.num_classes = _static_dims(model.graph.output[0])[0]

    def predict(
        self,
        images: np.ndarray,
        batch_size: int = DEFAULT_BATCH_SIZE,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Logits [N, classes] of uint8 images [N, H, W, C], ``batch_size`` images per run;
        ``progress(count)`` is called after each chunk."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape[1:] != self.image_shape:
            raise ValueError(
                f"expected uint8 images [N, {', '.join(map(str, self.image_shape))}], "
                f"got {images.dtype} {list(images.shape)}"
            )
        return predict_in_batches(
            lambda chunk: self.session.run([OUTPUT_NAME], {INPUT_NAME: chunk})[0],
            images,
            batch_size,
            self.num_classes,
            progress,
        )


def _static_dims(value: onnx.ValueInfoProto) -> tuple[int, ...]:
    """The dimensions of a value after its (dynamic) batch dimension."""
    return tuple(d.dim_value for d in value.type.tensor_type.shape.dim[1:])
