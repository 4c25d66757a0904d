"""SQuAD-style answer scoring: normalisation, containment exact match, token F1, means."""

from __future__ import annotations

import pytest

from dynalora.eval.answers import exact_match, normalize_answer, score_answers, token_f1


def test_normalize_answer():
    assert normalize_answer("  The Olvane   River!") == "olvane river"
    assert normalize_answer("An apple, a pear and THE plum.") == "apple pear and plum"
    assert normalize_answer("48,213") == "48213"
    assert normalize_answer("Theatre") == "theatre"  # articles only as whole words


def test_exact_match_is_normalised_containment_on_word_boundaries():
    assert exact_match("The pass key is 48213.", "48213") == 1.0
    assert exact_match("It is the Olvane river", "The Olvane River") == 1.0
    assert exact_match("Population: 48,200 people", "48,200") == 1.0
    assert exact_match("1200", "12") == 0.0  # no match inside a longer number
    assert exact_match("Veshyr", "Veshyr Industries") == 0.0
    assert exact_match("", "the") == 1.0 and exact_match("something", "the") == 0.0


def test_token_f1_exact_values():
    assert token_f1("Maris Velkin, a baker", "Maris Velkin") == pytest.approx(0.8)
    assert token_f1("the cat sat", "a dog sat") == pytest.approx(0.5)
    assert token_f1("Velkin Velkin", "Velkin") == pytest.approx(2 / 3)  # repeats count once per match
    assert token_f1("nothing shared", "Olvane") == 0.0
    assert token_f1("The", "a") == 1.0 and token_f1("", "Olvane") == 0.0


def test_score_answers_means_and_accepted_lists():
    scores = score_answers(["The pass key is 48213.", "Maris Velkin, a baker", "blue"],
                           ["48213", "Maris Velkin", ["teal", "blue"]])
    assert scores == {"exact_match": pytest.approx(1.0), "f1": pytest.approx((0.4 + 0.8 + 1.0) / 3)}
    assert score_answers(["no"], ["yes"]) == {"exact_match": 0.0, "f1": 0.0}
    with pytest.raises(ValueError, match="2 predictions but 1 answers"):
        score_answers(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty list"):
        score_answers(["a"], [[]])
