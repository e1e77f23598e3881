"""PyTorch eager fp32 baseline of the same network (ResNet-50 + 512-d bottleneck), for
side-by-side figures: run with a Python that has torch (``pip install torch==2.13.0``
in a separate environment), or through ``embed_throughput.py --torch-python PATH``.

    python benchmarks/torch_baseline.py [--batch-sizes 1 8] [--seconds 15] [--train]

``--train`` times a training step instead (575-class head, cross-entropy, SGD
momentum 0.9, weight decay 1e-4), the counterpart of train_throughput.py, in each of
``--train-modes``: fp32 (NCHW), fp32 channels-last, and bf16 autocast channels-last
(``torch.autocast("cpu", dtype=torch.bfloat16)``, PyTorch's own fast CPU training recipe).
"""
import argparse
import contextlib
import time

import torch
from torch import nn


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, stride: int, down: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid * 4, 1, bias=False), nn.BatchNorm2d(mid * 4))
        self.down = nn.Sequential(nn.Conv2d(cin, mid * 4, 1, stride, bias=False), nn.BatchNorm2d(mid * 4)) \
            if down else nn.Identity()

    def forward(self, x):
        return torch.relu(self.body(x) + self.down(x))


def embedding_net() -> nn.Module:
    layers, cin = [], 64
    for mid, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        layers += [Bottleneck(cin, mid, stride, True)] + [Bottleneck(mid * 4, mid, 1, False) for _ in range(blocks - 1)]
        cin = mid * 4
    return nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1),
        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 512), nn.BatchNorm1d(512)).eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--train", action="store_true", help="time a training step instead of inference")
    parser.add_argument("--train-modes", nargs="+", choices=TRAIN_MODES, default=list(TRAIN_MODES),
                        help="training variants to time (default: all)")
    args = parser.parse_args()
    if args.train:
        return train(args)
    net = embedding_net()
    print(f"torch {torch.__version__}, eager fp32, {torch.get_num_threads()} threads")
    with torch.inference_mode():
        for batch in args.batch_sizes:
            x = torch.randn(batch, 3, args.image_size, args.image_size)
            net(x)
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < args.seconds or done < 3 * batch:
                assert net(x).shape == (batch, 512)
                done += batch
            elapsed = time.perf_counter() - start
            print(f"batch {batch:3d}: {done / elapsed:6.2f} img/s  (torch eager, {done} images in {elapsed:.1f} s)")


TRAIN_MODES = ("fp32", "fp32-channels-last", "bf16-autocast-channels-last")


def train(args: argparse.Namespace) -> None:
    print(f"torch {torch.__version__}, eager training, {torch.get_num_threads()} threads")
    for mode in args.train_modes:
        torch.manual_seed(0)
        net = nn.Sequential(embedding_net(), nn.Dropout(0.5), nn.Linear(512, 575)).train()
        layout = torch.channels_last if "channels-last" in mode else torch.contiguous_format
        net = net.to(memory_format=layout)
        opt = torch.optim.SGD(net.parameters(), lr=0.002, momentum=0.9, weight_decay=1e-4)
        loss_fn = nn.CrossEntropyLoss()
        for batch in args.batch_sizes:
            x = torch.randn(batch, 3, args.image_size, args.image_size).contiguous(memory_format=layout)
            y = torch.randint(0, 575, (batch,))

            def step() -> None:
                opt.zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16) if "bf16" in mode else contextlib.nullcontext():
                    loss = loss_fn(net(x), y)
                loss.backward()
                opt.step()

            step()
            step()
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < args.seconds or done < 3 * batch:
                step()
                done += batch
            elapsed = time.perf_counter() - start
            print(f"torch train {mode:28s} batch {batch:3d}: {done / elapsed:6.2f} img/s  "
                  f"({done} images in {elapsed:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
