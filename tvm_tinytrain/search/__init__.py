"""The sparse-update scheme search: contribution analysis, then an evolutionary search under a budget."""
