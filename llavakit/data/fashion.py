"""Fashion-MNIST as LLaVA data: "what is this item?" questions and one-line captions.

Why: a real (if small) image-classification task the demo model is checked on -- train on the
60k train split only, evaluate on the 10k test split. The idx files come from Debian's
``dataset-fashion-mnist`` package and are read with numpy (no download, no extra dependency).
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
from PIL import Image

from llavakit.data.synthetic import CAPTION_REQUESTS, llava_record, write_json

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NAMES = (
    "t-shirt",
    "trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
_NOUN_PHRASES = ("a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat", "a sandal")
_NOUN_PHRASES += ("a shirt", "a sneaker", "a bag", "an ankle boot")
SYNONYMS: dict[int, tuple[str, ...]] = {
    0: ("t-shirt", "t-shirts", "t shirt", "tshirt", "tee", "tee shirt", "top", "tank top"),
    1: ("trousers", "trouser", "pants", "jeans", "slacks"),
    2: ("pullover", "pullovers", "sweater", "sweaters", "jumper", "sweatshirt", "hoodie"),
    3: ("dress", "dresses", "gown"),
    4: ("coat", "coats", "jacket", "jackets", "overcoat"),
    5: ("sandal", "sandals", "flip flop", "flip flops"),
    6: ("shirt", "shirts", "blouse", "button-down shirt"),
    7: ("sneaker", "sneakers", "trainer", "trainers", "running shoe", "running shoes"),
    8: ("bag", "bags", "handbag", "purse", "backpack", "tote"),
    9: ("ankle boot", "ankle boots", "boot", "boots"),
}
TRAIN_PHRASINGS = (
    "What is this item?",
    "What kind of clothing is shown?",
    "What is shown in the image?",
    "What item is in the picture?",
    "Name the item in the image.",
    "What type of item is this?",
    "Which article of clothing is this?",
    "What is this?",
    "Classify this item.",
)
HELDOUT_PHRASINGS = (
    "Identify the product in this photo.",
    "Which garment or accessory can you see?",
    "What would you call the thing in this picture?",
    "Tell me what this picture depicts.",
)
_FILES = {"train": "train", "test": "t10k"}
_MAGIC = {3: 0x00000803, 1: 0x00000801}  # unsigned bytes, 3-d images / 1-d labels
_INSTALL = "install it with `apt-get install dataset-fashion-mnist` (or pass root=...)"


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Read an idx-ubyte file (gzipped or not), checking the magic number and the size."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Fashion-MNIST file not found: {path}; {_INSTALL}")
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if magic != _MAGIC[ndim]:
        found = "none" if magic is None else f"0x{magic:08x}"
        raise ValueError(
            f"{path}: bad magic number {found} (expected 0x{_MAGIC[ndim]:08x}, an idx{ndim}-ubyte "
            f"file); the file is damaged or not Fashion-MNIST -- reinstall: {_INSTALL}"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {body.size} bytes; {_INSTALL}")
    return body.reshape(shape)


def _find(root: Path, name: str) -> Path:
    gz = root / f"{name}.gz"
    return gz if gz.is_file() or not (root / name).is_file() else root / name


def load_split(
    split: str = "train", root: str | Path = DEFAULT_ROOT
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, 28, 28], uint8 labels [N]) of the "train" (60k) or "test" (10k) split."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    images = read_idx(_find(root, f"{_FILES[split]}-images-idx3-ubyte"), 3)
    labels = read_idx(_find(root, f"{_FILES[split]}-labels-idx1-ubyte"), 1)
    if len(images) != len(labels) or images.shape[1:] != (28, 28):
        raise ValueError(f"{root}: {images.shape} images do not match {labels.shape} labels")
    if labels.size and labels.max() >= len(CLASSES):
        raise ValueError(f"{root}: label {labels.max()} out of range 0-9")
    return images, labels


def to_image(array28: np.ndarray, size: int = 56) -> Image.Image:
    """Grey 28x28 -> RGB at the tower size; bilinear, so train and eval see the same pixels."""
    image = Image.fromarray(np.asarray(array28, dtype=np.uint8)).convert("RGB")
    return (
        image
        if image.size == (size, size)
        else image.resize((size, size), Image.Resampling.BILINEAR)
    )


def caption(label: int) -> str:
    return f"A photo of {_NOUN_PHRASES[label]}."


def _indices(total: int, n: int | None, seed: int) -> np.ndarray:
    if n is None or n >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).permutation(total)[:n])


def _questions(phrasing: str) -> tuple[str, ...]:
    if phrasing not in ("train", "heldout"):
        raise ValueError(f"phrasing must be 'train' or 'heldout', got {phrasing!r}")
    return TRAIN_PHRASINGS if phrasing == "train" else HELDOUT_PHRASINGS


def write_dataset(
    out_dir: str | Path,
    split: str = "train",
    n: int | None = None,
    seed: int = 0,
    kind: str = "qa",
    phrasing: str = "train",
    size: int = 56,
    root: str | Path = DEFAULT_ROOT,
    plain: bool = False,
) -> Path:
    """Write PNGs to out_dir/images and return the LLaVA JSON (paths relative to out_dir).

    ``n=None`` takes the whole split, else a seeded subset. Answers are the friendly names;
    captions read "A photo of a sneaker."; ``plain=True`` leaves captions' human turn "<image>".
    """
    if kind not in ("qa", "caption"):
        raise ValueError(f"kind must be 'qa' or 'caption', got {kind!r}")
    requests = CAPTION_REQUESTS[phrasing] if kind == "caption" else _questions(phrasing)
    images, labels = load_split(split, root)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 1 if kind == "qa" else 2])
    stem = f"fashion_{kind}_{split}_s{seed}" + ("_heldout" if phrasing == "heldout" else "")
    records = []
    for i in _indices(len(labels), n, seed):
        label = int(labels[i])
        rel = f"images/fashion_{split}_{i:05d}_{size}px.png"
        if not (out / rel).is_file():  # one picture per size serves every kind and seed
            to_image(images[i], size).save(out / rel, compress_level=1)
        question = requests[int(rng.integers(len(requests)))]
        answer = NAMES[label] if kind == "qa" else caption(label)
        question = None if plain and kind == "caption" else question
        records.append(llava_record(f"{stem}_{i:05d}", rel, question, answer))
    return write_json(out / f"{stem}.json", records)


def eval_items(
    split: str = "test",
    n: int | None = None,
    phrasing: str = "heldout",
    seed: int = 0,
    size: int = 56,
    root: str | Path = DEFAULT_ROOT,
) -> list[tuple[Image.Image, str, str, int]]:
    """(image, question without "<image>", friendly answer, label) on the never-trained split."""
    questions = _questions(phrasing)
    images, labels = load_split(split, root)
    rng = np.random.default_rng([seed, 3])
    return [
        (
            to_image(images[i], size),
            questions[int(rng.integers(len(questions)))],
            NAMES[int(labels[i])],
            int(labels[i]),
        )
        for i in _indices(len(labels), n, seed)
    ]


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


_PATTERNS = sorted(
    ((tuple(_tokens(s)), label) for label, syns in SYNONYMS.items() for s in syns),
    key=lambda p: -len(p[0]),
)


def classify(answer_text: str) -> set[int]:
    """Classes an answer names; the longest phrase wins ("ankle boot" is not also "boot")."""
    words = _tokens(answer_text)
    taken = [False] * len(words)
    found = set()
    for pattern, label in _PATTERNS:
        k = len(pattern)
        for start in range(len(words) - k + 1):
            span = range(start, start + k)
            if tuple(words[start : start + k]) == pattern and not any(taken[j] for j in span):
                found.add(label)
                for j in span:
                    taken[j] = True
    return found


def score(answer_text: str, label: int | str) -> bool:
    """True when the answer names exactly the right class (synonyms ok, two classes wrong)."""
    if isinstance(label, str):
        names = [c.lower() for c in CLASSES]
        key = label.lower()
        label = NAMES.index(key) if key in NAMES else names.index(key)
    return classify(answer_text) == {int(label)}
