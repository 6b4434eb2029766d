"""Training data: LLaVA JSON datasets, label masks, collation and validation."""

from llavakit.data.dataset import (
    DatasetFormatError,
    InvalidSample,
    LlavaDataset,
    TrainExample,
    collate,
    encode_sample,
    load_samples,
)
from llavakit.data.labels import EmptySupervision, LabelError, supervised_text, tokenize_with_labels
from llavakit.data.validate import Report, format_report, validate_dataset

__all__ = [
    "DatasetFormatError",
    "EmptySupervision",
    "InvalidSample",
    "LabelError",
    "LlavaDataset",
    "Report",
    "TrainExample",
    "collate",
    "encode_sample",
    "format_report",
    "load_samples",
    "supervised_text",
    "tokenize_with_labels",
    "validate_dataset",
]
