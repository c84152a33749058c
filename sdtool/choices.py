"""The names the library's choice options accept, in one place that imports nothing.

The library checks its arguments against these tuples, and the CLI builds its choice Enums from them
(sdtool.cli_options). This module must stay free of imports: the CLI reads it before `cpu.configure()`
has run, and OpenMP reads its wait policy once, when torch is first imported.
"""

from __future__ import annotations

POLICIES = ("max_softmax", "entropy")  # early exit: how a shallow exit's confidence is measured
FALLBACKS = ("deepest", "ensemble")  # early exit: who answers the samples no shallow exit takes
COSTS = ("macs", "latency")  # threshold fitting: what a sample costs
ENGINES = ("torch", "onnxruntime")  # inference engines for timings
FORMATS = ("safetensors", "pt2", "onnx")  # `sdtool export` file formats
SPLITS = ("test", "val")  # the splits `sdtool eval` reports on
