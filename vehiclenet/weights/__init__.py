"""Published weights: the asset manifest, verified downloads into the cache, checksum verification,
and which weights a network is built from. Imports no MindSpore."""
