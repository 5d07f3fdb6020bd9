"""The report's study viewer in a real browser: headless Chromium driven by selenium.

The test makes its own report (synthetic studies, a bundle with random weights, ``pedetect predict
--report``), opens it from ``file://`` and uses it as a reader would: arrow keys, a click on the
curve, the mouse wheel, "next suspicious", the overlay and window keys, checking the page's state
and its pixels.

Chromium and its driver are Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them
where missing). Without them this test skips, except where ``CI`` or ``PEDETECT_REQUIRE_BROWSER`` is
set (``.ci/run`` sets it): there it fails, so CI cannot pass without having run it.

Run as a script, it writes a study page's screenshot (the README's picture; docs/viewer_example.png
was made with the demo's trained bundle, seed 7, on its test studies)::

    .venv/bin/python tests/view/test_viewer_browser.py docs/viewer_example.png --model demo_output/model --input demo_output/data/test
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

if __name__ == "__main__":  # run as a script: tests/, where the helpers package is, is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers.browser import browser_paths, missing, start_browser, wait_for

pytestmark = pytest.mark.xdist_group("viewer_browser")  # one worker: one report, one browser

N_STUDIES, SLICES, SIZE = 3, 40, 160


def make_report(root: Path, model: Path | None = None, dicom: Path | None = None) -> Path:
    """``pedetect predict --report`` into ``root/report``: of ``dicom`` with ``model`` when given,
    else of synthetic studies with a random demo-recipe bundle."""
    from typer.testing import CliRunner

    from pedetect.cli import app
    from pedetect.recipe import load_experiment
    from pedetect.synth import write_dataset
    from pedetect.testing import write_random_bundle

    if dicom is None:
        write_dataset(root / "data", N_STUDIES, slices=SLICES, size=SIZE, seed=11, split="test", progress=False)
        dicom = root / "data" / "test"
    if model is None:
        repo = Path(__file__).resolve().parents[2]
        model = write_random_bundle(load_experiment(repo / "configs" / "demo.yaml"), root / "model", folds=2)
    result = CliRunner().invoke(
        app,
        [
            "predict",
            str(dicom),
            "--model",
            str(model),
            "--out",
            str(root / "sub.csv"),
            "--report",
            str(root / "report"),
            "--device",
            "cpu",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    return root / "report"


class StudyPage:
    """One study page open in the browser, read and driven as a person would."""

    def __init__(self, driver, path: Path):
        from selenium.webdriver.common.by import By

        self.driver, self.by = driver, By
        driver.get(path.as_uri())
        self.record = json.loads(path.with_suffix(".json").read_text())
        self.wait_image()

    def find(self, css: str):
        return self.driver.find_element(self.by.CSS_SELECTOR, css)

    @property
    def body(self):
        return self.find("body")

    @property
    def slice(self) -> int:
        return int(self.body.get_attribute("data-slice"))

    def wait_image(self) -> None:
        """Until the shown slice's JPEG is decoded (the image a reader sees)."""
        wait_for(
            lambda: self.driver.execute_script(
                "const i = document.getElementById('slice'); return i.complete && i.naturalWidth > 0 && "
                "i.src.endsWith(arguments[0]);",
                self.record["viewer"]["slices"][self.slice],
            ),
            what="the slice image",
        )

    def key(self, key: str) -> None:
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(self.driver).send_keys(key).perform()
        self.wait_image()

    def wheel(self, delta_y: int) -> None:
        """The mouse wheel turned over the image (a real input event, not a script's)."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.actions.wheel_input import ScrollOrigin

        ActionChains(self.driver).scroll_from_origin(
            ScrollOrigin.from_element(self.find("#stage")), 0, delta_y
        ).perform()
        self.wait_image()

    def stage_pixels(self) -> np.ndarray:
        """The image area as the browser draws it (slice, window, overlay)."""
        import cv2

        png = self.find("#stage").screenshot_as_png
        return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR).astype(np.int16)

    def click_curve_at(self, index: int) -> None:
        """A click on the curve where slice ``index`` is drawn (the page's own x mapping: padding 34
        px left, 10 px right)."""
        from selenium.webdriver.common.action_chains import ActionChains

        curve = self.find("#curve")
        width = curve.size["width"]
        count = len(self.record["sop_uids"])
        x = 34 + index / (count - 1) * (width - 34 - 10)
        ActionChains(self.driver).move_to_element_with_offset(curve, int(round(x - width / 2)), 0).click().perform()
        self.wait_image()

    def console_errors(self) -> list[dict]:
        return [entry for entry in self.driver.get_log("browser") if entry["level"] == "SEVERE"]


@pytest.fixture(scope="module")
def driver():
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing(
            "selenium is missing (it is in the test extra: pip install -e '.[test]'): the viewer's browser test cannot run"
        )
    if browser_paths() is None:
        missing(
            "headless Chromium is missing (apt-get install -y chromium chromium-driver): the viewer's browser test cannot run"
        )
    browser = start_browser()
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    return make_report(tmp_path_factory.mktemp("viewer"))


def most_suspicious_study(report: Path) -> Path:
    records = {path: json.loads(path.read_text()) for path in report.glob("*.json")}
    return max(records, key=lambda p: records[p]["pe_probability"]).with_suffix(".html")


def test_study_page_scrolls_jumps_and_shows_where_the_model_looks(driver, report):
    page = StudyPage(driver, most_suspicious_study(report))
    record = page.record
    count = len(record["sop_uids"])
    assert page.slice == 0 and count == SLICES
    assert page.find("#slice-sop").text == record["sop_uids"][0]
    assert page.find("#study-uid").text == record["study_uid"]

    first = page.stage_pixels()
    source = page.find("#slice").get_attribute("src")
    page.key("\ue015")  # arrow down
    assert page.slice == 1 and page.find("#slice-index").text == "1"
    assert page.find("#slice").get_attribute("src") != source
    assert page.find("#slice-sop").text == record["sop_uids"][1]
    assert page.find("#slice-z").text == f"{record['z'][1]:.1f} mm"
    second = page.stage_pixels()
    assert first.shape == second.shape and np.abs(first - second).mean() > 0.5  # another slice on screen
    page.key("\ue013")  # arrow up
    assert page.slice == 0
    page.key("\ue014")  # arrow right: next as well
    page.key("\ue014")
    assert page.slice == 2

    page.wheel(120)  # one notch of a mouse wheel down, one up
    assert page.slice == 3
    page.wheel(-120)
    assert page.slice == 2

    target = count * 2 // 3
    page.click_curve_at(target)
    assert page.slice == target

    driver.find_element(page.by.ID, "next-suspicious").click()
    page.wait_image()
    probabilities = np.asarray(record["model_slice_probabilities"])
    assert page.slice == int(np.argmax(probabilities)) == record["viewer"]["suspicious"][0]

    # The overlay: the model's grid on the slice, off and on again (key o and the checkbox).
    assert record["viewer"]["location"]["grid"] == 3 and page.body.get_attribute("data-overlay") == "on"
    with_overlay = page.stage_pixels()
    page.key("o")
    assert page.body.get_attribute("data-overlay") == "off"
    assert page.find("#overlay").value_of_css_property("visibility") == "hidden"
    without = page.stage_pixels()
    assert np.abs(with_overlay - without).mean() > 0.5
    page.find("#overlay-toggle").click()
    assert page.body.get_attribute("data-overlay") == "on"
    assert np.abs(page.stage_pixels() - with_overlay).max() <= 2

    # Windows: another channel of the same JPEG.
    assert page.body.get_attribute("data-window") == "pe"
    page.key("2")
    assert page.body.get_attribute("data-window") == "lung"
    assert np.abs(page.stage_pixels() - with_overlay).mean() > 0.5
    page.key("1")

    assert page.console_errors() == []


def test_clot_candidates_are_listed_drawn_and_jumped_to(driver, report):
    """Each candidate a button (strongest first) that goes to its key slice, where its outline is drawn
    (toggled by c and the checkbox)."""
    records = {path: json.loads(path.read_text()) for path in report.glob("*.json")}
    path = max(records, key=lambda p: len(records[p]["candidates"]))
    candidates = records[path]["candidates"]
    assert len(candidates) >= 2  # a random bundle's maps peak somewhere on every slice it doubts
    page = StudyPage(driver, path.with_suffix(".html"))
    buttons = page.driver.find_elements(page.by.CSS_SELECTOR, "#candidates button.candidate")
    assert [int(b.get_attribute("data-candidate")) for b in buttons] == [c["candidate"] for c in candidates]
    assert candidates[1]["side"] in buttons[1].text
    buttons[1].click()
    page.wait_image()
    assert page.slice == candidates[1]["picture_index"]
    assert str(candidates[1]["candidate"]) in page.body.get_attribute("data-candidates-shown").split()
    page.find("#overlay-toggle").click()  # the location grid off: only the candidates over the slice
    with_marks = page.stage_pixels()
    page.key("c")
    assert (
        page.body.get_attribute("data-candidates") == "off" and page.body.get_attribute("data-candidates-shown") == ""
    )
    assert np.abs(page.stage_pixels() - with_marks).max() > 100  # the bright green outline is gone
    page.find("#candidates-toggle").click()
    assert page.body.get_attribute("data-candidates") == "on"
    assert np.abs(page.stage_pixels() - with_marks).max() <= 2
    assert page.console_errors() == []


def test_index_lists_the_most_suspicious_first_and_links_each_viewer(driver, report):
    from selenium.webdriver.common.by import By

    driver.get((report / "index.html").as_uri())
    rows = driver.find_elements(By.CSS_SELECTOR, "body.index table tr")[1:]
    assert len(rows) == N_STUDIES
    shown = [float(row.find_elements(By.TAG_NAME, "td")[1].text) for row in rows]
    assert shown == sorted(shown, reverse=True)
    rows[0].find_element(By.LINK_TEXT, "viewer").click()
    wait_for(
        lambda: driver.find_elements(By.ID, "study-uid") and driver.find_element(By.ID, "study-uid").text,
        what="the study page",
    )
    assert driver.current_url.endswith(most_suspicious_study(report).name)
    assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []


def test_a_study_with_no_readable_slice_opens_and_says_so(driver, report):
    from selenium.webdriver.common.by import By

    from pedetect.infer.report import StudyResult, write_study_report
    from pedetect.labels import EXAM_LABELS

    prior = dict.fromkeys(EXAM_LABELS, 0.1) | {"negative_exam_for_pe": 0.9}
    lost = StudyResult(
        "1.2.3.999", prior, [], [], [], dict(prior), [], error="no readable slice in 3 file(s): training prior written"
    )
    page = write_study_report(report, lost, None).page
    driver.get(page.as_uri())
    wait_for(lambda: driver.find_element(By.ID, "study-uid").text == "1.2.3.999", what="the study page")
    assert driver.find_element(By.ID, "no-slices").is_displayed()
    assert "no readable slice" in driver.find_element(By.ID, "study-notes").text
    driver.find_element(By.TAG_NAME, "body").send_keys(
        "\ue015n"
    )  # keys on an empty series do nothing, and fail nothing
    assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []


def save_example(out: Path, model: Path | None = None, dicom: Path | None = None) -> None:
    """A study page at a laptop's size on its most suspicious study's most suspicious slice, overlay
    on (docs/viewer_example.png: the demo's trained bundle on its test studies)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        report = make_report(Path(tmp), model, dicom)
        browser = start_browser()
        try:
            page = StudyPage(browser, most_suspicious_study(report))
            browser.find_element(page.by.ID, "next-suspicious").click()
            page.wait_image()
            assert page.console_errors() == []
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(browser.get_screenshot_as_png())
        finally:
            browser.quit()
    print(f"wrote {out}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Screenshot a study page of a fresh report (the README's picture).")
    parser.add_argument("out", type=Path, help="PNG to write, e.g. docs/viewer_example.png")
    parser.add_argument("--model", type=Path, help="a trained bundle (default: random weights)")
    parser.add_argument("--input", type=Path, help="DICOM studies to predict (default: synthetic ones)")
    arguments = parser.parse_args()
    save_example(arguments.out, arguments.model, arguments.input)
