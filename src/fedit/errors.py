"""The root of fedit's own errors: anything raised as one is a user-facing message."""


class FeditError(Exception):
    """An error whose message says what is wrong and where (file:line, config key, folder)."""
