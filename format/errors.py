"""The one exception the reader raises for any input bytes."""


class MbzFormatError(Exception):
    """The bytes are not a valid .mbz file; the message says what is wrong and where.

    ``decode_mbz`` and ``read_mbz`` raise only this for bad content (I/O errors stay ``OSError``).
    """
