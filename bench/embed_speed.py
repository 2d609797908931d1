"""Embedding throughput per model, precision and memory layout, on this machine.

Usage: python bench/embed_speed.py [--models efficientnet_lite0 ...] [--batch 32] [--repeats 2]
Prints a table of images/s. resnet50/18 run with randomly initialised weights when no ImageNet
weights are available (the speed is the same).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.embedders import MODELS, TorchvisionResNet, create_embedder  # noqa: E402


def throughput(name: str, precision: str, channels_last: bool, batch: int, repeats: int) -> float:
    """Images per second through the model's backbone on a random batch (preprocessing excluded)."""
    embedder = create_embedder(name, device="cpu", precision=precision, batch_size=batch)
    if isinstance(embedder, TorchvisionResNet):
        import torchvision

        model = getattr(torchvision.models, embedder.arch)(weights=None)
        preprocess = getattr(torchvision.models, embedder.weights_enum).IMAGENET1K_V1.transforms()
        embedder._load = lambda: (torch.nn.Sequential(*list(model.children())[:-1], torch.nn.Flatten(1)),
                                  model.fc, preprocess)
    backbone, _, _ = embedder.load()._loaded
    x = torch.randn(batch, 3, 224, 224)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        backbone = backbone.to(memory_format=torch.contiguous_format)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        backbone(x)  # warm-up
        started = time.perf_counter()
        for _ in range(repeats):
            backbone(x)
    return batch * repeats / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=sorted(MODELS), choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, batch {args.batch}")
    print(f"{'model':<20}{'fp32':>10}{'fp32+CL':>10}{'bf16+CL':>10}   (images/s)")
    for name in args.models:
        cells = [throughput(name, p, cl, args.batch, args.repeats) for p, cl in (("fp32", False), ("fp32", True), ("bf16", True))]
        print(f"{name:<20}" + "".join(f"{c:>10.1f}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
