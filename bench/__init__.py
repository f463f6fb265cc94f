"""Side-by-side benchmark: direct vs Tollgate vs a bare aiohttp passthrough vs nginx.

`python -m bench run` measures everything and writes bench/RESULTS.md; see bench/README.md.
"""
