"""Features in, ranked answers out: exact and indexed search, filters, re-ranking, the evaluation
metrics and protocols, the same-vehicle threshold, and ranking pictures. Imports no MindSpore."""
