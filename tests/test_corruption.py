"""The typo shift: deterministic for a seed, the identity at severity 0, worse with severity, labels untouched."""

import pytest

from bayes_peft.data.corruption import KEYBOARD_NEIGHBOURS, SEVERITY_RATES, corrupt_text, corrupted_task, corruption_rate
from bayes_peft.data.tasks import Example, Task

SENTENCES = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés from start to finish",
             "Uneven, but never boring: it wins you over in the end.", "an utterly charming and hilarious film that "
             "reminded me of the best of the old comedies", "dull", "it 's a lovely film with lovely performances"]


@pytest.fixture
def task():
    examples = [Example("Review: ", s, " Sentiment:", i % 2) for i, s in enumerate(SENTENCES * 5)]
    return Task("reviews", [" negative", " positive"], train=examples[:4], validation=examples[:2], test=examples)


def test_the_corruptions_are_deterministic_for_a_seed_and_differ_across_seeds(task):
    first, again = corrupted_task(task, 3, seed=0), corrupted_task(task, 3, seed=0)
    assert [e.passage for e in first.test] == [e.passage for e in again.test]
    other = corrupted_task(task, 3, seed=1)
    assert [e.passage for e in first.test] != [e.passage for e in other.test]


def test_severity_zero_is_the_identity_and_labels_prompts_and_label_words_are_untouched(task):
    assert corrupted_task(task, 0).test == task.test
    for severity in range(6):
        shifted = corrupted_task(task, severity, seed=2)
        assert [e.label for e in shifted.test] == [e.label for e in task.test]
        assert all(s.prefix == e.prefix and s.suffix == e.suffix for s, e in zip(shifted.test, task.test))
        assert shifted.labels == task.labels and shifted.train == [] and shifted.validation == []
        assert shifted.name == f"reviews_typos{severity}"


def test_the_measured_corruption_rate_grows_with_severity_and_is_nested(task):
    rates = [corruption_rate(task.test, corrupted_task(task, s, seed=0).test) for s in range(6)]
    assert rates[0] == 0 and all(a < b for a, b in zip(rates, rates[1:])), rates
    # Close to the rate asked (at least one word a text, rounded up): within 0.12 of it at every severity.
    assert all(abs(r - target) < 0.12 for r, target in zip(rates, SEVERITY_RATES)), rates
    for text in SENTENCES:  # each word corrupted at s is corrupted the same way at every s' > s
        levels = [corrupt_text(text, s, seed=4).split() for s in range(6)]
        for low, high in zip(levels, levels[1:]):
            assert all(b == c for a, b, c in zip(text.split(), low, high) if a != b)


def test_a_typo_is_one_letter_swapped_for_a_keyboard_neighbour():
    clean = "Gorgeous witty seductive movie"
    shifted = corrupt_text(clean, 5, seed=0)
    for a, b in zip(clean.split(), shifted.split()):
        diffs = [(x, y) for x, y in zip(a, b) if x != y]
        assert len(a) == len(b) and len(diffs) <= 1
        for x, y in diffs:
            assert y.lower() in KEYBOARD_NEIGHBOURS[x.lower()] and x.isupper() == y.isupper()
    with pytest.raises(ValueError, match="severity must be 0 to 5"):
        corrupt_text(clean, 6, seed=0)
