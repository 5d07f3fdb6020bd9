"""The slice store: ``pedetect prepare`` writes it, training and embedding read it.

- :class:`SliceStore` — ``SliceStore(path).read_slice(series_uid, slice_index)`` → (H, W, 3) uint8;
- :func:`prepare` — the job behind ``pedetect prepare`` (resumable; processes or a Dask cluster);
- :class:`PrepareConfig` — its settings (YAML via ``--config``).

Imported lazily, so that ``pedetect --help`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "SliceStore": "pedetect.store.reader",
    "prepare": "pedetect.store.job",
    "PrepareSummary": "pedetect.store.job",
    "StoreSettingsError": "pedetect.store.job",
    "PrepareConfig": "pedetect.store.config",
    "WindowSpec": "pedetect.store.config",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from pedetect.store.config import PrepareConfig, WindowSpec
    from pedetect.store.job import PrepareSummary, StoreSettingsError, prepare
    from pedetect.store.reader import SliceStore


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
