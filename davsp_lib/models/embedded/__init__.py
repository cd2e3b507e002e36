"""The embedded default vision-language model: a frozen OCR reader in front of a small LM.

It runs on CPU from PyPI wheels alone (no model hub); see :mod:`davsp_lib.models.embedded.reader`.
"""
