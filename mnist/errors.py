"""Errors a user can fix: printed as one line that says what to change, without a traceback."""


class UserFacingError(Exception):
    """Base of the errors whose message is meant for the person who ran the command."""


class ConfigValueError(UserFacingError, ValueError):
    """A config value that is well typed but cannot train (raised by the config's checks and by
    the data's, which the sweep's check hook runs before anything is created)."""
