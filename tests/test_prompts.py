"""Prompt syntax: weights, stops, colons inside text, escapes, and the errors for bad input."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vqclip.prompts import Prompt, parse_image_prompt, parse_noise_prompt, parse_text_prompts

INF = -math.inf


@pytest.mark.parametrize("text, expected", [
    ("a red circle", [Prompt("a red circle", 1.0, INF)]),
    ("a red circle:2", [Prompt("a red circle", 2.0, INF)]),
    ("a red circle:-0.5", [Prompt("a red circle", -0.5, INF)]),
    ("a red circle:1:0.8", [Prompt("a red circle", 1.0, 0.8)]),
    ("a:1.5e-1", [Prompt("a", 0.15, INF)]),
    ("a:.5", [Prompt("a", 0.5, INF)]),
    ("a:+2", [Prompt("a", 2.0, INF)]),
    ("  a sunset :  2 ", [Prompt("a sunset", 2.0, INF)]),
    ("a:1|b:-0.5", [Prompt("a", 1.0, INF), Prompt("b", -0.5, INF)]),
    ("a | b | c", [Prompt("a"), Prompt("b"), Prompt("c")]),
    # colons inside the text: only trailing numeric fields count
    ("https://example.com/cat.png", [Prompt("https://example.com/cat.png")]),
    ("https://example.com/cat.png:0.5", [Prompt("https://example.com/cat.png", 0.5)]),
    ("a 16:9 poster", [Prompt("a 16:9 poster")]),
    ("a 16:9 poster:2:0.5", [Prompt("a 16:9 poster", 2.0, 0.5)]),
    ("watermark:-1:-0.9", [Prompt("watermark", -1.0, -0.9)]),
    ("time: 12:30 pm", [Prompt("time: 12:30 pm")]),
    ("ratio:wide", [Prompt("ratio:wide")]),
    ("a:b:c:2", [Prompt("a:b:c", 2.0)]),
    ("x:1:2:3", [Prompt("x:1", 2.0, 3.0)]),  # at most two trailing numbers
    ("weight:inf", [Prompt("weight:inf")]),  # inf/nan are words, not numbers
    ("grandma:nan", [Prompt("grandma:nan")]),
    # escapes
    ("a poster in 16\\:9", [Prompt("a poster in 16:9")]),
    ("a poster in 16\\:9:2", [Prompt("a poster in 16:9", 2.0)]),
    ("this \\| that:3", [Prompt("this | that", 3.0)]),
    ("", []),
    ("   ", []),
])
def test_parse_text_prompts(text, expected):
    assert parse_text_prompts(text) == expected


def test_ambiguous_trailing_number_is_a_weight_with_a_warning(caplog):
    assert parse_text_prompts("a poster in 16:9") == [Prompt("a poster in 16", 9.0)]
    assert "\\:" in caplog.text  # the warning says how to keep the colon


@pytest.mark.parametrize("text, message", [
    ("a||b", "empty prompt"),
    ("|a", "empty prompt"),
    ("a|", "empty prompt"),
    (":2", "no text"),
    ("  :1:2", "no text"),
    ("a:0", "weight 0"),
    ("a:-0.0:1", "weight 0"),
    ("a:1e999", "finite"),
    ("a:1:5", "stop must be a distance in 0..4.93"),
    ("a:1:-0.5", "stop must be a distance"),
    ("a:-1:0.9", "repelling prompt's stop is a negative distance"),
])
def test_bad_text_prompts(text, message):
    with pytest.raises(ValueError, match=message):
        parse_text_prompts(text)


@pytest.mark.parametrize("spec, expected", [
    ("cat.png", Prompt("cat.png")),
    ("cat.png:0.5", Prompt("cat.png", 0.5)),
    ("C:\\images\\cat.png", Prompt("C:\\images\\cat.png")),
    ("C:\\images\\cat.png:-1", Prompt("C:\\images\\cat.png", -1.0)),
    ("dir/img:2.png", Prompt("dir/img:2.png")),
    ("frame\\:2", Prompt("frame:2")),
    ("a.png:1:2", Prompt("a.png:1", 2.0)),  # one number at most: no stop for images
])
def test_parse_image_prompt(spec, expected):
    assert parse_image_prompt(spec) == expected


@pytest.mark.parametrize("spec, expected", [
    ("42", Prompt("42")), ("42:0.5", Prompt("42", 0.5)), (" 7 : -1 ", Prompt("7", -1.0)),
])
def test_parse_noise_prompt(spec, expected):
    assert parse_noise_prompt(spec) == expected


@pytest.mark.parametrize("spec", ["", "x", "-1:1", "1.5:1", "3:abc", "3:0", "3:"])
def test_bad_noise_prompts(spec):
    with pytest.raises(ValueError):
        parse_noise_prompt(spec)


# Property: writing prompts back in the documented syntax (escaping the text) parses to the same.
words = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1).filter(
    lambda s: s.strip() == s and s and "\\" not in s)
numbers = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False).filter(lambda x: x != 0)


def _escape(text: str) -> str:
    return text.replace(":", "\\:").replace("|", "\\|")


stops = st.floats(min_value=0, max_value=4.9)


@given(st.lists(st.tuples(words, numbers, st.one_of(st.none(), stops)), min_size=1, max_size=4))
def test_round_trip_of_escaped_prompts(items):
    # a repelling prompt's stop is negative (compared with the signed distance)
    items = [(t, w, None if s is None else math.copysign(s, w)) for t, w, s in items]
    text = "|".join(f"{_escape(t)}:{w!r}" + (f":{s!r}" if s is not None else "")
                    for t, w, s in items)
    parsed = parse_text_prompts(text)
    assert parsed == [Prompt(t, w, s if s is not None else INF) for t, w, s in items]


@given(words)
def test_text_without_numeric_tail_is_kept_whole(text):
    text = _escape(text) if text[-1:].isdigit() or ":" in text or "|" in text else text
    parsed = parse_text_prompts(text)
    assert len(parsed) == 1 and parsed[0].weight == 1.0
    assert parsed[0].value == text.replace("\\:", ":").replace("\\|", "|").strip()
