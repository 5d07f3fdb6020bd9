"""pedetect: pulmonary embolism detection on CT pulmonary angiography."""

__version__ = "0.1.0"
