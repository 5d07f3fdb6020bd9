"""Orthanc (Debian packages orthanc, orthanc-dicomweb) as the tests' PACS: a server with its own
configuration and storage on loopback ports, stopped by its pid (tests/hospital/test_orthanc.py,
tests/hospital/test_ohif.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pydicom
import pytest

from helpers.serve import free_port, wait_for

ORTHANC = shutil.which("Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
# The routing rule of README.md's "In a hospital": every stable CT series to pedetect.
ROUTE_LUA = """
function OnStableSeries(seriesId, tags, metadata)
  if tags["Modality"] == "CT" then  -- CT series only: the results coming back are not sent again
    RestApiPost("/modalities/pedetect/store", seriesId)  -- C-STORE of the whole series
  end
end
"""


class Orthanc:
    """An Orthanc server with its own configuration and storage under ``folder``."""

    def __init__(self, folder: Path, pedetect_port: int, *, route: bool = False):
        if ORTHANC is None or not DICOMWEB_PLUGIN.exists():
            pytest.fail(
                "Orthanc with its DICOMweb plugin is not installed (Debian: orthanc orthanc-dicomweb; .ci/run installs them)"
            )
        self.folder, self.http, self.dicom = folder, free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http}"
        self.process: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "pedetect-test",
            "StorageDirectory": str(folder / "db"),
            "IndexDirectory": str(folder / "db"),
            "HttpPort": self.http,
            "DicomPort": self.dicom,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomModalities": {"pedetect": ["PEDETECT", "127.0.0.1", pedetect_port]},
        }
        if route:
            (folder / "route.lua").write_text(ROUTE_LUA)
            config.update({"LuaScripts": [str(folder / "route.lua")], "StableAge": 1})
        (folder / "orthanc.json").write_text(json.dumps(config))

    def start(self) -> None:
        self.log = open(self.folder / "orthanc.log", "a")
        self.process = subprocess.Popen(
            [ORTHANC, str(self.folder / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT
        )
        wait_for(lambda: self._up(), 30, "Orthanc to start", self.process, self.folder / "orthanc.log")

    def _up(self) -> bool:
        try:
            return self.get("/system")["DicomPort"] == self.dicom
        except OSError:
            return False

    def stop(self) -> None:
        stop_process(self.process, self.log)
        self.process = None

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read() or b"null")

    def post(self, path: str, data: bytes, content_type: str = "application/octet-stream"):
        request = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": content_type}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read() or b"null")

    def series_of(self, study: str) -> dict[str, list[str]]:
        """Modality -> SeriesInstanceUIDs of the study, by QIDO-RS."""
        try:
            found = self.get(f"/dicom-web/studies/{study}/series")
        except OSError:
            return {}
        series: dict[str, list[str]] = {}
        for item in found or []:
            series.setdefault(item["00080060"]["Value"][0], []).append(item["0020000E"]["Value"][0])
        return series

    def retrieve(self, study: str, series: str) -> list[pydicom.Dataset]:
        """The series' instances by WADO-RS."""
        from dicomweb_client.api import DICOMwebClient

        return DICOMwebClient(url=f"{self.url}/dicom-web").retrieve_series(study, series)


def stop_process(process, log) -> None:
    """Stop a server the test started (SIGTERM, then SIGKILL after 20 s) and close its log."""
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    if process is not None:
        log.close()
