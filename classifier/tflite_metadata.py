"""TFLite Model Metadata for image classifiers, so MediaPipe Tasks `ImageClassifier` reads our files unchanged.

What a phone runtime needs from a classifier .tflite, and what `add_image_classifier_metadata` writes:
- the input described as an RGB image; for a float input, NormalizationOptions mean 0 / std 1 so MediaPipe feeds
  raw pixels 0..255 (our models normalise inside the graph); a uint8 input is fed camera bytes as they are;
- the output's labels as an associated file of type TENSOR_AXIS_LABELS, so results carry category names;
- the input contract (`classifier.contract`: size, resize mode, DICOM decoding, class names) as an associated file
  of the model, so the toolkit feeds a .tflite copied away from its run as the model was trained.

How (DESIGN.md decision 5): the usual writers cannot run beside TF 2.21 — tflite-support pins protobuf < 4, and
mediapipe 1.2.2's `metadata_writers` fails to import (its native `_pywrap_metadata_version` is missing). So this
module builds the metadata flatbuffer itself from the generated schema modules:
- `mediapipe.tasks.metadata.metadata_schema_py_generated`: pure Python, ships in the `mediapipe` wheel; it is the
  only reason export needs mediapipe (a dependency of the project). It is imported only when metadata is
  written or parsed (importing mediapipe also imports TensorFlow); `read_labels` and `read_contract`, used by
  the LiteRT runtime, do without it;
- `ai_edge_litert.schema_py_generated`: the TFLite model schema, from the LiteRT runtime we depend on anyway.
It packs them the way tflite-support's `MetadataPopulator` does: the metadata goes into a model buffer referenced by
the model's metadata entry "TFLITE_METADATA" (file identifier "M001"), and the associated files go into a zip
archive appended to the model (TFLite ignores trailing bytes; metadata readers open the zip from its end).
The one value the native module used to compute, the minimum metadata-parser version, is fixed at 1.0.0: every
field written here exists since metadata schema 1.0.0 (see the history at the top of `metadata_schema.fbs`).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from classifier.errors import UserError
from classifier.run import CONTRACT_FILE, LABELS_FILE, format_labels, parse_labels

if TYPE_CHECKING:
    from classifier.contract import InputContract

METADATA_FIELD_NAME = "TFLITE_METADATA"
METADATA_FILE_IDENTIFIER = b"M001"
MODEL_FILE_IDENTIFIER = b"TFL3"
MIN_PARSER_VERSION = "1.0.0"
LABELS_FILE_NAME = LABELS_FILE  # the run folder's name, as MediaPipe Model Maker names the file too


def load_schema() -> Any:
    """Imports the generated metadata schema module from mediapipe.

    Returns:
        The module `mediapipe.tasks.metadata.metadata_schema_py_generated`.

    Raises:
        UserError: mediapipe is not installed, naming the extra to install and the --no-metadata way out.
    """
    try:
        from mediapipe.tasks.metadata import metadata_schema_py_generated
    except ImportError as error:
        raise UserError(
            "writing TFLite metadata (labels for MediaPipe and other phone runtimes) needs the metadata schema "
            f"that ships in the 'mediapipe' package, which failed to import ({error}): "
            "run pip install mediapipe==1.2.2 (a dependency of this project: pip install -e . restores it), "
            "or export with --no-metadata "
            f"to write .tflite files without embedded labels ({LABELS_FILE} is still written beside them)"
        ) from error
    return metadata_schema_py_generated


def add_image_classifier_metadata(
    model: bytes,
    labels: Sequence[str],
    *,
    name: str,
    description: str,
    float_input: bool,
    version: str = "",
    contract: InputContract | None = None,
) -> bytes:
    """Returns `model` with image-classifier metadata and its labels file embedded.

    Args:
        model: a .tflite flatbuffer with one input (an image [1, H, W, 3]) and one output (scores [1, C]).
        labels: class names in output order; written as `labels.txt` (TENSOR_AXIS_LABELS).
        name: model name shown by metadata viewers.
        description: one line on what the model does.
        float_input: True for a float32 input fed raw 0..255 pixels: adds NormalizationOptions mean 0 / std 1,
            which MediaPipe requires for float inputs. False for a uint8 input, which takes camera bytes as is.
        version: optional model version string.
        contract: the model's input contract, written as `input_contract.json`, a model-level associated file.

    Returns:
        The new model bytes: the re-packed flatbuffer followed by a zip archive holding `labels.txt` (and
        `input_contract.json`).

    Raises:
        UserError: the metadata schema (mediapipe) is not installed.
        ValueError: `model` is not a TFLite flatbuffer, or the label count does not match the output size.
    """
    import flatbuffers
    from ai_edge_litert import schema_py_generated as tflite_schema

    meta = load_schema()
    if not tflite_schema.Model.ModelBufferHasIdentifier(model, 0):
        raise ValueError("not a TFLite model: the file identifier 'TFL3' is missing")
    # Unpacking reads only the flatbuffer, so an archive appended earlier is dropped; a fresh one is added below.
    model_t = tflite_schema.ModelT.InitFromObj(tflite_schema.Model.GetRootAsModel(model, 0))
    subgraph = model_t.subgraphs[0]
    if len(subgraph.inputs) != 1 or len(subgraph.outputs) != 1:
        raise ValueError(f"expected 1 input and 1 output, got {len(subgraph.inputs)} and {len(subgraph.outputs)}")
    num_outputs = int(subgraph.tensors[subgraph.outputs[0]].shape[-1])
    if num_outputs != len(labels):
        raise ValueError(f"the model has {num_outputs} outputs but {len(labels)} labels were given")

    input_md = meta.TensorMetadataT(
        name="image",
        description="RGB image, raw pixel values 0..255 (the model normalises them itself).",
        content=meta.ContentT(
            contentPropertiesType=meta.ContentProperties.ImageProperties,
            contentProperties=meta.ImagePropertiesT(colorSpace=meta.ColorSpaceType.RGB),
        ),
        stats=meta.StatsT(max=[255.0], min=[0.0]),
    )
    if float_input:
        input_md.processUnits = [
            meta.ProcessUnitT(
                optionsType=meta.ProcessUnitOptions.NormalizationOptions,
                options=meta.NormalizationOptionsT(mean=[0.0], std=[1.0]),
            )
        ]
    output_md = meta.TensorMetadataT(
        name="probability",
        description="Probabilities of the classes, in the order of the labels file.",
        content=meta.ContentT(
            contentPropertiesType=meta.ContentProperties.FeatureProperties,
            contentProperties=meta.FeaturePropertiesT(),
        ),
        stats=meta.StatsT(max=[1.0], min=[0.0]),
        associatedFiles=[
            meta.AssociatedFileT(
                name=LABELS_FILE_NAME,
                description="Class names, one per line, in output order.",
                type=meta.AssociatedFileType.TENSOR_AXIS_LABELS,
            )
        ],
    )
    files = {LABELS_FILE_NAME: format_labels(labels)}
    model_files = None
    if contract is not None:
        files[CONTRACT_FILE] = contract.to_json()
        # Of the whole model, not of a tensor: size, resize mode and decoding say how to make the input.
        model_files = [
            meta.AssociatedFileT(
                name=CONTRACT_FILE,
                description="Input contract (JSON): image size, resize mode, DICOM decoding and class names.",
                type=meta.AssociatedFileType.DESCRIPTIONS,
            )
        ]
    model_md = meta.ModelMetadataT(
        name=name,
        description=description,
        version=version or None,
        subgraphMetadata=[meta.SubGraphMetadataT(inputTensorMetadata=[input_md], outputTensorMetadata=[output_md])],
        associatedFiles=model_files,
        minParserVersion=MIN_PARSER_VERSION,
    )
    builder = flatbuffers.Builder(0)
    builder.Finish(model_md.Pack(builder), METADATA_FILE_IDENTIFIER)
    metadata_buffer = tflite_schema.BufferT()
    metadata_buffer.data = bytes(builder.Output())

    # Replace an existing TFLITE_METADATA entry (a re-export), else add one pointing at a new buffer.
    model_t.metadata = model_t.metadata or []
    entry = next((m for m in model_t.metadata if m.name.decode() == METADATA_FIELD_NAME), None)
    if entry is None:
        model_t.buffers.append(metadata_buffer)
        entry = tflite_schema.MetadataT()
        entry.name = METADATA_FIELD_NAME
        entry.buffer = len(model_t.buffers) - 1
        model_t.metadata.append(entry)
    else:
        model_t.buffers[entry.buffer] = metadata_buffer
    builder = flatbuffers.Builder(0)
    builder.Finish(model_t.Pack(builder), MODEL_FILE_IDENTIFIER)

    out = io.BytesIO(bytes(builder.Output()))
    out.seek(0, io.SEEK_END)
    # Mode "a" on bytes that are not a zip appends a fresh archive at the end, as MetadataPopulator does.
    # Stored (uncompressed), as MediaPipe's in-memory zip reader expects.
    with zipfile.ZipFile(out, "a", compression=zipfile.ZIP_STORED) as archive:
        for file_name, text in files.items():
            archive.writestr(file_name, text)
    return out.getvalue()


def read_metadata(model: bytes) -> dict | None:
    """Reads the classifier metadata written by `add_image_classifier_metadata` (or any TFLite metadata).

    Args:
        model: .tflite file contents.

    Returns:
        None when the model has no TFLITE_METADATA entry, else a dict with "name", "description",
        "min_parser_version", "input_color_space" ("RGB", "GRAYSCALE" or None), "input_mean" / "input_std"
        (lists, or None without NormalizationOptions), "labels_file" (the TENSOR_AXIS_LABELS file name or None),
        "labels" (its lines, or None) and "model_files" (names of the model's own associated files, such as
        the input contract).

    Raises:
        UserError: the metadata schema (mediapipe) is not installed.
    """
    from ai_edge_litert import schema_py_generated as tflite_schema

    meta = load_schema()
    model_fb = tflite_schema.Model.GetRootAsModel(model, 0)
    buffer_index = None
    for i in range(model_fb.MetadataLength()):
        if model_fb.Metadata(i).Name().decode() == METADATA_FIELD_NAME:
            buffer_index = model_fb.Metadata(i).Buffer()
    if buffer_index is None:
        return None
    data = model_fb.Buffers(buffer_index).DataAsNumpy().tobytes()
    md = meta.ModelMetadataT.InitFromObj(meta.ModelMetadata.GetRootAsModelMetadata(data, 0))
    subgraph = md.subgraphMetadata[0]
    input_md, output_md = subgraph.inputTensorMetadata[0], subgraph.outputTensorMetadata[0]

    color_space = None
    if input_md.content and input_md.content.contentPropertiesType == meta.ContentProperties.ImageProperties:
        names = {v: k for k, v in vars(meta.ColorSpaceType).items() if not k.startswith("_")}
        color_space = names.get(input_md.content.contentProperties.colorSpace)
    normalization = next(
        (
            u.options
            for u in input_md.processUnits or []
            if u.optionsType == meta.ProcessUnitOptions.NormalizationOptions
        ),
        None,
    )
    labels_file = next(
        (
            f.name.decode()
            for f in output_md.associatedFiles or []
            if f.type == meta.AssociatedFileType.TENSOR_AXIS_LABELS
        ),
        None,
    )
    labels = None
    if labels_file is not None:
        with zipfile.ZipFile(io.BytesIO(model)) as archive:
            labels = archive.read(labels_file).decode("utf-8").splitlines()
    return {
        "name": md.name.decode() if md.name else None,
        "description": md.description.decode() if md.description else None,
        "min_parser_version": md.minParserVersion.decode() if md.minParserVersion else None,
        "input_color_space": color_space,
        "input_mean": list(normalization.mean) if normalization is not None else None,
        "input_std": list(normalization.std) if normalization is not None else None,
        "labels_file": labels_file,
        "labels": labels,
        "model_files": [f.name.decode() for f in md.associatedFiles or []],
    }


def read_labels(model: bytes) -> list[str] | None:
    """Returns the class names packed in a .tflite file, or None when it has none.

    Reads the appended zip archive directly instead of parsing the metadata: importing mediapipe for the schema
    also imports TensorFlow (seconds), which a LiteRT-only runtime should not pay. The labels file is the one
    named `labels.txt` (this module and MediaPipe Model Maker both use that name), else the archive's only
    text file.

    Args:
        model: .tflite file contents.

    Returns:
        The labels, one per class, or None.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(model)) as archive:
            names = archive.namelist()
            texts = [name for name in names if name.endswith(".txt")]
            name = LABELS_FILE_NAME if LABELS_FILE_NAME in names else (texts[0] if len(texts) == 1 else None)
            if name is None:
                return None
            return parse_labels(archive.read(name).decode("utf-8"))
    except zipfile.BadZipFile:
        return None


def read_contract(model: bytes, source: str = "in the .tflite metadata") -> InputContract | None:
    """Returns the input contract packed in a .tflite file, or None when it has none.

    Like `read_labels`, reads the appended zip archive directly, without TensorFlow.

    Args:
        model: .tflite file contents.
        source: where the bytes came from, for messages.

    Raises:
        UserError: the packed record is not a contract this version reads (`InputContract.from_json`).
    """
    from classifier.contract import InputContract

    try:
        with zipfile.ZipFile(io.BytesIO(model)) as archive:
            if CONTRACT_FILE not in archive.namelist():
                return None
            text = archive.read(CONTRACT_FILE).decode("utf-8")
    except zipfile.BadZipFile:
        return None
    return InputContract.from_json(text, source)
