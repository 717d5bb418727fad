"""`FastSteerError`: the one base of the errors fast-steer raises on bad input or an unmet precondition.

Its message says what was wrong and what is expected; the CLI prints it as one line, the server answers it as
a 4xx, and nothing else is caught under it, so a real bug still shows its traceback.
"""


class FastSteerError(Exception):
    """Bad input or an unmet precondition, described for the user (never a bug)."""
