"""Mask personal data in text: e-mail addresses, URLs, card numbers and phone numbers.

    >>> redact("mail jo@example.com or call +44 20 7946 0958, card 4111 1111 1111 1111")
    'mail [EMAIL] or call [PHONE], card [CARD]'

serve.py --redact passes every log line through `redact` (request texts with --log-text, error messages);
--redact-inputs also masks the texts before the model sees them. Patterns, not a named-entity model:
they catch the usual written forms, and a masked log is the point, so when in doubt they mask.

The order matters: URLs first (a URL may hold an address or digits), then e-mail addresses, then runs of
digits, which are cards if they pass the Luhn check (below) and otherwise phones if they look like one.
"""
import re

# a scheme or www., up to white space; a final full stop, comma or bracket ends the sentence, not the URL
URL = re.compile(r"\b(?:[a-z][a-z0-9+.-]*://|www\.)[^\s<>\"']*[^\s<>\"'.,;:!?)]", re.IGNORECASE)
EMAIL = re.compile(r"\b[\w.%+-]+@[\w-]+(?:\.[\w-]+)*\.[a-z]{2,}\b", re.IGNORECASE)
# a run of digits, optionally opened by + or (, grouped by single spaces, dashes, dots or brackets:
# "+1 (555) 123-4567", "4111-1111-1111-1111", "020 7946 0958"
DIGITS = re.compile(r"(?<![\w+])\+?\(?\d(?:[ .()-]{0,2}\d)+\b")
# dates are kept out of the runs of digits: 2024-01-15, 15.01.2024, 1/2/2024
DATE = re.compile(r"(?<!\d)(?:\d{4}([-/.])\d{1,2}\1\d{1,2}|\d{1,2}([-/.])\d{1,2}\2\d{4})(?!\d)")
DECIMAL = re.compile(r"\d+\.\d+")                                                  # 3.14159265


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of card numbers: from the right, double every second digit (subtracting 9 when
    the double exceeds 9); the number is valid when the sum is a multiple of 10. It catches every single
    wrong digit and most swaps of neighbours, so a random 16-digit number passes one time in ten."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _digits(match: re.Match) -> str:
    run = match.group()
    digits = re.sub(r"\D", "", run)
    if 13 <= len(digits) <= 19 and luhn_valid(digits):           # card numbers have 13 to 19 digits
        return "[CARD]"
    if DECIMAL.fullmatch(run):
        return run
    grouped = run.startswith(("+", "(")) or digits != run          # written like a phone number
    # E.164 numbers have at most 15 digits; a bare run of digits is a phone from 10 on ("5551234567"),
    # shorter bare runs are more often amounts, years or ids ("1500000").
    if (grouped and 7 <= len(digits) <= 15) or (not grouped and 10 <= len(digits) <= 15):
        return "[PHONE]"
    return run


def redact(text: str) -> str:
    """`text` with e-mail addresses, URLs, card numbers and phone numbers replaced by [EMAIL], [URL],
    [CARD] and [PHONE]; everything else unchanged."""
    text = URL.sub("[URL]", text)
    text = EMAIL.sub("[EMAIL]", text)
    out, last = [], 0
    for date in DATE.finditer(text):            # runs of digits between the dates, so none runs into one
        out += [DIGITS.sub(_digits, text[last:date.start()]), date.group()]
        last = date.end()
    return "".join(out) + DIGITS.sub(_digits, text[last:])


def redact_values(value):
    """`redact` applied to every string inside nested dicts and lists (a log record)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_values(v) for v in value]
    return value
