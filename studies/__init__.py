"""Studies of this repository's shipped datasets, written into its results/ folder.

Kept outside the library, like benchmarks/: `make results` runs `studies/results.py`, and
`python -m scalelora.study.results` (a thin entry point) runs it from a checkout of the repository."""
