"""Loader throughput: device-resident, FFCV, DALI and a plain torch DataLoader, on real CIFAR.

    python bench/loaders.py --data-dir /path/to/data [--epochs 5] [--batch-size 512] [--quick]

Every loader runs the same augmentation (4-pixel zero-padded random crop + flip) from the same epoch plan and
delivers (B, 3, 32, 32) float channels-last batches on the device. The DataLoader baseline does the crop/flip per
image in numpy inside its worker processes (no torchvision). Images/s counts full epochs; the first epoch (compiles,
worker start-up, page cache) is reported apart from the median of the others. Rows are appended as JSON lines to
--out, each with the harness's provenance (CPU model, capability, native bf16, threads, versions), and the table
is printed as markdown.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from harness import append_jsonl, bench_device, provenance, run_cli

from engine.config import DataConfig, default_data_dir
from engine.data import DeviceLoader, Loader, backends, build_loaders, load_splits
from engine.data.cifar import ArraySplit
from engine.data.loader import PAD, SIZE, EpochPlan, PlannedLoader
from engine.errors import UserError

BACKENDS = ("device", "ffcv", "dali", "dataloader")


class _PlannedImages(torch.utils.data.Dataset):
    """Position p of the current epoch plan -> (augmented HWC uint8 image, label), computed in a worker."""

    def __init__(self, split: ArraySplit):
        self.padded = np.pad(split.images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))  # (N, 40, 40, 3)
        self.labels = split.labels
        self.plan: EpochPlan | None = None

    def __len__(self) -> int:
        return len(self.plan.order)

    def __getitem__(self, p: int) -> tuple[np.ndarray, int]:
        i, y, x = self.plan.order[p], self.plan.dy[p], self.plan.dx[p]
        image = self.padded[i, y : y + SIZE, x : x + SIZE]
        return np.ascontiguousarray(image[:, ::-1] if self.plan.flip[p] else image), int(self.labels[i])


class DataLoaderBaseline(PlannedLoader):
    """torch.utils.data.DataLoader with per-image numpy augmentation in worker processes (forked every epoch, so
    they see the epoch's plan)."""

    def __init__(self, split: ArraySplit, batch_size: int, device: torch.device, num_workers: int, **kwargs):
        super().__init__(split, batch_size, device, train=True, **kwargs)
        self.dataset, self.num_workers = _PlannedImages(split), num_workers

    def __iter__(self):
        self.dataset.plan = self.plan()
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        for hwc, labels in loader:  # (B, 32, 32, 3) uint8 numpy-collated tensors, (B,) int64
            yield self.finish(hwc, labels)


def make_loader(backend: str, train: ArraySplit, batch_size: int, device: torch.device, workers: int) -> Loader:
    if backend == "dataloader":
        return DataLoaderBaseline(train, batch_size, device, workers)
    if backend == "device":
        return DeviceLoader(train, batch_size, device, train=True)
    cfg = DataConfig(dataset="cifar10", backend=backend)
    return build_loaders(cfg, train, None, batch_size, 1, device, 0)[0]  # no test loader (no second pipeline)


def time_epochs(loader: Loader, epochs: int, device: torch.device) -> list[float]:
    seconds = []
    for epoch in range(1, epochs + 1):
        loader.set_epoch(epoch)
        start, images = time.perf_counter(), 0
        for batch in loader:
            images += len(batch[1])
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the last batch's copy and conversion are asynchronous
        seconds.append(time.perf_counter() - start)
        x = batch[0]
        assert images == loader.num_images - loader.num_images % loader.batch_size, "not a full epoch"
        assert x.is_contiguous(memory_format=torch.channels_last) and x.device.type == device.type
    return seconds


def environment(device: torch.device) -> dict:
    def version(distribution: str) -> str | None:  # ffcv.__version__ says 0.0.3rc1 in ffcv 1.0.2
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return None

    env = provenance(device)  # the device, the CPU's model, capability and native bf16, torch's threads, versions
    return {**env, "cpus": os.cpu_count(), "ffcv": version("ffcv"), "dali": version("nvidia-dali-cuda130")}


def bench_backend(backend: str, train: ArraySplit, args, device: torch.device) -> dict:
    start = time.perf_counter()
    loader = make_loader(backend, train, args.batch_size, device, args.workers)
    setup = time.perf_counter() - start  # FFCV: beton (cached after the first run) and pipeline compile
    seconds = time_epochs(loader, args.epochs, device)
    images = len(loader) * args.batch_size
    return {
        "backend": backend,
        "images_per_epoch": images,
        "setup_s": round(setup, 2),
        "first_epoch_images_per_s": round(images / seconds[0]),
        "images_per_s": round(images / statistics.median(seconds[1:])),  # later epochs; median: robust to a busy host
        "epoch_seconds": [round(s, 3) for s in seconds],
        "load_avg_1m": round(os.getloadavg()[0], 2),  # other work on the machine, right after the run
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| backend | device | images/epoch | setup s | first epoch img/s | later epochs img/s (median) | load |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backend']} | {r['device_type']} | {r['images_per_epoch']} | {r['setup_s']:.1f} "
            f"| {r['first_epoch_images_per_s']:,} | {r['images_per_s']:,} | {r['load_avg_1m']} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=default_data_dir(), help="holds cifar-10-batches-py (default $ARAT_DATA_DIR)")
    p.add_argument("--dataset", default="cifar10", choices=("cifar10", "cifar100"))
    p.add_argument("--epochs", type=int, help="at least 2: the first is a warm-up (default 5; --quick: 2)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated subset of {','.join(BACKENDS)}")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader worker processes")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--quick", action="store_true", help="10,000 training images and 2 epochs")
    p.add_argument("--out", type=Path, default=Path("bench/results/loaders.jsonl"))
    args = p.parse_args(argv)
    unknown = set(args.backends.split(",")) - set(BACKENDS)
    if unknown:
        p.error(f"unknown backends {sorted(unknown)}: pick from {', '.join(BACKENDS)}")
    if args.epochs is None:
        args.epochs = 2 if args.quick else 5
    if args.epochs < 2 or args.batch_size < 1:
        p.error("--epochs must be at least 2 (the first is a warm-up) and --batch-size positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = bench_device(args.device)
    cfg = DataConfig(dataset=args.dataset, data_dir=args.data_dir, train_subset=10_000 if args.quick else 0)
    train, _ = load_splits(cfg, seed=0)
    if args.batch_size > len(train):
        raise UserError(
            f"--batch-size {args.batch_size} is larger than the {len(train)} training images: no full batch"
        )
    env = environment(device)  # with the time of the run
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for backend in args.backends.split(","):
        if backend in ("ffcv", "dali") and not backends.available(backend):  # a row saying so, not a silent gap
            print(f"skip {backend}: {backends.INSTALL[backend]}")
            append_jsonl(args.out, [{"bench": "loaders", "backend": backend, "skipped": backends.INSTALL[backend],
                                     "dataset": args.dataset, "device_type": device.type, **env}])  # fmt: skip
            continue
        row = bench_backend(backend, train, args, device)
        row |= {"bench": "loaders", "dataset": args.dataset, "batch_size": args.batch_size, "epochs": args.epochs}
        row |= {"device_type": device.type, "workers": args.workers, **env}
        rows.append(row)
        append_jsonl(args.out, [row])
        print(f"{backend}: {row['images_per_s']:,} img/s (first epoch {row['first_epoch_images_per_s']:,})")
    print(
        f"\n{table(rows)}\n\n{len(train)} training images, batch {args.batch_size}, {env['device']}, "
        f"{env['cpus']} CPUs; rows appended to {args.out}"
    )


if __name__ == "__main__":
    run_cli(main, "bench/loaders.py")
