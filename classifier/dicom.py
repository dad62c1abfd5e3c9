"""DICOM files -> 8-bit RGB pixels, as a radiologist's viewer shows them (pydicom, the optional `dicom` extra).

Per file, or per frame of a multi-frame file:
1. The pixel data is decoded by pydicom with the handlers the `dicom` extra installs (GDCM, pylibjpeg-openjpeg,
   pylibjpeg-rle: JPEG, JPEG-LS, JPEG 2000, HTJ2K, RLE). A transfer syntax that no installed handler reads (MPEG-2,
   H.264 and HEVC video clips, for instance) raises `DicomError` naming it; the scan lists such files as skipped.
2. The Modality LUT or Rescale Slope / Intercept is applied (`apply_modality_lut`): CT values become Hounsfield
   units, so the window presets mean the same on every scanner.
3. The window: a configured one (`data.dicom_window`, a preset or `C,W`) wins; else the file's own VOI LUT or first
   Window Center / Width (`apply_voi_lut`); else a robust window from the 0.5th to the 99.5th percentile of the
   image, so a few very bright or dark pixels (a marker, a collimator edge) do not wash out the rest. A
   configured window is linear, `(value - (C - W/2)) / W` clipped to 0..1 (the standard's LINEAR_EXACT).
4. MONOCHROME1 (low values shown white) is inverted, so that bone is bright in every image.
5. Grey is repeated into three channels. Colour images (RGB, YBR, PALETTE COLOR ultrasound) are already RGB and
   are only scaled to 8 bits.

Privacy: nothing read from a header leaves this module except the pixels, the frame count and, for grouped splits,
the patient ID handed straight to the caller that hashes it. Error messages are scrubbed of the header's text.
pydicom's own warnings and log records (which can quote header values) are silenced.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import warnings
from dataclasses import dataclass

import numpy as np

from classifier.errors import UserError

EXTENSIONS: frozenset[str] = frozenset({".dcm", ".dicom"})
# Window presets in Hounsfield units: (centre, width). The usual radiology reading windows.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),  # air-filled lung tissue, nodules, airways
    "mediastinum": (50.0, 350.0),  # soft tissue of the chest: heart, vessels, lymph nodes
    "bone": (400.0, 1800.0),  # cortical and trabecular bone, fractures
    "brain": (40.0, 80.0),  # grey / white matter, acute bleeding
}
WINDOW_CHOICES = ("auto", *WINDOW_PRESETS, "C,W")
PERCENTILES = (0.5, 99.5)  # the robust window of images without one
INSTALL_HINT = "pip install -e '.[dicom]'"
_MAGIC_OFFSET, _MAGIC = 128, b"DICM"
_NUMERIC_SUFFIX = re.compile(r"\.[0-9]+$")


class DicomError(ValueError):
    """A DICOM file whose pixels cannot be used; the message is the reason shown to the user."""


@dataclass(frozen=True)
class DicomInfo:
    """What the scan needs to know about a readable DICOM file.

    Attributes:
        frames: Number of frames (1 for a single image).
        patient_id: PatientID (with IssuerOfPatientID when present), or None; only for grouping, and the caller
            hashes it before it is kept or written anywhere.
    """

    frames: int
    patient_id: str | None


def parse_window(setting: str) -> tuple[float, float] | None:
    """The window of a `data.dicom_window` setting.

    Args:
        setting: `auto`, a preset name (`WINDOW_PRESETS`) or `C,W` (centre and width, e.g. `40,400`).

    Returns:
        None for `auto`, else (centre, width).

    Raises:
        UserError: any other value, or a width that is not above 0.
    """
    text = str(setting).strip().lower()
    if text == "auto":
        return None
    if text in WINDOW_PRESETS:
        return WINDOW_PRESETS[text]
    parts = text.split(",")
    try:
        centre, width = (float(part) for part in parts)
    except ValueError:
        raise UserError(
            f"data.dicom_window is {setting!r}: choose one of {', '.join(WINDOW_CHOICES)} (C,W is a window centre "
            "and width in the image's units, Hounsfield units for CT, e.g. 40,400)."
        ) from None
    if not (np.isfinite(centre) and np.isfinite(width) and width > 0):
        raise UserError(f"data.dicom_window is {setting!r}: the width (second number) must be above 0, e.g. 40,400.")
    return centre, width


def is_dicom(path: str | os.PathLike) -> bool:
    """Whether a file is read as DICOM: a `.dcm` / `.dicom` suffix, or a name without a suffix (or with a numeric
    one, as in `1.2.840.113619.2.55.3.1`) whose bytes 128..131 are `DICM`."""
    name = os.path.basename(os.fspath(path))
    suffix = os.path.splitext(name)[1].lower()
    if suffix in EXTENSIONS:
        return True
    if suffix and not _NUMERIC_SUFFIX.search(name):
        return False
    return _has_magic(path)


def _has_magic(path: str | os.PathLike) -> bool:
    """The DICOM file marker: `DICM` after the 128-byte preamble."""
    try:
        with open(path, "rb") as handle:
            handle.seek(_MAGIC_OFFSET)
            return handle.read(len(_MAGIC)) == _MAGIC
    except OSError:
        return False


def read(path: str | os.PathLike, *, window: tuple[float, float] | None, frame: int = 0, max_pixels: int) -> np.ndarray:
    """One frame of a DICOM file as model pixels.

    Args:
        path: The file.
        window: (centre, width) from `parse_window`, or None for the file's window / the percentile window.
        frame: 0-based frame index.
        max_pixels: Frames larger than this many pixels are refused.

    Returns:
        uint8 array (rows, columns, 3).

    Raises:
        DicomError: the file is not readable DICOM, holds no image, the frame does not exist, its transfer
            syntax has no installed decoder, or pydicom is not installed.
    """
    dataset = _open(path)
    count = _check_image(dataset, max_pixels)
    if not 0 <= frame < count:
        raise DicomError(f"frame {frame + 1} does not exist: the file has {count} frame(s)")
    pixels = _decode(dataset, index=frame)
    return _scrubbed(functools.partial(to_rgb8, pixels, dataset, window, frame), dataset)


def inspect(
    path: str | os.PathLike, *, window: tuple[float, float] | None, all_frames: bool, max_pixels: int
) -> DicomInfo:
    """Validates a DICOM file the way training reads it: converts the first frame, or every frame (one at a time:
    a long cine loop decoded at once could take gigabytes).

    Args:
        path: The file.
        window: As in `read`.
        all_frames: Decode every frame (each becomes a sample), not only the first.
        max_pixels: As in `read`.

    Returns:
        The frame count and the patient ID (see `DicomInfo`).

    Raises:
        DicomError: see `read`.
    """
    dataset = _open(path)
    count = _check_image(dataset, max_pixels)
    for frame in range(count if all_frames else 1):
        pixels = _decode(dataset, index=frame)
        _scrubbed(functools.partial(to_rgb8, pixels, dataset, window, frame), dataset)
    patient = str(dataset.get("PatientID", "") or "").strip()
    issuer = str(dataset.get("IssuerOfPatientID", "") or "").strip()
    return DicomInfo(frames=count, patient_id=f"{issuer}\0{patient}" if patient else None)


def frame_count(path: str | os.PathLike) -> int:
    """Frames of a DICOM file, read from its header only (pixels not decoded).

    Raises:
        DicomError: not a readable DICOM file.
    """
    return int(_open(path, pixels=False).get("NumberOfFrames", 1) or 1)


def to_rgb8(pixels: np.ndarray, dataset, window: tuple[float, float] | None, frame: int = 0) -> np.ndarray:
    """Decoded pixels of one frame -> uint8 (rows, columns, 3): modality LUT, window, MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut

    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return _colour_to_rgb8(pixels, dataset, photometric)
    dataset = _frame_view(dataset, frame)
    values = np.asarray(apply_modality_lut(pixels, dataset), dtype=np.float64)
    if window is not None:
        centre, width = window
        grey = (values - (centre - width / 2)) / width
    else:
        grey = _file_window(values, dataset)
        if grey is None:
            grey = _percentile_window(values)
    grey = np.clip(grey, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        grey = 1.0 - grey
    grey8 = np.rint(grey * 255.0).astype(np.uint8)
    return np.repeat(grey8[..., None], 3, axis=-1)


# The elements that turn stored grey values into displayed ones (PS3.3 C.11), and where enhanced multi-frame files
# (Enhanced CT / MR / XA) keep them per frame instead: functional group sequence -> its elements.
_GREY_ELEMENTS = (
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "ModalityLUTSequence",
    "RescaleSlope",
    "RescaleIntercept",
    "VOILUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
)
_FRAME_GROUPS = {
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept"),
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction"),
}


def _frame_view(dataset, frame: int):
    """The grey-value elements of one frame, where pydicom's apply_modality_lut and apply_voi_lut look for them.

    Top-level elements win; else the frame's own functional group (PerFrameFunctionalGroupsSequence), else the
    shared one. Without this, an Enhanced CT file would skip its rescale, and the HU windows would be wrong.
    """
    from pydicom.dataset import Dataset

    view = Dataset()
    view.file_meta = dataset.file_meta  # the endianness of OW lookup tables
    for name in _GREY_ELEMENTS:
        if name in dataset:
            view[name] = dataset[name]
    groups = []
    per_frame, shared = dataset.get("PerFrameFunctionalGroupsSequence"), dataset.get("SharedFunctionalGroupsSequence")
    if per_frame and frame < len(per_frame):
        groups.append(per_frame[frame])
    if shared:
        groups.append(shared[0])
    for sequence, names in _FRAME_GROUPS.items():
        if any(name in view for name in names[:2]):
            continue
        items = [group[sequence][0] for group in groups if group.get(sequence)]
        source = next((item for item in items if all(name in item for name in names[:2])), None)
        for name in names if source is not None else ():
            if name in source:
                view[name] = source[name]
    return view


def _file_window(values: np.ndarray, dataset) -> np.ndarray | None:
    """The file's VOI LUT or first window, as 0..1 (None when the file has neither, or an unusable one)."""
    from pydicom.pixels import apply_voi_lut
    from pydicom.pixels.processing import apply_voi, apply_windowing

    lut = dataset.get("VOILUTSequence")
    has_lut = bool(lut) and lut[0].get("LUTDescriptor") is not None and lut[0].get("LUTData") is not None
    has_window = dataset.get("WindowCenter") is not None and dataset.get("WindowWidth") is not None
    if not has_lut and not has_window:
        return None
    try:
        if has_lut:
            # The LUT maps integer values; its own output range is black..white (some LUTs declare 16 bits and
            # use 12, so the declared depth would leave them dark).
            values = np.rint(values).astype(np.int64)
            entries, first = lut[0].LUTDescriptor[0] or 2**16, lut[0].LUTDescriptor[1]
            table = apply_voi(np.arange(first, first + entries), dataset).astype(np.float64)
            low, high = table.min(), table.max()
        else:
            # pydicom scales a window to a range that depends on bits stored, sign and rescale; the window applied
            # to -inf and +inf gives exactly that range's ends.
            low, high = apply_windowing(np.array([-np.inf, np.inf]), dataset)
        mapped = np.asarray(apply_voi_lut(values, dataset, index=0), dtype=np.float64)
    except (ValueError, TypeError, IndexError, KeyError, NotImplementedError, AttributeError):
        return None  # a width below 1, an unknown VOI LUT function, a damaged LUT: use the percentile window
    if not high > low:
        return None
    return (mapped - low) / (high - low)


def _percentile_window(values: np.ndarray) -> np.ndarray:
    """0..1 over the 0.5th..99.5th percentile (min..max when those are equal; black for a flat image)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros_like(values)
    low, high = np.percentile(finite, PERCENTILES)
    if not high > low:
        low, high = finite.min(), finite.max()
    if not high > low:
        return np.zeros_like(values)
    return (np.nan_to_num(values, nan=low) - low) / (high - low)


def _colour_to_rgb8(pixels: np.ndarray, dataset, photometric: str) -> np.ndarray:
    """RGB / YBR (converted to RGB by pydicom) / PALETTE COLOR pixels -> uint8 RGB, scaled by their bit depth."""
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        pixels = apply_color_lut(pixels, dataset)
        top = float(np.iinfo(pixels.dtype).max) if np.issubdtype(pixels.dtype, np.integer) else 255.0
    else:
        top = float(2 ** int(dataset.get("BitsStored", 8) or 8) - 1)
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise DicomError(f"photometric interpretation {photometric} with pixel shape {pixels.shape} is not an image")
    if pixels.dtype == np.uint8 and top == 255.0:
        return np.ascontiguousarray(pixels)
    return np.rint(np.clip(pixels.astype(np.float64) * (255.0 / top), 0, 255)).astype(np.uint8)


@functools.cache
def _pydicom():
    """pydicom, set up once so that it never prints header values (its warnings and log records can quote them)."""
    try:
        import pydicom
        import pydicom.config
    except ImportError:
        raise DicomError(f"DICOM file, but pydicom is not installed: {INSTALL_HINT}") from None
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").propagate = False  # absl/TensorFlow put a handler on the root logger
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    return pydicom


def _open(path: str | os.PathLike, pixels: bool = True):
    """The dataset of a DICOM file (with its pixel data, still encoded, unless `pixels` is False)."""
    pydicom = _pydicom()
    try:
        # force: files written without the 128-byte preamble (older ACR-NEMA style exports) are still DICOM.
        dataset = pydicom.dcmread(os.fspath(path), force=True, stop_before_pixels=not pixels)
    except Exception as error:  # pydicom raises many types on damaged files: each is a reason, never a crash
        raise DicomError(f"not a readable DICOM file ({type(error).__name__})") from None
    if pixels and not any(name in dataset for name in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        if not _has_magic(path):
            raise DicomError("not a DICOM file: no 'DICM' marker at byte 128 and no image in it")
        raise DicomError("DICOM file without pixel data (a report, a structured document or a presentation state)")
    return dataset


def _check_image(dataset, max_pixels: int) -> int:
    """The frame count, after checking that the size is known and not too large."""
    try:
        rows, columns = int(dataset.Rows), int(dataset.Columns)
        count = int(dataset.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise DicomError("DICOM file without a usable image size (Rows, Columns)") from None
    if rows * columns > max_pixels:
        raise DicomError(
            f"too large: {columns} x {rows} pixels ({rows * columns / 1e6:.0f} MP) is over the "
            f"{max_pixels / 1e6:.0f} MP that is decoded; downscale the file"
        )
    return count


def _decode(dataset, index: int | None) -> np.ndarray:
    """Decoded pixels of one frame (`index`) or all frames (None)."""
    from pydicom.pixels import get_decoder, pixel_array

    syntax = dataset.file_meta.get("TransferSyntaxUID") if hasattr(dataset, "file_meta") else None
    if syntax is None:
        raise DicomError("DICOM file without a transfer syntax (no file meta information): re-export it")
    described = syntax.name if syntax.name == str(syntax) else f"{syntax.name} ({syntax})"
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise DicomError(
            f"transfer syntax {described} cannot be decoded: no DICOM decoder reads it; convert the file to an "
            "uncompressed, JPEG or JPEG 2000 transfer syntax"
        ) from None
    if not decoder.is_available:
        raise DicomError(f"transfer syntax {described} needs a decoder that is not installed: {INSTALL_HINT}")
    try:
        return pixel_array(dataset, index=index)
    except Exception as error:  # truncated or damaged pixel data: a reason, never a crash
        raise DicomError(
            _scrub(f"cannot decode the pixel data ({described}): {type(error).__name__}: {error}", dataset)
        ) from None


def _scrubbed(convert, dataset) -> np.ndarray:
    """Runs `convert`; an error becomes a DicomError whose message holds no header text."""
    try:
        return convert()
    except DicomError:
        raise
    except Exception as error:
        raise DicomError(_scrub(f"cannot convert the pixels: {type(error).__name__}: {error}", dataset)) from None


def _scrub(message: str, dataset) -> str:
    """`message` with every text value of the header (names, IDs, dates, institution ...) cut out, shortened."""
    for element in dataset.iterall():
        if element.VR in ("SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN", "US", "SS", "UL", "SL", "FL", "FD"):
            continue
        values = element.value if isinstance(element.value, list | tuple) else [element.value]
        for value in values:
            text = str(value).strip()
            if len(text) >= 3 and text in message:
                message = message.replace(text, "[header value]")
    return message[:300]
