"""`shrink bench`: speed ratios measured side by side in one run (see docs/benchmarks.md).

Each suite module exposes `run(quick: bool) -> {"rows": [row dicts], "tables": {...}}` where a row
has the fields of `shrinkcli.bench.timing.ROW_FIELDS`.
"""

SUITES = ("distill", "data", "onnx", "int8", "deploy", "cache", "memory", "scale")
