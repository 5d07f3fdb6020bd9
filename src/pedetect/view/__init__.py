"""The report's viewer: study pages that scroll a series slice by slice with the model's curve and
where it looks (``page``, ``assets/``), the slices' JPEGs at a bounded size (``slices``), and
``pedetect view``, which serves a report folder on loopback (``command``).

``pedetect.infer.report`` writes the pages during ``pedetect predict --report``; docs/viewer.md
describes them.
"""
