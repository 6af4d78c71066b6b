"""The pure-numpy runtime that executes the graph stored in a .mbz file (never imports torch)."""
