"""Which weights a network is built from, as one value, and the identity its outputs record.

Features of two networks cannot be compared, so every features file, chunk folder and
gallery index records the identity of the weights that embedded it, and the commands that
compare features refuse to mix two. Imports neither MindSpore nor numpy.
"""
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

from ..errors import UsageError

#: The seed of random weights (``--no-pretrained``) on the command line when none is given.
DEFAULT_SEED = 0


@dataclass(frozen=True)
class WeightsChoice:
    """A weights file (``checkpoint``), else a manifest asset (``pretrained``: True for the
    default one, or its name), else random weights drawn from ``seed`` (None: unseeded).

    Resolved once: :meth:`file` fetches and verifies at most once per choice and
    :meth:`identity` hashes a checkpoint at most once, so a command makes one choice and
    hands it on (``create_network(weights=choice)``) instead of resolving the weights again.
    """

    checkpoint: Optional[str] = None
    pretrained: Union[bool, str] = True
    seed: Optional[int] = None
    _resolved: Dict[str, object] = field(default_factory=dict, init=False, compare=False, repr=False)

    @classmethod
    def of(cls, checkpoint: Union[str, os.PathLike, None] = None, pretrained: Union[bool, str, None] = True,
           seed: Optional[int] = None) -> "WeightsChoice":
        """The choice ``create_network``'s ``checkpoint``/``pretrained``/``seed`` arguments make."""
        return cls(None if checkpoint is None else os.fspath(checkpoint), pretrained, seed)

    def _once(self, key: str, compute):
        if key not in self._resolved:
            self._resolved[key] = compute()
        return self._resolved[key]

    @property
    def random(self) -> bool:
        return self.checkpoint is None and (self.pretrained is False or self.pretrained is None)

    @property
    def from_asset(self) -> bool:
        """Whether the weights are a manifest asset (neither a file nor random)."""
        return self.checkpoint is None and not self.random

    @property
    def asset_name(self) -> Optional[str]:
        """The asset :attr:`pretrained` names (None: the manifest's default one)."""
        return None if self.pretrained is True else self.pretrained

    def asset(self):
        """The manifest entry of the weights (:class:`vehiclenet.weights.assets.Asset`), None
        for a checkpoint file or random weights; nothing is downloaded."""
        if not self.from_asset:
            return None
        from .assets import get_asset

        return get_asset(self.asset_name)

    def file(self) -> Optional[str]:
        """The file to load: the checkpoint, or the asset's verified download (fetched if the
        cache lacks it); None for random weights."""
        if not self.from_asset:
            return self.checkpoint
        from .download import fetch

        return self._once("file", lambda: os.fspath(fetch(self.asset_name)))

    def cached_file(self) -> Optional[str]:
        """Where :meth:`file` is or will be, without fetching it."""
        if not self.from_asset:
            return self.checkpoint
        from .download import cached_path

        return os.fspath(cached_path(self.asset_name))

    def identity(self) -> Optional[str]:
        """``sha256:<hex>`` of the weights file (a checkpoint is hashed; an asset's hash is
        the manifest's, nothing is downloaded), ``random:seed=N:vehiclenet-<version>`` for
        seeded random weights, None for unseeded ones (no two processes draw the same)."""
        return self.identity_and_input_size()[0]

    def identity_and_input_size(self) -> Tuple[Optional[str], Tuple[int, int]]:
        """:meth:`identity` and the (height, width) the network's input is resized to."""
        from ..embedding.preprocessing import INPUT_SIZE

        if self.checkpoint is not None:
            from ..fileio import sha256_file

            return self._once("identity", lambda: f"sha256:{sha256_file(self.checkpoint)}"), INPUT_SIZE
        if self.random:
            return random_identity(self.seed), INPUT_SIZE
        asset = self.asset()
        return f"sha256:{asset.sha256}", tuple(asset.input_size or INPUT_SIZE)


def random_identity(seed: Optional[int]) -> Optional[str]:
    """The identity of random weights drawn from ``seed`` by this version of the package
    (another version may initialise the network otherwise); None when unseeded."""
    if seed is None:
        return None
    from .. import __version__

    return f"random:seed={int(seed)}:vehiclenet-{__version__}"


def describe(identity: str) -> str:
    """``identity`` for a message: "random weights (seed 3)" or "weights sha256 1a2b3c4d5e6f"."""
    if identity.startswith("random:"):
        fields = dict(part.split("=", 1) for part in identity.split(":")[1:] if "=" in part)
        return f"random weights (seed {fields.get('seed', '?')}, {identity.rsplit(':', 1)[-1]})"
    return f"weights {identity.split(':', 1)[-1][:12]}"


def check_same_weights(stored: Optional[str], current: Optional[str], source: Union[str, os.PathLike],
                       what: str = "the query") -> None:
    """Refuse to compare features of ``source`` (embedded with ``stored``) with features of
    ``current`` weights; either unknown (an older file, unseeded random weights) passes.

    Raises:
        UsageError: two different weights; distances between their features mean nothing.
    """
    if stored is None or current is None or stored == current:
        return
    raise UsageError(f"{os.fspath(source)} was embedded with {describe(stored)}, {what} with {describe(current)}: "
                     "distances between features of two networks mean nothing; use the same --checkpoint "
                     "(or --no-pretrained --seed) for both, or embed the gallery again")


def stored_identity(extra, source: Union[str, os.PathLike]) -> Optional[str]:
    """The ``weights`` entry of the extra arrays of the features file ``source``, or None
    (files of older versions).

    Raises:
        DataError: an entry that is not one string.
    """
    from ..errors import DataError

    value = extra.get("weights")
    if value is None:
        return None
    if getattr(value, "shape", None) != () or getattr(value, "dtype", None) is None or value.dtype.kind != "U":
        raise DataError(f"{os.fspath(source)}: its 'weights' entry is not one string; write the file again "
                        "with `vehiclenet embed`")
    return str(value.item()) or None


def weights_files(checkpoint: Union[str, os.PathLike, None] = None,
                  pretrained: Union[bool, str, None] = True) -> List[str]:
    """The file a network will load: ``checkpoint``, else the cache entry of the ``pretrained``
    asset (True = the default one; not fetched here), else none (random weights)."""
    cached = WeightsChoice.of(checkpoint, pretrained).cached_file()
    return [] if cached is None else [cached]
