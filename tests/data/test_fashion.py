"""Fashion-MNIST: idx reading (on tiny fake files), LLaVA JSON, eval items and the scorer."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from PIL import Image

from llavakit.data import fashion as F
from llavakit.data import synthetic as S

N_TRAIN, N_TEST = 30, 20


def _write_idx(path, array: np.ndarray, magic: int | None = None, gz: bool = True) -> None:
    magic = (0x0800 | array.ndim) if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(data)


def _fake(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n, dtype=np.uint8) % 10


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "fmnist"
    root.mkdir()
    for prefix, n, seed in (("train", N_TRAIN, 0), ("t10k", N_TEST, 1)):
        images, labels = _fake(n, seed)
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def test_idx_round_trip(root):
    for split, n, seed in (("train", N_TRAIN, 0), ("test", N_TEST, 1)):
        images, labels = F.load_split(split, root)
        want_images, want_labels = _fake(n, seed)
        assert images.dtype == np.uint8 and images.shape == (n, 28, 28)
        assert np.array_equal(images, want_images) and np.array_equal(labels, want_labels)


def test_uncompressed_idx_is_read_too(tmp_path):
    images, _ = _fake(3, 0)
    _write_idx(tmp_path / "x-idx3-ubyte", images, gz=False)
    assert np.array_equal(F.read_idx(tmp_path / "x-idx3-ubyte", 3), images)


def test_bad_magic_number_is_refused_clearly(root):
    images, _ = _fake(N_TRAIN, 0)
    _write_idx(root / "train-images-idx3-ubyte.gz", images, magic=0x00000801)
    with pytest.raises(ValueError, match="magic number 0x00000801.*apt-get install"):
        F.load_split("train", root)


def test_truncated_file_is_refused(root):
    path = root / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(path) as f:
        data = f.read()
    with gzip.open(path, "wb") as f:
        f.write(data[:-3])
    with pytest.raises(ValueError, match="header says"):
        F.load_split("test", root)


def test_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        F.load_split("test", tmp_path)
    with pytest.raises(ValueError, match="split"):
        F.load_split("validation", tmp_path)


def test_to_image_is_grey_rgb_at_tower_size():
    array = np.full((28, 28), 200, dtype=np.uint8)
    array[:, :14] = 10
    image = F.to_image(array)
    assert image.mode == "RGB" and image.size == (56, 56)
    pixels = np.asarray(image)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    assert pixels[5, 5, 0] == 10 and pixels[5, 50, 0] == 200
    assert F.to_image(array, size=28).size == (28, 28)


def test_class_tables_line_up():
    assert len(F.CLASSES) == len(F.NAMES) == len(F.SYNONYMS) == 10
    assert F.CLASSES[0] == "T-shirt/top" and F.CLASSES[9] == "Ankle boot"
    for label, name in enumerate(F.NAMES):
        assert F.score(name, label) and F.score(F.CLASSES[label], label)
        assert F.score(F.caption(label), label)
        assert all(F.classify(s) == {label} for s in F.SYNONYMS[label])


def test_phrasings_are_disjoint_from_all_training_text():
    heldout = set(F.HELDOUT_PHRASINGS)
    assert not heldout & set(F.TRAIN_PHRASINGS)
    synthetic_train = {t for ts in S.TRAIN_PHRASINGS.values() for t in ts}
    assert not heldout & (synthetic_train | set(S.CAPTION_REQUESTS["train"]))
    # a fashion question is never also a synthetic question or caption request
    assert not set(F.TRAIN_PHRASINGS) & (synthetic_train | set(S.CAPTION_REQUESTS["train"]))


@pytest.mark.parametrize("kind", ["qa", "caption"])
def test_write_dataset_llava_json(root, tmp_path, kind):
    out = tmp_path / "out"
    path = F.write_dataset(out, "train", seed=0, kind=kind, root=root)
    records = json.loads(path.read_text())
    _, labels = F.load_split("train", root)
    assert len(records) == N_TRAIN and len({r["id"] for r in records}) == N_TRAIN
    for rec, label in zip(records, labels, strict=True):
        human, gpt = rec["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"].startswith("<image>\n")
        question = human["value"].removeprefix("<image>\n")
        if kind == "qa":
            assert question in F.TRAIN_PHRASINGS and gpt["value"] == F.NAMES[label]
        else:
            assert question in S.CAPTION_REQUESTS["train"] and gpt["value"] == F.caption(label)
        with Image.open(out / rec["image"]) as im:
            assert im.size == (56, 56) and im.mode == "RGB"
    assert path.read_text() == F.write_dataset(out, "train", kind=kind, root=root).read_text()


def test_write_dataset_subset_and_plain(root, tmp_path):
    path = F.write_dataset(tmp_path, "train", n=7, seed=3, kind="caption", root=root, plain=True)
    records = json.loads(path.read_text())
    assert len(records) == 7
    assert all(r["conversations"][0]["value"] == "<image>" for r in records)
    assert records == json.loads(
        F.write_dataset(
            tmp_path, "train", n=7, seed=3, kind="caption", root=root, plain=True
        ).read_text()
    )
    other = F.write_dataset(tmp_path, "train", n=7, seed=4, kind="caption", root=root)
    assert [r["image"] for r in json.loads(other.read_text())] != [r["image"] for r in records]


def test_eval_items_use_the_test_split(root):
    items = F.eval_items(root=root)
    images, labels = F.load_split("test", root)
    assert len(items) == N_TEST
    for (image, question, answer, label), array, want in zip(items, images, labels, strict=True):
        assert label == want and answer == F.NAMES[label] and question in F.HELDOUT_PHRASINGS
        assert image.tobytes() == F.to_image(array).tobytes()
    assert len(F.eval_items(n=5, phrasing="train", root=root)) == 5
    assert all(q in F.TRAIN_PHRASINGS for _, q, _, _ in F.eval_items(phrasing="train", root=root))


@pytest.mark.parametrize(
    "text, label",
    [
        ("It's a sneaker.", 7),
        ("Sneakers", 7),
        ("trainers", 7),
        ("A T-shirt", 0),
        ("t shirt", 0),
        ("tee", 0),
        ("Ankle boot", 9),
        ("boots", 9),
        ("a pair of pants", 1),
        ("Trouser", "Trouser"),
        ("sweater", "pullover"),
        ("a jacket", 4),
        ("handbag", 8),
        ("This is a shirt.", 6),
    ],
)
def test_score_accepts_class_names_and_synonyms(text, label):
    assert F.score(text, label)


@pytest.mark.parametrize(
    "text, label",
    [
        ("shirt", 0),
        ("t-shirt", 6),
        ("sneaker or sandal", 7),
        ("a shoe", 7),
        ("", 3),
        ("coat", 3),
        ("a boot and a bag", 9),
    ],
)
def test_score_rejects_wrong_or_several_classes(text, label):
    assert not F.score(text, label)


@pytest.mark.skipif(not F.DEFAULT_ROOT.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_test_split_shape():
    images, labels = F.load_split("test")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert np.bincount(labels).tolist() == [1000] * 10
