"""The simulated annotator's answer to the app's suggested slices (lib.evaluation.annotator, numpy only)."""
from __future__ import annotations

import numpy as np

from lib.evaluation.annotator import Case, draw_suggested


def _case() -> Case:
    """Organ 1 on slices 3..8 of 12."""
    truth = np.zeros((4, 4, 12), np.uint8)
    truth[1:3, 1:3, 3:9] = 1
    return Case(0, truth.astype(np.float32), truth, {"organ": 1}, {1: (3, 8)}, 0)


def test_a_suggested_slice_that_shows_the_organ_is_drawn():
    assert draw_suggested(_case(), 1, [7, 10], [5]) == (7, 0)


def test_past_the_organ_the_annotator_draws_its_last_slice_towards_the_annotation():
    case = _case()
    assert draw_suggested(case, 1, [10, 7], [5]) == (8, 1)     # 10 shows no organ: scroll back to 8
    assert draw_suggested(case, 1, [0], [5]) == (3, 1)         # below: up to 3


def test_when_that_last_slice_is_annotated_the_next_suggestion_is_taken():
    case = _case()
    assert draw_suggested(case, 1, [10, 6], [5, 8]) == (6, 1)
    assert draw_suggested(case, 1, [10, 11], [5, 8]) == (None, 2)
    assert draw_suggested(case, 1, [], [5]) == (None, 0)
