"""Stage-1 data: folds, slice datasets over the slice store, samplers and tensor augmentations.

Import the submodules directly (``pedetect.data.folds`` needs no torch).
"""
