"""unet.checks: the one integer check of the library's constructors."""

import numpy as np
import pytest

from unet.checks import check_int


@pytest.mark.parametrize("value, minimum", [(1, 1), (np.int64(7), 1), (0, 0), (2, 2)])
def test_check_int_returns_a_plain_int(value, minimum):
    checked = check_int("size", value, minimum)
    assert checked == value and type(checked) is int


@pytest.mark.parametrize(
    "value, minimum, message",
    [
        (0, 1, "size: expected a positive int, got 0"),
        (True, 1, "size: expected a positive int, got True"),
        (2.0, 1, "size: expected a positive int, got 2.0"),
        ("3", 1, "size: expected a positive int, got '3'"),
        (-1, 0, "size: expected a non-negative int, got -1"),
        (1, 2, "size: expected an int >= 2, got 1"),
    ],
)
def test_check_int_names_the_argument_and_what_was_expected(value, minimum, message):
    with pytest.raises(ValueError) as error:
        check_int("size", value, minimum)
    assert str(error.value) == message
