"""Synthetic scenes: deterministic, disjoint splits and phrasings, answers true to the picture."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from llavakit.data import synthetic as S


def _img_hash(image: Image.Image) -> str:
    return hashlib.sha1(image.tobytes()).hexdigest()


def test_generation_is_deterministic_per_seed():
    a = S.generate(60, seed=3)
    assert a == S.generate(60, seed=3)
    assert a != S.generate(60, seed=4)
    assert [x[0] for x in a] != [x[0] for x in S.generate(60, seed=3, kind="caption")]


def test_write_dataset_is_deterministic(tmp_path):
    paths = [S.write_dataset(tmp_path / d, 15, seed=7) for d in ("a", "b")]
    assert paths[0].read_text() == paths[1].read_text()
    for rec in json.loads(paths[0].read_text()):
        one, two = (p.parent / rec["image"] for p in paths)
        assert one.read_bytes() == two.read_bytes()


def test_train_and_test_scenes_never_coincide():
    train = [s for s, *_ in S.generate(1500, seed=0, split="train")]
    test = [s for s, *_ in S.generate(1500, seed=0, split="test")]
    assert {s.split for s in train} == {"train"} and {s.split for s in test} == {"test"}
    assert not {s.key() for s in train} & {s.key() for s in test}
    train_hashes = {_img_hash(S.render_scene(s)) for s in train}
    assert not train_hashes & {_img_hash(S.render_scene(s)) for s in test}
    # single-object scenes are few, so this is where collisions would show up
    assert sum(len(s.objects) == 1 for s in test) > 200


def test_phrasings_train_and_heldout_are_disjoint():
    assert set(S.TRAIN_PHRASINGS) == set(S.HELDOUT_PHRASINGS) == set(S.QTYPES)
    train = {t for ts in S.TRAIN_PHRASINGS.values() for t in ts}
    heldout = {t for ts in S.HELDOUT_PHRASINGS.values() for t in ts}
    assert not train & heldout
    assert not set(S.CAPTION_REQUESTS["train"]) & set(S.CAPTION_REQUESTS["heldout"])
    q_train = {q for _, q, _, _ in S.generate(500, seed=1, split="test")}
    q_held = {q for _, q, _, _ in S.generate(500, seed=1, split="test", phrasing="heldout")}
    assert not q_train & q_held
    assert len(q_held) > 30  # templates times referents


@pytest.mark.parametrize("phrasing", ["train", "heldout"])
def test_every_type_present_and_answers_balanced(phrasing):
    items = S.generate(2000, seed=2, split="train", phrasing=phrasing)
    by_type: dict[str, Counter] = {t: Counter() for t in S.QTYPES}
    for _, _, answer, qtype in items:
        by_type[qtype][answer] += 1
    assert all(sum(c.values()) == 400 for c in by_type.values())
    yes = by_type["existence"]["yes"] / 400
    assert 0.42 < yes < 0.58 and set(by_type["existence"]) == {"yes", "no"}
    assert set(by_type["count"]) == {"1", "2", "3", "4"}
    assert min(by_type["count"].values()) > 60
    assert set(by_type["colour"]) == set(S.COLOURS)
    assert set(by_type["shape"]) == set(S.SHAPES)
    assert set(by_type["position"]) == set(S.POSITIONS)
    assert max(by_type["position"].values()) < 2 * min(by_type["position"].values())


def _mentioned(question: str, vocab: tuple[str, ...]) -> set[str]:
    words = set(re.findall(r"[a-z]+", question.lower()))
    return words & set(vocab)


@pytest.mark.parametrize("phrasing", ["train", "heldout"])
def test_answers_are_true_to_the_scene(phrasing):
    for scene, question, answer, qtype in S.generate(1500, seed=5, split="val", phrasing=phrasing):
        assert len(answer.split()) <= 2
        if qtype == "count":
            assert answer == str(len(scene.objects))
            continue
        colours, shapes = _mentioned(question, S.COLOURS), _mentioned(question, S.SHAPES)
        places = _mentioned(question, S.POSITIONS)
        if qtype == "existence":
            (colour,), (shape,) = colours, shapes
            present = any(o.colour == colour and o.shape == shape for o in scene.objects)
            assert answer == ("yes" if present else "no")
            continue
        # the question names exactly one object, never by the attribute it asks for
        matches = [
            o
            for o in scene.objects
            if colours <= {o.colour} and shapes <= {o.shape} and places <= {o.position}
        ]
        assert len(matches) == 1, (question, scene)
        assert answer == {"colour": matches[0].colour, "shape": matches[0].shape}.get(
            qtype, matches[0].position
        )
        asked = {"colour": colours, "shape": shapes, "position": places}[qtype]
        assert not asked, question


def test_rendered_image_has_the_colours_at_object_centres():
    rng = np.random.default_rng(0)
    for size in (56, 112):
        for _ in range(100):
            scene = S.random_scene(rng)
            image = np.asarray(S.render_scene(scene, size))
            assert image.shape == (size, size, 3)
            assert tuple(image[0, 0]) == S.BACKGROUND  # corners are always empty
            for obj in scene.objects:
                x, y = (int(v) for v in S.object_center(obj, size))
                assert tuple(image[y, x]) == S.PALETTE[obj.colour], (obj, size)


def test_caption_describes_every_object():
    scene = S.Scene(
        (
            S.SceneObject("square", "blue", "small", "bottom"),
            S.SceneObject("circle", "red", "large", "left"),
        )
    )
    assert (
        scene.caption() == "A large red circle on the left and a small blue square at the bottom."
    )
    for scene, _, caption, _ in S.generate(50, seed=0, kind="caption"):
        assert caption.count(" a ") + 1 == len(scene.objects)
        assert all(f"{o.size} {o.colour} {o.shape}" in caption for o in scene.objects)


def test_scene_rejects_overlap_and_ambiguity():
    red_circle = S.SceneObject("circle", "red", "large", "left")
    with pytest.raises(ValueError, match="position"):
        S.Scene((red_circle, S.SceneObject("square", "blue", "small", "left")))
    with pytest.raises(ValueError, match="colour and shape"):
        S.Scene((red_circle, S.SceneObject("circle", "red", "small", "top")))
    with pytest.raises(ValueError):
        S.SceneObject("star", "red", "small", "top")
    with pytest.raises(ValueError):
        S.SceneObject("circle", "red", "large", "top", offset=(3, 0))


@pytest.mark.parametrize("kind", ["qa", "caption"])
def test_written_json_is_llava_format(tmp_path, kind):
    path = S.write_dataset(tmp_path, 25, seed=1, split="train", kind=kind)
    records = json.loads(path.read_text())
    assert len(records) == 25 and len({r["id"] for r in records}) == 25
    for rec in records:
        assert set(rec) == {"id", "image", "conversations"}
        human, gpt = rec["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
        assert gpt["value"] and "<image>" not in gpt["value"]
        with Image.open(tmp_path / rec["image"]) as im:
            assert im.size == (56, 56) and im.mode == "RGB"
    if kind == "caption":
        plain = S.write_dataset(tmp_path, 5, seed=1, kind="caption", plain=True)
        assert all(
            r["conversations"][0]["value"] == "<image>" for r in json.loads(plain.read_text())
        )


def test_multi_turn_conversations(tmp_path):
    convs = S.conversations(60, seed=2, max_turns=3)
    assert {len(turns) for _, turns in convs} == {1, 2, 3}
    assert Counter(turns[0][2] for _, turns in convs) == Counter({q: 12 for q in S.QTYPES})
    for scene, turns in convs:
        assert scene.split == "train"
        assert len({t for _, _, t in turns}) == len(turns)  # distinct question types
        for _, answer, qtype in turns:
            if qtype == "count":
                assert answer == str(len(scene.objects))
            elif qtype in ("colour", "shape", "position"):
                attrs = {getattr(o, qtype) for o in scene.objects}
                assert answer in attrs
    path = S.write_dataset(tmp_path, 10, seed=2, kind="qa", size=84, max_turns=3)
    records = json.loads(path.read_text())
    for rec, (_, turns) in zip(records, S.conversations(10, seed=2, max_turns=3), strict=True):
        conv = rec["conversations"]
        assert [c["from"] for c in conv] == ["human", "gpt"] * len(turns)
        assert conv[0]["value"].startswith("<image>\n")
        assert sum(c["value"].count("<image>") for c in conv) == 1
        assert [c["value"] for c in conv[1::2]] == [a for _, a, _ in turns]
        with Image.open(tmp_path / rec["image"]) as im:
            assert im.size == (84, 84)
    with pytest.raises(ValueError, match="max_turns"):
        S.conversations(3, max_turns=6)
    with pytest.raises(ValueError, match="kind='qa'"):
        S.write_dataset(tmp_path, 3, kind="caption", max_turns=2)


def test_eval_items():
    items = S.eval_items(20, seed=0, phrasing="heldout")
    assert len(items) == 20
    image, question, answer, qtype = items[0]
    assert isinstance(image, Image.Image) and image.size == (56, 56)
    assert "<image>" not in question and qtype in S.QTYPES
    assert Counter(t for *_, t in items) == {t: 4 for t in S.QTYPES}


@pytest.mark.parametrize(
    "text, expected, qtype",
    [
        ("red", "red", "colour"),
        ("It is Red.", "red", "color"),
        ("The shape is violet", "purple", "colour"),
        ("three", "3", "count"),
        ("There are 3 shapes.", "3", "count"),
        ("Four", "4", "count"),
        ("On the left.", "left", "position"),
        ("in the middle", "center", "position"),
        ("centre", "center", "position"),
        ("Yes, there is.", "yes", "existence"),
        ("No", "no", "existence"),
        ("a triangle", "triangle", "shape"),
        ("Circles", "circle", "shape"),
    ],
)
def test_score_accepts_correct_variants(text, expected, qtype):
    assert S.score(text, expected, qtype)


@pytest.mark.parametrize(
    "text, expected, qtype",
    [
        ("blue", "red", "colour"),
        ("red or blue", "red", "colour"),
        ("reddish", "red", "colour"),
        ("2", "3", "count"),
        ("3 or 4", "3", "count"),
        ("top left", "left", "position"),
        ("right", "left", "position"),
        ("yes and no", "yes", "existence"),
        ("not sure", "no", "existence"),
        ("", "yes", "existence"),
        ("square", "circle", "shape"),
    ],
)
def test_score_rejects_wrong_answers(text, expected, qtype):
    assert not S.score(text, expected, qtype)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="split"):
        S.generate(1, split="holdout")
    with pytest.raises(ValueError, match="phrasing"):
        S.generate(1, phrasing="test")
    with pytest.raises(ValueError, match="kind"):
        S.write_dataset(tmp_path, 1, kind="vqa")
    with pytest.raises(ValueError, match="qtype"):
        S.score("red", "red", "size")


def test_weighted_conversations_follow_the_shares_and_never_repeat_a_question():
    weights = {"colour": 2, "shape": 1, "count": 1, "position": 3, "existence": 3}
    convs = S.conversations(2000, seed=4, max_turns=3, weights=weights)
    assert convs == S.conversations(2000, seed=4, max_turns=3, weights=weights)  # deterministic
    counts = Counter(t for _, turns in convs for _, _, t in turns)
    total = sum(counts.values())
    for qtype, w in weights.items():  # within a few points of the asked share
        assert abs(counts[qtype] / total - w / 10) < 0.04, (qtype, counts)
    firsts = Counter(turns[0][2] for _, turns in convs)
    assert firsts["position"] == firsts["existence"] == 3 * firsts["shape"]
    yes_no = Counter(a for _, turns in convs for _, a, t in turns if t == "existence")
    assert abs(yes_no["yes"] - yes_no["no"]) < 0.1 * sum(yes_no.values())
    for scene, turns in convs:
        assert 1 <= len(turns) <= 3
        assert len({q for q, _, _ in turns}) == len(turns)  # no question twice
        exist = [a for _, a, t in turns if t == "existence"]
        assert len(exist) <= 2 and len(set(exist)) == len(exist)  # a pair is one yes, one no
        for qtype in ("colour", "shape", "position"):  # a repeat is about another object
            asked = [q for q, _, t in turns if t == qtype]
            assert len(asked) <= len(scene.objects)
        for question, answer, qtype in turns:
            if qtype == "existence":
                (colour,), (shape,) = (
                    _mentioned(question, S.COLOURS),
                    _mentioned(question, S.SHAPES),
                )
                present = any(o.colour == colour and o.shape == shape for o in scene.objects)
                assert answer == ("yes" if present else "no")
    with pytest.raises(ValueError, match="weights"):
        S.conversations(3, weights={"size": 1})
