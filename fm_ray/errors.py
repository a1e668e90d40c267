"""The one error type for bad user input: the CLI prints it as one line and exits with code 2."""


class UserError(Exception):
    """Bad input or environment the user can fix; the message names the problem and the fix."""
