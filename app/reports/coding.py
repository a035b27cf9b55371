"""The coded concepts of the results, in one place.

Standard codes where the standard has one (SNOMED CT for the disease, the presence values
and the procedure; DCM for the document structure; UCUM for units). The rule's own numbers
have no standard concept: they use a local coding scheme, "99COVIDCT" (designators that
start with "99" are private by PS3.16 8.2), declared in each SR's Coding Scheme
Identification Sequence.
"""

from __future__ import annotations

from typing import Final

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from app.domain import Outcome

# SNOMED CT 840539006: "Disease caused by severe acute respiratory syndrome coronavirus 2
# (disorder)". Its fully specified name (65 characters) does not fit Code Meaning (LO, 64):
# the meaning is its synonym "COVID-19".
COVID_19: Final = Code("840539006", "SCT", "COVID-19")
PRESENCE: Final[dict[Outcome, Code]] = {
    "covid": codes.SCT.Present,  # 52101004
    "normal": codes.SCT.Absent,  # 272519000
    "indeterminate": codes.SCT.Indeterminate,  # 82334004
}
CT_OF_CHEST: Final = Code("169069000", "SCT", "CT of chest")
DEVICE: Final = codes.DCM.Device
PROCESSING_EQUIPMENT: Final = codes.DCM.ProcessingEquipment  # CID 7005
OF_INTEREST: Final = codes.DCM.OfInterest  # CID 7010 key object selection title
SOURCE_IMAGE_FOR_PROCESSING: Final = codes.DCM.SourceImageForImageProcessingOperation
COMMENT: Final = Code("121106", "DCM", "Comment")
QUALITATIVE_EVALUATIONS: Final = Code("C0034375", "UMLS", "Qualitative Evaluations")

NO_UNITS: Final = Code("1", "UCUM", "no units")
SLICES: Final = Code("{slices}", "UCUM", "slices")

LOCAL_SCHEME: Final = "99COVIDCT"
SLICE_COVID_PROBABILITY: Final = Code("SLICEPROB", LOCAL_SCHEME, "Slice COVID-19 probability")
COVID_SLICES: Final = Code("K", LOCAL_SCHEME, "Selected slices scored COVID-19")
SELECTED_SLICES: Final = Code("N", LOCAL_SCHEME, "Selected slices")
REQUIRED_SLICES: Final = Code("REQUIRED", LOCAL_SCHEME, "COVID-19 slices required")
THRESHOLD_FRACTION: Final = Code("T", LOCAL_SCHEME, "Patient threshold fraction")


def local_scheme() -> CodingSchemeIdentificationItem:
    return CodingSchemeIdentificationItem(
        designator=LOCAL_SCHEME,
        name="covidct result concepts",
        responsible_organization="covidct project",
    )
