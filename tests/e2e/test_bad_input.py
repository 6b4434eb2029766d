"""Bad input gives a specific exception from the API and a one-line error from the CLI."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import llavakit
from llavakit import errors
from llavakit.cli import main
from tests.conftest import png_claiming, random_image


def _jpeg_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "notimage.jpg").write_bytes(b"this is plainly not an image\n" * 10)
    (d / "empty.png").write_bytes(b"")
    (d / "truncated.jpg").write_bytes(_jpeg_bytes(random_image(120, 90))[:700])
    Image.new("RGB", (1, 1), (9, 9, 9)).save(d / "one.png")
    (d / "bomb.png").write_bytes(png_claiming(30000, 30000))
    return d


CASES = [
    ("missing.png", errors.ImageNotFound, "no such image file"),
    ("notimage.jpg", errors.ImageDecodeError, "not a recognised image"),
    ("empty.png", errors.ImageDecodeError, "empty"),
    ("truncated.jpg", errors.ImageDecodeError, "damaged"),
    ("one.png", errors.ImageTooSmall, "1x1"),
    ("bomb.png", errors.ImageTooLarge, "900000000 pixels"),
]


@pytest.fixture(scope="module")
def pipe(llava15_dir):
    return llavakit.load(llava15_dir, dtype="float32")


@pytest.mark.parametrize(("name", "error", "message"), CASES)
def test_api_raises_specific_error(pipe, bad_files, name, error, message):
    with pytest.raises(error, match=message):
        pipe.chat([str(bad_files / name)], "What is this?", max_new_tokens=2)


@pytest.mark.parametrize(("name", "error", "message"), CASES)
def test_cli_prints_one_line_and_fails(llava15_dir, bad_files, name, error, message, capsys):
    code = main(
        ["chat", "--model", str(llava15_dir), "--image", str(bad_files / name), "What is this?"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert err[-1].startswith("llavakit: error:") and message in err[-1]
    assert not any("Traceback" in line for line in err)


def test_placeholder_mismatch_and_long_prompt_api(pipe):
    image = random_image(40, 40)
    with pytest.raises(errors.ImageCountMismatch):
        pipe.chat([image, image], "<image> only one placeholder")
    with pytest.raises(errors.ImageCountMismatch):
        pipe.chat([image], "<image><image> two placeholders")
    with pytest.raises(errors.PromptTooLong, match="context is 1024 tokens"):
        pipe.chat([image], "word " * 3000)


def test_placeholder_mismatch_and_long_prompt_cli(llava15_dir, tmp_path, capsys):
    path = tmp_path / "ok.png"
    random_image(40, 40).save(path)
    for argv, message in [
        (["--image", str(path), "<image> <image> two?"], "2 <image> placeholder(s) but 1 image"),
        (["word " * 3000], "context is 1024 tokens"),
    ]:
        code = main(["chat", "--model", str(llava15_dir), *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code != 0 and message in err[-1] and len(err) == 1


def _pil_variants():
    rgb = np.asarray(random_image(48, 32))
    la = Image.fromarray(rgb[..., 0]).convert("LA")
    pal = Image.fromarray(rgb).convert("P")
    pal.info["transparency"] = 0
    return {
        "CMYK": Image.fromarray(rgb).convert("CMYK"),
        "LA": la,
        "P": pal,
        "I;16": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
        "RGBA": Image.fromarray(rgb).convert("RGBA"),
        "1": Image.fromarray(rgb).convert("1"),
    }


@pytest.mark.parametrize("mode", list(_pil_variants()))
def test_every_mode_is_accepted_from_files(pipe, tmp_path, mode):
    image = _pil_variants()[mode]
    path = tmp_path / ("img.tiff" if mode == "CMYK" else "img.png")
    image.save(path)
    assert Image.open(path).mode == mode
    answer = pipe.chat([str(path)], "What is this?", max_new_tokens=3)
    assert isinstance(answer, str)
    assert pipe.processor.load_images([str(path)])[0].mode == "RGB"


def test_cli_subprocess_has_no_traceback(llava15_dir, bad_files):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llavakit",
            "chat",
            "--model",
            str(llava15_dir),
            "--image",
            str(bad_files / "bomb.png"),
            "hi",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("llavakit: error:")
