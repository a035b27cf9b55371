"""Prometheus metrics, named by Prometheus conventions (unit suffixes, _total counters)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Latency buckets reach minutes: a large series on a CPU takes that long.
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)

HTTP_REQUEST_DURATION = Histogram(
    "covidct_http_request_duration_seconds",
    "HTTP request latency by route template, method and status code",
    ["route", "method", "status"],
    buckets=_SECONDS,
)
HTTP_REQUESTS_IN_FLIGHT = Gauge(
    "covidct_http_requests_in_flight", "HTTP requests being handled now"
)
STAGE_DURATION = Histogram(
    "covidct_stage_duration_seconds",
    "Wall time of one pipeline stage for one request (ingest, select, infer, diagnose; "
    "explain, for requests that asked for explanations)",
    ["stage"],
    buckets=_SECONDS,
)
SLICES_PROCESSED = Counter("covidct_slices_processed_total", "Slices decoded from uploads")
SLICES_SELECTED = Counter("covidct_slices_selected_total", "Slices kept by the open-lung rule")
DIAGNOSES = Counter("covidct_diagnoses_total", "Patient diagnoses by outcome", ["outcome"])
ERRORS = Counter(
    "covidct_errors_total", "Requests answered with a problem, by problem type", ["type"]
)

INFERENCE_QUEUE_TIME = Histogram(
    "covidct_inference_queue_seconds",
    "Time a request's slices waited before their first model call",
    buckets=_SECONDS,
)
INFERENCE_COMPUTE_TIME = Histogram(
    "covidct_inference_compute_seconds", "Wall time of one model call (one batch)", buckets=_SECONDS
)
INFERENCE_BATCH_SIZE = Histogram(
    "covidct_inference_batch_size",
    "Slices per model call",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256),
)
INFERENCE_QUEUE_DEPTH = Gauge(
    "covidct_inference_queue_slices", "Slices waiting for the model or being computed"
)
EXPLAIN_QUEUE_DEPTH = Gauge(
    "covidct_explain_queue_slices",
    "Slices waiting for the model's explain signature or being explained (app/explain.py)",
)
MODEL_INFO = Gauge(
    "covidct_model_info",
    "The served model (value 1); labels from its model card",
    ["name", "version", "weights_source", "device"],
)
MODEL_READY = Gauge("covidct_model_ready", "1 when the model is loaded and warm, else 0")

# --- asynchronous jobs and STOW-RS (docs/jobs.md) ---------------------------------------
# Jobs wait up to hours when the queue is long: the queue-wait buckets reach 2 h.
_WAIT_SECONDS = (*_SECONDS, 640, 1280, 2560, 3600, 7200)

JOBS = Gauge(
    "covidct_jobs",
    "Jobs by state, all replicas together (queued, running, done, failed, from the job "
    "store; receiving: studies STOW-RS is still receiving)",
    ["state"],
)
JOB_QUEUE_WAIT = Histogram(
    "covidct_job_queue_wait_seconds",
    "Time from a job's submission (or its last return to the queue) to the start of its run",
    buckets=_WAIT_SECONDS,
)
JOB_RUN_TIME = Histogram(
    "covidct_job_run_seconds",
    "Wall time of one job run, by outcome (done, failed, deferred: given back to the queue)",
    ["outcome"],
    buckets=_SECONDS,
)
JOBS_SUBMITTED = Counter(
    "covidct_jobs_submitted_total",
    "Jobs queued by this replica, by source (upload: POST /jobs; stow: a STOW-RS study)",
    ["source"],
)
STOW_INSTANCES = Counter(
    "covidct_stow_instances_total",
    "Instances received over STOW-RS, by outcome (stored, failed)",
    ["outcome"],
)
