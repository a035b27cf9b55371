"""configure_libraries(): the one start-up call that sets up the readers ingest uses.

Nothing here runs on import: the service calls it once at start-up, each decode worker
process when it starts (app/ingest/pool.py), the tests in their conftest, and the scripts
that read DICOM in process.
"""

from __future__ import annotations

import contextlib

from pydicom import config as dicom_config
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import AllTransferSyntaxes

from app.logs import protect_library_logs


def configure_libraries() -> None:
    """Set up pydicom for untrusted input; idempotent (call it again at will).

    - pydicom's default "warn" validation echoes invalid tag values (patient data) into
      its warnings and log: values are read without validation instead. Process-wide, but
      ingest is the service's only pydicom reader.
    - GDCM is taken out of every decoder (see `_never_gdcm`).
    - Whatever the readers still log or warn loses its text (app/logs.py).
    """
    dicom_config.settings.reading_validation_mode = dicom_config.IGNORE
    _never_gdcm()
    protect_library_logs()


# GDCM (see below), and pyjpegls, which highdicom installs: a second JPEG-LS decoder that
# would get a second try at every stream pylibjpeg refuses, never fuzzed here.
_UNTRUSTED_PLUGINS = ("gdcm", "pyjpegls")


def _never_gdcm() -> None:
    """Take GDCM out of every pydicom decoder, even where it is installed.

    pydicom would try it first for the JPEG family (it decodes JPEG Lossless ~1.5× faster
    than pylibjpeg), but a fuzzed JPEG Lossless stream made it throw a C++ exception that
    aborts the whole process (std::terminate in gdcmJPEGCodec.cxx). pylibjpeg decodes
    every syntax the service takes and raises Python exceptions on bad data. pyjpegls
    (installed with highdicom) goes too: only the decoders the fuzz tests ran are used.
    """
    for uid in AllTransferSyntaxes:
        for plugin in _UNTRUSTED_PLUGINS:
            # NotImplementedError: no decoder for that syntax; ValueError: no such plugin in it
            with contextlib.suppress(NotImplementedError, ValueError):
                get_decoder(uid).remove_plugin(plugin)
