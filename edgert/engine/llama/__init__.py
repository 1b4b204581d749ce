"""llama.cpp backend on llama-cpp-python's low-level (ctypes) API.

The only package that imports ``llama_cpp`` (an import-linter contract holds it to that),
and it converts every llama.cpp failure into an edgert error. Its modules:

- :mod:`.process`: llama.cpp's process-wide initialisation and log hook (load errors quote
  the log), ``--verbose`` and the capabilities ``edgert doctor`` reports;
- :mod:`.backend`: :class:`LlamaBackend` (one model, one multi-sequence context), its
  samplers and the JSON grammars ``response_format`` compiles to;
- :mod:`.reference`: greedy runs of llama-cpp-python's own ``Llama`` class, the baseline
  for parity tests and ``edgert bench``.

Callers import from here.
"""

from edgert.engine.llama.backend import LlamaBackend, LlamaSampler, json_grammar
from edgert.engine.llama.process import capabilities, set_verbose
from edgert.engine.llama.reference import ReferenceRun, reference_generate

__all__ = [
    "LlamaBackend",
    "LlamaSampler",
    "ReferenceRun",
    "capabilities",
    "json_grammar",
    "reference_generate",
    "set_verbose",
]
