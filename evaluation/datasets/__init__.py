"""Benchmark datasets in the layouts of the CAT-Seg / SED prepare scripts, and the commands that prepare them."""

from .base import IGNORE, DatasetError, LabelEncoding, Sample, SemSegDataset
from .specs import SPECS, open_dataset

__all__ = ["IGNORE", "SPECS", "DatasetError", "LabelEncoding", "Sample", "SemSegDataset", "open_dataset"]
