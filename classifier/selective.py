"""Selective quantization: a quantized .tflite with the layers that lose most left in float.

Export calls these when a quantized format fails the parity gate (classifier/export.py). Both rank the layers by
the error each one adds when it alone is quantized, and keep the worst in float:

- `int8`: TFLite's quantization debugger measures each layer's output error and converts again with those layers
  denylisted.
- `dynamic`: TFLite has no denylist for dynamic-range quantization and no debugger for it, so each hybrid layer
  (int8 weights, float activations quantized on the fly) is measured by running the float32 file with that layer
  alone quantized, and the chosen layers get their float32 weights back in the flatbuffer (TFLite's own
  flatbuffer_utils); a convolution whose weights are float runs TFLite's float kernel.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

Batches = Callable[[], Iterator[list[np.ndarray]]]


def int8(source: Path, converter_for: Callable, representative_dataset: Batches, keep_float: int, scratch: Path):
    """Full int8 with the `keep_float` layers of largest quantization error left in float.

    TFLite's quantization debugger runs the calibration images through the float and the quantized model layer by
    layer; the error of a layer is the RMSE of its quantized output in units of its quantization step (the measure
    of TensorFlow's debugger guide). The debugger's model has float input and output, so TFLite's own
    modify_model_interface turns them back into the uint8 camera bytes and scores of the full int8 file.

    Args:
        source: The SavedModel the formats are converted from.
        converter_for: `converter_for(source, representative_dataset)` returns the full-int8 TFLiteConverter.
        representative_dataset: The calibration batches.
        keep_float: How many layers to leave in float.
        scratch: A folder for the intermediate files.

    Returns:
        The .tflite bytes and the names of the layers kept in float.
    """
    import tensorflow as tf
    from tensorflow.lite.tools.optimize.python import _pywrap_modify_model_interface as interface

    debug = tf.lite.experimental.QuantizationDebugger(
        converter=converter_for(source, representative_dataset), debug_dataset=first(representative_dataset, 64)
    )
    debug.run()
    dump = io.StringIO()
    debug.layer_statistics_dump(dump)
    rows = list(csv.DictReader(io.StringIO(dump.getvalue())))

    def error(row: dict) -> float:
        scale = float(row["scale"] or 0)
        return float(row["mean_squared_error"] or 0) ** 0.5 / scale if scale > 0 else 0.0

    worst = [row["tensor_name"] for row in sorted(rows, key=error, reverse=True)[:keep_float]]
    # The debugger's options setter quantizes its calibrated model again with the denylist: the calibration images
    # are not run through the model a second time (a 300 px ELPV retry: 47.8 s against 92.5 s with a new debugger).
    debug.options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=worst)
    float_io, uint8_io = scratch / "selective_float_io.tflite", scratch / "selective.tflite"
    float_io.write_bytes(debug.get_nondebug_quantized_model())
    uint8 = 3  # TFLite's TensorType UINT8
    if interface.modify_model_interface(str(float_io), str(uint8_io), uint8, uint8) != 0:
        raise RuntimeError("TFLite's modify_model_interface could not give the selective int8 model uint8 input")
    return uint8_io.read_bytes(), [layer_name(name) for name in worst]


def dynamic(
    quantized: bytes, reference: bytes, images: np.ndarray, keep_float: int, scratch: Path, num_threads: int
) -> tuple[bytes, list[str]]:
    """Dynamic range with the `keep_float` layers of largest error given their float32 weights back.

    The error of a layer: the mean L1 distance between the probabilities of the float32 file and of the float32
    file with only that layer's weights quantized (its int8 tensor from the dynamic file), on `images`. It is the
    dynamic-range analogue of the debugger's per-layer error: one layer quantized, the rest exact.

    Args:
        quantized: The dynamic-range .tflite, without metadata.
        reference: The float32 .tflite of the same SavedModel, without metadata.
        images: Calibration images, [N, S, S, 3] float32 pixels 0..255.
        keep_float: How many layers to give float weights back.
        scratch: A folder for the candidate files.
        num_threads: LiteRT threads.

    Returns:
        The .tflite bytes and the names of the layers kept in float.
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    dynamic_model = flatbuffer_utils.read_model_from_bytearray(bytearray(quantized))
    float_model = flatbuffer_utils.read_model_from_bytearray(bytearray(reference))
    dynamic_tensors, float_tensors = _by_unique_name(dynamic_model), _by_unique_name(float_model)
    # The hybrid layers' weights: int8 filters of a convolution or dense layer (the ops with hybrid kernels) whose
    # float32 twin (same name, same shape) holds the float weights.
    graph = dynamic_model.subgraphs[0]
    ops = schema.BuiltinOperator
    hybrid_ops = {ops.CONV_2D, ops.DEPTHWISE_CONV_2D, ops.FULLY_CONNECTED}
    filters = set()
    for op in graph.operators:
        code = dynamic_model.operatorCodes[op.opcodeIndex]
        if max(code.builtinCode, code.deprecatedBuiltinCode) in hybrid_ops and len(op.inputs) > 1:
            filters.add(graph.tensors[op.inputs[1]].name)
    hybrid = [
        name
        for name, tensor in dynamic_tensors.items()
        if name in filters
        and tensor.type == schema.TensorType.INT8
        and name in float_tensors
        and float_tensors[name].type == schema.TensorType.FLOAT32
        and list(float_tensors[name].shape) == list(tensor.shape)
    ]

    def probabilities(model) -> np.ndarray:
        from classifier.inference import load_predictor

        path = scratch / "selective_candidate.tflite"
        path.write_bytes(flatbuffer_utils.convert_object_to_bytearray(model))
        return load_predictor(path, num_threads=num_threads).predict(images, batch_size=len(images))

    expected = probabilities(float_model)

    def error(name: str) -> float:
        tensor, twin = float_tensors[name], dynamic_tensors[name]
        saved = (tensor.type, tensor.quantization, tensor.buffer)
        float_model.buffers.append(schema.BufferT())  # a buffer of its own: the float one may be shared
        float_model.buffers[-1].data = dynamic_model.buffers[twin.buffer].data
        tensor.type, tensor.quantization, tensor.buffer = twin.type, twin.quantization, len(float_model.buffers) - 1
        try:
            return float(np.abs(probabilities(float_model) - expected).sum(-1).mean())
        finally:
            tensor.type, tensor.quantization, tensor.buffer = saved
            float_model.buffers.pop()

    worst = sorted(hybrid, key=error, reverse=True)[:keep_float]
    for name in worst:
        tensor = dynamic_tensors[name]
        if sum(other.buffer == tensor.buffer for other in graph.tensors) > 1:  # shared: it gets its own buffer
            dynamic_model.buffers.append(schema.BufferT())
            tensor.buffer = len(dynamic_model.buffers) - 1
        dynamic_model.buffers[tensor.buffer].data = float_model.buffers[float_tensors[name].buffer].data
        tensor.type, tensor.quantization = schema.TensorType.FLOAT32, None
    return bytes(flatbuffer_utils.convert_object_to_bytearray(dynamic_model)), [layer_name(name) for name in worst]


def _by_unique_name(model) -> dict:
    """The main graph's tensors by name; a name two tensors share matches neither (TFLite allows it)."""
    tensors: dict = {}
    for tensor in model.subgraphs[0].tensors:
        tensors[tensor.name] = None if tensor.name in tensors else tensor
    return {name: tensor for name, tensor in tensors.items() if tensor is not None}


def layer_name(tensor_name: str | bytes) -> str:
    """`.../backbone_1/block6a_project_conv_1/convolution;...` -> `block6a_project_conv` (readable in the report)."""
    if isinstance(tensor_name, bytes):
        tensor_name = tensor_name.decode()
    parts = tensor_name.split(";")[0].split("/")
    named = [
        part for part in parts if part and not part.startswith(("efficientnet", "backbone", "batchnorm", "classifier"))
    ]
    return (named[0] if named else parts[-1]).removesuffix("_1")


def first(representative_dataset: Batches, count: int) -> Batches:
    """The representative dataset cut to its first `count` samples (the debugger runs each one layer by layer)."""

    def batches():
        for index, batch in enumerate(representative_dataset()):
            if index >= count:
                return
            yield batch

    return batches
