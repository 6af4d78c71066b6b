"""The one exception type of mbz's torch-side library; the CLI turns it into a clear message."""


class MbzError(Exception):
    """A problem the user can fix (bad input file, unsupported layer, missing data).

    The message says what is wrong and what to do; the CLI prints it without a traceback.
    """
