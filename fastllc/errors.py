"""The one exception type users see: a problem with their input, stated in one line."""


class FastLLCError(ValueError):
    """Bad input or unusable data (a bad option, a missing or corrupt checkpoint).

    The CLI prints the message as a one-line error and exits non-zero; library callers may catch it.
    """
