"""Images in, L2-normalised features out: input listing, the reference pre-processing, batched
embedding, features files and chunk folders, per-image metadata and tracklets."""
