"""The CLI as a user drives it: one-shot, REPL, --help, python -m llavakit, the demo model."""

from __future__ import annotations

import os
import subprocess
import sys

import llavakit
from llavakit.cli import main
from tests.conftest import random_image


def test_one_shot_streams_the_same_answer_as_the_api(llava15_dir, tmp_path, capsys):
    image = tmp_path / "img.png"
    random_image(64, 40, 3).save(image)
    code = main(
        [
            "chat",
            "--model",
            str(llava15_dir),
            "--image",
            str(image),
            "--dtype",
            "float32",
            "--max-new-tokens",
            "8",
            "Describe.",
        ]
    )
    out = capsys.readouterr().out
    expected = llavakit.load(llava15_dir, dtype="float32").chat(
        [str(image)], "Describe.", max_new_tokens=8
    )
    assert code == 0
    assert out == expected + "\n"


def test_repl_keeps_history_and_survives_errors(llava15_dir, tmp_path):
    image = tmp_path / "img.png"
    random_image(64, 40, 3).save(image)
    script = f"/image {tmp_path / 'missing.png'}\n/image {image}\nWhat is it?\nAnd now?\n/exit\n"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llavakit",
            "chat",
            "--model",
            str(llava15_dir),
            "--dtype",
            "float32",
            "--max-new-tokens",
            "5",
        ],
        input=script,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "missing.png: no such image file" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.count("ASSISTANT> ") == 2
    pipe = llavakit.load(llava15_dir, dtype="float32")
    first = pipe.chat([str(image)], "What is it?", max_new_tokens=5)
    assert f"ASSISTANT> {first}\n" in result.stdout
    history = [
        {"role": "user", "content": "What is it?"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And now?"},
    ]
    second = pipe.chat([str(image)], messages=history, max_new_tokens=5)
    assert f"ASSISTANT> {second}\n" in result.stdout


def test_every_command_has_help_with_an_example():
    for command in ("chat", "convert"):
        result = subprocess.run(
            [sys.executable, "-m", "llavakit", command, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0
        assert "example: llavakit " + command in result.stdout


def test_load_without_argument_falls_back_to_an_untrained_demo(tmp_path, monkeypatch, capsys):
    """A checkout without the bundled demo weights still runs, and says the model is untrained."""
    import llavakit.demo

    monkeypatch.setenv("LLAVAKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(llavakit.demo, "BUNDLED", tmp_path / "no-bundle")
    pipe = llavakit.load(dtype="float32")
    assert "UNTRAINED" in capsys.readouterr().err
    assert os.path.isdir(tmp_path / "untrained-demo")
    assert isinstance(pipe.chat([random_image(30, 30)], "hi", max_new_tokens=3), str)
