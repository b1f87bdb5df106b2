"""fxsurgeon: model surgery for PyTorch with torch.fx.

Trace a model, rewrite its architecture with passes that keep the trained weights wherever maths allows,
report the savings and run the result.

>>> import torch, timm, fxsurgeon
>>> model = timm.create_model("resnet18", pretrained=False).eval()
>>> small = fxsurgeon.convert(model)
>>> print(fxsurgeon.summary(small))  # doctest: +SKIP
"""

from . import moved as _moved
from .bench.eager import BenchmarkResult, benchmark
from .checkpoints import load_original_state_dict
from .convert import convert
from .errors import SurgeryError
from .heads import class_map
from .io import load, save
from .passes import PassOptions, PassResult, Rewrite, Skip, get_pass, list_passes, register_pass
from .record import Conversion, Verification, get_record, summary
from .report.savings import SavingsReport, savings
from .runtime import __version__
from .synthetic import SyntheticData, synthesize
from .tracing import trace

__all__ = [
    "BenchmarkResult",
    "Conversion",
    "PassOptions",
    "PassResult",
    "Rewrite",
    "SavingsReport",
    "Skip",
    "SurgeryError",
    "SyntheticData",
    "Verification",
    "__version__",
    "benchmark",
    "class_map",
    "convert",
    "get_pass",
    "get_record",
    "list_passes",
    "load",
    "load_original_state_dict",
    "register_pass",
    "save",
    "savings",
    "summary",
    "synthesize",
    "trace",
]

_moved.install()  # old module names (fxsurgeon.forms_dense, ...) stay importable: pickles and saved files name them
