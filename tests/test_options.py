"""The shared option checks: what passes, what fails, and the message that names option, value and valid ones."""

from __future__ import annotations

import numpy as np
import pytest

from hosl_lightning.core.options import check_choice, check_int, check_number


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: check_choice("mode", "hsol", ("hosl", "fo")), "mode='hsol' is not valid: choose one of 'hosl', 'fo'"),
        (lambda: check_int("q", 0, 1), "q=0 is not valid: it must be an integer >= 1"),
        (lambda: check_int("q", True, 1), "q=True is not valid: it must be an integer >= 1"),
        (lambda: check_int("q", 1.0, 1), r"q=1.0 is not valid: it must be an integer >= 1"),
        (lambda: check_int("seed", "3"), "seed='3' is not valid: it must be an integer$"),
        (lambda: check_int("seed", None), "seed=None is not valid: it must be an integer$"),
        (lambda: check_int("k", 0, 1, none="all"), "k=0 is not valid: it must be an integer >= 1, or None for all"),
        (lambda: check_number("mu", 0.0, 0, strict=True), "mu=0.0 is not valid: it must be a number > 0"),
        (lambda: check_number("lr", -1, 0), "lr=-1 is not valid: it must be a number >= 0"),
        (lambda: check_number("lr", float("nan"), 0), "lr=nan is not valid: it must be a number >= 0"),
        (lambda: check_number("lr", False, 0), "lr=False is not valid: it must be a number >= 0"),
        (lambda: check_number("p", 0, 0, 1, strict=True), r"p=0 is not valid: it must be a number in \(0, 1\]"),
        (lambda: check_number("p", 1.5, 0, 1), r"p=1.5 is not valid: it must be a number in \[0, 1\]"),
    ],
)
def test_a_bad_value_fails_naming_the_option_the_value_and_the_valid_ones(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    ("good", "bad"),
    [  # each good value passes, and its nearest bad neighbour fails: the check draws its line in the right place
        (lambda: check_choice("mode", "fo", ("hosl", "fo")), lambda: check_choice("mode", "FO", ("hosl", "fo"))),
        (lambda: check_int("q", 1, 1), lambda: check_int("q", 0, 1)),
        (lambda: check_int("q", np.int64(2), 1), lambda: check_int("q", np.float64(2), 1)),  # numpy integers count
        (lambda: check_int("seed", -5), lambda: check_int("seed", -5.0)),
        (lambda: check_int("k", None, 1, none="all"), lambda: check_int("k", None, 1)),
        (lambda: check_number("mu", 1e-3, 0, strict=True), lambda: check_number("mu", 0, 0, strict=True)),
        (lambda: check_number("lr", 0, 0), lambda: check_number("lr", -1e-12, 0)),
        (lambda: check_number("p", 1, 0, 1, strict=True), lambda: check_number("p", 1 + 1e-12, 0, 1, strict=True)),
        (lambda: check_number("lr", 1e300, 0), lambda: check_number("lr", float("inf"), 0)),
    ],
)
def test_good_values_pass_and_their_nearest_bad_neighbours_fail(good, bad) -> None:
    assert good() is None
    with pytest.raises(ValueError, match="is not valid"):
        bad()
