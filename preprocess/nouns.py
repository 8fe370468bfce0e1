"""Nouns of a caption: the objects that Grounding DINO is asked to find ("dog barking" -> dog).

The paper tags captions with nltk. nltk's tagger is a separate data download; where it is missing we
stop with the command that installs it. textblob's PatternTagger tags offline from a lexicon that
ships with textblob, and is the explicit choice of the `tiny` preset and the tests.

VGGSound's captions are its 309 class labels, phrases that taggers handle poorly ("skateboarding" has no noun
for them, "playing drum kit" gives "kit"). A caption that is exactly one of those labels (up to case and
whitespace) takes its nouns from a table reviewed by hand (assets/vggsound_label_nouns.tsv); the tagger only
handles free text.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path

from common.weights import sha256_file

NOUN_TAGS = frozenset({"NN", "NNS", "NNP", "NNPS"})
VERB_TAGS = frozenset({"VB", "VBP", "VBZ"})
NLTK_TAGGER_RESOURCE = "averaged_perceptron_tagger_eng"
# -ing words that name things; any other -ing word opening a label is its action ("playing bass drum")
ING_NOUNS = frozenset(
    "building ceiling clothing evening king morning painting pudding railing ring sling spring sting string "
    "swing thing wedding wing".split()
)

LABEL_NOUNS_FILE = Path(__file__).resolve().parent / "assets" / "vggsound_label_nouns.tsv"
MAX_TABLE_NOUNS = 4

Tagger = Callable[[list[str]], list[tuple[str, str]]]


class TaggerUnavailableError(RuntimeError):
    """The chosen part-of-speech tagger cannot run here (missing data)."""


def tokenize(caption: str) -> list[str]:
    """Lower-cased words of any script ("café", not "caf"; the combining vowel signs of Devanagari or Thai inside
    a word), a possessive's "'s" or "'" dropped ("dog's" is "dog"); punctuation splits clauses ("male speech, man
    speaking"). A word starts with a letter and goes on with letters, combining marks, apostrophes and hyphens."""
    words: list[str] = []
    current: list[str] = []
    for char in unicodedata.normalize("NFC", caption.lower()) + " ":
        kind = unicodedata.category(char)
        if kind.startswith("L") or (current and (kind.startswith("M") or char in "'-")):
            current.append(char)
        elif current:
            words.append(re.sub(r"'s?$", "", "".join(current)))
            current = []
    return [word for word in words if word]


def _nltk_tagger() -> Tagger:
    import nltk

    try:
        nltk.data.find(f"taggers/{NLTK_TAGGER_RESOURCE}/")
    except LookupError:
        raise TaggerUnavailableError(
            f"nltk's tagger data '{NLTK_TAGGER_RESOURCE}' is not installed: run "
            f"`python -m nltk.downloader {NLTK_TAGGER_RESOURCE}` (needs network), "
            "or choose textblob's offline tagger with `--tagger pattern`"
        ) from None
    return lambda words: nltk.pos_tag(words)


def _pattern_tagger() -> Tagger:
    from textblob.en.taggers import PatternTagger

    tagger = PatternTagger()
    return lambda words: [(w, t) for w, t in tagger.tag(" ".join(words), tokenize=False)]


@lru_cache(maxsize=2)
def get_tagger(name: str) -> Tagger:
    if name == "nltk":
        return _nltk_tagger()
    if name == "pattern":
        return _pattern_tagger()
    raise ValueError(f"unknown tagger {name!r} (choose 'nltk' or 'pattern')")


def nouns_from_tags(tagged: list[tuple[str, str]]) -> list[str]:
    """Distinct nouns in order of appearance.

    VGGSound labels are mostly "<noun> <verb>ing" or "<verb>ing <noun>" phrases, which taggers
    trained on sentences mis-tag; we correct three patterns: a bare verb right before a gerund or
    closing a noun phrase is a noun ("drum beating", "bass drum": drum/VB -> noun); an -ing word
    right after a noun is its action ("mouse squeaking": squeaking/NN -> not a noun); an -ing word
    opening a longer label is its action ("typing on computer keyboard"), unless it names a thing.
    """
    nouns: list[str] = []
    last = len(tagged) - 1
    for i, (word, tag) in enumerate(tagged):
        next_tag = tagged[i + 1][1] if i < last else ""
        prev_tag = tagged[i - 1][1] if i > 0 else ""
        prev_is_noun = i > 0 and tagged[i - 1][0] in nouns
        closes_phrase = i == last and prev_tag in NOUN_TAGS | {"JJ"}
        is_noun = tag in NOUN_TAGS or (tag in VERB_TAGS and (next_tag == "VBG" or closes_phrase))
        if is_noun and word.endswith("ing") and word not in ING_NOUNS and (prev_is_noun or (i == 0 and last > 0)):
            is_noun = False
        if is_noun and len(word) > 1 and word not in nouns:
            nouns.append(word)
    return nouns


def caption_key(caption: str) -> str:
    """How captions are matched to table labels: lower-cased, runs of whitespace collapsed to one space."""
    return " ".join(caption.lower().split())


def read_label_nouns(path: Path) -> dict[str, tuple[str, ...]]:
    """A label -> nouns table: "#" lines are comments, each other line is `label<TAB>noun, noun, ...`."""
    table: dict[str, tuple[str, ...]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        label, tab, listed = line.partition("\t")
        nouns = tuple(n.strip() for n in listed.split(",") if n.strip())
        if not tab or not label.strip() or not nouns:
            raise ValueError(f"{path}:{number}: expected 'label<TAB>noun, noun', got {line!r}")
        if len(nouns) > MAX_TABLE_NOUNS:
            raise ValueError(f"{path}:{number}: {label!r} has {len(nouns)} nouns, at most {MAX_TABLE_NOUNS} allowed")
        if len(set(nouns)) < len(nouns):
            raise ValueError(f"{path}:{number}: {label!r} lists a noun twice")
        key = caption_key(label)
        if key in table:
            raise ValueError(f"{path}:{number}: label {label!r} is listed twice")
        table[key] = nouns
    return table


@lru_cache(maxsize=1)
def label_nouns() -> dict[str, tuple[str, ...]]:
    """The reviewed nouns of VGGSound's labels, keyed by `caption_key(label)`, in the labels' order."""
    return read_label_nouns(LABEL_NOUNS_FILE)


def label_nouns_sha256() -> str:
    """Checksum of the table file, recorded in stage one's meta.json (the table decides what is grounded)."""
    return sha256_file(LABEL_NOUNS_FILE)


def caption_nouns(caption: str, tagger: str = "pattern", max_nouns: int | None = None) -> list[str]:
    """The nouns of one caption, at most `max_nouns` (the first ones): the table's for a VGGSound label, else tagged."""
    nouns = label_nouns().get(caption_key(caption))
    if nouns is not None:
        return list(nouns[:max_nouns])
    return tagged_nouns(caption, tagger, max_nouns)


def tagged_nouns(caption: str, tagger: str = "pattern", max_nouns: int | None = None) -> list[str]:
    """The nouns that the part-of-speech tagger finds in a caption, clause by clause, at most `max_nouns`."""
    tag = get_tagger(tagger)
    nouns: list[str] = []
    for clause in re.split(r"[,;/()]", caption):
        words = tokenize(clause)
        if words:
            nouns.extend(n for n in nouns_from_tags(tag(words)) if n not in nouns)
    return nouns[:max_nouns] if max_nouns is not None else nouns


def needs_tagger(captions: Iterable[str]) -> bool:
    """Whether any of these captions is free text (not a VGGSound label of the reviewed table)."""
    table = label_nouns()
    return any(caption_key(caption) not in table for caption in captions)


class NounCache:
    """Finds each distinct caption's nouns once (captions repeat: VGGSound has 309 labels for 200k clips).

    The tagger is loaded at once, so that a missing one fails before any clip is decoded; given the run's `captions`,
    only when one of them needs it (captions that are all VGGSound labels take their nouns from the table, and run
    without nltk's tagger data)."""

    def __init__(self, tagger: str, max_nouns: int, captions: Iterable[str] | None = None):
        self.tagger = tagger
        self.max_nouns = max_nouns
        label_nouns()  # fail early for a damaged label table
        if captions is None or needs_tagger(captions):
            get_tagger(tagger)
        self._cache: dict[str, list[str]] = {}

    def __call__(self, caption: str) -> list[str]:
        if caption not in self._cache:
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[caption] = caption_nouns(caption, self.tagger, self.max_nouns)
        return list(self._cache[caption])
