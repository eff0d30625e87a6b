"""Images from disk: transferlab's data=hf loader against a hand-written Dataset + DataLoader over
the same JPEG files (the same workers, batch size and transform: decode, RGB, resize, [0, 1]
float32), and peak memory at two dataset sizes.

    .venv/bin/python scripts/bench_data.py                     # 20,000 JPEGs at 224 px, generated once
    .venv/bin/python scripts/bench_data.py --images 4000 --dir /tmp/bench_images   # a quick look

Each measurement runs in its own process (one epoch over --count images, shuffled), rounds in
alternating order; it prints images/s per round, the ratio transferlab / hand-written, and each
process's peak RSS (the training process, and the largest worker) for the smaller and the larger
count: RSS that grows with the number of images means something holds them in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

CLASSES = 10


def generate(root: Path, count: int, size: int) -> None:
    """`count` JPEGs of size × size in CLASSES class folders: smooth colour fields with a shape
    (what photos compress like, ~10 KB each), generated once."""
    import numpy as np
    from PIL import Image, ImageDraw

    done = sum(1 for _ in root.rglob("*.jpg")) if root.exists() else 0
    if done >= count:
        return
    print(f"generating {count} JPEGs at {size} px in {root} ...", flush=True)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    for i in range(count):
        folder = root / f"class{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        a, b = rng.random(3) * 255, rng.random(3) * 255
        pixels = (a[None, None] * ramp[:, None, None] + b[None, None] * ramp[None, :, None]) / 2
        image = Image.fromarray(pixels.astype(np.uint8))
        r = int(rng.integers(size // 8, size // 3))
        x, y = (int(v) for v in rng.integers(r, size - r, 2))
        ImageDraw.Draw(image).ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        image.save(folder / f"{i}.jpg", quality=90)


def files(root: Path, count: int) -> list[str]:
    paths = sorted(str(p) for p in root.rglob("*.jpg"))
    return paths[:count]


def hand_written(root: Path, count: int, size: int, batch: int, workers: int) -> float:
    """The loop a researcher would write: a Dataset that opens one file per item, a DataLoader."""
    import numpy as np
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    paths = files(root, count)

    class Images(Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            with Image.open(paths[i]) as image:
                image = image.convert("RGB")
                if image.size != (size, size):
                    image = image.resize((size, size), Image.BILINEAR)
                pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
            return pixels, int(Path(paths[i]).parent.name[5:])

    loader = DataLoader(Images(), batch_size=batch, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    return epoch(loader)


def transferlab_loader(root: Path, count: int, size: int, batch: int, workers: int) -> float:
    """data=hf's path: an imagefolder dataset (Arrow, paths only), ImageColumn, make_loader."""
    import torch

    from transferlab.data.hf import load_hf
    from transferlab.data.loaders import make_loader

    pool = load_hf(builder="imagefolder", data_files=files(root, count), image_size=size)
    x, y = pool.x_train, torch.from_numpy(pool.y_train)
    assert len(x) == count, (len(x), count)
    return epoch(make_loader((x, y), batch, shuffle=True, seed=0, num_workers=workers))


def epoch(loader) -> float:
    """Images per second over one epoch; the first batch (worker start-up) is not timed."""
    iterator = iter(loader)
    first = next(iterator)[0]
    seen, started = 0, time.perf_counter()
    for x, *_ in iterator:
        seen += len(x)
    elapsed = time.perf_counter() - started
    assert first.shape[1:] == x.shape[1:]
    return seen / elapsed


def measure(which: str, args) -> dict:
    """One measurement in a fresh process: images/s and peak RSS (MB) of it and of its workers."""
    command = [sys.executable, __file__, "--measure", which, "--dir", str(args.dir), "--count", str(args.count_now),
               "--size", str(args.size), "--batch", str(args.batch), "--workers", str(args.workers)]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/transferlab_bench_images"))
    parser.add_argument("--images", type=int, default=20000, help="the larger count (the smaller: a quarter)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--measure", choices=["hand", "transferlab", "prepare"])
    parser.add_argument("--count", type=int)
    args = parser.parse_args()

    if args.measure == "prepare":
        from transferlab.data.hf import load_hf

        load_hf(builder="imagefolder", data_files=files(args.dir, args.count), image_size=args.size)
        print(json.dumps({}))
        return
    if args.measure:  # the child process
        run = hand_written if args.measure == "hand" else transferlab_loader
        rate = run(args.dir, args.count, args.size, args.batch, args.workers)
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(json.dumps({"images_per_s": rate, "rss_mb": own, "worker_rss_mb": workers}))
        return

    generate(args.dir, args.images, args.size)
    for count in (args.images // 4, args.images):  # the imagefolder's Arrow table (paths), built once, untimed
        args.count_now = count
        measure("prepare", args)
    print(f"{os.cpu_count()} CPUs, batch {args.batch}, {args.workers} workers, {args.size} px; "
          f"one shuffled epoch per measurement, rounds alternate", flush=True)
    results: dict[tuple[str, int], list[dict]] = {}
    for count in (args.images // 4, args.images):
        args.count_now = count
        for r in range(args.rounds):
            order = ("hand", "transferlab") if r % 2 == 0 else ("transferlab", "hand")
            for which in order:
                result = measure(which, args)
                results.setdefault((which, count), []).append(result)
                print(f"  {count:>6} images  {which:<11}  {result['images_per_s']:7.1f} images/s  "
                      f"RSS {result['rss_mb']:6.0f} MB  worker RSS {result['worker_rss_mb']:6.0f} MB", flush=True)
    print()
    for count in (args.images // 4, args.images):
        ours = sum(r["images_per_s"] for r in results[("transferlab", count)]) / args.rounds
        hand = sum(r["images_per_s"] for r in results[("hand", count)]) / args.rounds
        print(f"{count:>6} images: transferlab {ours:.1f} images/s, hand-written {hand:.1f}: ratio {ours / hand:.2f}x")
    small, large = args.images // 4, args.images
    for which in ("transferlab", "hand"):
        peak = {c: max(r["rss_mb"] for r in results[(which, c)]) for c in (small, large)}
        workers = {c: max(r["worker_rss_mb"] for r in results[(which, c)]) for c in (small, large)}
        print(f"{which:<11} peak RSS {peak[small]:.0f} MB at {small} images, {peak[large]:.0f} MB at {large} "
              f"({peak[large] / peak[small]:.2f}x); largest worker {workers[small]:.0f} → {workers[large]:.0f} MB "
              f"({workers[large] / workers[small]:.2f}x)")


if __name__ == "__main__":
    main()
