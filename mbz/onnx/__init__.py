"""The .mbz graph as ONNX, never importing torch (and kept out of ``mbz.runtime``, which stays
numpy-only): ``mbz.onnx.export`` builds the model, weights still compressed and decoded in the
graph; ``mbz.onnx.session`` runs it in onnxruntime. Import the submodule you need: exporting
does not load onnxruntime."""
