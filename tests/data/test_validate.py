"""validate-data: every kind of broken sample is named with its id and reason; good ones pass."""

from __future__ import annotations

import argparse
import io
import json

import pytest

import llavakit
from llavakit.data.dataset import DatasetFormatError
from llavakit.data.validate import add_validate_parser, format_report, validate_dataset
from tests.conftest import random_image

MAX_LENGTH = 160  # the vicuna system prompt is ~88 tiny-vocabulary tokens, an image 16


def conv(*turns, roles=("human", "gpt")):
    return [{"from": roles[i % 2], "value": v} for i, v in enumerate(turns)]


GOOD = [
    {"id": "good_image", "image": "a.png", "conversations": conv("<image>\nWhat is it?", "A cat.")},
    {"id": "good_text", "conversations": conv("Hi", "Hello", "Where?", "Left.")},
    {
        "id": "good_multi",
        "image": ["a.png", "b.png"],
        "conversations": conv("<image> vs <image>", "same"),
    },
    {"id": "good_no_placeholder", "image": "b.png", "conversations": conv("Describe.", "Blue.")},
    {"id": "good_truncated", "conversations": conv("Q", "A1", "Q2 " * 80, "A2")},
]

# id -> (sample without its id, expected part of the reason)
BAD = {
    "missing_image": ({"image": "nope.png", "conversations": conv("Q", "A")}, "no such image"),
    "corrupt_image": (
        {"image": "corrupt.png", "conversations": conv("Q", "A")},
        "not a recognised image format",
    ),
    "truncated_png": (
        {"image": "truncated.png", "conversations": conv("Q", "A")},
        "damaged image data",
    ),
    "more_placeholders": (
        {"image": "a.png", "conversations": conv("<image> <image> Q", "A")},
        "2 <image> placeholder(s) but 1 image(s)",
    ),
    "fewer_placeholders": (
        {"image": ["a.png", "b.png"], "conversations": conv("<image> Q", "A")},
        "1 <image> placeholder(s) but 2 image(s)",
    ),
    "placeholder_without_image": (
        {"conversations": conv("<image>\nQ", "A")},
        "1 <image> placeholder(s) but 0 image(s)",
    ),
    "fully_masked": ({"conversations": conv("word " * 120, "A")}, "fully masked"),
    "image_cut": (
        {"image": "a.png", "conversations": conv("Q", "A " * 50, "<image>\nQ2", "A2")},
        f"image tokens cut by truncation at {MAX_LENGTH} tokens",
    ),
    "empty_conversation": ({"conversations": []}, "empty conversation"),
    "missing_conversations": ({"image": "a.png"}, 'missing "conversations"'),
    "conversations_not_list": ({"conversations": "Q A"}, '"conversations" must be a list'),
    "bad_role": (
        {"conversations": [{"from": "robot", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        "unknown role 'robot'",
    ),
    "gpt_first": ({"conversations": conv("A", "Q", roles=("gpt", "human"))}, "expected a human"),
    "not_alternating": (
        {"conversations": conv("Q1", "Q2", "A", roles=("human", "human", "gpt"))},
        "expected a gpt turn",
    ),
    "non_string_value": (
        {"conversations": [{"from": "human", "value": 42}, {"from": "gpt", "value": "A"}]},
        '"value" must be a string',
    ),
    "list_with_missing_file": (
        {"image": ["a.png", "missing2.png"], "conversations": conv("<image><image>Q", "A")},
        "missing2.png: no such image file",
    ),
    "empty_reply": ({"conversations": conv("Q", "  ")}, "empty gpt reply"),
    "ends_with_human": ({"conversations": conv("Q", "A", "Q2")}, "ends with a human turn"),
    "bad_image_type": ({"image": 7, "conversations": conv("Q", "A")}, '"image" must be a path'),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate")
    random_image(40, 30, 1).save(root / "a.png")
    random_image(30, 40, 2).save(root / "b.png")
    (root / "corrupt.png").write_bytes(b"this is not an image")
    buf = io.BytesIO()
    random_image(64, 64, 3).save(buf, format="PNG")
    (root / "truncated.png").write_bytes(buf.getvalue()[:200])
    samples = GOOD[:2] + [{"id": k, **s} for k, (s, _) in BAD.items()] + GOOD[2:]
    samples.append("not a sample")  # a bare string in the list: named by its index
    (root / "data.json").write_text(json.dumps(samples))
    (root / "good.json").write_text(json.dumps(GOOD))
    return root


@pytest.fixture(scope="module")
def processor(llava15_dir):
    return llavakit.load(llava15_dir).processor


def test_every_bad_sample_is_named_with_its_reason(data, processor):
    report = validate_dataset(data / "data.json", data, processor, MAX_LENGTH)
    reasons = {row.sample_id: row.reason for row in report.invalid}
    for sid, (_, expected) in BAD.items():
        assert sid in reasons, sid
        assert expected in reasons[sid], (sid, reasons[sid])
    index = len(GOOD) + len(BAD)
    assert "must be a JSON object" in reasons[f"#{index}"]
    assert report.num_invalid == len(BAD) + 1
    assert report.num_samples == len(GOOD) + len(BAD) + 1
    good = {row.sample_id: row for row in report.rows if row.ok}
    assert set(good) == {s["id"] for s in GOOD}
    assert good["good_image"].image_tokens == 16
    assert good["good_multi"].image_tokens == 32
    assert good["good_text"].image_tokens == 0
    assert good["good_truncated"].total > MAX_LENGTH
    assert "truncated" in good["good_truncated"].reason
    assert report.invalid_indices == {row.index for row in report.rows if not row.ok}


def test_counts_add_up(data, processor):
    report = validate_dataset(data / "good.json", data, processor, MAX_LENGTH)
    assert report.num_invalid == 0
    for row in report.rows:
        assert row.text_tokens + row.image_tokens == row.total


def test_format_report(data, processor):
    report = validate_dataset(data / "data.json", data, processor, MAX_LENGTH)
    text = format_report(report)
    for sid in BAD:
        assert any(line.strip().startswith(f"{sid} (#") for line in text.splitlines())
    assert f"max length {MAX_LENGTH}" in text
    assert text.splitlines()[-1] == f"{report.num_samples} samples, {report.num_invalid} invalid"
    short = format_report(report, only_invalid=True)
    assert "good_image" not in short and "missing_image" in short


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llavakit")
    add_validate_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_run_validate_exits_1_and_prints_invalid_samples(data, llava15_dir, capsys):
    argv = ["validate-data", str(data / "data.json"), "--image-folder", str(data)]
    code = run(argv + ["--model", str(llava15_dir), "--max-length", str(MAX_LENGTH)])
    out = capsys.readouterr().out
    assert code == 1
    for sid, (_, expected) in BAD.items():
        assert f"{sid} (#" in out and expected in out
    assert f"{len(GOOD) + len(BAD) + 1} samples, {len(BAD) + 1} invalid" in out


def test_run_validate_exits_0_on_good_data(data, llava15_dir, capsys):
    argv = ["validate-data", str(data / "good.json"), "--image-folder", str(data)]
    assert run(argv + ["--model", str(llava15_dir), "--max-length", str(MAX_LENGTH)]) == 0
    assert f"{len(GOOD)} samples, 0 invalid" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON (line 1"),
        ('{"id": 1}', "expected a JSON list of samples, got a dict"),
        (None, "no such data file"),
    ],
)
def test_unusable_files_are_a_clear_error(
    tmp_path, processor, llava15_dir, capsys, content, message
):
    path = tmp_path / "data.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DatasetFormatError, match="data.json"):
        validate_dataset(path, tmp_path, processor)
    assert run(["validate-data", str(path), "--model", str(llava15_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llavakit: error:") and message in err and "Traceback" not in err
