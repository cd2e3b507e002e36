"""DAVSP workbook library: data, model adapters and the Deep Aligned Visual Safety Prompt."""

from davsp_lib.runtime.errors import DataError, UnsupportedModelError

__all__ = ["DataError", "UnsupportedModelError", "__version__"]
__version__ = "0.1.0"
