"""`python -m scalelora.bench`: the command users type; the harness is `benchmarks/bench.py` in the
repository, outside the library (it needs a checkout, not only the installed package)."""

from __future__ import annotations

import sys
from pathlib import Path

from scalelora.errors import error_line

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    if not (ROOT / "benchmarks" / "bench.py").is_file():
        error_line(
            "the benchmark harness is benchmarks/bench.py of a scalelora checkout; run it from a clone of the repository"
        )
        return 2
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.bench import main as bench_main

    return bench_main(argv)


if __name__ == "__main__":
    sys.exit(main())
