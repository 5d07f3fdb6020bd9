"""The results in the radiologist's own viewer: OHIF Viewer 3.13.2 (npm @ohif/app's prebuilt app) served
by nginx, which proxies /dicom-web/ to Orthanc's DICOMweb, opened in headless Chromium (selenium).

A positive synthetic study whose clot candidates are put by hand on its real emboli, and a negative
one, are stored in Orthanc with their results (SR, SC, KOS, SEG: ``write_study_results``); the test
opens each study in OHIF, opens the SR and then the SEG, and checks what a reader sees: no error page
("Something went wrong") and no uncaught error in the console, an annotation on each candidate's key
slice, the measurement panel listing the candidates, the segmentation's segments; the negative study's
SR opens without error. The positive study's SR, as OHIF draws it, is docs/ohif_sr.png.

Everything listens on 127.0.0.1 (Orthanc: RemoteAccessAllowed false, as tests/hospital/test_orthanc.py; nginx:
``listen 127.0.0.1``) and is stopped by its pid. Needs Debian's orthanc, orthanc-dicomweb, nginx,
chromium and chromium-driver, and tests/ohif/install.sh run (the app in tests/ohif/app): ``.ci/run``
does both. Without them this test skips, except where ``CI`` or ``PEDETECT_REQUIRE_BROWSER`` is set.

Run as a script, it starts the stack on the two studies and waits (look at it in a browser)::

    .venv/bin/python tests/hospital/test_ohif.py /tmp/ohif-stack
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ohif")]

APP = Path(__file__).resolve().parents[1] / "ohif" / "app"
OHIF_VERSION = "3.13.2"
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).is_file()), None)
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "ohif_sr.png"
WINDOW = (1600, 1000)

APP_CONFIG = """window.config = {
  name: 'pedetect-test',
  routerBasename: '/',
  showStudyList: true,
  extensions: [],
  modes: [],
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: false,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: { option: 'never' },
  showErrorDetails: 'always',
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (pedetect test)',
        name: 'orthanc',
        wadoUriRoot: '/dicom-web',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
      },
    },
  ],
};
"""

NGINX_CONF = """worker_processes 1;
{user}
pid {run}/nginx.pid;
error_log {run}/error.log warn;
events {{ worker_connections 256; }}
http {{
  include /etc/nginx/mime.types;
  types {{ application/wasm wasm; }}
  default_type application/octet-stream;
  access_log {run}/access.log;
  client_body_temp_path {run}/body;
  proxy_temp_path {run}/proxy;
  fastcgi_temp_path {run}/fastcgi;
  uwsgi_temp_path {run}/uwsgi;
  scgi_temp_path {run}/scgi;
  client_max_body_size 0;
  server {{
    listen 127.0.0.1:{port};
    root {app};
    location = /app-config.js {{ alias {run}/app-config.js; }}
    location /dicom-web/ {{
      proxy_pass http://127.0.0.1:{orthanc}/dicom-web/;
      proxy_buffering off;
      proxy_read_timeout 120s;
    }}
    location / {{ try_files $uri /index.html; }}
  }}
}}
"""


def missing_stack() -> list[str]:
    """What the OHIF stack lacks here (empty: it can run)."""
    from helpers.browser import browser_paths
    from helpers.orthanc import DICOMWEB_PLUGIN, ORTHANC

    missing = []
    if ORTHANC is None or not DICOMWEB_PLUGIN.exists():
        missing.append("Orthanc with its DICOMweb plugin (Debian: orthanc orthanc-dicomweb)")
    if NGINX is None:
        missing.append("nginx (Debian: nginx)")
    if browser_paths() is None:
        missing.append("Chromium and chromedriver (Debian: chromium chromium-driver)")
    if (APP / ".ohif-version").read_text().strip() != OHIF_VERSION if (APP / ".ohif-version").exists() else True:
        missing.append(f"OHIF Viewer {OHIF_VERSION}'s app (run tests/ohif/install.sh)")
    return missing


def require_stack() -> None:
    """A skip on a developer's machine, a failure on CI: CI must not pass without the OHIF test."""
    from helpers.browser import missing

    absent = missing_stack()
    if absent:
        missing("the OHIF stack needs " + "; ".join(absent) + " (.ci/run installs them)")


class Nginx:
    """nginx serving OHIF's app (and our app-config.js) and proxying /dicom-web/ to Orthanc, on loopback."""

    def __init__(self, folder: Path, orthanc_http: int):
        from helpers.serve import free_port

        self.run, self.port = folder, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "app-config.js").write_text(APP_CONFIG)
        user = "user root;" if os.geteuid() == 0 else ""  # a root master's workers must read the app and the config
        (folder / "nginx.conf").write_text(
            NGINX_CONF.format(user=user, run=folder, port=self.port, app=APP, orthanc=orthanc_http)
        )
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        from helpers.serve import wait_for

        self.log = open(self.run / "nginx.out", "a")
        self.process = subprocess.Popen(
            [NGINX, "-c", str(self.run / "nginx.conf"), "-p", str(self.run), "-g", "daemon off;"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._up, 30, "nginx to start", self.process, self.run / "error.log")

    def _up(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(self.url + "/app-config.js", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        from helpers.orthanc import stop_process

        stop_process(self.process, self.log)
        self.process = None


def make_studies(root: Path) -> dict:
    """The positive and the negative phantom study with their results written (docs of each in
    tests/helpers/results.py): {"positive"|"negative": (result, sources, written)}."""
    from helpers.results import ALGORITHM, PHANTOM_SEED, phantom_study, write_picture
    from pedetect.hospital.results import write_study_results

    studies = {}
    for kind, seed in (("positive", PHANTOM_SEED), ("negative", PHANTOM_SEED + 1)):
        folder = root / kind
        result, sources = phantom_study(folder, seed=seed, positive=kind == "positive")
        written = write_study_results(
            result, sources, write_picture(folder / "picture.png"), ALGORITHM, folder / "dicom"
        )
        studies[kind] = (result, sources, written)
    return studies


def store(pacs, studies: dict) -> None:
    """Every CT slice and every result into Orthanc (its REST API, as a PACS receives them)."""
    for _result, sources, written in studies.values():
        for path in [*sources.values(), *written.files]:
            pacs.post("/instances", Path(path).read_bytes(), "application/dicom")


def start_stack(root: Path):
    """Orthanc (the two studies stored) and nginx in front of it: (pacs, nginx, studies)."""
    from helpers.orthanc import Orthanc
    from helpers.serve import free_port

    studies = make_studies(root / "studies")
    pacs = Orthanc(root / "orthanc", free_port())
    pacs.start()
    web = Nginx(root / "nginx", pacs.http)
    try:
        store(pacs, studies)
        web.start()
    except BaseException:
        pacs.stop()
        web.stop()
        raise
    return pacs, web, studies


class Ohif:
    """OHIF open in headless Chromium, read and driven as a reader would."""

    def __init__(self, driver, web: Nginx):
        from selenium.webdriver.common.by import By

        self.driver, self.web, self.by = driver, web, By

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def open_study(self, study_uid: str) -> None:
        from helpers.browser import wait_for

        self.driver.get(f"{self.web.url}/viewer?StudyInstanceUIDs={study_uid}")
        wait_for(lambda: self.series_items(), 60, "OHIF's study browser to list the series")
        wait_for(lambda: self.js("return !!(window.services && window.cornerstoneTools)"), 30, "OHIF's services")
        time.sleep(1.0)  # the onboarding tour appears once the viewport is up
        for button in self.driver.find_elements(self.by.XPATH, "//*[normalize-space(text())='Skip all']"):
            button.click()

    def series_items(self) -> dict:
        """The study browser's series without a thumbnail image (SR, KO, SEG): modality -> element."""
        items = {}
        for item in self.driver.find_elements(self.by.CSS_SELECTOR, '[data-cy="study-browser-thumbnail-no-image"]'):
            text = item.text.strip()
            if text:
                items.setdefault(text.split()[0], item)
        return items

    def open_series(self, modality: str) -> None:
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(self.driver).double_click(self.series_items()[modality]).perform()

    def click(self, css: str) -> None:
        self.driver.find_element(self.by.CSS_SELECTOR, css).click()

    def has(self, css: str) -> bool:
        return bool(self.driver.find_elements(self.by.CSS_SELECTOR, css))

    def text(self) -> str:
        return self.driver.find_element(self.by.TAG_NAME, "body").text

    def annotations(self, tool: str) -> list[dict]:
        return self.js(
            "return cornerstoneTools.annotation.state.getAllAnnotations()"
            ".filter(a => a.metadata.toolName === arguments[0])"
            ".map(a => ({image: a.metadata.referencedImageId, label: a.data.label || null}))",
            tool,
        )

    def measurements(self) -> list[dict]:
        return self.js(
            "return services.measurementService.getMeasurements()"
            ".map(m => ({label: m.label, toolName: m.toolName, sop: m.SOPInstanceUID, frame: m.frameNumber}))"
        )

    def shown_image(self) -> str:
        """The image the active viewport shows (its imageId: …/instances/<SOP>/frames/<n>)."""
        return self.js(
            "const e = window.cornerstone.getEnabledElements().find(e => e.viewport.getCurrentImageId);"
            "return e ? e.viewport.getCurrentImageId() : null;"
        )

    def drawn_shapes(self) -> int:
        """Shapes drawn in the viewport's annotation layer (cornerstone's SVG layer)."""
        return self.js(
            "return [...document.querySelectorAll('[data-cy=\"viewport-pane\"] svg.svg-layer')]"
            ".map(s => s.querySelectorAll('path, polyline, polygon, circle, line').length)"
            ".reduce((a, b) => a + b, 0);"
        )

    def segments(self) -> list[str]:
        """The labels of the loaded segmentation's segments (OHIF's segmentation service)."""
        return self.js(
            "return services.segmentationService.getSegmentations()"
            ".flatMap(s => Object.values(s.segments || {}).filter(x => x).map(x => x.label))"
        )

    def wait_drawn(self, what: str, timeout: float = 30.0) -> int:
        """Until the viewport's annotation layer has a shape drawn. OHIF 3.13.2's SR viewport sometimes
        sets which regions to show after its first render and draws them only at the next one (a mouse
        move, a scroll): after a second without shapes the viewport is rendered again, as a reader's
        next move would."""
        deadline, nudge = time.monotonic() + timeout, time.monotonic() + 1.0
        while time.monotonic() < deadline:
            shapes = self.drawn_shapes()
            if shapes:
                return shapes
            if time.monotonic() > nudge:
                self.js(
                    "window.cornerstone.getEnabledElements().forEach(e => e.viewport.render && e.viewport.render());"
                )
                nudge = time.monotonic() + 1.0
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")

    def console_errors(self) -> list[str]:
        """Uncaught errors and console.error calls since the last look (SEVERE in Chromium's log)."""
        return [e["message"] for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]

    def error_page(self) -> bool:
        return "Something went wrong" in self.text()

    def assert_clean(self) -> None:
        """No error page (OHIF's error boundary) and no error in the console since the last look."""
        errors = self.console_errors()
        if self.error_page():
            for button in self.driver.find_elements(self.by.XPATH, "//*[normalize-space(text())='Show Details']"):
                button.click()
            time.sleep(0.5)
            raise AssertionError(f"OHIF's error page: {self.text()[:3000]}\nconsole: {errors}")
        assert errors == [], errors


def image_of(candidate: dict) -> str:
    """The end of the imageId OHIF gives a candidate's key slice (WADO-RS: the instance and frame)."""
    from pedetect.dicom.frames import split_frame_key

    sop, frame = split_frame_key(candidate["sop"])
    return f"/instances/{sop}/frames/{frame or 1}"


def show_sr(ohif: Ohif, result) -> None:
    """Open the study, its SR, track its measurements and open the measurement panel (checking each
    step); ends on candidate 1's key slice, zoomed so that the outline shows."""
    from helpers.browser import wait_for

    candidates = result.candidates
    ohif.open_study(result.study_uid)
    ohif.open_series("SR")
    # Before tracking: OHIF draws the SR's regions itself (its DICOMSRDisplay tool), one per candidate.
    drawn = wait_for(
        lambda: (lambda a: a if len(a) == len(candidates) else None)(ohif.annotations("DICOMSRDisplay")),
        60,
        "the SR's regions drawn",
    )
    for c in candidates:
        assert any(a["image"].endswith(image_of(c)) for a in drawn), c["candidate"]
    wait_for(lambda: (ohif.shown_image() or "").endswith(image_of(candidates[0])), 30, "candidate 1's key slice")
    ohif.wait_drawn("the region drawn on candidate 1's key slice")
    # Tracking (OHIF's prompt): every group becomes an editable freehand ROI in the measurement service.
    wait_for(lambda: ohif.has('[data-cy="yes-hydrate-btn"]'), 30, "OHIF's prompt to track the measurements")
    ohif.click('[data-cy="yes-hydrate-btn"]')
    tracked = wait_for(
        lambda: (lambda m: m if len(m) == len(candidates) else None)(ohif.measurements()),
        60,
        "the candidates tracked as measurements",
    )
    for m, c in zip(sorted(tracked, key=lambda m: m["label"]), candidates):
        assert m["toolName"] == "PlanarFreehandROI" and m["label"].startswith(f"PE candidate {c['candidate']}: ")
        assert image_of(c).startswith(f"/instances/{m['sop']}/")
    ohif.click('[data-cy="trackedMeasurements-btn"]')
    panel = wait_for(
        lambda: (lambda t: t if f"Measurements ({len(candidates)})" in t else None)(ohif.text()),
        30,
        "the measurement panel",
    )
    for c in candidates:
        assert f"PE candidate {c['candidate']}: " in panel
    # Each row of the panel brings its candidate's key slice, with the outline drawn on it.
    for c in reversed(candidates):
        row = ohif.driver.find_element(
            ohif.by.XPATH, f"//*[starts-with(normalize-space(text()), 'PE candidate {c['candidate']}: ')]"
        )
        row.click()
        wait_for(
            lambda c=c: (ohif.shown_image() or "").endswith(image_of(c)), 30, f"candidate {c['candidate']}'s key slice"
        )
        ohif.wait_drawn(f"candidate {c['candidate']}'s outline drawn")
    ohif.js(
        "const e = window.cornerstone.getEnabledElements().find(e => e.viewport.getCurrentImageId);"
        "e.viewport.setZoom(2.2); e.viewport.render();"
    )
    time.sleep(1.0)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    require_stack()
    from helpers.browser import start_browser

    root = tmp_path_factory.mktemp("ohif")
    pacs, web, studies = start_stack(root)
    driver = None
    try:
        driver = start_browser(WINDOW)
        yield Ohif(driver, web), studies, root
    finally:
        if driver is not None:
            driver.quit()
        web.stop()
        pacs.stop()


def test_the_sr_shows_each_candidate_on_its_key_slice_and_in_the_measurement_panel(stack):
    ohif, studies, root = stack
    result = studies["positive"][0]
    started = time.monotonic()
    show_sr(ohif, result)
    ohif.driver.save_screenshot(str(root / "ohif_sr.png"))
    ohif.assert_clean()
    print(
        f"\nOHIF: SR opened, {len(result.candidates)} candidates tracked and visited in {time.monotonic() - started:.1f} s"
    )


def test_the_segmentation_displays_a_segment_per_candidate(stack):
    from helpers.browser import wait_for

    ohif, studies, _ = stack
    result = studies["positive"][0]
    ohif.open_study(result.study_uid)
    ohif.open_series("SEG")
    wait_for(lambda: ohif.has('[data-cy="yes-hydrate-btn"]') or ohif.segments(), 60, "the segmentation loaded")
    if ohif.has('[data-cy="yes-hydrate-btn"]'):
        ohif.click('[data-cy="yes-hydrate-btn"]')
    segments = wait_for(lambda: ohif.segments(), 60, "the segmentation's segments")
    assert segments == [f"PE candidate {c['candidate']}" for c in result.candidates]
    ohif.click('[data-cy="panelSegmentation-btn"]')
    panel = wait_for(
        lambda: (lambda t: t if "PE candidate 1" in t else None)(ohif.text()), 30, "the segmentation panel"
    )
    for c in result.candidates:
        assert f"PE candidate {c['candidate']}" in panel
    ohif.assert_clean()


def test_the_sr_of_a_negative_study_opens_without_error(stack):
    from helpers.browser import wait_for

    ohif, studies, root = stack
    result = studies["negative"][0]
    assert result.candidates == []
    ohif.open_study(result.study_uid)
    ohif.open_series("SR")
    # Not an "Imaging Measurement Report" (it has no measurement): OHIF shows it as text, the exam outputs
    # (the Qualitative Evaluations) with it.
    shown = wait_for(
        lambda: (lambda t: t if "Qualitative Evaluations" in t else None)(ohif.text()), 60, "the SR shown as text"
    )
    assert "CT Chest Report" in shown and "negative exam for PE: present" in shown
    time.sleep(2.0)  # what would go wrong (an unguarded read, an error boundary) happens at once
    ohif.driver.save_screenshot(str(root / "ohif_negative_sr.png"))
    ohif.assert_clean()


if __name__ == "__main__":
    import argparse
    import signal

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the helpers package
    parser = argparse.ArgumentParser(description="the OHIF stack on the two phantom studies")
    parser.add_argument("folder", type=Path, help="where Orthanc, nginx and the studies go")
    parser.add_argument("--screenshot", type=Path, help="write the positive study's SR, as OHIF shows it, and stop")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    pacs, web, studies = start_stack(args.folder)
    try:
        if args.screenshot:
            from helpers.browser import start_browser

            driver = start_browser(WINDOW)
            try:
                show_sr(Ohif(driver, web), studies["positive"][0])
                driver.save_screenshot(str(args.screenshot))
            finally:
                driver.quit()
        else:
            for kind, (result, _, _) in studies.items():
                print(f"{kind}: {web.url}/viewer?StudyInstanceUIDs={result.study_uid}", flush=True)
            while True:
                time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        web.stop()
        pacs.stop()
