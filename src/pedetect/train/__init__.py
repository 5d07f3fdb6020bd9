"""Training: the stages and what they share.

``setup`` (model folder, recipe, folds: every stage's inputs), ``cnn`` (stage 1, with ``module``,
the Lightning module, and ``trainer``, the Lightning run's pieces), ``embed`` (out-of-fold
embeddings), ``seq`` (stage 2), ``reporting`` (each fold's metrics and curves), ``pipeline`` (the
stages in order) and ``command`` (``pedetect split`` and ``pedetect train``).

Import the submodules directly; this package imports nothing heavy.
"""
