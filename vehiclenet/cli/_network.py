"""What the commands that run the network share: their options, the checks made before
MindSpore is imported, and building the network."""
import argparse
import logging
from typing import TYPE_CHECKING, List, Optional

if TYPE_CHECKING:  # annotations only: the parsers of every command must not import numpy
    from ..embedding.inputs import ImageInputs
    from ..weights.choice import WeightsChoice

#: vehiclenet.retrieval.index.KINDS, written again here because that module imports numpy, which the
#: parser of every command (verify, download...) must not (tests/test_index.py checks they match).
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


def network_files(args: argparse.Namespace) -> List[str]:
    """The weights file the network of ``embed``/``rank`` will read (an input like the images)."""
    from ..weights.choice import weights_files

    return weights_files(args.checkpoint, not args.no_pretrained)


def list_inputs(inputs: List[str], skip_bad: bool) -> "ImageInputs":
    """The images of ``inputs`` (files and folders), listed once for the whole command; missing
    inputs and folders without images are reported now, before MindSpore is imported (with
    --skip-bad, embed skips them instead)."""
    from ..embedding.inputs import expand_inputs

    listed = expand_inputs(inputs)
    if not skip_bad:
        listed.check()
    return listed


def embedding_network(args: argparse.Namespace, images: int):
    """The embedding network for a job of ``images`` images: PyNative for a handful, where
    compiling the graph would take longer than the job."""
    from ..model.checkpoint import check_checkpoint_file
    from ..model.device import mode_for_images

    if args.checkpoint:  # a FIFO or device is refused here, before the network is built
        check_checkpoint_file(args.checkpoint)
    choice = weights_choice(args)
    if choice.random:
        logging.getLogger("vehiclenet").warning("--no-pretrained: random weights (seed %d), the features mean "
                                                "nothing", choice.seed)
    mode = mode_for_images(images)
    logging.getLogger("vehiclenet").info(
        "execution mode %s for %d image(s): %s", mode, images,
        "sooner than compiling the graph" if mode == "pynative" else "the graph is compiled once")
    return build_network(choice.checkpoint, choice.pretrained, args.precision, mode=mode, seed=choice.seed)


def build_network(checkpoint: Optional[str], pretrained: bool, precision: str, mode: str,
                  seed: Optional[int] = None):
    """The embedding network, with MindSpore imported and the network built with signals held
    (see interrupts.py); only the download of the weights stays interruptible at once."""
    import os

    from ..interrupts import doing, held, import_mindspore

    # MindSpore logs a warning per missing device plugin; our own log says which device is used.
    # GLOG_v is read when mindspore is first imported, so set it before importing it.
    os.environ.setdefault("GLOG_v", "3")
    import_mindspore()
    from ..model.factory import create_network, weights_path

    doing("fetching the weights")
    weights_path(checkpoint, pretrained)  # downloads here, interruptible; create_network finds it verified
    with held("building the network"):
        # pretrained passed on: the asset's input_size and last_stride come with it (net.weights_meta).
        return create_network(pretrained=pretrained, checkpoint=checkpoint, include_top=False, precision=precision,
                              mode=mode, seed=seed)
