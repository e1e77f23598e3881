"""Fine-tune VehicleNet in your own training script, with the package's public pieces.

    python examples/finetune_own_script.py --data my_vehicles/ --out runs/exp2 --epochs 40

``my_vehicles/`` holds one folder per vehicle identity (``my_vehicles/<id>/*.jpg``)
or is a VeRi-776 folder (``image_train/``). The script starts from the published
weights (``--no-pretrained``: random weights), trains the reference recipe and
saves a checkpoint every epoch; at the end it reloads the last checkpoint the way
an application would and embeds one image.
"""
import argparse
import time

# vehiclenet before mindspore: importing it shortens GNU OpenMP's spin-wait, which only takes
# effect before mindspore loads libgomp (training on CPU is ~8 % faster).
import vehiclenet
from vehiclenet.datasets.folders import save_label_map, scan_training_data
from vehiclenet.training import finetune as ft

import mindspore as ms  # noqa: E402  isort: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--no-pretrained", action="store_true")
    args = parser.parse_args()

    # 1. Data: identities -> labels 0..N-1, the mapping saved next to the checkpoints.
    data = scan_training_data(args.data)
    save_label_map(data, args.out)
    dataset = ft.build_train_dataset(data, batch_size=args.batch_size, image_size=args.image_size)
    steps_per_epoch = dataset.get_dataset_size()

    # 2. Network: published backbone and bottleneck, a fresh last layer for our identities.
    net = vehiclenet.create_network(pretrained=not args.no_pretrained, num_classes=data.num_classes,
                                    mode="graph")  # compiled: the fast mode for training

    # 3. Optimiser: head at --lr, the rest at 0.1x; SGD momentum 0.9, wd 1e-4; warm-up then step decay.
    optimizer = ft.create_optimizer(net, ft.lr_schedule(args.lr, steps_per_epoch, args.epochs))
    train_step = ft.build_train_step(net, optimizer)
    saver = ft.CheckpointSaver(args.out, keep_max=3)

    # 4. The loop.
    step = 0
    for epoch in range(1, args.epochs + 1):
        start, losses = time.perf_counter(), []
        for images, labels in dataset.create_tuple_iterator(num_epochs=1):
            losses.append(float(train_step(images, labels).asnumpy()))
            step += 1
        seconds = time.perf_counter() - start
        path = saver.save(train_step, epoch=epoch, step=step)
        print(f"epoch {epoch}: loss {sum(losses) / len(losses):.4f}, "
              f"{steps_per_epoch * args.batch_size / seconds:.1f} images/s, saved {path}", flush=True)

    # 5. Use the result: the embedding network from the last checkpoint.
    embedder = vehiclenet.create_network(checkpoint=path, num_classes=data.num_classes, include_top=False,
                                         mode="graph")
    images, _ = next(dataset.create_tuple_iterator(num_epochs=1))
    features = embedder(images[:1])
    print(f"reloaded {path}: embedding shape {tuple(features.shape)}, labels in {args.out}/labels.json")
    assert features.shape == (1, 512) and ms.ops.isfinite(features).all()


if __name__ == "__main__":
    main()
