"""NNCodec (the MPEG NNC reference encoder, ``pip install nncodec``) on the same model and test
images as ``bench_accuracy_at_size.py``: bitstream bytes and top-1 at several QP values.

The model's whole state_dict (weights, biases and BatchNorm statistics, unfolded) goes through
``nncodec.nn.encode`` with its default coding tools (dependent quantization, DeepCABAC); the
decoded parameters are loaded back into the model and evaluated exactly as mbz measures its
float model. The bytes are the bitstream's length, which (unlike a .mbz file) holds no graph,
no preprocessing and no checksums. Imported by the benchmark when nncodec is installed; it runs
on its own too::

    python examples/nncodec_points.py MODEL DATA [--arch cifar --mean ... --std ...] [--qp ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Iterable

import numpy as np
import torch

from mbz.api import PackJob, float_model_accuracy, prepare_pack

DEFAULT_QPS = (-38, -34, -32, -30, -28, -26, -24, -22)  # nncodec's default QP is -32


def available() -> bool:
    """Whether nncodec can be imported here."""
    try:
        import nncodec.nn  # noqa: F401
    except ImportError:
        return False
    return True


def coded(module: torch.nn.Module, qp: int) -> tuple[torch.nn.Module, int]:
    """A copy of ``module`` with its state_dict encoded and decoded by NNCodec at ``qp``, and
    the bitstream's bytes."""
    from nncodec.nn import decode, encode

    state = module.state_dict()
    floats = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in state.items()
              if v.is_floating_point()}
    bitstream = encode(floats, args={"qp": qp, "verbose": False})
    decoded = decode(bitstream)
    copied = copy.deepcopy(module)
    restored = {k: torch.as_tensor(np.asarray(decoded[k], dtype=np.float32)).reshape(v.shape)
                if k in floats else v for k, v in state.items()}
    copied.load_state_dict(restored)
    return copied.eval(), len(bitstream)


def points(job: PackJob, qps: Iterable[int]) -> list[dict]:
    """One row per QP: bitstream bytes, ratio to the float32 model, top-1 and the drop."""
    module, base = job.loaded.module, job.loaded.fp32_bytes
    if job.dataset is None:
        raise ValueError("NNCodec's points need test images: prepare the job with data")
    float_top1 = float_model_accuracy(module, job.config, job.dataset)["top1"]
    rows = []
    for qp in qps:
        start = time.perf_counter()
        model, size = coded(module, qp)
        top1 = float_model_accuracy(model, job.config, job.dataset)["top1"]
        rows.append({
            "name": f"nncodec qp {qp}", "options": {"qp": qp}, "file_bytes": size,
            "ratio": base / size, "top1": top1, "float_top1": float_top1,
            "drop_pt": 100 * (top1 - float_top1), "seconds": round(time.perf_counter() - start, 1),
        })
    return rows


def model_and_data_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL, DATA, --arch, --mean, --std, --limit and --qp: what this script and the
    accuracy-at-size benchmark both take."""
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--arch", default=None)
    parser.add_argument("--mean", type=lambda s: tuple(map(float, s.split(","))))
    parser.add_argument("--std", type=lambda s: tuple(map(float, s.split(","))))
    parser.add_argument("--limit", type=int, default=None, help="first N test images")
    parser.add_argument("--qp", type=int, nargs="*", default=list(DEFAULT_QPS),
                        help="NNCodec quantization parameters (its default is -32)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model_and_data_arguments(parser)
    args = parser.parse_args()
    norm = {"mean": args.mean, "std": args.std} if args.mean else {}
    job = prepare_pack(args.model, "/dev/null", data=args.data, arch=args.arch,
                       limit=args.limit, bias_correction=False, **norm)
    for row in points(job, args.qp):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
