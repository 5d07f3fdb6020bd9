"""The slice store: ``pedetect prepare`` writes it, training and embedding read it.

- :class:`SliceStore` — ``SliceStore(path).read_slice(series_uid, slice_index)`` → (H, W, 3) uint8;
- :func:`prepare` — the job behind ``pedetect prepare`` (resumable; processes or a Dask cluster);
- :class:`PrepareConfig` — its settings (YAML via ``--config``).

Imported lazily, so that ``pedetect --help`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pedetect._lazy import by_name, lazy_getattr

_EXPORTS = by_name(
    {
        "pedetect.store.reader": ("SliceStore",),
        "pedetect.store.job": ("prepare", "PrepareSummary", "StoreSettingsError"),
        "pedetect.store.config": ("PrepareConfig", "WindowSpec"),
    }
)

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from pedetect.store.config import PrepareConfig, WindowSpec
    from pedetect.store.job import PrepareSummary, StoreSettingsError, prepare
    from pedetect.store.reader import SliceStore


__getattr__ = lazy_getattr(globals(), _EXPORTS)
