"""One module per ``mbz`` command; each is a thin click layer over library functions."""
