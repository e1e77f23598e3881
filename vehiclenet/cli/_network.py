"""What the commands that run the network share: their options, the checks made before
MindSpore is imported, and building the network."""
import argparse
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Tuple

if TYPE_CHECKING:  # annotations only: the parsers of every command must not import numpy
    from ..embedding.inputs import ImageInputs
    from ..embedding.result import FeatureResult
    from ..weights.choice import WeightsChoice

#: vehiclenet.retrieval.index.KINDS, written again here because that module imports numpy, which the
#: parser of every command (verify, download...) must not (tests/retrieval/test_index.py checks they match).
INDEX_KINDS = ("auto", "exact", "ivf-sq8", "ivf-flat", "hnsw-sq8")


def add_network_args(p: argparse.ArgumentParser, batch_default: int = 16) -> None:
    p.add_argument("--checkpoint", metavar="PATH", help="weights to load (default: the published checkpoint)")
    p.add_argument("--no-pretrained", action="store_true",
                   help="random weights, nothing downloaded (for tests and timing only)")
    p.add_argument("--seed", type=int, default=None, metavar="N",
                   help="--no-pretrained: draw the random weights from seed N (default 0), so that two "
                   "commands build the same network; outputs record it")
    p.add_argument("--no-flip", action="store_true", help="skip the horizontal-flip feature sum (2x faster)")
    p.add_argument("--batch-size", type=int, default=batch_default,
                   help=f"images per network call (default {batch_default})")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip missing, corrupt or non-image files (listed on stderr) instead of failing")
    add_precision_arg(p)
    add_image_size_arg(p)


#: Bounds of --image-size on the commands that embed: a network input outside them is a typo.
IMAGE_SIZES = (32, 2048)


def add_image_size_arg(p: argparse.ArgumentParser, note: str = "") -> None:
    p.add_argument("--image-size", type=int, default=None, metavar="S",
                   help="square network input the images are resized to (default: the weights' input size, "
                   f"384 for the published ones; give the size a fine-tuning run used){note}")


def image_size(args: argparse.Namespace) -> "Optional[tuple]":
    """(S, S) of --image-size, or None: the weights' input size."""
    return None if args.image_size is None else (args.image_size, args.image_size)


def add_precision_arg(p: argparse.ArgumentParser, note: str = "") -> None:
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="CPU inference arithmetic: fp32 (default, the published model exactly) or bf16 "
                   "(bfloat16 convolutions, float32 accumulation: about 2x faster on CPUs with AVX512-BF16 or "
                   f"AMX, features within cosine 0.9999 of fp32){note}")


def check_network_args(args: argparse.Namespace) -> None:
    from ..errors import UsageError

    if args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    check_image_size(args)
    if args.checkpoint and args.no_pretrained:
        raise UsageError("--checkpoint and --no-pretrained exclude each other")
    if args.seed is not None and not args.no_pretrained:
        raise UsageError("--seed draws the random weights of --no-pretrained; give both, or neither")
    if args.seed is not None and not 0 <= args.seed < 2 ** 32:
        raise UsageError(f"--seed must be in [0, 2**32), got {args.seed}")


def check_image_size(args: argparse.Namespace) -> None:
    from ..errors import UsageError

    low, high = IMAGE_SIZES
    if args.image_size is not None and not low <= args.image_size <= high:
        raise UsageError(f"--image-size must be in [{low}, {high}], got {args.image_size}")


def weights_choice(args: argparse.Namespace) -> "WeightsChoice":
    """The weights the command's options choose (random ones are seeded: default 0)."""
    from ..weights.choice import DEFAULT_SEED, WeightsChoice

    seed = (DEFAULT_SEED if args.seed is None else args.seed) if args.no_pretrained else None
    return WeightsChoice(args.checkpoint, not args.no_pretrained, seed)


@dataclass(frozen=True)
class NetworkRequest:
    """What the network options of ``embed``, ``rank``, ``search`` and ``compare`` ask for,
    checked once: the commands pass this instead of reading ``args``, and its one
    :class:`WeightsChoice` is fetched and hashed at most once per command."""

    weights: "WeightsChoice"
    precision: str = "fp32"
    flip: bool = True
    batch_size: int = 16
    skip_bad: bool = False
    size: Optional[Tuple[int, int]] = None  # None: the weights' input size
    progress: Optional[bool] = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "NetworkRequest":
        """The request of the parsed options (:class:`UsageError` for a bad one)."""
        from ._common import progress

        check_network_args(args)
        return cls(weights_choice(args), args.precision, not args.no_flip, args.batch_size, args.skip_bad,
                   image_size(args), progress(args))

    def files(self) -> List[str]:
        """The weights file the network will read (an input of the command, like its images)."""
        cached = self.weights.cached_file()
        return [] if cached is None else [cached]

    def identity(self) -> Optional[str]:
        """The identity the command's outputs record and its comparisons check."""
        return self.weights.identity()

    def network(self, images: int):
        """The embedding network for a job of ``images`` images (the execution mode suits it)."""
        from ..model.device import mode_for_images

        return self.network_in_mode(mode_for_images(images), images)

    def network_in_mode(self, mode: str, images: Optional[int] = None):
        """The embedding network in MindSpore ``mode`` ("graph" or "pynative")."""
        from ..model.checkpoint import check_checkpoint_file

        if self.weights.checkpoint:  # a FIFO or device is refused here, before the network is built
            check_checkpoint_file(self.weights.checkpoint)
        if self.weights.random:
            logging.getLogger("vehiclenet").warning("--no-pretrained: random weights (seed %d), the features mean "
                                                    "nothing", self.weights.seed)
        if images is not None:
            logging.getLogger("vehiclenet").info(
                "execution mode %s for %d image(s): %s", mode, images,
                "sooner than compiling the graph" if mode == "pynative" else "the graph is compiled once")
        return build_network(self.weights, self.precision, mode=mode)

    def embed(self, net, images: "ImageInputs", skip_bad: Optional[bool] = None) -> "FeatureResult":
        """Features of ``images`` as the options ask (``skip_bad``: override --skip-bad)."""
        from ..embedding.features import embed

        return embed(net, images, batch_size=self.batch_size, flip=self.flip,
                     skip_bad=self.skip_bad if skip_bad is None else skip_bad, progress=self.progress,
                     size=self.size)


def list_inputs(inputs: List[str], skip_bad: bool) -> "ImageInputs":
    """The images of ``inputs`` (files and folders), listed once for the whole command; missing
    inputs and folders without images are reported now, before MindSpore is imported (with
    --skip-bad, embed skips them instead)."""
    from ..embedding.inputs import expand_inputs

    listed = expand_inputs(inputs)
    if not skip_bad:
        listed.check()
    return listed


def build_network(weights: "WeightsChoice", precision: str, mode: str):
    """The embedding network, with MindSpore imported and the network built with signals held
    (see interrupts.py); only the download of the weights stays interruptible at once."""
    import os

    from ..interrupts import doing, held, import_mindspore

    # MindSpore logs a warning per missing device plugin; our own log says which device is used.
    # GLOG_v is read when mindspore is first imported, so set it before importing it.
    os.environ.setdefault("GLOG_v", "3")
    import_mindspore()
    from ..model.factory import create_network

    doing("fetching the weights")
    weights.file()  # downloads here, interruptible; the choice remembers the verified file
    with held("building the network"):
        # The choice carries the asset: its input_size and last_stride come with it (net.weights_meta).
        return create_network(weights=weights, include_top=False, precision=precision, mode=mode)
