"""`python -m scalelora.study.results`: the command the docs give for the results study; the study is
`studies/results.py` in the repository, outside the library (it reads and writes the checkout's results/
folder, so it needs a checkout, not only the installed package)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def main(argv: list[str] | None = None) -> int:
    if not (ROOT / "studies" / "results.py").is_file():
        print(
            "scalelora: error: the results study is studies/results.py of a scalelora checkout; "
            "run it from a clone of the repository",
            file=sys.stderr,
        )
        return 2
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from studies.results import main as results_main

    return results_main(argv)


if __name__ == "__main__":
    sys.exit(main())
