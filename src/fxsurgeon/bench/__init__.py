"""Benchmarks: latency and throughput of an original and its converted model, timed interleaved in rounds.

Modules: ``eager`` (PyTorch eager and ``torch.compile``, CPU or CUDA), ``ort`` (onnxruntime on CPU, imported
only when asked for) and ``results`` (what they measured, side by side, as Markdown or JSON).
"""

from __future__ import annotations

# the package's public names are eager's, re-exported as one list so the two cannot drift apart
from .eager import *  # noqa: F403
from .eager import __all__  # noqa: F401
