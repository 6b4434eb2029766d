"""``llavakit validate-data``: token counts per sample and every sample that cannot be trained.

Each sample is encoded exactly as training would encode it (template, tokenization, label
masks, image token counts, truncation), so a sample that passes here trains, and one that fails
is named with its id and the reason, instead of silently becoming an all-masked loss of 0.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

from llavakit.data.dataset import InvalidSample, encode_untruncated, load_samples, sample_id_of
from llavakit.data.dataset import truncate as truncate_example
from llavakit.errors import LlavakitError
from llavakit.processing.processor import LlavaProcessor


@dataclass
class SampleRow:
    """One sample's verdict. Token counts are ``None`` when encoding stopped before them."""

    index: int
    sample_id: str
    text_tokens: int | None = None
    image_tokens: int | None = None
    total: int | None = None
    ok: bool = True
    reason: str = ""  # why the sample is invalid, or a note (e.g. truncation) when it is ok


@dataclass
class Report:
    """Per-sample rows of one data file, checked against ``max_length``."""

    data_path: str
    max_length: int
    rows: list[SampleRow] = field(default_factory=list)

    @property
    def invalid(self) -> list[SampleRow]:
        return [row for row in self.rows if not row.ok]

    @property
    def num_samples(self) -> int:
        return len(self.rows)

    @property
    def num_invalid(self) -> int:
        return len(self.invalid)

    @property
    def invalid_indices(self) -> set[int]:
        """Indices to pass as ``LlavaDataset(..., skip=...)``."""
        return {row.index for row in self.invalid}


def check_sample(
    processor: LlavaProcessor,
    sample: object,
    image_folder: str | os.PathLike | None,
    max_length: int,
    index: int,
) -> SampleRow:
    """Encode one sample the way training does and report, never raising on a bad sample."""
    row = SampleRow(index, sample_id_of(sample, index))
    try:
        example = encode_untruncated(processor, sample, image_folder, index, pixels=False)
        row.total = len(example.input_ids)
        row.image_tokens = example.image_tokens
        row.text_tokens = row.total - example.image_tokens
        truncate_example(example, max_length, processor.config.image_token_id)
    except InvalidSample as exc:
        row.ok, row.reason = False, exc.reason
    except LlavakitError as exc:
        row.ok, row.reason = False, str(exc)
    except Exception as exc:  # a validator reports; it does not stop at the first surprise
        row.ok, row.reason = False, f"unexpected {type(exc).__name__}: {exc}"
    if row.ok and row.total is not None and row.total > max_length:
        row.reason = f"text truncated from {row.total} to {max_length} tokens"
    return row


def validate_dataset(
    data_path: str | os.PathLike,
    image_folder: str | os.PathLike | None,
    processor: LlavaProcessor,
    max_length: int | None = None,
    samples: list | None = None,
) -> Report:
    """Check every sample of a LLaVA JSON file (or of ``samples`` already read from it).

    Only an unusable file raises (``DatasetFormatError``); bad samples become rows with a reason.
    """
    max_length = max_length or processor.config.max_context
    samples = load_samples(data_path) if samples is None else samples
    report = Report(os.fspath(data_path), max_length)
    for index, sample in enumerate(samples):
        report.rows.append(check_sample(processor, sample, image_folder, max_length, index))
    return report


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def format_report(report: Report, only_invalid: bool = False) -> str:
    """Readable text: token counts per sample (unless ``only_invalid``), then each invalid
    sample with its reason, then the summary line "N samples, K invalid"."""
    width = max([len("id")] + [len(row.sample_id) for row in report.rows])
    lines = [f"{report.data_path} (max length {report.max_length} tokens)"]
    if not only_invalid:
        lines.append(f"{'id':<{width}}  {'text':>6}  {'image':>6}  {'total':>6}  status")
    for row in [] if only_invalid else report.rows:
        status = "ok" if row.ok else "INVALID"
        if row.ok and row.reason:
            status += f" ({row.reason})"
        lines.append(
            f"{row.sample_id:<{width}}  {_count(row.text_tokens):>6}  "
            f"{_count(row.image_tokens):>6}  {_count(row.total):>6}  {status}"
        )
    if report.invalid:
        lines += ["", "invalid samples:"]
        lines += [f"  {row.sample_id} (#{row.index}): {row.reason}" for row in report.invalid]
    lines += ["", f"{report.num_samples} samples, {report.num_invalid} invalid"]
    return "\n".join(lines)


def add_validate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``validate-data`` to the ``llavakit`` command line."""
    parser = subparsers.add_parser(
        "validate-data",
        help="check a LLaVA JSON training file: token counts and invalid samples",
        epilog="example: llavakit validate-data llava_v1_5_mix665k.json --image-folder data/",
    )
    parser.add_argument("data", help="LLaVA JSON (list of samples) or JSON Lines file")
    parser.add_argument(
        "--image-folder", default=None, help="folder image paths are relative to (default: .)"
    )
    parser.add_argument(
        "--model",
        default="demo",
        help="checkpoint whose tokenizer and template to use (default: bundled demo)",
    )
    parser.add_argument(
        "--max-length", type=int, default=None, help="tokens per sample (default: model context)"
    )
    parser.set_defaults(func=run_validate)
    return parser


def run_validate(args: argparse.Namespace) -> int:
    """Print the report; 0 if every sample is valid, 1 if any is not, 2 on an unusable file."""
    try:
        samples = load_samples(args.data)  # a bad file fails before the model loads
        if args.max_length is not None and args.max_length < 1:
            raise LlavakitError(f"--max-length must be positive, got {args.max_length}")
        import llavakit

        processor = llavakit.load(args.model).processor
        report = validate_dataset(
            args.data, args.image_folder, processor, args.max_length, samples=samples
        )
    except LlavakitError as exc:
        print(f"llavakit: error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 1 if report.num_invalid else 0


__all__ = [
    "Report",
    "SampleRow",
    "add_validate_parser",
    "check_sample",
    "format_report",
    "run_validate",
    "validate_dataset",
]
