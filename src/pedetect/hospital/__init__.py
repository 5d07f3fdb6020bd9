"""pedetect in a hospital: DICOM results (SR, secondary capture, key images), the DICOM node
(`pedetect serve`) and result delivery to a PACS (docs/dicom_results.md)."""
