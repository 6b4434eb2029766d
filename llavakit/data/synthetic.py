"""Synthetic shape scenes: images, captions and short-answer questions for the demo model.

Why synthetic: every answer is known exactly, so a tiny model trained on CPU can be checked per
question type (colour, shape, count, position, existence) on held-out scenes and phrasings.

Layout: a 3x3 grid whose middle cell and four edge-middle cells are ``center``, ``left``,
``right``, ``top``, ``bottom``; corners stay empty. So each position is one word and objects never
overlap. A scene has 1-4 objects at distinct positions with distinct (colour, shape) pairs, so
"the red square" always names one object.

Splits are disjoint by construction: a scene's canonical key is hashed into 10 buckets (0-7
train, 8 val, 9 test) and generators reject other splits' scenes, so no picture is in two splits.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 80, 230),
    "yellow": (235, 200, 0),
    "purple": (140, 40, 180),
    "orange": (255, 130, 0),
}
COLOURS = tuple(PALETTE)
SIZES = ("small", "large")
POSITIONS = ("top", "left", "center", "right", "bottom")  # also the caption order
QTYPES = ("colour", "shape", "count", "position", "existence")
SPLITS = {"train": range(0, 8), "val": range(8, 9), "test": range(9, 10)}
MAX_OBJECTS = 4
BACKGROUND = (240, 240, 235)

_BASE = 56.0  # geometry is designed at 56 px and scaled to the requested size
_CELL = _BASE / 3
_CENTRES = {
    "top": (1.5 * _CELL, 0.5 * _CELL),
    "left": (0.5 * _CELL, 1.5 * _CELL),
    "center": (1.5 * _CELL, 1.5 * _CELL),
    "right": (2.5 * _CELL, 1.5 * _CELL),
    "bottom": (1.5 * _CELL, 2.5 * _CELL),
}
_RADIUS = {"small": 5.5, "large": 7.5}  # px at 56; a cell is 18.7 px wide
_JITTER = {"small": 2, "large": 1}  # max integer offset, keeps shapes inside their cell
_SUPERSAMPLE = 4
_POS_PHRASE = {
    "top": "at the top",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom": "at the bottom",
}

# Templates: {ref} is a referring expression ("circle", "red square", "object on the left"),
# {a_ref} the same with its article ("a red square", "an orange circle").
TRAIN_PHRASINGS: dict[str, tuple[str, ...]] = {
    "colour": (
        "What colour is the {ref}?",
        "What color is the {ref}?",
        "What is the colour of the {ref}?",
        "What is the color of the {ref}?",
        "Which colour is the {ref}?",
        "Tell me the colour of the {ref}.",
        "Name the color of the {ref}.",
    ),
    "shape": (
        "What shape is the {ref}?",
        "What is the shape of the {ref}?",
        "Which shape is the {ref}?",
        "What kind of shape is the {ref}?",
        "Tell me the shape of the {ref}.",
        "Name the shape of the {ref}.",
    ),
    "count": (
        "How many shapes are there?",
        "How many objects are there?",
        "How many shapes are in the image?",
        "How many objects can you see?",
        "What is the number of shapes?",
        "How many shapes do you see in the picture?",
    ),
    "position": (
        "Where is the {ref}?",
        "Where is the {ref} located?",
        "What is the position of the {ref}?",
        "In which part of the image is the {ref}?",
        "Where can the {ref} be found?",
        "Where in the image is the {ref}?",
    ),
    "existence": (
        "Is there {a_ref}?",
        "Is there {a_ref} in the image?",
        "Does the image contain {a_ref}?",
        "Can you see {a_ref}?",
        "Is {a_ref} present?",
        "Is there {a_ref} in the picture?",
    ),
}
HELDOUT_PHRASINGS: dict[str, tuple[str, ...]] = {
    "colour": (
        "Which colour does the {ref} have?",
        "The {ref} is what colour?",
        "Identify the color of the {ref}.",
    ),
    "shape": (
        "Which shape does the {ref} have?",
        "The {ref} is what shape?",
        "Identify the shape of the {ref}.",
    ),
    "count": (
        "Count the objects.",
        "What is the total number of shapes in the picture?",
        "How many things are drawn here?",
    ),
    "position": (
        "Tell me where the {ref} is.",
        "In what part of the picture is the {ref}?",
        "Locate the {ref}.",
    ),
    "existence": (
        "Do you see {a_ref}?",
        "Is there any {ref} in this picture?",
        "Does this picture show {a_ref}?",
    ),
}
CAPTION_REQUESTS = {
    "train": (
        "Describe the image.",
        "Describe the image briefly.",
        "Give a short description of the image.",
        "Write a one-sentence description of the picture.",
        "Describe this picture in one sentence.",
    ),
    "heldout": ("Write a caption for this picture.", "Summarise what you see in one sentence."),
}


@dataclass(frozen=True)
class SceneObject:
    """One shape; ``offset`` is an integer jitter in px at 56 px (scaled with the image)."""

    shape: str
    colour: str
    size: str
    position: str
    offset: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if self.shape not in SHAPES or self.colour not in PALETTE or self.size not in SIZES:
            raise ValueError(f"unknown shape/colour/size in {self}")
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {self.position!r}")
        if max(abs(self.offset[0]), abs(self.offset[1])) > _JITTER[self.size]:
            raise ValueError(f"offset {self.offset} too large for a {self.size} object")

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """1-4 objects at distinct positions with distinct (colour, shape) pairs."""

    objects: tuple[SceneObject, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"a scene has 1 to {MAX_OBJECTS} objects, got {len(self.objects)}")
        if len({o.position for o in self.objects}) != len(self.objects):
            raise ValueError("two objects share a position")
        if len({o.name for o in self.objects}) != len(self.objects):
            raise ValueError("two objects share colour and shape")

    def key(self) -> tuple:
        """Canonical, order-independent description: equal keys render equal images."""
        return tuple(
            sorted((o.position, o.shape, o.colour, o.size, o.offset) for o in self.objects)
        )

    @property
    def split(self) -> str:
        digest = hashlib.blake2b(repr(self.key()).encode(), digest_size=8).digest()
        bucket = int.from_bytes(digest, "big") % 10
        return next(name for name, buckets in SPLITS.items() if bucket in buckets)

    def caption(self) -> str:
        """One sentence, objects in POSITIONS order: "A large red circle on the left and ..."."""
        ordered = sorted(self.objects, key=lambda o: POSITIONS.index(o.position))
        parts = [f"a {o.size} {o.name} {_POS_PHRASE[o.position]}" for o in ordered]
        text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return text[0].upper() + text[1:] + "."


def object_center(obj: SceneObject, size: int = 56) -> tuple[float, float]:
    """Centre of ``obj`` in pixels of a ``size`` image (the pixel there has the pure colour)."""
    cx, cy = _CENTRES[obj.position]
    scale = size / _BASE
    return (cx + obj.offset[0]) * scale, (cy + obj.offset[1]) * scale


def render_scene(scene: Scene, size: int = 56) -> Image.Image:
    """Draw at 4x and box-downsample: clean anti-aliased edges, pure colours inside shapes."""
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        cx, cy = (v * _SUPERSAMPLE for v in object_center(obj, size))
        r = _RADIUS[obj.size] * big / _BASE
        fill = PALETTE[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif obj.shape == "square":
            h = 0.88 * r  # about the circle's area
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        else:
            draw.polygon(
                [(cx, cy - r), (cx - r, cy + 0.85 * r), (cx + r, cy + 0.85 * r)], fill=fill
            )
    return image.reduce(_SUPERSAMPLE)


def random_scene(rng: np.random.Generator, split: str | None = None) -> Scene:
    """A uniform 1-4 object scene; with ``split``, only scenes belonging to that split."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    while True:
        n = int(rng.integers(1, MAX_OBJECTS + 1))
        positions = rng.permutation(len(POSITIONS))[:n]
        pairs = rng.permutation(len(COLOURS) * len(SHAPES))[:n]
        sizes = rng.integers(0, 2, n)
        jitter = rng.random((n, 2))
        objects = []
        for pos, pair, s, (dx, dy) in zip(positions, pairs, sizes, jitter, strict=True):
            size = SIZES[s]
            j = _JITTER[size]
            offset = (int(dx * (2 * j + 1)) - j, int(dy * (2 * j + 1)) - j)
            colour, shape = COLOURS[pair // len(SHAPES)], SHAPES[pair % len(SHAPES)]
            objects.append(SceneObject(shape, colour, size, POSITIONS[pos], offset))
        scene = Scene(tuple(objects))
        if split is None or scene.split == split:
            return scene


def _article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _referents(scene: Scene, obj: SceneObject, without: str) -> list[str]:
    """Expressions naming ``obj`` uniquely without using the attribute being asked about."""
    single = len(scene.objects) == 1
    shapes = [o.shape for o in scene.objects]
    colours = [o.colour for o in scene.objects]
    where = _POS_PHRASE[obj.position]
    if without == "colour":
        refs = ["shape", "object"] if single else [f"object {where}", f"{obj.shape} {where}"]
        return refs + [obj.shape] * (2 if shapes.count(obj.shape) == 1 else 0)
    if without == "shape":
        refs = ["object"] if single else [f"object {where}"]
        return refs + [f"{obj.colour} object"] * (colours.count(obj.colour) == 1)
    refs = ["shape", "object"] if single else []  # position: name it by colour and shape
    return refs + [obj.name] * 2 + [obj.shape] * (shapes.count(obj.shape) == 1)


def ask(
    scene: Scene,
    qtype: str,
    rng: np.random.Generator,
    phrasing: str = "train",
    want: str | None = None,
    obj: SceneObject | None = None,
) -> tuple[str, str]:
    """One (question, answer) of ``qtype`` about ``scene``; answers are one or two words.

    ``want`` ("yes" / "no") fixes an existence answer; ``obj`` picks the object a colour,
    shape or position question is about (default: a random one).
    """
    templates = _phrasings(phrasing)[qtype]
    template = _pick(rng, templates)
    if qtype == "count":
        return template, str(len(scene.objects))
    if qtype == "existence":
        present = {o.name for o in scene.objects}
        if want == "yes" or (want is None and rng.random() < 0.5):
            name, answer = _pick(rng, sorted(present)), "yes"
        else:  # half the negatives share a colour or a shape with the scene: binding matters
            absent = [f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in present]
            near = [a for a in absent if any(w in a.split() for p in present for w in p.split())]
            name, answer = _pick(rng, near if near and rng.random() < 0.5 else absent), "no"
        return template.format(ref=name, a_ref=_article(name)), answer
    if obj is None:
        obj = scene.objects[int(rng.integers(len(scene.objects)))]
    ref = _pick(rng, _referents(scene, obj, qtype))
    answer = {"colour": obj.colour, "shape": obj.shape, "position": obj.position}[qtype]
    return template.format(ref=ref, a_ref=_article(ref)), answer


def _weighted_turns(
    scene: Scene, first: str, n: int, p: dict[str, float], rng: np.random.Generator, phrasing: str
) -> list[tuple[str, str, str]]:
    """``n`` turns: ``first``, then types drawn with probabilities ``p``. A type may come back
    about another object (colour, shape, position) or with the other answer (existence: a
    "no" after a "yes"); a turn with nothing new to ask is dropped."""
    types = list(p)
    draws = [first] + [types[k] for k in rng.choice(len(types), n - 1, p=list(p.values()))]
    asked: dict[str, list] = {}
    turns = []
    for qtype in draws:
        seen = asked.setdefault(qtype, [])
        if qtype == "count" and seen or qtype == "existence" and len(seen) == 2:
            continue
        if qtype == "existence":
            want = {"yes": "no", "no": "yes"}[seen[0]] if seen else None
            question, answer = ask(scene, qtype, rng, phrasing, want=want)
            seen.append(answer)
        elif qtype == "count":
            question, answer = ask(scene, qtype, rng, phrasing)
            seen.append(answer)
        else:
            left = [o for o in scene.objects if o not in seen]
            if not left:
                continue
            obj = left[int(rng.integers(len(left)))]
            question, answer = ask(scene, qtype, rng, phrasing, obj=obj)
            seen.append(obj)
        turns.append((question, answer, qtype))
    return turns


def _phrasings(phrasing: str) -> dict[str, tuple[str, ...]]:
    if phrasing not in ("train", "heldout"):
        raise ValueError(f"phrasing must be 'train' or 'heldout', got {phrasing!r}")
    return TRAIN_PHRASINGS if phrasing == "train" else HELDOUT_PHRASINGS


def _rng(seed: int, split: str, kind: str) -> np.random.Generator:
    """Independent stream per (seed, split, kind)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    tag = int.from_bytes(hashlib.blake2b(f"{split}/{kind}".encode(), digest_size=4).digest(), "big")
    return np.random.default_rng([seed, tag])


def generate(
    n: int, seed: int = 0, split: str = "train", kind: str = "qa", phrasing: str = "train"
) -> list[tuple[Scene, str, str, str]]:
    """``n`` (scene, question, answer, qtype) tuples; QA types cycle so each gets n/5."""
    if kind not in ("qa", "caption"):
        raise ValueError(f"kind must be 'qa' or 'caption', got {kind!r}")
    rng = _rng(seed, split, kind)
    _phrasings(phrasing)
    out = []
    for i in range(n):
        scene = random_scene(rng, split)
        if kind == "caption":
            out.append((scene, _pick(rng, CAPTION_REQUESTS[phrasing]), scene.caption(), "caption"))
        else:
            qtype = QTYPES[i % len(QTYPES)]
            out.append((scene, *ask(scene, qtype, rng, phrasing), qtype))
    return out


def conversations(
    n: int,
    seed: int = 0,
    split: str = "train",
    max_turns: int = 3,
    phrasing: str = "train",
    weights: dict[str, float] | None = None,
) -> list[tuple[Scene, list[tuple[str, str, str]]]]:
    """``n`` scenes, each with 1..max_turns (question, answer, qtype) turns of distinct types.

    Multi-turn records (as in LLaVA-Instruct) supervise several answers per image for the
    cost of encoding it once. The first turn's type cycles, so each type gets its share.
    ``weights`` (question type -> relative share) replaces equal shares: first turns cycle
    through the types in that proportion, later turns are drawn with it, and a type may come
    back about another object or, for existence, with the opposite answer (see
    ``_weighted_turns``).
    """
    if not 1 <= max_turns <= len(QTYPES):
        raise ValueError(f"max_turns must be 1..{len(QTYPES)}, got {max_turns}")
    if weights is not None and (set(weights) - set(QTYPES) or min(weights.values()) < 0):
        raise ValueError(f"weights must map question types {QTYPES} to shares >= 0: {weights}")
    tag = f"conversation{max_turns}" + ("" if weights is None else f"w{sorted(weights.items())}")
    rng = _rng(seed, split, tag)
    _phrasings(phrasing)
    if weights is not None:
        total = sum(weights.values())
        p = {t: w / total for t, w in weights.items()}
        cycle = [t for t in QTYPES for _ in range(round(weights.get(t, 0) * 10))]
    out = []
    for i in range(n):
        scene = random_scene(rng, split)
        if weights is not None:
            turns = int(rng.integers(1, max_turns + 1))
            qa = _weighted_turns(scene, cycle[i % len(cycle)], turns, p, rng, phrasing)
            out.append((scene, qa))
            continue
        first = QTYPES[i % len(QTYPES)]
        others = [QTYPES[j] for j in rng.permutation(len(QTYPES)) if QTYPES[j] != first]
        turns = int(rng.integers(1, max_turns + 1))
        qtypes = [first, *others[: turns - 1]]
        out.append((scene, [(*ask(scene, t, rng, phrasing), t) for t in qtypes]))
    return out


def llava_record(ident: str, image: str, question: str | None, answer: str) -> dict:
    """A LLaVA conversation; ``question=None`` gives the stage-1 plain style ("<image>" only)."""
    human = "<image>" if question is None else "<image>\n" + question
    return {
        "id": ident,
        "image": image,
        "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}],
    }


def write_json(path: Path, records: list[dict]) -> Path:
    """One JSON list, as the LLaVA loaders expect (not JSON lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def write_dataset(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    split: str = "train",
    kind: str = "qa",
    phrasing: str = "train",
    size: int = 56,
    plain: bool = False,
    max_turns: int = 1,
    weights: dict[str, float] | None = None,
) -> Path:
    """Write PNGs to out_dir/images and return the LLaVA JSON (image paths relative to out_dir).

    ``plain=True`` (captions only) leaves the human turn as bare "<image>" for stage 1;
    ``max_turns > 1`` (QA only) writes multi-turn conversations (see ``conversations``, which
    also takes ``weights``).
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    stem = f"synthetic_{kind}_{split}_s{seed}" + ("_heldout" if phrasing == "heldout" else "")
    records = []
    if max_turns > 1:
        if kind != "qa":
            raise ValueError("max_turns > 1 needs kind='qa'")
        stem += f"_t{max_turns}" + ("_w" if weights else "")
        convs = conversations(n, seed, split, max_turns, phrasing, weights)
        for i, (scene, turns) in enumerate(convs):
            ident = f"{stem}_{i:06d}"
            render_scene(scene, size).save(out / "images" / f"{ident}.png", compress_level=1)
            record = llava_record(ident, f"images/{ident}.png", turns[0][0], turns[0][1])
            for question, answer, _ in turns[1:]:
                record["conversations"] += [
                    {"from": "human", "value": question},
                    {"from": "gpt", "value": answer},
                ]
            records.append(record)
        return write_json(out / f"{stem}.json", records)
    for i, (scene, question, answer, _) in enumerate(generate(n, seed, split, kind, phrasing)):
        ident = f"{stem}_{i:06d}"
        render_scene(scene, size).save(out / "images" / f"{ident}.png", compress_level=1)
        question = None if plain and kind == "caption" else question
        records.append(llava_record(ident, f"images/{ident}.png", question, answer))
    return write_json(out / f"{stem}.json", records)


def eval_items(
    n: int, seed: int = 0, phrasing: str = "heldout", split: str = "test", size: int = 56
) -> list[tuple[Image.Image, str, str, str]]:
    """(image, question without "<image>", answer, qtype) on held-out scenes, n/5 per type."""
    return [
        (render_scene(scene, size), q, a, t)
        for scene, q, a, t in generate(n, seed, split, "qa", phrasing)
    ]


_NUMBER_WORDS = "zero one two three four five six seven eight nine ten".split()
_CANON = {w: str(i) for i, w in enumerate(_NUMBER_WORDS)}
_CANON.update({"centre": "center", "middle": "center", "upper": "top", "lower": "bottom"})
_CANON.update({"violet": "purple", "yeah": "yes", "yep": "yes", "nope": "no"})
_CANON.update({f"{s}s": s for s in SHAPES})
_VOCAB = {"colour": set(COLOURS), "shape": set(SHAPES), "position": set(POSITIONS)}
_VOCAB.update(count={str(i) for i in range(11)}, existence={"yes", "no"})


def _words(text: str) -> list[str]:
    return [_CANON.get(w, w) for w in re.findall(r"[a-z0-9]+", text.lower())]


def score(answer_text: str, expected: str, qtype: str) -> bool:
    """Lenient match: the expected word appears and no other answer of that type does.

    Case, punctuation, "three" vs "3", "centre"/"middle" vs "center" and plurals are ignored;
    "red or blue" is wrong for a colour question (naming two candidates is not an answer).
    """
    qtype = "colour" if qtype == "color" else qtype
    if qtype not in _VOCAB:
        raise ValueError(f"qtype must be one of {QTYPES}, got {qtype!r}")
    target = " ".join(_words(expected))
    found = set(_words(answer_text)) & _VOCAB[qtype]
    return found == {target}
