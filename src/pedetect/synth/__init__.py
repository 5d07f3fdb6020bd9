"""Synthetic CTPA studies with ground truth from the phantom itself (docs/design.md, "Synthetic data").

Python API (imported lazily, so that ``pedetect --help`` stays fast):

- :func:`write_dataset` — studies in the RSNA layout plus train.csv / test CSVs; returns the labels.
- :func:`render_study` — one study in memory: HU volume, embolus masks, tissue labels, labels.
- :func:`plan_study` — one study's geometry, scanner, UIDs and labels without drawing pixels.
- :func:`write_preview` — a montage PNG of a positive study.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pedetect._lazy import by_name, lazy_getattr

_EXPORTS = by_name(
    {
        "pedetect.synth.dataset": ("write_dataset", "sample_submission"),
        "pedetect.synth.render": ("render_study", "render_plan", "RenderedStudy"),
        "pedetect.synth.phantom": ("plan_study", "StudyPlan", "POSITIVE_FRACTION", "INDETERMINATE_FRACTION"),
        "pedetect.synth.anatomy": ("Tissue",),
        "pedetect.synth.dicom": ("write_series", "TRANSFER_SYNTAXES"),
        "pedetect.synth.preview": ("write_preview",),
    }
)

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from pedetect.synth.anatomy import Tissue
    from pedetect.synth.dataset import sample_submission, write_dataset
    from pedetect.synth.dicom import TRANSFER_SYNTAXES, write_series
    from pedetect.synth.phantom import INDETERMINATE_FRACTION, POSITIVE_FRACTION, StudyPlan, plan_study
    from pedetect.synth.preview import write_preview
    from pedetect.synth.render import RenderedStudy, render_plan, render_study


__getattr__ = lazy_getattr(globals(), _EXPORTS)
