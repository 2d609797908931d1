"""Embedding speed per model on this machine: the naive baseline, imsrc's chosen configuration, and populate.

Usage: python bench/embed.py [--models efficientnet_lite0 resnet50] [--images 256] [--baseline REV] [--json FILE]

For each model, on the same real images (Fashion-MNIST test images, Debian's dataset-fashion-mnist):
- naive: fp32, default memory format, batch 16, model only (preprocessed tensors in, features out);
- imsrc: the configuration EMBED_PRECISION=auto and EMBED_RUNTIME=auto pick here (PyTorch channels-last in fp32
  or bf16, or OpenVINO), model only;
- populate: `ingest` end to end (read, hash, decode, embed, store) into a throw-away embedded PostgreSQL;
- cosine of imsrc's vectors to fp32's, mean and minimum over the images;
- onnxruntime, openvino (where installed: bench/requirements.txt): the naive backbone exported to ONNX, each
  runtime with its own defaults for this CPU.
resnet50/18 use randomly initialised weights when no ImageNet weights are available: the speed is the same, but
their cosines then say little. Prints a table; --json writes {model: {naive, imsrc, populate, precision, runtime, load_first_s, load_stored_s, ...}}.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.embedding.models import TorchvisionResNet, create_embedder
from backend.embedding.pixels import network_input  # noqa: E402
from backend.embedding.vectors import l2_normalize  # noqa: E402
from backend.pipeline.datasets import load_dataset, select_balanced  # noqa: E402
from bench.common import checkout, machine, write_json  # noqa: E402

NAIVE_BATCH = 16


def embedder_for(name: str, precision: str, engine_dir: Path | None = None):
    """An embedder of `name`, loaded; ResNets without ImageNet weights get random ones (same speed)."""
    embedder = create_embedder(name, device="cpu", precision=precision, batch_size=NAIVE_BATCH, engine_dir=engine_dir)
    if isinstance(embedder, TorchvisionResNet) and embedder.weights_problem():
        import torchvision

        torch.manual_seed(0)  # the same random weights in every embedder made here: cosines compare like with like
        network = getattr(torchvision.models, embedder.arch)(weights=None)
        transforms = getattr(torchvision.models, embedder.weights_enum).IMAGENET1K_V1.transforms()
        embedder._load = lambda: (torch.nn.Sequential(*list(network.children())[:-1], torch.nn.Flatten(1)),
                                  network.fc, transforms)
        embedder.random_weights = True
    return embedder.load()


def model_only(forward, batches: list[torch.Tensor]) -> tuple[float, np.ndarray]:
    """Images/s of a forward pass alone (preprocessed batches in, features out), and its L2-normalised features."""
    outputs = []
    with torch.inference_mode():
        for batch in batches[:2]:  # warm-up: the first passes set up kernels
            forward(batch)
        started = time.perf_counter()
        for batch in batches:
            outputs.append(torch.as_tensor(forward(batch)).float())
        seconds = time.perf_counter() - started
    return sum(len(b) for b in batches) / seconds, l2_normalize(torch.cat(outputs).numpy())


def other_runtimes(backbone, batches: list[torch.Tensor], fp32_vectors: np.ndarray) -> dict:
    """Images/s and cosine to PyTorch fp32 of the same backbone exported to ONNX, under ONNX Runtime and OpenVINO
    (each with its defaults for this CPU: OpenVINO picks bf16 itself where the CPU has it), where installed."""
    try:
        import onnx  # noqa: F401 (torch's exporter needs it)
    except ImportError:
        return {"missing": "pip install -r bench/requirements.txt"}
    results = {}
    with tempfile.TemporaryDirectory(prefix="imsrc-onnx-") as tmp:
        path = str(Path(tmp) / "backbone.onnx")
        torch.onnx.export(backbone, batches[0], path, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
        runners = {}
        try:
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            runners["onnxruntime"] = lambda x: session.run(None, {"x": x})[0]
        except ImportError:
            results["onnxruntime"] = {"missing": "pip install onnxruntime"}
        try:
            import openvino

            compiled = openvino.Core().compile_model(path, "CPU")
            runners["openvino"] = lambda x: compiled(x)[0]
        except ImportError:
            results["openvino"] = {"missing": "pip install openvino"}
        for name, run_batch in runners.items():
            arrays = [b.numpy() for b in batches]
            for x in arrays[:2]:
                run_batch(x)
            started = time.perf_counter()
            outputs = [np.asarray(run_batch(x), dtype=np.float32) for x in arrays]
            seconds = time.perf_counter() - started
            cosine = (l2_normalize(np.concatenate(outputs)) * fp32_vectors).sum(1)
            results[name] = {"images_per_s": round(sum(len(x) for x in arrays) / seconds, 1),
                             "cosine_mean": round(float(cosine.mean()), 5), "cosine_min": round(float(cosine.min()), 5)}
    return results


def populate_speed(embedder, items) -> float:
    """Images/s of ingest() end to end into a fresh embedded PostgreSQL."""
    from sqlalchemy.orm import sessionmaker

    from backend.pipeline.ingest import ingest
    from backend.storage.embedded_server import EmbeddedPostgres
    from backend.storage.migrations import migrated_engine

    with tempfile.TemporaryDirectory(prefix="imsrc-bench-") as tmp:
        server = EmbeddedPostgres(Path(tmp) / "pg")
        try:
            engine = migrated_engine(server.acquire(), "bench")
            report = ingest(sessionmaker(engine, expire_on_commit=False), items, embedder,
                            batch_size=embedder.batch_size, progress=False)
            engine.dispose()
        finally:
            server.release()
    return report.images_per_second


LOAD = ("import sys, time; from backend.embedding.models import create_embedder; "
        "e = create_embedder(sys.argv[1], device='cpu', engine_dir=sys.argv[2]); "
        "started = time.perf_counter(); e.load(); print(time.perf_counter() - started)")


def load_seconds(name: str) -> dict:
    """Seconds a new process takes to load the model (after its imports) on a machine's first start, when the
    engine is measured and OpenVINO converts and compiles, and on a later start, which reuses what was stored."""
    if create_embedder(name).weights_problem():
        return {"load_first_s": None, "load_stored_s": None}  # random weights are made here, not loaded
    with tempfile.TemporaryDirectory(prefix="imsrc-engines-") as engines:
        seconds = [float(subprocess.run([sys.executable, "-c", LOAD, name, engines], check=True, capture_output=True,
                                        text=True, cwd=Path(__file__).resolve().parent.parent).stdout)
                   for _ in range(2)]
    return {"load_first_s": round(seconds[0], 2), "load_stored_s": round(seconds[1], 2)}


def run(name: str, items) -> dict:
    from backend.embedding.decode import decode

    naive_backbone = embedder_for(name, "fp32")._loaded[0].to(memory_format=torch.contiguous_format)
    chosen = embedder_for(name, "auto")
    # imsrc's input is what its preprocessing gives (uint8 pixels, normalised in the network: embedding.pixels); the
    # naive baseline's is the preset's float tensors
    prepared = chosen.prepare([decode(item.read()).image for item in items])
    batches = list(torch.split(network_input(chosen._loaded[2], prepared), NAIVE_BATCH))
    naive, fp32_vectors = model_only(naive_backbone, batches)
    imsrc, chosen_vectors = model_only(chosen.embed_prepared, list(torch.split(prepared, NAIVE_BATCH)))
    cosine = (fp32_vectors * chosen_vectors).sum(1)
    return {"naive": round(naive, 1), "imsrc": round(imsrc, 1), "speedup": round(imsrc / naive, 2),
            "populate": round(populate_speed(chosen, items), 1), "precision": chosen.precision,
            **load_seconds(name),
            "why": chosen.precision_reason, "runtime": chosen.runtime_reason, "cosine_mean": round(float(cosine.mean()), 5),
            "cosine_min": round(float(cosine.min()), 5), "random_weights": getattr(chosen, "random_weights", False),
            "runtimes": other_runtimes(naive_backbone, batches, fp32_vectors)}


def _loads(r: dict) -> str:
    return "n/a" if r["load_first_s"] is None else f"{r['load_first_s']:.1f}/{r['load_stored_s']:.1f}"


def baseline(args) -> dict:
    """This benchmark as it is at revision args.baseline (in a git worktree), with the same arguments: it prints its
    own table; returns its JSON report."""
    print(f"before ({args.baseline}):", flush=True)
    with checkout(args.baseline) as tree, tempfile.TemporaryDirectory(prefix="imsrc-embed-") as folder:
        out = Path(folder) / "before.json"
        command = [sys.executable, str(tree / "bench" / "embed.py"), "--models", *args.models, "--images",
                   str(args.images), "--json", str(out)] + (["--data-dir", str(args.data_dir)] if args.data_dir else [])
        subprocess.run(command, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, check=True)
        report = json.loads(out.read_text())
    print("now:", flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0", "resnet50"])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--data-dir", type=Path, default=None, help="Fashion-MNIST IDX files (default FASHION_MNIST_DIR)")
    parser.add_argument("--baseline", default=None, metavar="REV",
                        help="first run this benchmark as it is at this git revision, as the 'before' table")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    before = baseline(args) if args.baseline else None
    items = select_balanced(load_dataset("fashion-mnist", "test", args.data_dir), args.images)
    info = machine()
    print(f"{info['cpu']} ({', '.join(info['flags'])}), {info['threads']} threads, torch {info['torch']}, "
          f"{len(items)} Fashion-MNIST test images")
    print(f"{'model':<20}{'naive':>8}{'imsrc':>8}{'ratio':>7}{'populate':>10}{'pop/imsrc':>10}{'load s':>12}  precision"
          "  cosine mean/min")
    results = {}
    for name in args.models:
        r = results[name] = run(name, items)
        print(f"{name:<20}{r['naive']:>8.1f}{r['imsrc']:>8.1f}{r['speedup']:>6.2f}x{r['populate']:>10.1f}"
              f"{r['populate'] / r['imsrc']:>9.0%}{_loads(r):>12}  {r['precision']:<9}  {r['cosine_mean']:.4f} / {r['cosine_min']:.4f}"
              + ("  (random weights)" if r["random_weights"] else ""), flush=True)
        for runtime, measured in r["runtimes"].items():
            print(f"  {runtime:<18}" + (f"{measured['images_per_s']:>8.1f} images/s, {measured['images_per_s'] / r['naive']:.2f}x "
                                        f"naive, cosine to fp32 {measured['cosine_mean']:.4f} / {measured['cosine_min']:.4f}"
                                        if "images_per_s" in measured else f"  {measured}"), flush=True)
    print("images/s; naive = fp32, default memory format, batch 16; imsrc = EMBED_PRECISION=auto, channels-last;")
    print("load s: a new process's model load on a machine's first start (engine measured, converted, compiled) / on")
    print("a later one (the stored engine and OpenVINO's files reused; n/a: random weights);")
    print("onnxruntime/openvino: the naive backbone exported to ONNX, each runtime's defaults for this CPU")
    for name, r in results.items():
        print(f"{name}: {r['runtime']}")
    write_json(args.json, {"machine": info, **results, **({"before": before} if before else {})})


if __name__ == "__main__":
    main()
