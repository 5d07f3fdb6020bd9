"""The slice store reading API as training uses it: random access, pickling, forked workers."""

from __future__ import annotations

import multiprocessing as mp
import pickle

import numpy as np
import pytest
import torch

from helpers.dicom import ct_series
from pedetect.dicom import read_files
from pedetect.labels import SERIES, SOP, STUDY
from pedetect.store import SliceStore, prepare
from pedetect.store.format import decode_frame, encode_frame, jpeg_params


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("in")
    for k in range(3):
        ct_series(root / f"s{k}", 4 + k, rows=32, cols=32)
    out = tmp_path_factory.mktemp("store") / "store"
    summary = prepare(root, out, progress=False, echo=lambda m: None)
    assert summary.ok and summary.slices_total == 15
    return out


def test_tables_and_series_info(store_path):
    store = SliceStore(store_path)
    assert len(store) == 15 and len(store.series_uids) == 3
    slices = store.slices
    assert list(slices.columns[:5]) == [STUDY, SERIES, SOP, "slice_index", "z"]
    for uid in store.series_uids:
        info = store.series_info(uid)
        assert info["n_slices"] == len(slices[slices[SERIES] == uid])
        assert info["order_by"] == "position" and info["spacing"] == pytest.approx(2.5)
        assert len(info["z"]) == info["n_slices"] and info["height"] == info["width"] == 32
    assert store.failures.empty
    assert store.settings["windows"] == [[-600.0, 1500.0], [100.0, 700.0], [40.0, 400.0]]
    assert store.settings["window_names"] == ["lung", "pe", "mediastinal"]


def test_read_slice_matches_in_memory_reader(store_path):
    store = SliceStore(store_path)
    sources = store.slices["source"].tolist()
    volumes, _ = read_files(sources)
    for volume in volumes:
        stored = store.read_series(volume.series)
        assert stored.shape == volume.images.shape and stored.dtype == np.uint8
        for i in range(len(volume)):
            single = store.read_slice(volume.series, i)
            np.testing.assert_array_equal(single, stored[i])
            # the stored frame is the JPEG (q90, 4:4:4, R = first window) of what the in-memory reader gives
            bgr = np.ascontiguousarray(volume.images[i][:, :, ::-1])
            np.testing.assert_array_equal(single, decode_frame(encode_frame(bgr, jpeg_params(90, "444"))))
        # channel order R,G,B = lung, PE, mediastinal: air is only visible in the lung window
        assert stored[0, 0, 0].tolist()[1:] == [0, 0] and stored[0, 0, 0, 0] > 30


def test_errors(store_path):
    store = SliceStore(store_path)
    with pytest.raises(KeyError):
        store.read_slice("1.2.3.nope", 0)
    with pytest.raises(IndexError):
        store.read_slice(store.series_uids[0], 99)
    with pytest.raises(FileNotFoundError):
        SliceStore(store_path.parent / "missing")


def _worker_read(args):
    store, series_uid, index = args
    return store.read_slice(series_uid, index).sum()


def test_pickle_and_forked_workers(store_path):
    store = SliceStore(store_path)
    uid = store.slices[SERIES].value_counts().index[0]  # the longest series (6 slices)
    expected = [int(store.read_slice(uid, i).sum()) for i in range(5)]  # opens files in the parent
    clone = pickle.loads(pickle.dumps(store))
    assert clone._files == {} and clone._index is None  # nothing travels but the path
    assert [int(clone.read_slice(uid, i).sum()) for i in range(5)] == expected
    for method in ("fork", "spawn"):
        with mp.get_context(method).Pool(2) as pool:
            got = pool.map(_worker_read, [(store, uid, i) for i in range(5)])
        assert [int(v) for v in got] == expected


def test_torch_dataloader_workers(store_path):
    class Slices(torch.utils.data.Dataset):
        def __init__(self, store):
            self.store = store
            self.items = store.slices[[SERIES, "slice_index"]].to_records(index=False).tolist()

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            series, index = self.items[i]
            return torch.from_numpy(self.store.read_slice(series, int(index)))

    store = SliceStore(store_path)
    store.read_slice(store.series_uids[0], 0)  # parent has open handles before the fork
    loader = torch.utils.data.DataLoader(Slices(store), batch_size=5, num_workers=2)
    batches = torch.cat(list(loader))
    assert batches.shape == (15, 32, 32, 3)
    direct = np.stack([store.read_slice(s, int(i)) for s, i in Slices(store).items])
    np.testing.assert_array_equal(batches.numpy(), direct)
