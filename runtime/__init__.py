"""The pure-numpy runtime that executes the graph stored in a .mbz file (never imports torch)."""

from .graph import infer_shapes, validate_graph
from .program import Program, load_program
from .threads import blas_threads

__all__ = ["Program", "blas_threads", "infer_shapes", "load_program", "validate_graph"]
