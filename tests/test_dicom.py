"""DICOM and 16-bit TIFF in, the same pixels everywhere: windows, rescale, frames, grouped splits, privacy.

Expected pixels are computed here from the DICOM standard's formulas (PS3.3 C.11.2.1.2: LINEAR window; C.11.1:
rescale), not by calling the code under test.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom", reason="the dicom extra: pip install -e '.[dicom]'")
from conftest import TINY  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import MPEG4HP41, ExplicitVRLittleEndian, generate_uid  # noqa: E402

from classifier import data  # noqa: E402
from classifier.config import Config  # noqa: E402
from classifier.errors import UserError  # noqa: E402

# Header values planted in every file; none of them may show up in anything the toolkit writes or prints.
PLANTED = {
    "PatientName": "Quxbridge^Zelda",
    "PatientBirthDate": "19230417",
    "InstitutionName": "Planted Memorial Hospital 8842",
    "ReferringPhysicianName": "Vexmoor^Oswin",
    "StudyDescription": "Yarrowfield protocol",
}
PATIENT_ID_PREFIX = "PID-93417-QX"
# The CT windows as a radiologist sets them: centre, width in Hounsfield units.
WINDOWS = {"lung": (-600, 1500), "mediastinum": (50, 350), "bone": (400, 1800), "brain": (40, 80), "40,400": (40, 400)}


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    patient_id: str = f"{PATIENT_ID_PREFIX}-0",
    syntax=ExplicitVRLittleEndian,
    pixel_data: bytes | None = None,
    **elements,
) -> Path:
    """A DICOM file written by pydicom: (frames,) rows x columns of `pixels`, plus any header `elements`."""
    pixels = np.asarray(pixels)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    for name, value in PLANTED.items():
        setattr(dataset, name, value)
    dataset.PatientID = patient_id
    dataset.Modality = "OT"
    dataset.Rows, dataset.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        dataset.NumberOfFrames = pixels.shape[0]
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, photometric
    dataset.BitsAllocated = pixels.dtype.itemsize * 8
    dataset.BitsStored = bits_stored or dataset.BitsAllocated
    dataset.HighBit = dataset.BitsStored - 1
    dataset.PixelRepresentation = int(pixels.dtype.kind == "i")
    for name, value in elements.items():
        setattr(dataset, name, value)
    dataset.PixelData = pixel_data if pixel_data is not None else pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return path


def linear_window(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """A configured window, `(x - (C - W/2)) / W` clipped to 0..1, as 8-bit grey."""
    return np.rint(np.clip((values - (centre - width / 2)) / width, 0, 1) * 255).astype(int)


def dicom_linear_window(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """A window stored in the file: PS3.3 C.11.2.1.2.1 LINEAR (centre - 0.5, width - 1), as 8-bit grey."""
    centre, width = centre - 0.5, width - 1
    grey = np.where(
        values <= centre - width / 2, 0.0, np.where(values > centre + width / 2, 1.0, (values - centre) / width + 0.5)
    )
    return np.rint(grey * 255).astype(int)


def grey(pixels: np.ndarray) -> np.ndarray:
    """The one grey channel of a decoded image, after checking that all three channels hold it."""
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[-1] == 3
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all()
    return pixels[..., 0].astype(int)


# --- pixels -------------------------------------------------------------------------------------------------------


def test_eight_bit_with_a_full_range_window_in_the_file_keeps_the_stored_values(tmp_path):
    stored = np.arange(256, dtype=np.uint8).reshape(16, 16)
    # C 128, W 256 LINEAR maps 0..255 onto itself: ((x - 127.5) / 255 + 0.5) * 255 = x.
    path = write_dicom(tmp_path / "eight.dcm", stored, WindowCenter=128, WindowWidth=256)
    np.testing.assert_array_equal(grey(data.load_image(path)), stored)


def test_sixteen_bit_without_a_window_uses_the_robust_percentile_window(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.integers(1000, 3001, 2000)
    values[:40], values[40:80] = 1000, 3000  # 2 % at each end: the 0.5th and 99.5th percentiles are 1000 and 3000
    values[80:85], values[85:90] = 0, 65535  # 0.25 % outliers each side: they must not set the window
    stored = values.astype(np.uint16).reshape(40, 50)
    path = write_dicom(tmp_path / "sixteen.dcm", stored)
    decoded = grey(data.load_image(path))
    np.testing.assert_allclose(decoded, linear_window(stored.astype(float), 2000, 2000), atol=1)
    assert decoded.flat[80] == 0 and decoded.flat[85] == 255  # outliers clipped, not stretched to
    assert decoded.flat[40] == 255 and decoded.flat[0] == 0


def test_twelve_bit_window_from_the_file_and_monochrome1_inverted(tmp_path):
    stored = np.linspace(0, 4095, 64 * 64).astype(np.uint16).reshape(64, 64)
    window = {"WindowCenter": 1500, "WindowWidth": 1001}
    expected = dicom_linear_window(stored.astype(float), 1500, 1001)
    mono2 = write_dicom(tmp_path / "mono2.dcm", stored, bits_stored=12, **window)
    mono1 = write_dicom(tmp_path / "mono1.dcm", stored, bits_stored=12, photometric="MONOCHROME1", **window)
    np.testing.assert_allclose(grey(data.load_image(mono2)), expected, atol=1)
    # MONOCHROME1 shows low values white: inverted, so the same tissue is bright in both.
    np.testing.assert_allclose(grey(data.load_image(mono1)), 255 - expected, atol=1)
    assert grey(data.load_image(mono1))[-1, -1] == 0 and grey(data.load_image(mono2))[-1, -1] == 255


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEG2000Lossless"])
def test_compressed_pixel_data_decodes_to_the_same_pixels(tmp_path, syntax):
    stored = (np.arange(32 * 32).reshape(32, 32) * 37 % 4096).astype(np.uint16)
    plain = write_dicom(tmp_path / "plain.dcm", stored, bits_stored=12, WindowCenter=2048, WindowWidth=4096)
    dataset = pydicom.dcmread(plain)
    dataset.compress(getattr(pydicom.uid, syntax))  # pydicom's RLE encoder, pylibjpeg-openjpeg's JPEG 2000
    dataset.save_as(tmp_path / "compressed.dcm", enforce_file_format=True)
    assert pydicom.dcmread(tmp_path / "compressed.dcm").file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(data.load_image(tmp_path / "compressed.dcm"), data.load_image(plain))
    np.testing.assert_allclose(
        grey(data.load_image(plain)), dicom_linear_window(stored.astype(float), 2048, 4096), atol=1
    )


def test_a_configured_window_overrides_the_files_window(tmp_path):
    stored = np.linspace(0, 4095, 32 * 32).astype(np.uint16).reshape(32, 32)
    path = write_dicom(tmp_path / "w.dcm", stored, bits_stored=12, WindowCenter=1500, WindowWidth=1001)
    decoded = grey(data.load_image(path, data.Decoding(dicom_window="2000,3000")))
    np.testing.assert_allclose(decoded, linear_window(stored.astype(float), 2000, 3000), atol=1)


def test_a_voi_lut_sequence_is_preferred_to_the_window(tmp_path):
    stored = np.arange(256, dtype=np.uint8).reshape(16, 16)
    lut = Dataset()
    lut.LUTDescriptor = [256, 0, 8]
    lut.add_new("LUTData", "US", [255 - value for value in range(256)])  # a reversing LUT
    path = write_dicom(tmp_path / "lut.dcm", stored, VOILUTSequence=[lut], WindowCenter=128, WindowWidth=256)
    np.testing.assert_array_equal(grey(data.load_image(path)), 255 - stored.astype(int))


def test_signed_ct_is_rescaled_to_hounsfield_units_then_windowed(tmp_path):
    hu = np.array([[-1000, -600, -100, 0, 40, 50, 400, 1000, 2000]], dtype=float)
    slope, intercept = 2, -24
    stored = ((hu - intercept) / slope).astype(np.int16)  # -488 for air: signed storage
    assert stored.min() < 0
    path = write_dicom(tmp_path / "ct.dcm", stored, RescaleSlope=slope, RescaleIntercept=intercept, Modality="CT")
    for setting, (centre, width) in WINDOWS.items():
        decoded = grey(data.load_image(path, data.Decoding(dicom_window=setting)))
        np.testing.assert_allclose(decoded, linear_window(hu, centre, width), atol=1, err_msg=setting)
    lung = grey(data.load_image(path, data.Decoding(dicom_window="lung")))[0]
    assert lung[0] < lung[1] < lung[2] and lung[-1] == 255  # air darker than lung tissue; bone saturates


def test_multi_frame_first_or_every_frame(tmp_path):
    frames = np.stack([np.full((4, 6), value, np.uint16) for value in (500, 1000, 1500)])
    path = write_dicom(tmp_path / "cine.dcm", frames, WindowCenter=1000, WindowWidth=2001)
    expected = [dicom_linear_window(np.array(value, float), 1000, 2001) for value in (500, 1000, 1500)]
    assert grey(data.load_image(path))[0, 0] == expected[0]  # a plain path is the first frame
    for index in range(3):
        ref = data.frame_ref(str(path), index)
        assert ref.endswith(f"#frame={index + 1}")
        assert (grey(data.load_image(ref)) == expected[index]).all()
    assert data.frame_refs(str(path), data.Decoding(dicom_frames="first")) == [str(path)]
    assert data.frame_refs(str(path), data.Decoding(dicom_frames="all")) == [f"{path}#frame={n}" for n in (1, 2, 3)]
    with pytest.raises(ValueError, match="frame 4 does not exist"):
        data.load_image(f"{path}#frame=4")


def test_enhanced_multi_frame_rescale_and_window_come_from_the_functional_groups(tmp_path):
    stored = np.stack([np.linspace(0, 2000, 16).reshape(4, 4)] * 2).astype(np.uint16)
    intercepts = (-1024, -500)  # per frame, as Enhanced CT stores them
    per_frame = []
    for intercept in intercepts:
        transform = Dataset()
        transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 1, intercept, "HU"
        group = Dataset()
        group.PixelValueTransformationSequence = [transform]
        per_frame.append(group)
    window, shared = Dataset(), Dataset()
    window.WindowCenter, window.WindowWidth = 40, 401
    shared.FrameVOILUTSequence = [window]
    path = write_dicom(
        tmp_path / "enhanced.dcm",
        stored,
        PerFrameFunctionalGroupsSequence=per_frame,
        SharedFunctionalGroupsSequence=[shared],
    )
    for frame, intercept in enumerate(intercepts):
        hu = stored[frame].astype(float) + intercept
        decoded = grey(data.load_image(data.frame_ref(str(path), frame)))
        np.testing.assert_allclose(decoded, dicom_linear_window(hu, 40, 401), atol=1, err_msg=f"frame {frame + 1}")
        lung = grey(data.load_image(data.frame_ref(str(path), frame), data.Decoding(dicom_window="lung")))
        np.testing.assert_allclose(lung, linear_window(hu, -600, 1500), atol=1, err_msg=f"frame {frame + 1}")


def test_sixteen_bit_and_float_tiffs_are_scaled_by_their_own_range(tmp_path):
    deep = np.linspace(300, 4300, 48 * 64).reshape(48, 64).astype(np.uint16)  # every value above 255
    Image.fromarray(deep).save(tmp_path / "deep.tif")
    with Image.open(tmp_path / "deep.tif") as image:
        assert image.mode.startswith("I;16")
    decoded = grey(data.load_image(tmp_path / "deep.tif"))
    np.testing.assert_allclose(decoded, np.rint((deep - 300.0) / 4000.0 * 255), atol=1)
    assert decoded.min() == 0 and decoded.max() == 255 and len(np.unique(decoded)) == 256  # not clipped white

    signal = np.linspace(-2.5, 7.5, 32 * 32).reshape(32, 32).astype(np.float32)
    Image.fromarray(signal).save(tmp_path / "float.tif")
    np.testing.assert_allclose(
        grey(data.load_image(tmp_path / "float.tif")), np.rint((signal + 2.5) / 10 * 255), atol=1
    )

    pages = [Image.fromarray(np.full((8, 8), value, np.uint16)) for value in (1000, 3000)]
    pages[0].putpixel((0, 0), 0)  # page 1 has a range; page 2 would be flat
    pages[0].save(tmp_path / "pages.tif", save_all=True, append_images=pages[1:])
    with Image.open(tmp_path / "pages.tif") as image:
        assert image.n_frames == 2
    first = grey(data.load_image(tmp_path / "pages.tif"))
    assert first[0, 0] == 0 and (first.flat[1:] == 255).all()  # the first page, scaled by its own range


# --- the scan: what is found, what is skipped and why ------------------------------------------------------------


def test_scan_finds_dicom_without_suffix_and_lists_unusable_files_with_reasons(tmp_path):
    root = tmp_path / "data"
    for label, name in enumerate(("dark", "bright")):
        for index in range(4):
            value = np.full((8, 8), 100 + 800 * label + index, np.uint16)
            value[:2] = 0
            write_dicom(root / name / f"image{index}.dcm", value)
    stored = np.arange(64, dtype=np.uint16).reshape(8, 8)
    write_dicom(root / "dark" / "IM000017", stored)  # no suffix: known by the DICM marker
    write_dicom(root / "dark" / "1.2.840.113619.2.55.3.17", stored)  # PACS export named by its UID
    (root / "dark" / "README").write_text("no suffix, not DICOM: ignored")
    good = (root / "dark" / "image0.dcm").read_bytes()
    (root / "bright" / "truncated.dcm").write_bytes(good[: len(good) - 60])
    (root / "bright" / "garbage.dcm").write_bytes(b"this is not a medical image\n" * 10)
    write_dicom(root / "bright" / "clip.dcm", stored, syntax=MPEG4HP41, pixel_data=encapsulate([b"\x00\x00\x01" * 50]))

    split = data.prepare_split(root, tmp_path / "run", val_fraction=0.2, test_fraction=0.2)
    used = {Path(rel).name for rel, _ in split.train + split.val + split.test}
    assert {"IM000017", "1.2.840.113619.2.55.3.17"} <= used and "README" not in used
    reasons = {
        entry["path"]: entry["reason"] for entry in json.loads((tmp_path / "run" / "split.json").read_text())["skipped"]
    }
    assert set(reasons) == {"bright/truncated.dcm", "bright/garbage.dcm", "bright/clip.dcm"}
    assert "cannot decode the pixel data" in reasons["bright/truncated.dcm"]
    assert "not a DICOM file" in reasons["bright/garbage.dcm"]
    assert "H.264" in reasons["bright/clip.dcm"] and "cannot be decoded" in reasons["bright/clip.dcm"]
    assert "1.2.840.10008.1.2.4.102" in reasons["bright/clip.dcm"]


def test_settings_are_checked_with_the_accepted_values(tmp_path):
    def message(**data_settings) -> str:
        with pytest.raises(UserError) as error:
            Config().replace({"data": data_settings})
        return str(error.value)

    assert "data.dicom_window is 'soft'" in message(dicom_window="soft")
    assert "auto, lung, mediastinum, bone, brain, C,W" in message(dicom_window="soft")
    assert "width (second number) must be above 0" in message(dicom_window="40,0")
    assert "data.dicom_frames is 'some'" in message(dicom_frames="some") and "first, all" in message(dicom_frames="x")
    assert "data.group_by is 'patient'" in message(group_by="patient")
    assert "not a valid regular expression" in message(group_by="filename_regex:case(")
    assert Config().replace({"data": {"dicom_window": "-600,1500", "group_by": "filename_regex:c(\\d+)"}})


# --- splits: frames of a file, and groups, stay in one subset ----------------------------------------------------


def _subset_of(split: data.Split) -> dict[str, str]:
    return {rel: name for name in data.SUBSETS for rel, _ in split.subset(name)}


def test_every_frame_is_a_sample_and_the_frames_of_a_file_stay_together(tmp_path):
    root = tmp_path / "data"
    for label, name in enumerate(("a", "b")):
        for index in range(10):
            frames = np.stack([np.full((4, 4), 10 * frame + label, np.uint16) for frame in range(3)])
            frames[:, 0] = 0
            write_dicom(root / name / f"loop{index}.dcm", frames)
    split = data.split_scan(data.scan_folder(root, data.Decoding(dicom_frames="all")), seed=3)
    subsets = _subset_of(split)
    assert len(subsets) == 2 * 10 * 3
    by_file: dict[str, set] = {}
    for rel, subset in subsets.items():
        by_file.setdefault(data.split_frame_ref(rel)[0], set()).add(subset)
    assert len(by_file) == 20 and all(len(found) == 1 for found in by_file.values())
    assert all(split.subset(name) for name in data.SUBSETS)


def test_grouped_split_keeps_each_patient_in_one_subset(tmp_path):
    root, patient_of = tmp_path / "data", {}
    for patient in range(16):
        classes = ["normal", "finding"] if patient == 15 else [("normal", "finding")[patient % 2]]
        for name in classes:  # patient 15 has images in both classes
            for view in range(3):
                rel = f"{name}/p{patient}v{view}.dcm"
                pixels = np.full((6, 6), 50 * view + patient, np.uint16)
                pixels[0] = 0
                write_dicom(root / rel, pixels, patient_id=f"{PATIENT_ID_PREFIX}-{patient}")
                patient_of[rel] = patient
    data.prepare_split(root, tmp_path / "run", group_by="dicom_patient", seed=7)
    content = json.loads((tmp_path / "run" / "split.json").read_text())
    seen: dict[int, set] = {}
    for name in data.SUBSETS:
        assert content[name], name
        for rel, _ in content[name]:
            seen.setdefault(patient_of[rel], set()).add(name)
    assert len(seen) == 16 and all(len(subsets) == 1 for subsets in seen.values()), seen
    # The manifest records hashed groups only: one per patient, none in two subsets, no ID in clear.
    assert content["group_by"] == "dicom_patient"
    hashes = [set(content["groups"][name]) for name in data.SUBSETS]
    assert sum(map(len, hashes)) == len(set().union(*hashes)) == 16
    assert PATIENT_ID_PREFIX not in (tmp_path / "run" / "split.json").read_text()


def test_grouped_split_by_file_name_pattern(tmp_path):
    root, case_of = tmp_path / "data", {}
    for case in range(14):
        name = ("ok", "defect")[case % 2]
        for shot in range(4):
            rel = f"{name}/case{case:02d}_shot{shot}.png"
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.new("L", (8, 8), 10 * shot + case).save(root / rel)
            case_of[rel] = case
    split = data.split_scan(data.scan_folder(root, group_by=r"filename_regex:case(\d+)_"), seed=1)
    seen: dict[int, set] = {}
    for rel, subset in _subset_of(split).items():
        seen.setdefault(case_of[rel], set()).add(subset)
    assert len(seen) == 14 and all(len(subsets) == 1 for subsets in seen.values())
    with pytest.raises(UserError, match="matches none of the image paths"):
        data.scan_folder(root, group_by=r"filename_regex:patient(\d+)")


# --- end to end: a mixed folder trains, exports and predicts; nothing from a header leaks ------------------------


def _write_mixed_folder(root: Path) -> None:
    """Two classes told apart by a bright or a dark centre, as PNG, DICOM (some without a suffix, one multi-frame,
    one MONOCHROME1, signed CT) and 16-bit TIFF, with patient fields planted in every DICOM header."""
    rng = np.random.default_rng(0)
    size = 48
    for label, name in enumerate(("bright_centre", "dark_centre")):
        for index in range(12):
            base = rng.uniform(0.1, 0.3, (size, size))
            base[12:36, 12:36] = rng.uniform(0.7, 0.9)
            pattern = base if label == 0 else 1.0 - base
            folder = root / name
            folder.mkdir(parents=True, exist_ok=True)
            patient = f"{PATIENT_ID_PREFIX}-{label}{index // 2}"  # two images per patient
            kind = index % 4
            if kind == 0:
                Image.fromarray((pattern * 255).astype(np.uint8)).save(folder / f"photo{index}.png")
            elif kind == 1:
                Image.fromarray((pattern * 4095 + 300).astype(np.uint16)).save(folder / f"scan{index}.tif")
            elif kind == 2:
                stored = (pattern * 2000 - 1000).astype(np.int16)  # signed CT, HU = stored - 24
                write_dicom(folder / f"ct{index}.dcm", stored, RescaleSlope=1, RescaleIntercept=-24, patient_id=patient)
            elif index == 3:
                frames = np.stack([(pattern * 4000 + 50 * k).astype(np.uint16) for k in range(3)])
                write_dicom(
                    folder / f"loop{index}.dcm", frames, WindowCenter=2000, WindowWidth=4000, patient_id=patient
                )
            else:
                inverted = ((1.0 - pattern) * 4095).astype(np.uint16)
                write_dicom(
                    folder / f"IM{index:04d}", inverted, bits_stored=12, photometric="MONOCHROME1", patient_id=patient
                )


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory) -> dict:
    """train, export, `classifier predict` and evaluate on a mixed PNG / DICOM / TIFF folder, with all they printed.

    The commands run through `classifier.cli.main` in the test's own process (what `python -m classifier ...` runs
    after its imports), their output captured and the decoded-image cache pointed into the test's folder.
    """
    from classifier import cli

    tmp = tmp_path_factory.mktemp("mixed")
    images, runs, cache = tmp / "images", tmp / "runs", tmp / "cache"
    _write_mixed_folder(images)
    run_dir = runs / "mixed"
    steps = [
        ["train", "--data-dir", str(images), "--output-dir", str(runs), "--name", "mixed", *TINY, "--epochs", "1",
         "--image-size", "48", "--batch-size", "4", "--augment", "none", "--set", "data.dicom_frames=all",
         "--set", "data.group_by=dicom_patient", "--set", "train.feature_views=0"],
        ["export", "--run-dir", str(run_dir), "--formats", "float32,int8", "--calibration-images", "8",
         "--latency-runs", "2", "--max-accuracy-drop", "1"],
        ["predict", "--model", str(run_dir / "export" / "model_int8.tflite"), str(images), "--format", "json",
         "--output", str(tmp / "predictions.json")],
        ["evaluate", "--run-dir", str(run_dir), "--subset", "val"],
    ]  # fmt: skip
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        patch.setenv("XDG_CACHE_HOME", str(cache))
        for step in steps:
            print(f"== classifier {step[0]}", flush=True)
            code = cli.main(step)
            if code:
                break
    assert code == 0, f"{step[0]} exited {code}: " + out.getvalue()[-3000:] + err.getvalue()[-3000:]
    return {
        "tmp": tmp,
        "images": images,
        "run_dir": run_dir,
        "cache": cache,
        "stdout": out.getvalue(),
        "stderr": err.getvalue(),
    }


def test_mixed_png_dicom_tiff_folder_trains_exports_and_predicts(mixed_run):
    run_dir = mixed_run["run_dir"]
    split = json.loads((run_dir / "split.json").read_text())
    used = [rel for name in data.SUBSETS for rel, _ in split[name]]
    suffixes = {os.path.splitext(data.split_frame_ref(rel)[0])[1] for rel in used}
    assert {".png", ".tif", ".dcm", ""} <= suffixes, suffixes  # "" = DICOM files without a suffix
    loops = [rel for rel in used if "loop" in rel]
    assert sorted(loops) == [
        f"{name}/loop3.dcm#frame={n}" for name in ("bright_centre", "dark_centre") for n in (1, 2, 3)
    ]
    assert split["skipped"] == []
    for name in ("model.keras", "metrics.json", "export/model_float32.tflite", "export/model_int8.tflite"):
        assert (run_dir / name).is_file(), name
    report = json.loads((run_dir / "export" / "export_report.json").read_text())
    assert report["decoding"] == {"dicom_window": "auto", "dicom_frames": "all"}
    assert report["calibration_images"] == 8

    predictions = json.loads((mixed_run["tmp"] / "predictions.json").read_text())
    assert predictions["errors"] == 0 and predictions["decoding"]["dicom_frames"] == "all"
    rows = {Path(row["path"]).name: row for row in predictions["predictions"]}
    assert {"IM0007", "ct2.dcm", "scan1.tif", "photo0.png", "loop3.dcm#frame=3"} <= set(rows)
    assert all(row["label"] in ("bright_centre", "dark_centre") for row in rows.values())
    evaluation = json.loads(next((run_dir / "evaluation").glob("*/evaluation.json")).read_text())
    assert evaluation["count"] == len(split["val"]) and evaluation["model"]["decoding"]["dicom_frames"] == "all"


def test_no_header_field_reaches_any_output(mixed_run):
    planted = [*PLANTED.values(), PATIENT_ID_PREFIX, "Quxbridge", "Zelda", "Vexmoor", "Yarrowfield", "Planted Memorial"]
    outputs = {"stdout": mixed_run["stdout"].encode(), "stderr": mixed_run["stderr"].encode()}
    folders = [mixed_run["run_dir"], mixed_run["cache"], mixed_run["tmp"] / "predictions.json"]
    for folder in folders:
        files = [folder] if folder.is_file() else [path for path in folder.rglob("*") if path.is_file()]
        for path in files:
            outputs[str(path)] = path.read_bytes()
            if zipfile.is_zipfile(path):  # model.keras: the members are compressed, search them decompressed
                with zipfile.ZipFile(path) as archive:
                    for member in archive.namelist():
                        outputs[f"{path}:{member}"] = archive.read(member)
    assert len(outputs) > 20  # the run folder, TensorBoard logs, the export, predictions and evaluation
    source = (mixed_run["images"] / "dark_centre" / "IM0007").read_bytes()
    assert all(value.encode() in source for value in planted)  # the search finds them where they are
    assert b"dicom_patient" in outputs[str(mixed_run["run_dir"] / "split.json")]
    for where, content in outputs.items():
        for value in planted:
            for encoded in {value.encode(), value.encode("utf-16-le")}:
                assert encoded not in content, f"{value!r} found in {where}"
