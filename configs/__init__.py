"""The experiment configs that ship with cljax (`cljax.configs` once installed).

Each module's `get_config(arg)` returns an `ml_collections.ConfigDict`; its docstring gives
the commands and the numbers to expect, marked as measured by cljax or quoted from a paper.
Load one with `cljax.load_config("NAME[:ARG]")` or `python -m cljax.train --config=NAME`.
"""
