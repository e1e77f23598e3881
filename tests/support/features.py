"""Generated features: unit rows clustered around identities, gallery names, finished chunk folders."""
from pathlib import Path

import numpy as np


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, d: int, seed: int, per_id: int = 10, spread: float = 0.8):
    """Features around n/per_id identity centres (like re-identification features), with ids."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((max(1, n // per_id), d)))
    ids = rng.integers(0, len(centres), n)
    return unit(centres[ids] + spread * unit(rng.standard_normal((n, d)))), ids, centres


def names(n: int, start: int = 0):
    return [f"gallery/{i:06d}.jpg" for i in range(start, start + n)]


def chunk_folder(folder: Path, n: int = 4, dim: int = 8, seed: int = 0) -> Path:
    """A finished folder of feature chunks (2 per chunk), as `embed --out-dir` leaves it."""
    from vehiclenet.embedding import shards
    from vehiclenet.embedding.result import FeatureResult

    paths = [f"img{i}.jpg" for i in range(n)]
    job = shards.ShardJob(images=n, inputs_sha256=shards.inputs_digest(paths), chunk_size=2, weights="sha256:00",
                          flip=False, precision="fp32", image_size=(384, 384), skip_bad=False, version="0")
    shards.prepare_folder(folder, job)
    feats = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    for index in range(job.chunks):
        a, b = job.chunk_range(index)
        shards._write_chunk(folder, job, index, paths[a:b], FeatureResult(feats[a:b], paths[a:b]))
    return folder
