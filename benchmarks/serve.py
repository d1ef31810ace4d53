"""Load test of the prediction service on loopback: batching on vs off, same run.

    python -m benchmarks.serve [--photos ../shared/photos] [--requests 400] [--soak 10000]

Starts two real servers (`python -m serving`, uvicorn) on free loopback ports over the same
checkpoint (a 1000-class AlexNet; throughput does not depend on the weights): one with
micro-batching (max batch 32), one without. An httpx async load generator sends ImageNet-size
JPEGs made from real photographs at 1, 8 and 32 concurrent clients to each and measures
requests/s and p50/p99 latency. The limit it is compared with is the model's own forward
throughput at batch 32 measured in this process. `--soak N` then sends N requests at 32
clients to the batching server and counts errors. Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from deploy.steps import free_port

REPO = Path(__file__).resolve().parents[1]


def make_checkpoint(folder: Path) -> Path:
    from pipeline.transforms import Normalization
    from trainer.checkpoint import save
    from trainer.model import AlexNet, AlexNetConfig

    torch.manual_seed(0)
    model = AlexNet(AlexNetConfig(num_classes=1000, init="kaiming")).eval()
    classes = [{"index": i, "wnid": f"n{i:08d}", "name": f"class {i}"} for i in range(1000)]
    return save(folder, model, classes=classes, normalization=Normalization((120.0, 115.0, 105.0)), epoch=0,
                metrics={}, shards={"jpeg_quality": 90})


def photos_as_requests(photos: Path) -> list[bytes]:
    out = []
    for path in sorted(photos.glob("*.jpg")):
        img = Image.open(path).convert("RGB")
        s = 500 / max(img.size)
        buf = io.BytesIO()
        img.resize((round(img.size[0] * s), round(img.size[1] * s)), Image.LANCZOS).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    if not out:
        raise SystemExit(f"no .jpg photographs in {photos}")
    return out


def start_server(checkpoint: Path, batching: bool, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [sys.executable, "-m", "serving", "--checkpoint", str(checkpoint), "--port", str(port), "--max-batch", "32"]
    if not batching:
        args.append("--no-batching")
    proc = subprocess.Popen(args, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server did not start: {log.read_text()[-2000:]}")


async def load(url: str, images: list[bytes], clients: int, requests: int) -> dict:
    latencies: list[float] = []
    errors = 0
    sent = 0

    async def client(http: httpx.AsyncClient, i: int):
        nonlocal sent, errors
        while sent < requests:
            sent += 1
            body = images[(sent + i) % len(images)]
            t = time.perf_counter()
            try:
                r = await http.post(f"{url}/predict", content=body, headers={"content-type": "image/jpeg"})
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - t)
            errors += not ok

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        await http.post(f"{url}/predict", content=images[0], headers={"content-type": "image/jpeg"})  # warm
        t0 = time.perf_counter()
        await asyncio.gather(*[client(http, i) for i in range(clients)])
        elapsed = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"clients": clients, "requests": len(lat), "errors": errors, "rps": round(len(lat) / elapsed, 2),
            "p50_ms": round(1e3 * statistics.median(lat), 1), "p99_ms": round(1e3 * lat[int(0.99 * (len(lat) - 1))], 1)}


def raw_forward_limit(checkpoint: Path, images: list[bytes], batch: int = 32, rounds: int = 5) -> float:
    """Images/s of the model's own forward at `batch`, preprocessed inputs (the ceiling)."""
    from serving.predictor import Predictor

    predictor = Predictor(checkpoint)
    crops = np.concatenate([predictor.preprocess(images[i % len(images)]) for i in range(batch)])
    predictor.forward(crops)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        predictor.forward(crops)
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=Path, default=REPO.parent / "shared" / "photos")
    p.add_argument("--requests", type=int, default=400, help="requests per (server, concurrency) point")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--soak", type=int, default=10_000, help="requests at 32 clients to the batching server")
    a = p.parse_args(argv)
    images = photos_as_requests(a.photos)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp) / "checkpoint")
        limit = raw_forward_limit(ckpt, images)
        results: dict = {"benchmark": "serve", "machine": {"cores": os.cpu_count(), "torch": torch.__version__},
                         "raw_forward_img_per_s_batch32": round(limit, 2)}
        for mode in ("batching_on", "batching_off"):
            proc, url = start_server(ckpt, mode == "batching_on", Path(tmp) / f"{mode}.log")
            try:
                results[mode] = [asyncio.run(load(url, images, c, min(a.requests, 50 * c) if c == 1 else a.requests))
                                 for c in a.clients]
                if mode == "batching_on" and a.soak:
                    results["soak"] = asyncio.run(load(url, images, 32, a.soak))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    top = max(a.clients)
    on = next(r for r in results["batching_on"] if r["clients"] == top)
    off = next(r for r in results["batching_off"] if r["clients"] == top)
    results["at_max_clients"] = {"clients": top, "service_over_raw_limit": round(on["rps"] / limit, 3),
                                 "batching_on_over_off": round(on["rps"] / off["rps"], 3),
                                 "p99_over_p50": round(on["p99_ms"] / on["p50_ms"], 2)}
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
