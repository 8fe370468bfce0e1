"""Nouns of captions: the objects Grounding DINO is asked to find (VGGSound labels from a reviewed table)."""

from __future__ import annotations

import hashlib
import itertools
import json

import pytest

from preprocess import nouns as nouns_module
from preprocess.config import PRESETS
from preprocess.demo import PHRASES
from preprocess.nouns import (
    LABEL_NOUNS_FILE,
    NounCache,
    TaggerUnavailableError,
    caption_key,
    caption_nouns,
    label_nouns,
    nouns_from_tags,
    read_label_nouns,
    tagged_nouns,
)

LABELS_FILE = LABEL_NOUNS_FILE.parent / "vggsound_labels.txt"

# What the offline tagger (with our corrections) makes of label-like phrases.
TAGGED = {
    "dog barking": ["dog"],
    "playing acoustic guitar": ["guitar"],
    "car engine knocking": ["car", "engine"],
    "male speech, man speaking": ["speech", "man"],
    "people marching": ["people"],
    "bell ringing and drum beating": ["bell", "drum"],
    "mouse squeaking": ["mouse"],
    "typing on computer keyboard": ["computer", "keyboard"],
    "playing bass drum": ["bass", "drum"],
    "ceiling fan noise": ["ceiling", "fan", "noise"],
    "race car, auto racing": ["race", "car", "auto"],
    "helicopter": ["helicopter"],
    "chainsawing trees": ["trees"],
    "female singing": [],
}

# Rows of the reviewed table, checked by hand against what a picture of each sound shows.
REVIEWED = {
    "playing drum kit": ["drum kit"],
    "skateboarding": ["skateboard"],
    "dog barking": ["dog"],
    "people whistling": ["people"],
    "lions roaring": ["lion"],
    "female singing": ["woman"],
    "male speech, man speaking": ["man"],
    "mouse clicking": ["computer mouse"],
    "mouse squeaking": ["mouse"],
    "typing on computer keyboard": ["computer keyboard"],
    "playing bass drum": ["bass drum"],
    "chainsawing trees": ["chainsaw", "tree"],
    "cattle, bovinae cowbell": ["cowbell", "cattle"],
    "hammering nails": ["hammer", "nail"],
    "police car (siren)": ["police car", "siren"],
    "playing tennis": ["tennis racket", "tennis ball"],
    "raining": ["rain"],
}


def label_lines() -> list[str]:
    return LABELS_FILE.read_text(encoding="utf-8").splitlines()


@pytest.mark.parametrize("caption, expected", TAGGED.items())
def test_the_tagger_finds_nouns_of_label_like_phrases(caption, expected):
    assert tagged_nouns(caption, tagger="pattern") == expected


def test_tagged_max_nouns_keeps_the_first_ones():
    assert tagged_nouns("railroad car, train wagon", max_nouns=2) == ["railroad", "car"]


def test_the_table_covers_exactly_the_vggsound_labels_in_order():
    labels = label_lines()
    assert len(labels) == 309
    assert list(label_nouns()) == [caption_key(label) for label in labels]
    rows = [line.split("\t") for line in LABEL_NOUNS_FILE.read_text(encoding="utf-8").splitlines()
            if not line.startswith("#")]
    assert [label for label, _ in rows] == labels  # the file spells each label as vggsound_labels.txt does
    for label, nouns in label_nouns().items():
        assert 1 <= len(nouns) <= 4 and len(set(nouns)) == len(nouns), label
        assert all(n == n.strip().lower() and n for n in nouns), label


def test_the_table_starts_with_a_comment_saying_what_it_is():
    first = LABEL_NOUNS_FILE.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("#") and "VGGSound" in first


@pytest.mark.parametrize("label, expected", REVIEWED.items())
def test_reviewed_rows(label, expected):
    assert caption_nouns(label) == expected


def test_a_label_up_to_case_and_whitespace_uses_the_table(monkeypatch):
    def no_tagger(name):
        raise AssertionError("the tagger must not run for a VGGSound label")

    monkeypatch.setattr(nouns_module, "get_tagger", no_tagger)
    assert caption_nouns("  Playing   DRUM\tkit ") == ["drum kit"]
    assert caption_nouns("Skateboarding\n", tagger="nltk") == ["skateboard"]


def test_free_text_uses_the_tagger():
    for caption in ("a dog barking at the mailman", "ball bouncing", "playing drum kit loudly"):
        assert caption_key(caption) not in label_nouns()
        assert caption_nouns(caption) == tagged_nouns(caption)
    assert caption_nouns("playing drum kit loudly") != ["drum kit"]


def test_words_of_any_script_stay_whole_and_a_possessive_is_its_noun():
    """Only ASCII letters made words: "café" was the noun "caf", "piñata" the nouns "pi" and "ata" (each grounded and
    embedded); "dog's" was a noun of its own beside "dog"."""
    from preprocess.nouns import tokenize

    assert tokenize("Café crowd at the piñata; Zürich's fjord, the dogs' bowl") == [
        "café", "crowd", "at", "the", "piñata", "zürich", "fjord", "the", "dogs", "bowl"]
    assert tagged_nouns("café crowd cheering at the piñata") == ["café", "crowd", "piñata"]
    # combining vowel signs stay inside their word (not one-letter fragments); decomposed accents are composed
    assert tokenize("हिन्दी गाना") == ["हिन्दी", "गाना"] and tokenize("cafe\u0301") == ["café"]
    assert tagged_nouns("dog's bark, a dog") == ["dog", "bark"]


def test_max_nouns_caps_table_nouns():
    assert caption_nouns("forging swords") == ["sword", "hammer", "anvil"]
    assert caption_nouns("forging swords", max_nouns=2) == ["sword", "hammer"]
    assert caption_nouns("forging swords", max_nouns=1) == ["sword"]
    assert NounCache("pattern", 1)("rowboat, canoe, kayak rowing") == ["rowboat"]


def test_demo_captions_are_free_text():
    # the demo's shards keep their tagged nouns only while no demo caption is a VGGSound label
    for count in range(1, len(PHRASES) + 1):
        for kinds in itertools.permutations(PHRASES.values(), count):
            assert caption_key(" and ".join(kinds)) not in label_nouns()


def test_generate_vocabulary_comes_from_the_table(monkeypatch):
    from vta_sam.generate import vocabulary

    expected: list[str] = []
    for line in LABEL_NOUNS_FILE.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            expected.extend(n for n in line.split("\t")[1].split(", ") if n not in expected)
    monkeypatch.setattr(nouns_module, "get_tagger", lambda name: pytest.fail("vocabulary ran the tagger"))
    words = vocabulary("nltk")
    assert words == expected
    assert len(words) == len(set(words))
    assert {"drum kit", "skateboard", "computer mouse"} <= set(words) and "kit" not in words


@pytest.mark.parametrize("text, reason", [
    ("dog barking dog\n", "expected 'label<TAB>noun, noun'"),
    ("dog barking\t\n", "expected 'label<TAB>noun, noun'"),
    ("dog barking\tdog\nDog  barking\tdog\n", "listed twice"),
    ("band\ta, b, c, d, e\n", "has 5 nouns, at most 4 allowed"),
    ("dog barking\tdog, dog\n", "lists a noun twice"),
])
def test_a_damaged_table_is_one_line_naming_the_file(tmp_path, text, reason):
    path = tmp_path / "nouns.tsv"
    path.write_text("# a comment\n" + text, encoding="utf-8")
    with pytest.raises(ValueError, match=r"nouns\.tsv:\d+: .*") as error:
        read_label_nouns(path)
    assert reason in str(error.value) and "\n" not in str(error.value)


def test_stage_one_meta_records_the_table_without_refusing_older_folders(tmp_path):
    from preprocess.pipeline import build_meta, prepare_output

    meta = build_meta(PRESETS["tiny"], {"clip": "c", "grounding": "g", "vae": "v"}, 0.5)
    assert meta["label_nouns"]["sha256"] == hashlib.sha256(LABEL_NOUNS_FILE.read_bytes()).hexdigest()
    older = {key: value for key, value in meta.items() if key != "label_nouns"}
    (tmp_path / "meta.json").write_text(json.dumps(older), encoding="utf-8")
    prepare_output(tmp_path, meta, rank=0)  # a folder written before the table existed is still accepted
    edited = meta | {"label_nouns": {"file": LABEL_NOUNS_FILE.name, "sha256": "0" * 64}}
    prepare_output(tmp_path, edited, rank=0)


def test_corrections_apply_to_any_tagger_output():
    # a bare verb before a gerund is a noun; an -ing word after a noun is not
    assert nouns_from_tags([("drum", "VB"), ("beating", "VBG")]) == ["drum"]
    assert nouns_from_tags([("mouse", "NN"), ("squeaking", "NN")]) == ["mouse"]
    assert nouns_from_tags([("string", "NN"), ("quartet", "NN")]) == ["string", "quartet"]


def test_missing_nltk_data_says_how_to_install(monkeypatch):
    import nltk

    def not_found(*args, **kwargs):
        raise LookupError("not found")

    monkeypatch.setattr(nltk.data, "find", not_found)
    nouns_module.get_tagger.cache_clear()
    try:
        with pytest.raises(TaggerUnavailableError, match=r"nltk.downloader averaged_perceptron_tagger_eng.*--tagger pattern"):
            NounCache("nltk", 4)
        with pytest.raises(TaggerUnavailableError):  # a run with one free-text caption needs it at once
            NounCache("nltk", 4, ["Dog barking", "a man hammers a nail"])
        # a run whose captions are all VGGSound labels takes its nouns from the table: no tagger needed (the paper
        # preset stopped for nltk's data that no VGGSound clip uses)
        cache = NounCache("nltk", 4, ["Dog barking", "  air conditioning   noise"])
        assert cache("dog barking") == ["dog"] and cache("air conditioning noise") == ["air conditioner"]
    finally:
        nouns_module.get_tagger.cache_clear()


def test_each_caption_is_tagged_once(monkeypatch):
    calls = []
    real = nouns_module.caption_nouns
    monkeypatch.setattr(nouns_module, "caption_nouns", lambda c, t, m: calls.append(c) or real(c, t, m))
    cache = NounCache("pattern", 4)
    assert [cache("dog barking") for _ in range(3)] == [["dog"]] * 3
    assert calls == ["dog barking"]
