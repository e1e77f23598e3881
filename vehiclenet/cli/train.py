"""`finetune` and `export`: both build the network."""
import argparse
from ._common import add_command, emit
from ._network import check_image_size


def add_finetune_command(sub: "argparse._SubParsersAction") -> None:
    p = add_command(
        sub, "finetune",
        json_help="print the run (identities, epochs, checkpoints) as one JSON object",
        help="fine-tune on your own identities (ROOT/<id>/*.jpg or VeRi image_train/)",
        description="Fine-tune VehicleNet: published backbone and bottleneck, a new last layer for your "
        "identities. Writes labels.json and vehiclenet-eNNN.ckpt (network + SGD state + epoch) into --out; "
        "create_network(checkpoint=FILE) loads them (the head sized from the file). Under msrun every worker trains on its "
        "shard with averaged gradients and only rank 0 writes files.",
    )
    p.add_argument("--data", required=True, metavar="DIR", help="ROOT/<id>/*.jpg, or a VeRi-776 folder (image_train/)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for labels.json and checkpoints")
    p.add_argument("--epochs", type=int, default=40, help="total epochs (default 40, the reference VeRi stage)")
    p.add_argument("--batch-size", type=int, default=24, help="images per step and worker (default 24)")
    p.add_argument("--lr", type=float, default=0.02, help="head learning rate; the rest trains at 0.1x (default 0.02)")
    p.add_argument("--image-size", type=int, default=384, help="square training size (default 384)")
    p.add_argument("--no-pretrained", action="store_true", help="start from random weights, not the published ones")
    p.add_argument("--checkpoint", metavar="CKPT", help="start from the weights of this file instead")
    p.add_argument("--resume", metavar="CKPT", help="continue a run from its checkpoint (weights, SGD state, epoch)")
    p.add_argument("--num-workers", type=int, default=2, help="data pre-processing threads (default 2)")
    p.add_argument("--save-every", type=int, default=1, metavar="E", help="checkpoint every E epochs (default 1)")
    p.add_argument("--keep-max", type=int, default=5, metavar="K", help="keep the newest K checkpoints (default 5)")
    p.add_argument("--warmup-epochs", type=float, default=None, help="linear warm-up epochs (default min(5, epochs // 8): none below 8 epochs)")
    p.add_argument("--decay-epochs", type=int, nargs="*", default=None, metavar="E",
                   help="epochs where the lr drops 10x (default 3/4 of --epochs)")
    p.add_argument("--eval-data", metavar="DIR", help="VeRi-style folder with image_query/ and image_test/")
    p.add_argument("--eval-every", type=int, default=0, metavar="E", help="evaluate on --eval-data every E epochs")
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=None, help="seed for weights, data order and augmentations")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="convolution arithmetic: fp32 (default) or bf16 (forward and both backward passes in "
                   "bfloat16 with float32 accumulation; BatchNorm, weights, gradients and the optimizer stay "
                   "float32, checkpoints as in fp32); bf16 needs a CPU with AVX512-BF16 or AMX")
    p.set_defaults(func=_cmd_finetune)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from ..training.finetune import FinetuneConfig, finetune, note_start
    from ..interrupts import import_mindspore

    config = FinetuneConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, image_size=args.image_size,
        pretrained=not args.no_pretrained, checkpoint=args.checkpoint, resume=args.resume,
        num_workers=args.num_workers, save_every=args.save_every, keep_max=args.keep_max,
        warmup_epochs=args.warmup_epochs, decay_epochs=args.decay_epochs, eval_data=args.eval_data,
        eval_every=args.eval_every, max_steps_per_epoch=args.max_steps_per_epoch, seed=args.seed,
        precision=args.precision)
    config.check()  # every option, before MindSpore is imported and before anything is written
    note_start(args.resume)
    import_mindspore()

    epochs = []

    def show(stats) -> None:
        epochs.append({"epoch": stats.epoch, "loss": stats.loss, "images_per_second": stats.images_per_second,
                       "step": stats.step, "seconds": stats.seconds, "compile_seconds": stats.compile_seconds,
                       "evaluation": stats.evaluation, "checkpoint": stats.checkpoint and str(stats.checkpoint)})
        if args.json:
            return
        line = (f"epoch {stats.epoch}/{args.epochs}: loss {stats.loss:.4f}, {stats.images_per_second:.2f} images/s, "
                f"step {stats.step}, {stats.seconds:.1f} s")
        if stats.compile_seconds is not None:
            line += f" (first step incl. compilation {stats.compile_seconds:.1f} s, not in images/s)"
        if stats.evaluation:
            line += f", mAP {stats.evaluation['mAP']:.4f}, rank-1 {stats.evaluation['rank1']:.4f}"
        if stats.checkpoint:
            line += f", saved {stats.checkpoint}"
        print(line, flush=True)

    result = finetune(args.data, args.out, config, on_epoch=show)
    if result.rank == 0:
        lines = [f"{result.num_classes} identities, labels in {result.labels_file}"
                 + (f", {result.group_size} workers" if result.group_size > 1 else "")]
        lines += [str(result.checkpoints[-1])] if result.checkpoints else []
        emit(args, lines, {"identities": result.num_classes, "labels": str(result.labels_file),
                           "workers": result.group_size, "epochs": epochs,
                           "checkpoints": [str(c) for c in result.checkpoints]})
    return 0


def add_export_command(sub: "argparse._SubParsersAction") -> None:
    p = add_command(
        sub, "export",
        json_help="print the file written, its format and input shape as one JSON object",
        help="export the embedding network (image -> 512-d) to MindIR or ONNX, or a checkpoint's weights alone",
        description="Export the embedding network for a B x 3 x S x S float32 input (pre-processed) to "
        "MindIR (reload with mindspore.load + nn.GraphCell; B fixed) or ONNX (onnxruntime; any B, the input x "
        "has a dynamic batch axis). CKPT writes the network "
        "weights of --checkpoint (head included) without the optimizer state of a fine-tuning checkpoint, a "
        "third of its size, for create_network(checkpoint=...); --image-size and --batch-size "
        "do not apply to it. The last line of stdout is the file written.",
    )
    p.add_argument("--format", required=True, type=str.upper, choices=["MINDIR", "ONNX", "CKPT"],
                   help="MINDIR, ONNX or CKPT")
    p.add_argument("--out", required=True, metavar="FILE", help="output file (the format's suffix is added if absent)")
    p.add_argument("--checkpoint", metavar="PATH", help="weights to export (default: the published checkpoint)")
    p.add_argument("--num-classes", type=int, default=None, metavar="N",
                   help="identities of the checkpoint's head, checked against the file")
    p.add_argument("--image-size", type=int, default=None,
                   help="square input size (default: the weights' input size, 384x384 for the published ones)")
    p.add_argument("--batch-size", type=int, default=1, help="fixed batch dimension of MINDIR (default 1); "
                   "ONNX takes any batch")
    p.add_argument("--no-pretrained", action="store_true", help="export random weights (testing only)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from ..model.export import export_embedding
    from ..interrupts import kept

    check_image_size(args)
    kept(f"nothing written ({args.out} untouched)")
    path = export_embedding(args.out, file_format=args.format, checkpoint=args.checkpoint,
                            pretrained=not args.no_pretrained, num_classes=args.num_classes,
                            image_size=args.image_size, batch_size=args.batch_size)
    result = {"path": str(path), "format": args.format, "bytes": path.stat().st_size, "input": None}
    if args.format == "CKPT":
        line = f"CKPT: network weights, no training state ({path.stat().st_size / 2 ** 20:.1f} MiB)"
    else:
        from ..model.factory import weights_meta

        batch = "N" if args.format == "ONNX" else args.batch_size
        height, width = ((args.image_size,) * 2 if args.image_size else
                         weights_meta(args.checkpoint, not args.no_pretrained).input_size)
        line = (f"{args.format}: embedding network, input {batch}x3x{height}x{width} "
                "float32 -> 512-d" + (" (any batch N)" if args.format == "ONNX" else ""))
        result["input"] = [None if batch == "N" else batch, 3, height, width]
    emit(args, [line, str(path)], result)
    return 0
