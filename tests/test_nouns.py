"""Nouns of VGGSound-like labels: the objects Grounding DINO is asked to find."""

from __future__ import annotations

import pytest

from preprocess import nouns as nouns_module
from preprocess.nouns import NounCache, TaggerUnavailableError, caption_nouns, nouns_from_tags

LABELS = {
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


@pytest.mark.parametrize("label, expected", LABELS.items())
def test_nouns_of_vggsound_labels(label, expected):
    assert caption_nouns(label, tagger="pattern") == expected


def test_max_nouns_keeps_the_first_ones():
    assert caption_nouns("railroad car, train wagon", max_nouns=2) == ["railroad", "car"]


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
    finally:
        nouns_module.get_tagger.cache_clear()


def test_each_caption_is_tagged_once(monkeypatch):
    calls = []
    real = nouns_module.caption_nouns
    monkeypatch.setattr(nouns_module, "caption_nouns", lambda c, t, m: calls.append(c) or real(c, t, m))
    cache = NounCache("pattern", 4)
    assert [cache("dog barking") for _ in range(3)] == [["dog"]] * 3
    assert calls == ["dog barking"]
