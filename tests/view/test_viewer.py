"""The viewer's parts that need no browser: slice JPEGs within the budget, the suspicious slices,
the page's embedded data, the location grid from the ensemble, and ``pedetect view``'s server.
The pages in a real browser: tests/view/test_viewer_browser.py."""

from __future__ import annotations

import json
import re
import threading
import urllib.request

import numpy as np

from pedetect.infer.ensemble import Ensemble
from pedetect.metric.loss import sigmoid
from pedetect.recipe import load_experiment
from pedetect.testing import write_random_bundle
from pedetect.view.command import serve_report
from pedetect.view.page import suspicious_slices, write_study_page
from pedetect.view.slices import MAX_SIDE, SLICE_BUDGET_BYTES, encode_viewer_slice


def noisy_slice(side: int, noise: float, seed: int = 0) -> np.ndarray:
    """Three windows (different gains) of a disc with pixel noise of ``noise`` grey levels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:side, :side]
    body = ((y - side / 2) ** 2 + (x - side / 2) ** 2 < (side * 0.4) ** 2) * 120.0
    grey = body[..., None] + rng.normal(0, noise, (side, side, 1))
    return np.clip(grey * np.array([0.6, 1.0, 1.6]) + 40, 0, 255).astype(np.uint8)


def decode(data: bytes):
    import cv2

    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]  # R, G, B = the windows


def test_slices_fit_the_budget_and_keep_each_window():
    image = noisy_slice(512, noise=2)
    data, quality = encode_viewer_slice(image)
    assert len(data) <= SLICE_BUDGET_BYTES and quality == 90 and decode(data).shape == (512, 512, 3)
    # 4:4:4: each window survives as its own channel (none blurred into the others).
    assert all(np.abs(decode(data)[..., k].astype(int) - image[..., k]).mean() < 3 for k in range(3))
    noisy, lower = encode_viewer_slice(noisy_slice(512, noise=25))  # white noise: the budget costs quality
    assert len(noisy) <= SLICE_BUDGET_BYTES and lower < 90
    big, _ = encode_viewer_slice(noisy_slice(1024, noise=2))
    assert decode(big).shape[:2] == (MAX_SIDE, MAX_SIDE)
    small, _ = encode_viewer_slice(image, budget=8_000)  # too big even at the lowest quality: halved
    assert len(small) <= 8_000 and decode(small).shape[0] < 512


def test_suspicious_slices_are_one_per_run_most_probable_first():
    assert suspicious_slices([0.1, 0.6, 0.9, 0.2, 0.7, 0.1, 0.55], 0.5) == [2, 4, 6]
    assert suspicious_slices([0.1, 0.3, 0.2], 0.5) == [1]  # a negative study: where it came closest
    assert suspicious_slices([], 0.5) == []
    assert suspicious_slices(np.linspace(0.6, 0.9, 10), 0.5) == [9]  # one embolus over ten slices: one finding


def test_the_page_carries_its_record_whatever_the_strings(tmp_path):
    record = {
        "study_uid": "1.2.3",
        "skipped_files": [{"path": "a/</script><script>alert(1)</script>.dcm", "reason": "<!-- x"}],
    }
    page = write_study_page(tmp_path, "1.2.3", record).read_text()
    embedded = re.search(r'<script id="study-data" type="application/json">(.*?)</script>', page, re.S).group(1)
    assert json.loads(embedded) == record and "<script>alert" not in page
    assert "<title>pedetect · 1.2.3</title>" in page and 'src="viewer/viewer.js"' in page


def test_the_location_grid_is_the_fold_mean_with_flips_undone(tmp_path):
    config = load_experiment("configs/demo.yaml")
    model = write_random_bundle(config, tmp_path / "model", folds=2)
    volume = np.random.default_rng(0).integers(0, 255, (5, 96, 96, 3), dtype=np.uint8)
    plain = Ensemble([model], device="cpu", runtime="torch")
    key = plain.reads[0]
    assert plain.location_view.grid == 3 and plain.location_view.crop == config.cnn.input.crop
    prediction = plain.predict_series({key: volume})
    assert prediction.location.shape == (5, 3, 3) and prediction.slices.shape == (5,)

    from pedetect.models.slice_classifier import embed_volume

    expected = np.mean(
        [sigmoid(embed_volume(m.cnn, volume, m.input_config)[0][:, -9:]).reshape(5, 3, 3) for m in plain.members],
        axis=0,
    )
    assert np.allclose(prediction.location, expected, atol=1e-3)  # float16 embeddings

    flipped = plain.predict_series({key: np.ascontiguousarray(volume[:, :, ::-1])}).location
    tta = Ensemble([model], device="cpu", runtime="torch", tta=True).predict_series({key: volume}).location
    assert np.allclose(tta, (prediction.location + flipped[:, :, ::-1]) / 2, atol=1e-3)


def test_view_serves_the_report_on_loopback_only(tmp_path, cli):
    (tmp_path / "index.html").write_text("<h1>pedetect report</h1>")
    server = serve_report(tmp_path, 0)
    assert server.server_address[0] == "127.0.0.1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/index.html", timeout=10) as response:
            assert response.status == 200 and b"pedetect report" in response.read()
    finally:
        server.shutdown()
        server.server_close()
    result = cli("view", tmp_path / "nothing")
    assert result.exit_code == 2 and "no index.html" in result.output
