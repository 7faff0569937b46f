"""The sparse-update scheme search: contribution analysis, then an evolutionary search under a budget.

``search_scheme(model, data, budget, ...) -> SearchResult`` (:mod:`.scheme_search`); the parts:
:mod:`.contribution` (the runs and their gains), :mod:`.masks` (one build, a mask per scheme),
:mod:`.memory_model` (the planner's figure, and a calibrated additive model of it),
:mod:`.evolution` (the search under the budget), :mod:`.jobs` (local processes or Ray),
:mod:`.worker` (what a process does), :mod:`.cache` (on disk), :mod:`.plot`, :mod:`.command` (the CLI).
"""

from .scheme_search import SearchResult, search_scheme

__all__ = ["SearchResult", "search_scheme"]
