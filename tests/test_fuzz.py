"""Seeded fuzzing of POST /patients/diagnose with mutated real zips, DICOM and TIFF files:
every answer is a 200 diagnosis or a 4xx problem+json, never a 5xx, and the service keeps
answering. A fixed, seeded set of inputs (the same answers on any machine, however loaded);
tests/tools/fuzz.py runs the long version.

COVIDCT_FUZZ_SEED and COVIDCT_FUZZ_COUNT change the seed and the number of inputs.
"""

from __future__ import annotations

import collections
import os
import time

import pytest
from fastapi.testclient import TestClient

from hostile import check_answer, mutated_uploads, p002_slice, post, seed_corpus, series_corpus
from shared_data import needs_data, zip_files

pytestmark = [needs_data, pytest.mark.usefixtures("production_warning_filters")]


SEED = int(os.environ.get("COVIDCT_FUZZ_SEED", "20260611"))
# 150 inputs: about 40 s on a loaded 2-core CPU (322 inputs took 90 s there).
COUNT = int(os.environ.get("COVIDCT_FUZZ_COUNT", "150"))


@pytest.fixture(scope="module")
def raw(client: TestClient) -> TestClient:
    """The session's app, answering 500 instead of raising, so a 5xx is counted."""
    return TestClient(client.app, raise_server_exceptions=False)


@pytest.mark.slow  # mutated real series through the full network
def test_mutated_uploads_get_a_diagnosis_or_a_4xx_problem(raw: TestClient) -> None:
    outcomes: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    uploads = mutated_uploads(SEED, seed_corpus(), series_corpus())
    t0 = time.perf_counter()
    for i, (label, archive) in zip(range(COUNT), uploads, strict=False):
        response = post(raw, archive, patient_id=f"FUZZ-{i}")
        try:
            outcomes[check_answer(response)] += 1
        except AssertionError as e:
            failures.append(f"input {i} ({label}, seed {SEED}): {e}"[:300])
    seconds = time.perf_counter() - t0
    print(f"\n{sum(outcomes.values())} inputs in {seconds:.0f} s: {dict(outcomes.most_common())}")
    assert not failures, "\n".join(failures)
    # The mutations reach past the container: diagnoses and several kinds of refusal.
    assert outcomes["200"] > 0 and len(outcomes) >= 4, outcomes
    assert sum(outcomes.values()) == COUNT


def test_the_service_is_healthy_after_fuzzing(raw: TestClient) -> None:
    assert raw.get("/health").status_code == 200
    r = post(raw, zip_files([("P002/IM0060.dcm", p002_slice(60))]), patient_id="AFTER")
    assert r.status_code == 200 and r.json()["patient_id"] == "AFTER"
