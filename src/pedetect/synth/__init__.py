"""Synthetic CTPA studies with ground truth from the phantom itself (docs/design.md, "Synthetic data").

Python API (imported lazily, so that ``pedetect --help`` stays fast):

- :func:`write_dataset` — studies in the RSNA layout plus train.csv / test CSVs; returns the labels.
- :func:`render_study` — one study in memory: HU volume, embolus masks, tissue labels, labels.
- :func:`plan_study` — one study's geometry, scanner, UIDs and labels without drawing pixels.
- :func:`write_preview` — a montage PNG of a positive study.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pedetect._lazy import lazy_getattr

_EXPORTS = {
    "write_dataset": "pedetect.synth.dataset",
    "sample_submission": "pedetect.synth.dataset",
    "render_study": "pedetect.synth.render",
    "render_plan": "pedetect.synth.render",
    "RenderedStudy": "pedetect.synth.render",
    "plan_study": "pedetect.synth.phantom",
    "StudyPlan": "pedetect.synth.phantom",
    "Tissue": "pedetect.synth.anatomy",
    "POSITIVE_FRACTION": "pedetect.synth.phantom",
    "INDETERMINATE_FRACTION": "pedetect.synth.phantom",
    "write_series": "pedetect.synth.dicom",
    "TRANSFER_SYNTAXES": "pedetect.synth.dicom",
    "write_preview": "pedetect.synth.preview",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from pedetect.synth.anatomy import Tissue
    from pedetect.synth.dataset import sample_submission, write_dataset
    from pedetect.synth.dicom import TRANSFER_SYNTAXES, write_series
    from pedetect.synth.phantom import INDETERMINATE_FRACTION, POSITIVE_FRACTION, StudyPlan, plan_study
    from pedetect.synth.preview import write_preview
    from pedetect.synth.render import RenderedStudy, render_plan, render_study


__getattr__ = lazy_getattr(globals(), _EXPORTS)
