"""`FastSteerError`: the one base of the errors fast-steer raises on bad input or an unmet precondition.

Its message says what was wrong and what is expected; the CLI prints it as one line, the server answers it as
a 4xx, and nothing else is caught under it, so a real bug still shows its traceback. Domain errors
(`SpecError`, `SAEFormatError`, `DataFormatError`, ...) derive from it; the general ones below are for
capabilities whose input is a setting or a path. Each also keeps the builtin base its callers expect.
"""


class FastSteerError(Exception):
    """Bad input or an unmet precondition, described for the user (never a bug)."""


class ConfigError(FastSteerError, ValueError):
    """A setting (option, config field, argument) has a value that cannot be used."""


class MissingFileError(FastSteerError, FileNotFoundError):
    """A file or folder the user named, or that an earlier step should have written, is not there."""


class OutputExistsError(FastSteerError, FileExistsError):
    """The output would overwrite something that is already there."""
