"""The side-by-side benchmark harness (HF Trainer + PEFT against scalelora) and its results.

Kept outside the library: `python -m scalelora.bench` (a thin entry point) runs `benchmarks/bench.py`
from a checkout of the repository."""
