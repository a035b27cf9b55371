"""Secondary Capture overlays: one RGB image per explained slice (e.g. a Grad-CAM heat map
over the CT slice), "NOT FOR DIAGNOSTIC USE" burned into the pixels and written in the
series description, each image referencing its source slice."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from app.reports.coding import SOURCE_IMAGE_FOR_PROCESSING
from app.reports.provenance import (
    NOT_DIAGNOSTIC_LABEL,
    UNTRAINED_LABEL,
    ResultUids,
    algorithm_equipment,
    copy_patient_and_study,
    series_description,
)
from app.reports.source import ReportInput, ReportInputError, SourceSlice

logger = logging.getLogger(__name__)

SC_SERIES_NUMBER = 9003
DERIVATION = "Heat map of the COVID-19 classifier (Grad-CAM) drawn over the CT slice"
BANNER_BACKGROUND: Final = (0, 0, 0)
BANNER_TEXT: Final = (255, 255, 0)
_MIN_FONT_PX = 8


def banner_lines(*, untrained: bool) -> tuple[str, ...]:
    return (NOT_DIAGNOSTIC_LABEL, UNTRAINED_LABEL) if untrained else (NOT_DIAGNOSTIC_LABEL,)


def burn_in(rgb: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """A copy of `rgb` (uint8 [rows, cols, 3]) with `lines` written in yellow on a black
    band across the top, the font as large as the width allows (rows/24 px at most)."""
    image = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    draw = ImageDraw.Draw(image)
    width = image.width
    size = max(_MIN_FONT_PX, image.height // 24)
    font = ImageFont.load_default(size=size)
    while size > _MIN_FONT_PX and max(draw.textlength(t, font=font) for t in lines) > width - 4:
        size -= 1
        font = ImageFont.load_default(size=size)
    if max(draw.textlength(t, font=font) for t in lines) > width - 4:
        raise ReportInputError(f"an overlay {width} pixels wide is too narrow for its warning")
    pad = max(2, size // 4)
    band = pad + len(lines) * (size + pad)
    draw.rectangle((0, 0, width - 1, band), fill=BANNER_BACKGROUND)
    for i, line in enumerate(lines):
        draw.text((pad, pad + i * (size + pad)), line, fill=BANNER_TEXT, font=font)
    return np.asarray(image, dtype=np.uint8).copy()


def build_overlays(
    report: ReportInput,
    *,
    uids: ResultUids | None = None,
    series_number: int = SC_SERIES_NUMBER,
) -> tuple[hd.sc.SCImage, ...]:
    """One Secondary Capture image per overlay of `report`, in one new series."""
    uids = uids or ResultUids()
    model = report.model
    lines = banner_lines(untrained=model.untrained)
    description = series_description("COVID-19 heat maps", model, not_diagnostic=True)
    series_uid = uids.uid("sc", "series")
    images = []
    for number, overlay in enumerate(report.overlays, start=1):
        source = overlay.source
        if source.patient_orientation is None:
            raise ReportInputError(f"overlay {number}: its source slice has no orientation")
        image = hd.sc.SCImage(
            pixel_array=burn_in(overlay.rgb, lines),
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            study_instance_uid=report.study.study_instance_uid,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=uids.uid("sc", str(number), source.sop_instance_uid),
            instance_number=number,
            manufacturer=model.manufacturer,
            patient_orientation=source.patient_orientation,
            series_description=description,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=[algorithm_equipment(model, DERIVATION)],
            specific_character_set=report.study.header.get("SpecificCharacterSet"),
            manufacturer_model_name=model.name,
            software_versions=model.version,
        )
        _describe(image, source, lines)
        # General Series: Laterality is required unless the body part is unpaired; say it.
        image.BodyPartExamined = report.study.header.get("BodyPartExamined") or "CHEST"
        copy_patient_and_study(image, report.study)
        images.append(image)
    logger.info("built %d overlay images", len(images))
    return tuple(images)


def _describe(image: hd.sc.SCImage, source: SourceSlice, lines: Sequence[str]) -> None:
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.sop_class_uid
    reference.ReferencedSOPInstanceUID = source.sop_instance_uid
    reference.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept.from_code(SOURCE_IMAGE_FOR_PROCESSING)
    ]
    image.SourceImageSequence = [reference]
    image.DerivationDescription = f"{DERIVATION}. {' - '.join(lines)}."
    image.ImageComments = " - ".join(lines)
    image.BurnedInAnnotation = "YES"
    image.ConversionType = "WSD"  # rendered by software, not digitised from a film or video
