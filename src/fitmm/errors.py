"""The one exception users see for bad input.

Anything a user can get wrong (a file, a column, a config key) raises `InputError` with a message
that names the file, the row or field, and the fix. The CLI turns it into exit code 2 and a
message on stderr; every other exception is an internal error (exit code 1).
"""


class InputError(ValueError):
    """Bad input or usage: the message says where and how to fix it."""


QUOTE_LIMIT = 80  # characters of file content an error message quotes at most


def quote(value, limit: int = QUOTE_LIMIT) -> str:
    """repr(value) cut to `limit` characters with '…': a message never echoes a whole line of a
    file (a 1 MB header, binary junk)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"
