"""A real Orthanc PACS with its DICOMweb plugin, for the tests that need a PACS to push.

Debian packages `orthanc` and `orthanc-dicomweb` (`apt-get install -y orthanc
orthanc-dicomweb`). `start_orthanc` runs the server binary on free loopback ports (HTTP and
DICOM) with a temporary JSON configuration and storage directory, its DICOMweb client
pointed at the `servers` given (the `DicomWeb.Servers` setting), and stops it at the end.

The fixture `orthanc_install` finds the binary and the plugin: without them the tests skip
with the reason outside CI, and fail in CI (CI=true), where `.ci/run` must install them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from loopback import free_port, wait_ready
from processes import stop

IN_CI = os.environ.get("CI", "").lower() == "true"
DEADLINE_S = 60.0  # bound of every wait on the server; never reached when all is well
_PLUGIN_NAME = "libOrthancDicomWeb.so"
_PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))


@dataclass(frozen=True)
class OrthancInstall:
    binary: Path
    plugin: Path


def find_orthanc() -> OrthancInstall | None:
    """The Orthanc binary and its DICOMweb plugin (as `dpkg -L orthanc-dicomweb` lists it),
    or None when either is missing."""
    binary = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/bin")
    if binary is None:
        return None
    for directory in _PLUGIN_DIRS:
        plugins = sorted(directory.glob(_PLUGIN_NAME + "*")) if directory.is_dir() else []
        if plugins:
            return OrthancInstall(Path(binary), plugins[0])
    return None


@pytest.fixture(scope="session")
def orthanc_install() -> OrthancInstall:
    found = find_orthanc()
    if found is None:
        message = "Orthanc or its DICOMweb plugin not found (Debian: orthanc, orthanc-dicomweb)"
        if IN_CI:
            pytest.fail(f"{message}: CI must install them")
        pytest.skip(f"{message}; these tests run in CI")
    return found


@dataclass
class Orthanc:
    """A running Orthanc: its REST API at `url`."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def client(self, timeout_s: float = DEADLINE_S) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout_s)

    def upload(self, files: list[Path]) -> str:
        """Store DICOM files (POST /instances); the Orthanc ID of their (one) study."""
        studies = set()
        with self.client() as c:
            for path in files:
                r = c.post("/instances", content=path.read_bytes())
                r.raise_for_status()
                studies.add(r.json()["ParentStudy"])
        assert len(studies) == 1, "the files are expected to hold one study"
        return studies.pop()

    def stow(self, server: str, resources: list[str]) -> Any:
        """Push resources to a DICOMweb server of `DicomWeb.Servers` over STOW-RS, with
        Orthanc's own DICOMweb client; waits until the push has ended."""
        with self.client() as c:
            r = c.post(
                f"/dicom-web/servers/{server}/stow",
                json={"Resources": resources, "Synchronous": True},
            )
            if r.status_code != 200:
                raise AssertionError(f"Orthanc STOW-RS failed ({r.status_code}): {self.tail()}")
            return r.json()

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


@contextmanager
def start_orthanc(
    install: OrthancInstall, workdir: Path, servers: dict[str, dict[str, Any]]
) -> Iterator[Orthanc]:
    """Orthanc on free loopback ports, configured in `workdir`; stopped at the end."""
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "covidct-test-pacs",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "COVIDCTTEST",
        "RemoteAccessAllowed": False,  # loopback clients only
        "AuthenticationEnabled": False,
        "HttpTimeout": 120,
        "StableAge": 1,
        "Plugins": [str(install.plugin)],
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": False,
            "Servers": servers,
        },
    }
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log = workdir / "orthanc.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(install.binary), "--verbose", str(config_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    server = Orthanc(f"http://127.0.0.1:{http_port}", process, log)
    try:
        _wait_ready(server)
        yield server
    finally:
        stop(process, timeout_s=DEADLINE_S)


def _wait_ready(server: Orthanc) -> None:
    with server.client(timeout_s=2) as c:

        def ready() -> bool:
            if c.get("/system").status_code != 200:
                return False
            plugins = c.get("/plugins").json()
            assert "dicom-web" in plugins, f"DICOMweb plugin not loaded: {plugins}"
            return True

        wait_ready(
            server.process,
            ready,
            transient=httpx.TransportError,
            timeout_s=DEADLINE_S,
            poll_s=0.05,
            what="Orthanc",
            tail=server.tail,
        )
