"""Masking of sensitive values in streamed output, across every possible split."""

from __future__ import annotations

import random
import re

import pytest

from services.runner.masking import MASK, Masker, mask_all


def stream(pieces: list[str], secrets: list[str]) -> str:
    masker = Masker(secrets)
    return "".join(masker.feed(p) for p in pieces) + masker.finish()


def reference(text: str, secrets: list[str]) -> str:
    values = sorted({s for s in secrets if s}, key=len, reverse=True)
    return re.sub("|".join(map(re.escape, values)), MASK, text)


def test_secret_split_at_every_position() -> None:
    secret = "hunter2-s3cr3t"
    text = f"login with {secret} now\n"
    for cut in range(len(text) + 1):
        out = stream([text[:cut], text[cut:]], [secret])
        assert out == "login with *** now\n", cut
        assert secret not in out


def test_secret_split_over_three_pieces_at_every_pair_of_positions() -> None:
    secret = "abcdef"
    text = f"x{secret}y{secret}"
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            out = stream([text[:i], text[i:j], text[j:]], [secret])
            assert out == "x***y***", (i, j)


def test_one_character_pieces() -> None:
    secret = "pa$$w0rd"
    text = f"a {secret} b {secret}{secret} c"
    assert stream(list(text), [secret]) == "a *** b ****** c"


def test_several_secrets_and_one_inside_another() -> None:
    secrets = ["token-123", "123", "other"]
    text = "token-123 and 123 and other and token-12"
    expected = "*** and *** and *** and token-12"
    for cut in range(len(text) + 1):
        assert stream([text[:cut], text[cut:]], secrets) == expected


def test_same_result_as_masking_the_whole_text_for_random_splits() -> None:
    rng = random.Random(7)
    secrets = ["aab", "abab", "b", "ééx"]
    alphabet = "abéx \n"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(0, 5)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert stream(pieces, secrets) == reference(text, secrets), (text, cuts)


def test_holds_back_at_most_longest_secret_minus_one() -> None:
    masker = Masker(["short", "a-much-longer-secret"])
    out = masker.feed("x" * 100)
    assert len(masker.pending) <= len("a-much-longer-secret") - 1
    assert out + masker.finish() == "x" * 100


def test_no_secrets_passes_text_through_without_holding_back() -> None:
    masker = Masker([])
    assert masker.feed("abc") == "abc"
    assert masker.pending == ""
    assert masker.finish() == ""


def test_empty_secret_values_are_ignored() -> None:
    assert stream(["some text"], ["", "text"]) == "some ***"


@pytest.mark.parametrize("line", ["key=s3cret\n", "s3crets3cret", "nothing here"])
def test_mask_all(line: str) -> None:
    assert "s3cret" not in mask_all(line, ["s3cret"])
