"""The Key Object Selection document: the slices the model scored COVID-19, which a PACS
viewer offers as the study's "key images" (TID 2010, title "Of Interest")."""

from __future__ import annotations

import logging

import highdicom as hd

from app.diagnosis import SLICE_COVID_CUTOFF
from app.reports.coding import OF_INTEREST
from app.reports.provenance import (
    UNTRAINED_LABEL,
    UNVERIFIED_NOTE,
    ResultUids,
    algorithm_equipment,
    copy_patient_and_study,
    device_observer,
    reference_dataset,
    series_description,
)
from app.reports.source import ReportInput

logger = logging.getLogger(__name__)

KO_SERIES_NUMBER = 9002
_WHAT = "selection of the chest CT slices scored COVID-19"


def build_key_images(
    report: ReportInput,
    *,
    uids: ResultUids | None = None,
    series_number: int = KO_SERIES_NUMBER,
) -> hd.ko.KeyObjectSelectionDocument | None:
    """The key-image selection, or None when no slice was scored COVID (a selection
    must reference at least one object)."""
    selected = report.covid_slices
    if not selected:
        logger.info("no key images: no slice scored COVID")
        return None
    uids = uids or ResultUids()
    references = [reference_dataset(s, report.study) for s in selected]
    v = report.verdict
    warning = f"{UNTRAINED_LABEL}. " if report.model.untrained else ""
    description = (
        f"{warning}{len(selected)} of {v.n} selected slices scored COVID-19 "
        f"(probability > {SLICE_COVID_CUTOFF:g}) by {report.model.name} {report.model.version}. "
        f"{UNVERIFIED_NOTE}"
    )
    document = hd.ko.KeyObjectSelectionDocument(
        evidence=references,
        content=hd.ko.KeyObjectSelection(
            document_title=OF_INTEREST,
            referenced_objects=references,
            observer_device_context=device_observer(report.model),
            description=description,
        ),
        series_instance_uid=uids.uid("ko", "series"),
        series_number=series_number,
        sop_instance_uid=uids.uid("ko", "instance"),
        instance_number=1,
        series_description=series_description("COVID-19 AI key images", report.model),
        contributing_equipment=[algorithm_equipment(report.model, _WHAT)],
        manufacturer=report.model.manufacturer,
        manufacturer_model_name=report.model.name,
        software_versions=report.model.version,
    )
    copy_patient_and_study(document, report.study)
    logger.info("built the key object selection: %d key images", len(selected))
    return document
