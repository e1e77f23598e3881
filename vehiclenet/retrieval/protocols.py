"""Evaluation protocols of the benchmarks, over features computed once.

* Query vs gallery (VeRi-776, VERI-Wild): :func:`evaluate_split`, the VeRi junk rule
  (gallery images with the query's id *and* camera are left out of its ranking).
* VehicleID: :func:`evaluate_vehicleid`. Each trial draws a gallery of one image per
  identity from the test list; every other image is a query with exactly one true
  match. Each image is its own "camera", so nothing is junk. The figures are the mean
  and the (population, ddof=0) standard deviation over the trials; the seed is part of
  the result.

Trial ``t`` of seed ``s`` gives every image a random 64-bit key, the raw output of
PCG64 seeded with ``SeedSequence([s, t])`` (both fixed across numpy versions, unlike
numpy's shuffling methods); the image of each identity with the smallest key (ties by
list order) goes to the gallery. Trial t is the same whatever ``trials`` is, so
``--trials 10`` extends ``--trials 5``.

:func:`evaluate_split` is the one place where distances are computed and ranked, so
another engine (e.g. bounded-memory evaluation) can replace it for every dataset.
"""
import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import DataError
from .exact import cosine_distance_blocks
from .metrics import EvalResult, evaluate_blocks
from ..interrupts import doing

if TYPE_CHECKING:
    from .rerank import NeighbourSource

__all__ = ["Rerank", "evaluate_split", "one_image_per_identity", "TrialsResult", "evaluate_vehicleid", "timed"]

METRICS = ("mAP", "rank1", "rank5", "rank10", "mINP")


@dataclass(frozen=True)
class Rerank:
    """k-reciprocal re-ranking parameters (:func:`vehiclenet.retrieval.rerank.re_rank`)."""

    k1: int = 100
    k2: int = 15
    lambda_value: float = 0.0
    #: Where the k1-neighbour lists come from: "exact" (brute force), or a gallery index kind
    #: of vehiclenet.retrieval.index ("ivf-sq8", ...) built over query + gallery: approximate re-ranking.
    neighbours: str = "exact"
    nprobe: Optional[int] = None


@contextlib.contextmanager
def timed(timings: Optional[Dict[str, float]], key: str) -> Iterator[None]:
    """Add the seconds the block took to ``timings[key]`` (when timings is given and it does not raise)."""
    start = time.perf_counter()
    yield
    if timings is not None:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def evaluate_split(
    query_features: np.ndarray,
    gallery_features: np.ndarray,
    q_ids: Sequence[int],
    g_ids: Sequence[int],
    q_cams: Sequence[int],
    g_cams: Sequence[int],
    *,
    rerank: Optional[Rerank] = None,
    ap: str = "trapezoid",
    timings: Optional[Dict[str, float]] = None,
    neighbours: Optional["NeighbourSource"] = None,
) -> EvalResult:
    """mAP / CMC / mINP of one query set against one gallery (VeRi junk rule).

    Cosine distance, or re-ranked distance with ``rerank`` (k1-neighbour lists from
    ``neighbours``, exact by default), a block of queries at a time: no query x gallery
    matrix is ever held whole, and the figures are bit-identical to
    ``evaluate(cosine_distance(...))`` / ``evaluate(re_rank(...))``. Adds ``distance_s``
    (re-ranking's preparation) and ``metrics_s`` (distance blocks and ranking) to
    ``timings``. ValueError for unusable re-ranking parameters.
    """
    with timed(timings, "distance_s"):  # re-ranking's neighbour lists, expanded sets and weights
        if rerank is None:
            blocks = cosine_distance_blocks(query_features, gallery_features)
        else:
            from .rerank import re_rank_blocks

            if neighbours is None and rerank.neighbours != "exact":
                from .index import index_neighbours

                neighbours = index_neighbours(rerank.neighbours, nprobe=rerank.nprobe)
            blocks = re_rank_blocks(query_features, gallery_features, k1=rerank.k1, k2=rerank.k2,
                                    lambda_value=rerank.lambda_value, neighbours=neighbours)
    with timed(timings, "metrics_s"):  # distance blocks computed, ranked and dropped
        return evaluate_blocks(blocks, q_ids, g_ids, q_cams, g_cams, ap=ap)


def one_image_per_identity(ids: Sequence[int], seed: int, trial: int) -> Tuple[np.ndarray, np.ndarray]:
    """(query rows, gallery rows) of trial ``trial`` of ``seed``, both in ascending order.

    The gallery holds one image per identity (see the module docstring for the draw);
    identities with one image have no query.
    """
    labels = np.asarray(ids, dtype=np.int64)
    if seed < 0 or trial < 0:
        raise ValueError(f"seed and trial must be >= 0, got {seed} and {trial}")
    bits = np.random.PCG64(np.random.SeedSequence([seed, trial]))
    keys = bits.random_raw(labels.shape[0])
    order = np.argsort(keys, kind="stable")
    _, first = np.unique(labels[order], return_index=True)
    gallery = np.sort(order[first])
    in_gallery = np.zeros(labels.shape[0], dtype=bool)
    in_gallery[gallery] = True
    return np.flatnonzero(~in_gallery), gallery


@dataclass
class TrialsResult:
    """Per-trial figures of the VehicleID protocol, their mean and standard deviation."""

    trials: List[EvalResult]
    seed: int
    num_gallery: int

    def mean(self, metric: str) -> float:
        """Mean over the trials of ``mAP``, ``rank1``, ``rank5``, ``rank10`` or ``mINP``."""
        return float(np.mean(self._values(metric)))

    def std(self, metric: str) -> float:
        """Population standard deviation (ddof=0) over the trials; 0 for one trial."""
        return float(np.std(self._values(metric)))

    def _values(self, metric: str) -> np.ndarray:
        return np.asarray([t.to_dict()[metric] for t in self.trials], dtype=np.float64)

    def to_dict(self) -> Dict[str, object]:
        """Means under the keys of :meth:`EvalResult.to_dict`, plus ``std``, ``trials``, ``seed``
        and ``per_trial``."""
        first = self.trials[0]
        out: Dict[str, object] = {m: self.mean(m) for m in METRICS}
        out.update(
            std={m: self.std(m) for m in METRICS},
            num_query=int(first.num_query),
            num_valid_query=int(min(t.num_valid_query for t in self.trials)),
            ap=first.ap,
            cmc=[float(x) for x in np.mean([t.cmc for t in self.trials], axis=0)],
            trials=len(self.trials),
            seed=int(self.seed),
            per_trial=[{m: t.to_dict()[m] for m in METRICS} for t in self.trials],
        )
        return out


def evaluate_vehicleid(
    features: np.ndarray,
    ids: Sequence[int],
    *,
    trials: int = 10,
    seed: int = 0,
    rerank: Optional[Rerank] = None,
    ap: str = "trapezoid",
    timings: Optional[Dict[str, float]] = None,
) -> TrialsResult:
    """The VehicleID protocol over ``trials`` seeded splits of one test list's features.

    ``features`` (N, D) and ``ids`` (N,) hold every test image once; only the split
    changes between trials. Each image is its own camera (rows), so no gallery image is junk.
    """
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    labels = np.asarray(ids, dtype=np.int64)
    feats = np.asarray(features)
    if feats.ndim != 2 or feats.shape[0] != labels.shape[0]:
        raise ValueError(f"features {feats.shape} and ids {labels.shape} do not match")
    cams = np.arange(labels.shape[0], dtype=np.int64)
    if labels.size == 0 or np.unique(labels, return_counts=True)[1].max() < 2:
        raise DataError("no identity has two images: every image would go to the gallery and no trial would "
                        "have a query; VehicleID needs at least two images of some vehicle")
    results = []
    for trial in range(trials):
        doing(f"evaluating trial {trial + 1} of {trials}")
        q, g = one_image_per_identity(labels, seed, trial)
        results.append(evaluate_split(feats[q], feats[g], labels[q], labels[g], cams[q], cams[g],
                                      rerank=rerank, ap=ap, timings=timings))
    return TrialsResult(results, seed, int(np.unique(labels).shape[0]))
