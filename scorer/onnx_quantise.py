"""int8 feature graphs: ONNX Runtime's static quantisation of the extractor's float32 graph (scorer.features).

What is quantised: every operator in QDQ form (quantise/dequantise pairs ONNX Runtime fuses into int8 kernels),
weights int8 per output channel, activations uint8 per tensor from the min/max ranges of the calibration windows -
except the backbone's first `FLOAT_STAGES` stages, kept float32. Why (a /tmp comparison on the 2-core AMD EPYC
with AVX-512 VNNI, 16 bottle test crops at 224 px): quantised whole, mobilenet_v2's features moved by 18-23 %
(Frobenius, relative), nearly all of it from its first inverted residual block (features.1, whose depthwise
activations one per-tensor scale cannot hold), Lite2's by 11 %; with stages 0-2 in float32, 5 % and 7 %.
bench/int8.py measures the shipped form against float32 (features, speed, `patchcore eval` end to end).
`reduce_range` (7-bit weights) only where the CPU has no VNNI: the AVX2 u8 x s8 kernels sum pairs of products in
int16, which saturates with full 8-bit weights.

Calibration inputs must be real images of the line (a bank's good training windows): the activation ranges are
taken from them, so noise or another line's images would give ranges that clip or waste the 8 bits.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import numpy as np

CALIBRATION_BATCH = 8  # calibration inputs per session run (memory stays small at any input size)
FLOAT_STAGES = 3  # the backbone's first stages kept float32 (their int8 error dominated; see above)


class QuantiseError(ValueError):
    """Calibration inputs the quantiser cannot use."""


def quantise_graph(graph: bytes, calibration: np.ndarray, reduce_range: bool = False, input_name: str = "images",
                   float_stages: int = FLOAT_STAGES) -> bytes:
    """A float32 ONNX graph of the extractor (serialised) -> its static int8 form (serialised), activation ranges
    from `calibration`: float32 inputs [N, C, H, W] as the graph takes them (N >= 1). The nodes of the backbone's
    first `float_stages` stages (exported as /body/stages.<i>/...) stay float32."""
    import onnx  # the [onnx] extra, as onnxruntime
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calibration = np.ascontiguousarray(calibration, dtype=np.float32)
    if calibration.ndim != 4 or len(calibration) == 0 or not np.isfinite(calibration).all():
        raise QuantiseError(f"calibration inputs must be finite [N >= 1, C, H, W], not shape {calibration.shape}")

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{input_name: calibration[i:i + CALIBRATION_BATCH]}
                                 for i in range(0, len(calibration), CALIBRATION_BATCH)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="patchcore-int8-") as folder, _quiet_root_logger():
        float_graph, prepared, quantised = (Path(folder) / name for name in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        float_graph.write_bytes(graph)
        # shape inference and graph optimisation first (ONNX Runtime's advice before quantising); the symbolic
        # pass is skipped: the batch axis is dynamic and the other shapes are known
        quant_pre_process(str(float_graph), str(prepared), skip_symbolic_shape=True)
        kept = [node.name for node in onnx.load(str(prepared)).graph.node
                if any(f"/stages.{i}/" in node.name for i in range(float_stages))]
        quantize_static(str(prepared), str(quantised), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=kept)
        onnx.checker.check_model(str(quantised))
        return quantised.read_bytes()


@contextlib.contextmanager
def _quiet_root_logger():
    """The quantiser warns through the root logger (logging.warning: a shape it skips, per tensor; harmless and
    many): drop records logged on the root logger itself meanwhile. The project's own loggers propagate to the
    root's handlers without passing its filters, so their records still show; a NullHandler keeps logging.warning
    from installing a console handler (basicConfig) on a process that has none."""
    root = logging.getLogger()
    drop, spare = (lambda record: False), logging.NullHandler()
    root.addFilter(drop)
    root.addHandler(spare)
    try:
        yield
    finally:
        root.removeFilter(drop)
        root.removeHandler(spare)
