"""A labelled distribution shift that ships offline: a task's test texts with seeded keyboard typos.

The family is the character-level "keyboard typo" of the robustness literature (CheckList's typos,
Ribeiro et al. 2020; nlpaug's ``KeyboardAug``): a corrupted word has one letter replaced by a neighbour on
a QWERTY keyboard, its case kept. Severity s ∈ {0, …, 5} corrupts a fraction ``SEVERITY_RATES[s]`` of the
words of the passage (the review, the question; never the instruction or the answer cue, so the label
words still follow the prompt), at least one word from severity 1 on:

    severity            0     1     2     3     4     5
    words with a typo   0%   10%   20%   30%   45%   60%

The corruptions are nested: for one example and seed, the words corrupted at severity s are also corrupted,
with the same typo, at every higher severity, so the damage grows with s text by text, not only on average.
Labels are untouched. Severity 0 is the identity.

    shifted = corrupted_task(task, severity=3, seed=0)   # test split corrupted, the rest dropped
"""

from __future__ import annotations

import dataclasses
import math
import random
import re

from .tasks import Example, Task

__all__ = ["SEVERITY_RATES", "KEYBOARD_NEIGHBOURS", "corrupt_text", "corrupted_task", "corruption_rate"]

SEVERITY_RATES = (0.0, 0.10, 0.20, 0.30, 0.45, 0.60)

_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def _neighbours() -> dict[str, str]:
    """Each letter's neighbours on a QWERTY keyboard: left and right in its row, and the keys touching it in
    the rows above and below (which are offset by about half a key)."""
    where = {c: (r, i) for r, row in enumerate(_ROWS) for i, c in enumerate(row)}
    out = {}
    for c, (r, i) in where.items():
        near = [d for d, (r2, i2) in where.items() if d != c and
                ((r2 == r and abs(i2 - i) == 1) or (r2 == r - 1 and i2 in (i, i + 1)) or (r2 == r + 1 and i2 in (i - 1, i)))]
        out[c] = "".join(sorted(near))
    return out


KEYBOARD_NEIGHBOURS = _neighbours()
_WORD = re.compile(r"\S+")


def _typo(word: str, rng: random.Random) -> str:
    """``word`` with one of its letters replaced by a keyboard neighbour (its case kept)."""
    letters = [i for i, c in enumerate(word) if c.lower() in KEYBOARD_NEIGHBOURS]
    i = rng.choice(letters)
    new = rng.choice(KEYBOARD_NEIGHBOURS[word[i].lower()])
    return word[:i] + (new.upper() if word[i].isupper() else new) + word[i + 1:]


def corrupt_text(text: str, severity: int, seed: int) -> str:
    """``text`` with keyboard typos in ``SEVERITY_RATES[severity]`` of its words (words that have a letter),
    nested across severities for one ``seed``; whitespace is kept as it was."""
    if severity not in range(len(SEVERITY_RATES)):
        raise ValueError(f"severity must be 0 to {len(SEVERITY_RATES) - 1}, got {severity}")
    words = [(m.start(), m.end()) for m in _WORD.finditer(text)
             if any(c.lower() in KEYBOARD_NEIGHBOURS for c in m.group())]
    n = 0 if severity == 0 else max(1, math.ceil(SEVERITY_RATES[severity] * len(words))) if words else 0
    rng = random.Random(f"corrupt/{seed}/{text}")  # the same order and typos at every severity: nested
    order = rng.sample(range(len(words)), len(words))
    typos = {k: _typo(text[words[k][0]:words[k][1]], random.Random(f"typo/{seed}/{text}/{k}")) for k in order[:n]}
    out, last = [], 0
    for k in sorted(typos):
        start, end = words[k]
        out += [text[last:start], typos[k]]
        last = end
    return "".join(out) + text[last:]


def corrupted_task(task: Task, severity: int, seed: int = 0) -> Task:
    """``task`` with its test passages corrupted at ``severity`` (train and validation dropped: a shift is
    scored, never trained on), named ``"{name}_typos{severity}"``; labels, prompts and label words as they were."""
    test = [dataclasses.replace(e, passage=corrupt_text(e.passage, severity, seed)) for e in task.test]
    return dataclasses.replace(task, name=f"{task.name}_typos{severity}", train=[], validation=[], test=test)


def corruption_rate(clean: list[Example], corrupted: list[Example]) -> float:
    """The fraction of words that differ between two lists of the same passages (a measured severity)."""
    changed = total = 0
    for a, b in zip(clean, corrupted, strict=True):
        words_a, words_b = a.passage.split(), b.passage.split()
        changed += sum(x != y for x, y in zip(words_a, words_b, strict=True))
        total += len(words_a)
    return changed / max(total, 1)
