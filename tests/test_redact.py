"""redact.py: e-mail addresses, URLs, card numbers (Luhn-valid) and phone numbers are masked; dates,
decimals, amounts and ordinary words are left alone."""
import pytest

from redact import luhn_valid, redact, redact_values


@pytest.mark.parametrize("text, masked", [
    ("mail jo.doe+films@mail.example.co.uk today", "mail [EMAIL] today"),
    ("see https://example.org/a?b=1&c=jo@x.com.", "see [URL]."),                  # the URL swallows its e-mail
    ("(www.example.com/path)", "([URL])"),
    ("ftp://files.example.net/x and HTTP://A.B", "[URL] and [URL]"),
    ("visa 4111 1111 1111 1111, mc 5500-0000-0000-0004", "visa [CARD], mc [CARD]"),
    ("amex 378282246310005", "amex [CARD]"),
    ("call +44 20 7946 0958", "call [PHONE]"),
    ("call (555) 123-4567 or 555.123.4567 or 555-1234", "call [PHONE] or [PHONE] or [PHONE]"),
    ("ring 5551234567", "ring [PHONE]"),
])
def test_personal_data_is_masked(text, masked):
    assert redact(text) == masked


@pytest.mark.parametrize("text", [
    "released on 2024-01-15 (15.01.2024), 3 stars of 5",
    "it grossed 1500000 dollars in 1999",                  # a bare run under 10 digits: an amount, a year
    "pi is 3.14159265, a ratio of 1.5, 10-20 people",
    "ref 4111 1111 1111 1112",                              # 16 digits failing the Luhn check, too long for a phone
    "a gripping, funny film; email me? no.",
])
def test_ordinary_text_is_left_alone(text):
    assert redact(text) == text


def test_luhn_check_matches_known_card_numbers():
    assert all(map(luhn_valid, ["4111111111111111", "5500000000000004", "378282246310005", "79927398713"]))
    assert not any(map(luhn_valid, ["4111111111111112", "79927398710", "1234567812345678"]))


def test_redact_values_masks_strings_inside_a_log_record():
    record = {"texts": ["jo@example.com", 3], "nested": {"e": "call 555-123-4567"}, "n": 2}
    assert redact_values(record) == {"texts": ["[EMAIL]", 3], "nested": {"e": "call [PHONE]"}, "n": 2}
