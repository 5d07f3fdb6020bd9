"""runtime.parallel_folds: stage 1 and the embedding pass with the folds in processes of their own give
the models and embeddings of the folds trained one after another (on a store prepared from real
synthetic DICOM, which each process opens itself); the folds' processes end when their parent is killed."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers.train import tiny_config
from pedetect.models.layout import COMPLETE, cnn_dir, embed_dir
from pedetect.models.slice_classifier import load_slice_classifier
from pedetect.recipe import apply_overrides
from pedetect.store import prepare
from pedetect.synth import write_dataset
from pedetect.train.embed import read_series_embedding
from pedetect.train.pipeline import train
from pedetect.train.setup import TrainError

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:DeprecationWarning"),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    write_dataset(
        root / "dicom", 9, slices=8, size=64, seed=3, positive_fraction=0.6, min_embolus_pixels=9, progress=False
    )
    prepare(root / "dicom" / "train", root / "store", workers=1, progress=False, echo=lambda message: None)
    return root / "store", root / "dicom" / "train.csv"


def test_folds_in_processes_match_folds_in_turn(store, tmp_path):
    store_path, labels = store
    config = tiny_config("cnn.input.image_size=32", "embed.location_grid=2")
    # The processes get one thread each here (3 folds on at most 2 cores): the same as this one, so the
    # numbers are the same to the bit.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for stage in ("cnn", "embed"):
            train(config, stage=stage, store=store_path, labels=labels, out=tmp_path / "in_turn")
    finally:
        torch.set_num_threads(threads)
    parallel = apply_overrides(config, ["runtime.parallel_folds=3"])
    for stage in ("cnn", "embed"):
        train(parallel, stage=stage, store=store_path, labels=labels, out=tmp_path / "parallel")
    for k in range(3):
        ours = load_slice_classifier(tmp_path / "parallel", k).state_dict()
        theirs = load_slice_classifier(tmp_path / "in_turn", k).state_dict()
        assert all(torch.equal(ours[name], theirs[name]) for name in theirs), f"fold {k}"
        files = sorted((embed_dir(tmp_path / "in_turn", k)).glob("*.npz"))
        assert len(files) == 3  # the fold's own series (scope own_fold)
        for path in files:
            a, b = read_series_embedding(path), read_series_embedding(embed_dir(tmp_path / "parallel", k) / path.name)
            assert (a.embedding == b.embedding).all() and (a.logit == b.logit).all() and list(a.sop) == list(b.sop)

    # A fold that fails in its process is named; the others finish and keep their markers.
    out = tmp_path / "broken"
    (cnn_dir(out, 2)).parent.mkdir(parents=True)
    cnn_dir(out, 2).write_text("in the way of fold 2's folder")
    with pytest.raises(TrainError, match="cnn fold 2 failed in its process"):
        train(parallel, stage="cnn", store=store_path, labels=labels, out=out)
    assert (cnn_dir(out, 0) / COMPLETE).is_file() and (cnn_dir(out, 1) / COMPLETE).is_file()


def test_the_folds_processes_end_with_the_process_that_started_them(tmp_path):
    # A `pedetect train` stopped by SIGKILL (or SIGTERM) cannot shut its fold processes down: they must
    # end by themselves rather than train on, unseen, on every core.
    script = (
        "import time, sys\n"
        "from pedetect.train.parallel import _executor\n"
        "pool = _executor(2)\n"
        "futures = [pool.submit(time.sleep, 600) for _ in range(2)]\n"
        "time.sleep(0.5)\n"
        "print(*pool._processes, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        children = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(children) == 2 and all(alive(pid) for pid in children)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in children)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its new parent, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"
