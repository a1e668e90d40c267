"""The one error type for bad user input: the CLI prints it as one line and exits with code 2."""


class UserError(Exception):
    """Bad input or environment the user can fix; the message names the problem and the fix."""


class DegenerateModelError(UserError):
    """The model's outputs on the pool cannot rank it (NaN/inf outputs, or every candidate scoring
    the same): the query would be arbitrary, so none is made."""


class ArgumentValueError(UserError, ValueError):
    """A bad argument value at a Python boundary (`fm_ray.select`); the message names the argument."""


class ArgumentTypeError(UserError, TypeError):
    """An argument of the wrong type at a Python boundary; the message names the argument."""


class InternalError(Exception):
    """A failure inside fm_ray that is neither bad input nor a known environment failure: its one
    line names the exception and the log file holding the traceback; the original is `.cause`."""

    def __init__(self, line: str, cause: BaseException, log: str | None = None):
        super().__init__(line)
        self.cause = cause
        self.log = log
