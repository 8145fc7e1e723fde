"""Where producers and workers meet: the `autoglm` command line, the local fleet demo, and the
spawner that runs real worker processes for the demo, the tests and the benchmarks.

`producers/` (what a web backend imports) and `workers/` (what a GPU box runs) never import each
other; only this package joins them.
"""
