"""Property tests of slice order and rescale: any permutation of a series' files gives
the same order, the documented fallbacks (InstanceNumber, then SOPInstanceUID) are taken and
recorded when orientation is degenerate or a position is missing, and the table-driven windowing
equals HU = stored × slope + intercept windowed by hand."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.dicom import reference_window
from pedetect.dicom import SliceHeader, plan_series
from pedetect.dicom.pixels import DEFAULT_WINDOWS, StoredEncoding, window_stored

unit = st.tuples(*[st.floats(-1, 1, allow_nan=False)] * 3).filter(lambda v: np.linalg.norm(v) > 0.1)


@st.composite
def series_headers(draw, degenerate: bool = False, drop_position: bool = False, drop_instance: bool = False):
    """Headers of one series: positions along the normal of a random orientation (steps may repeat),
    InstanceNumbers in any order; optionally a degenerate orientation, a missing position or a
    missing InstanceNumber."""
    n = draw(st.integers(2, 25))
    row = np.asarray(draw(unit))
    row /= np.linalg.norm(row)
    other = np.asarray(draw(unit))
    col = other - other.dot(row) * row
    if np.linalg.norm(col) < 0.1:  # nearly parallel draws: any perpendicular will do
        col = np.cross(row, [0.0, 0.0, 1.0] if abs(row[2]) < 0.9 else [1.0, 0.0, 0.0])
    col = row.copy() if degenerate else col / np.linalg.norm(col)  # degenerate: parallel, no slice normal
    normal = np.cross(row, col)
    origin = np.asarray(draw(st.tuples(*[st.floats(-500, 500)] * 3)))
    steps = draw(st.lists(st.sampled_from([0.0, 0.625, 1.25, 2.5, 5.0]), min_size=n, max_size=n))
    instances = draw(st.permutations(range(1, n + 1)))
    headers = [
        SliceHeader(
            source=f"file{k}",
            study="1.2.3",
            series="1.2.3.4",
            sop=f"1.2.3.4.{k}",
            rows=8,
            cols=8,
            position=tuple(float(v) for v in origin + normal * float(np.sum(steps[: k + 1]))),
            orientation=tuple(float(v) for v in (*row, *col)),
            instance_number=instances[k],
        )
        for k in range(n)
    ]
    if drop_position:
        headers[draw(st.integers(0, n - 1))].position = None
    if drop_instance:
        headers[draw(st.integers(0, n - 1))].instance_number = None
    return headers


def _order(headers):
    plan = plan_series(headers)
    return [h.sop for h in plan.slices], plan


@settings(max_examples=150, deadline=None)
@given(series_headers(), st.randoms(use_true_random=False))
def test_any_permutation_gives_the_same_position_order(headers, rnd):
    order, plan = _order(headers)
    shuffled = list(headers)
    rnd.shuffle(shuffled)
    assert _order(shuffled)[0] == order
    assert plan.order_by == "position" and np.all(np.diff(plan.z) >= 0)
    assert not any("ordered by InstanceNumber" in text for text in plan.irregularities)


@settings(max_examples=100, deadline=None)
@given(
    st.one_of(series_headers(degenerate=True), series_headers(drop_position=True)), st.randoms(use_true_random=False)
)
def test_degenerate_orientation_or_a_missing_position_falls_back_to_instance_number(headers, rnd):
    order, plan = _order(headers)
    assert plan.order_by == "instance_number" and plan.normal is None
    assert order == [h.sop for h in sorted(headers, key=lambda h: h.instance_number)]
    assert any(text.endswith("ordered by InstanceNumber") for text in plan.irregularities)
    shuffled = list(headers)
    rnd.shuffle(shuffled)
    assert _order(shuffled)[0] == order


@settings(max_examples=60, deadline=None)
@given(series_headers(degenerate=True, drop_instance=True), st.randoms(use_true_random=False))
def test_without_geometry_or_instance_numbers_the_order_is_by_uid_and_says_so(headers, rnd):
    order, plan = _order(headers)
    assert plan.order_by == "file" and order == sorted(h.sop for h in headers)
    assert (
        "neither position nor InstanceNumber on every slice: slice order unknown (sorted by SOPInstanceUID)"
        in plan.irregularities
    )
    shuffled = list(headers)
    rnd.shuffle(shuffled)
    assert _order(shuffled)[0] == order


@settings(max_examples=80, deadline=None)
@given(
    st.booleans(),
    st.integers(9, 16),
    st.floats(0.01, 20, allow_nan=False),
    st.floats(-4096, 4096, allow_nan=False),
    st.integers(0, 2**32 - 1),
)
def test_table_windowing_equals_rescaled_hounsfield_units(signed, bits, slope, intercept, seed):
    rng = np.random.default_rng(seed)
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    values = rng.integers(low, high + 1, size=(6, 7))
    stored = (values & 0xFFFF).astype(np.uint16)  # the 16-bit words as the file holds them
    image = window_stored(stored, StoredEncoding(signed, bits, slope, intercept), DEFAULT_WINDOWS)
    expected = reference_window(values * slope + intercept)
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1  # float32 vs float64 rounding at .5
