"""Prediction on new studies: reading, models, ensembling, consistency, reports."""
