"""Errors a user can fix: printed as one line that says what to change, without a traceback."""


class UserFacingError(Exception):
    """Base of the errors whose message is meant for the person who ran the command."""
