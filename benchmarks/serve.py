"""Load test of the prediction service on loopback: batching on vs off, and overload with
admission control on vs off, same run.

    python -m benchmarks.serve [--photos ../shared/photos] [--requests 400] [--soak 10000]
                               [--overload-clients 300] [--overload-s 30] [--backends torch onnxruntime]

Normal load: two real servers (`python -m serving`, uvicorn) on free loopback ports over the
same checkpoint (a 1000-class AlexNet; throughput does not depend on the weights), default
settings, one with micro-batching and one without (`--no-batching`). An httpx async load
generator sends ImageNet-size JPEGs made from real photographs at 1, 8 and 32 concurrent
clients to each and measures requests/s and p50/p99 latency. The limit it is compared with
is the model's own forward throughput at batch 32 measured in this process. `--soak N` then
sends N requests at 32 clients to the batching server and counts errors.

Inference, before and after (`--inference-rounds R`, 0 skips it): two batching servers up at
once, the default (settings.inference "auto": the optimized path on a CPU; decodes and the
forward taking turns) and main's default before issue 28 (`--inference eager --take-turns
off`: the network as trained, eager float32, decodes beside the forward), and
for each client count R rounds of the same load on each, alternating which goes first, so
that a machine whose speed drifts slows both alike. Reported: per server the median
requests/s, p50 and p99 over rounds (and every round), the median of the rounds' own
requests/s ratios, the server CPU seconds per request (the work, steadier than the wall
clock on a shared machine), and each path's raw forward limit at batch 32 and latency at
batch 1 in this process. `--only-inference` runs that part alone. Before them, the cause of
the drop under load: the forward at batch 32 alone and beside two threads preprocessing
requests (serving.turns).

Back-ends: the model's forward at batch 32 and the service at the most clients, with PyTorch
(the default, and the baseline) and with ONNX Runtime (`--backend onnxruntime`: the network
exported at load), where onnxruntime is installed (`--backends` picks).

Overload: a fresh server with the default settings (bounded in-flight requests, batch
queue and deadline), and 300 clients each posting `?crops=10` requests back to back for
`--overload-s` seconds (after a 503 a client waits its Retry-After, as a well-behaved client
does). Reported: answers by status, p50/p99 of the accepted and of the refused, the
server's peak RSS (VmHWM). Baseline, same run: the same load on a server whose bounds are
lifted (what the service did before admission control: everything queued). Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import torch

from benchmarks.photos import resized
from deploy.steps import free_port
from serving.settings import Settings

REPO = Path(__file__).resolve().parents[1]
# The baseline of the overload run: admission bounds lifted (every request queued, no deadline).
UNBOUNDED = ["--max-in-flight", "1000000", "--max-queue-images", "1000000000", "--request-timeout-s", "86400"]
# Every simulated client connects from 127.0.0.1 and stands for a client of its own: the
# per-address connection bound (32) would otherwise refuse all but 32 of them.
MANY_ADDRESSES = ["--max-connections-per-client", "100000"]
# The service as main served it before issue 28: the network as trained (eager float32), and
# decodes running beside the forward pass (serving.turns off).
BEFORE = ["--inference", "eager", "--take-turns", "off"]


def make_checkpoint(folder: Path) -> Path:
    from pipeline.preprocess import DEFAULT_JPEG_QUALITY
    from pipeline.transforms import Normalization
    from trainer.checkpoint import save
    from trainer.checkpoint_meta import ShardsMeta
    from trainer.model import AlexNet, AlexNetConfig

    torch.manual_seed(0)
    model = AlexNet(AlexNetConfig(num_classes=1000, init="kaiming")).eval()
    classes = [{"index": i, "wnid": f"n{i:08d}", "name": f"class {i}"} for i in range(1000)]
    return save(
        folder,
        model,
        classes=classes,
        normalization=Normalization((120.0, 115.0, 105.0)),
        epoch=0,
        metrics={},
        shards=ShardsMeta(jpeg_quality=DEFAULT_JPEG_QUALITY),
    )


def photos_as_requests(photos: Path) -> list[bytes]:
    out = [resized(path.read_bytes(), 500) for path in sorted(photos.glob("*.jpg"))]  # ImageNet-size copies
    if not out:
        raise SystemExit(f"no .jpg photographs in {photos}")
    return out


def start_server(checkpoint: Path, log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """`python -m serving` with the default settings (plus `extra` flags), the per-address
    bound lifted (MANY_ADDRESSES)."""
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "serving",
        "--checkpoint",
        str(checkpoint),
        "--port",
        str(port),
        "--grpc-port",
        str(free_port()),
        *MANY_ADDRESSES,
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALEXNET_")}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
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
    return {
        "clients": clients,
        "requests": len(lat),
        "errors": errors,
        "rps": round(len(lat) / elapsed, 2),
        "p50_ms": round(1e3 * statistics.median(lat), 1),
        "p99_ms": round(1e3 * lat[int(0.99 * (len(lat) - 1))], 1),
    }


def rss_mb(pid: int, field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of a process, in MB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    raise KeyError(field)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(1e3 * values[int(q * (len(values) - 1))], 1)


class RawHTTP:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams, for the overload run: with
    300 clients, httpx's per-request CPU made the load generator (on the same 2 cores) the
    bottleneck and its own queueing showed up as server latency."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.host, self.port, self.netloc = parts.hostname, parts.port, parts.netloc
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, ctype: str) -> tuple[int, dict[str, str]]:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.netloc}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        try:
            await self.writer.drain()
            status = int((await self.reader.readline()).split()[1])
            headers = {}
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            await self.reader.readexactly(int(headers.get("content-length", 0)))
        except (OSError, IndexError, ValueError, asyncio.IncompleteReadError):
            self.close()
            raise
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def overload(url: str, images: list[bytes], clients: int, crops: int, seconds: float) -> dict:
    """`clients` closed-loop clients posting ?crops=`crops` for `seconds` (a request under way
    at the end is waited for); after a 503 a client waits its Retry-After."""
    answers: list[tuple[str, float]] = []
    stop_at = time.monotonic() + seconds

    async def client(i: int):
        http, n = RawHTTP(url), i
        while time.monotonic() < stop_at:
            body, n = images[n % len(images)], n + clients
            t = time.perf_counter()
            retry = 0.0
            try:
                code, headers = await http.post(f"/predict?crops={crops}", body, "image/jpeg")
                if code == 503:
                    retry = float(headers.get("retry-after", 1))
                status = str(code)
            except (OSError, IndexError, ValueError, asyncio.IncompleteReadError) as exc:
                status, retry = type(exc).__name__, 1.0
            answers.append((status, time.perf_counter() - t))
            if retry:
                await asyncio.sleep(retry)
        http.close()

    t0 = time.perf_counter()
    await asyncio.gather(*[client(i) for i in range(clients)])
    elapsed = time.perf_counter() - t0
    by_status: dict[str, int] = {}
    for status, _ in answers:
        by_status[status] = by_status.get(status, 0) + 1
    accepted = [t for s, t in answers if s == "200"]
    refused = [t for s, t in answers if s == "503"]
    return {
        "clients": clients,
        "crops": crops,
        "seconds": seconds,
        "elapsed_s": round(elapsed, 1),
        "answers": len(answers),
        "by_status": dict(sorted(by_status.items())),
        "accepted_per_s": round(len(accepted) / elapsed, 2),
        "accepted_p50_ms": pct(accepted, 0.5),
        "accepted_p99_ms": pct(accepted, 0.99),
        "accepted_max_ms": pct(accepted, 1.0),
        "refused_p50_ms": pct(refused, 0.5),
        "refused_p99_ms": pct(refused, 0.99),
    }


def overload_run(checkpoint: Path, images: list[bytes], log: Path, clients: int, seconds: float, *extra: str) -> dict:
    proc, url = start_server(checkpoint, log, *extra)
    try:
        asyncio.run(load(url, images, 1, 5))  # warm up (first forward, allocator)
        before = rss_mb(proc.pid, "VmRSS")
        out = asyncio.run(overload(url, images, clients, 10, seconds))
        metrics = httpx.get(f"{url}/metrics", timeout=10).text

        def sample(prefix: str) -> float:
            return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(prefix))

        out.update(
            server_rss_before_mb=before,
            server_peak_rss_mb=rss_mb(proc.pid, "VmHWM"),
            server_rejected={
                reason: int(sample(f'alexnet_rejected_requests_total{{reason="{reason}"}}'))
                for reason in ("in_flight", "queue_full", "deadline")
            },
            server_dropped_images=int(sample("alexnet_dropped_images_total")),
            health_after=httpx.get(f"{url}/health", timeout=10).status_code,
        )
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def raw_forward_limit(
    checkpoint: Path, images: list[bytes], batch: int = 32, rounds: int = 5, backend: str = "torch"
) -> float:
    """Images/s of the model's own forward at `batch`, preprocessed inputs (the ceiling), on
    the `backend` serving runs it with (torch, or onnxruntime: serving.onnx_backend)."""
    from serving.predictor import Predictor

    predictor = Predictor(checkpoint, Settings.model_construct(backend=backend))
    crops = np.concatenate([predictor.preprocess(images[i % len(images)]) for i in range(batch)])
    predictor.forward(crops)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        predictor.forward(crops)
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def forward_by_mode(checkpoint: Path, images: list[bytes], modes: tuple[str, ...], rounds: int = 7) -> dict:
    """Per inference mode, in this process, rounds alternating between the modes: images/s of
    the forward at batch 32, ms at batch 1, and the process CPU ms per image at batch 32."""
    from serving.predictor import Predictor

    predictors = {m: Predictor(checkpoint, Settings.model_construct(inference=m)) for m in modes}
    first = next(iter(predictors.values()))
    crops = np.concatenate([first.preprocess(images[i % len(images)]) for i in range(32)])
    times: dict[str, dict[str, list[float]]] = {m: {"b32": [], "b1": [], "cpu": []} for m in modes}
    for p in predictors.values():
        p.forward(crops)
    for r in range(rounds):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            p = predictors[mode]
            t, c = time.perf_counter(), time.process_time()
            p.forward(crops)
            times[mode]["b32"].append(time.perf_counter() - t)
            times[mode]["cpu"].append(time.process_time() - c)
            t = time.perf_counter()
            for _ in range(5):
                p.forward(crops[:1])
            times[mode]["b1"].append((time.perf_counter() - t) / 5)
    return {
        m: {
            "img_per_s_batch32": round(32 / statistics.median(v["b32"]), 2),
            "cpu_ms_per_image_batch32": round(1e3 * statistics.median(v["cpu"]) / 32, 2),
            "ms_batch1": round(1e3 * statistics.median(v["b1"]), 2),
        }
        for m, v in times.items()
    }


def forward_beside_decodes(checkpoint: Path, images: list[bytes], rounds: int = 3) -> dict:
    """The cause of the drop under load, in this process: the forward at batch 32 alone, and
    while two threads preprocess requests (what max_decodes = 2 lets the service do), with
    torch's default threads and with one."""
    import threading

    from serving.predictor import Predictor

    predictor = Predictor(checkpoint, Settings.model_construct(inference="eager"))
    crops = np.concatenate([predictor.preprocess(images[i % len(images)]) for i in range(32)])
    predictor.forward(crops)
    default_threads = torch.get_num_threads()

    def forward_ms() -> float:
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            predictor.forward(crops)
            times.append(time.perf_counter() - t)
        return round(1e3 * statistics.median(times), 1)

    out: dict = {}
    try:
        for threads in sorted({default_threads, 1}, reverse=True):
            torch.set_num_threads(threads)
            alone = forward_ms()
            stop = threading.Event()

            def decode(offset: int, stop: threading.Event = stop) -> None:
                i = offset
                while not stop.is_set():
                    predictor.preprocess(images[i % len(images)])
                    i += 1

            workers = [threading.Thread(target=decode, args=(i,)) for i in range(2)]
            for w in workers:
                w.start()
            beside = forward_ms()
            stop.set()
            for w in workers:
                w.join()
            out[f"torch_threads_{threads}"] = {
                "batch32_ms_alone": alone,
                "batch32_ms_beside_2_decode_threads": beside,
                "slowdown": round(beside / alone, 2),
            }
    finally:
        torch.set_num_threads(default_threads)
    return out


def server_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def inference_before_after(
    checkpoint: Path, images: list[bytes], log: Path, clients: list[int], requests: int, rounds: int
) -> dict:
    """The default server against main's default (BEFORE), same load, alternating."""
    servers = {"default": start_server(checkpoint, log.with_name("default.log"))}
    servers["before"] = start_server(checkpoint, log.with_name("before.log"), *BEFORE)
    out: dict = {
        "default_mode": httpx.get(f"{servers['default'][1]}/ready", timeout=10).json().get("inference"),
        "baseline": " ".join(BEFORE),
        "by_clients": {},
    }
    try:
        for name in servers:
            asyncio.run(load(servers[name][1], images, 8, 32))  # warm up (first forward, allocator)
        for c in clients:
            n = min(requests, 50 * c) if c == 1 else requests
            rows: dict[str, list[dict]] = {name: [] for name in servers}
            for r in range(rounds):
                for name in list(servers) if r % 2 == 0 else list(servers)[::-1]:
                    proc, url = servers[name]
                    cpu = server_cpu_s(proc.pid)
                    row = asyncio.run(load(url, images, c, n))
                    row["server_cpu_ms_per_request"] = round(1e3 * (server_cpu_s(proc.pid) - cpu) / row["requests"], 2)
                    rows[name].append(row)

            def median(runs: list[dict], key: str) -> float:
                return round(statistics.median(row[key] for row in runs), 2)

            point = {
                name: {k: median(rows[name], k) for k in ("rps", "p50_ms", "p99_ms", "server_cpu_ms_per_request")}
                | {"rounds_rps": [row["rps"] for row in rows[name]], "errors": sum(row["errors"] for row in rows[name])}
                for name in servers
            }
            point["rps_default_over_before"] = round(
                statistics.median(d["rps"] / e["rps"] for d, e in zip(rows["default"], rows["before"])), 3
            )
            point["cpu_per_request_before_over_default"] = round(
                statistics.median(
                    e["server_cpu_ms_per_request"] / d["server_cpu_ms_per_request"]
                    for d, e in zip(rows["default"], rows["before"])
                ),
                3,
            )
            out["by_clients"][str(c)] = point
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    return out


def onnxruntime_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnxscript"))


def backends_run(
    checkpoint: Path, images: list[bytes], tmp: Path, backends: list[str], clients: int, requests: int
) -> dict:
    """Each back-end (serving.settings.backend) raw (its forward at batch 32, in this process)
    and as the service (a fresh server with batching on, `clients` clients); the baseline is
    torch, measured the same way in the same run."""
    out: dict = {}
    for backend in backends:
        entry: dict = {
            "raw_forward_img_per_s_batch32": round(raw_forward_limit(checkpoint, images, backend=backend), 2)
        }
        # A fresh server each, back to back (not the batching run's torch server: the machine's
        # load may have changed since).
        proc, url = start_server(checkpoint, tmp / f"backend-{backend}.log", "--backend", backend)
        try:
            entry["service"] = asyncio.run(load(url, images, clients, requests))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        out[backend] = entry
    if {"torch", "onnxruntime"} <= set(out):
        out["onnxruntime_over_torch"] = {
            "raw": round(
                out["onnxruntime"]["raw_forward_img_per_s_batch32"] / out["torch"]["raw_forward_img_per_s_batch32"], 3
            ),
            "service_rps": round(out["onnxruntime"]["service"]["rps"] / out["torch"]["service"]["rps"], 3),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=Path, default=REPO.parent / "shared" / "photos")
    p.add_argument("--requests", type=int, default=400, help="requests per (server, concurrency) point")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--soak", type=int, default=10_000, help="requests at 32 clients to the batching server")
    p.add_argument("--overload-clients", type=int, default=300, help="clients of the overload run (0: skip it)")
    p.add_argument("--overload-s", type=float, default=30.0, help="seconds each overload run sends for")
    p.add_argument(
        "--inference-rounds", type=int, default=3, help="rounds of the default vs eager comparison (0: skip it)"
    )
    p.add_argument("--only-inference", action="store_true", help="run the default vs eager comparison alone")
    p.add_argument(
        "--backends",
        nargs="+",
        choices=("torch", "onnxruntime"),
        default=["torch", "onnxruntime"] if onnxruntime_installed() else ["torch"],
        help="model back-ends to compare, raw and as a service at the most clients (default: both where "
        "onnxruntime is installed)",
    )
    a = p.parse_args(argv)
    defaults = Settings.model_construct()
    images = photos_as_requests(a.photos)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp) / "checkpoint")
        results: dict = {
            "benchmark": "serve",
            "machine": {
                "cores": os.cpu_count(),
                "torch": torch.__version__,
                "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
            },
            "settings": {
                k: getattr(defaults, k)
                for k in (
                    "inference",
                    "max_batch",
                    "max_wait_ms",
                    "max_in_flight",
                    "max_queue_images",
                    "request_timeout_s",
                    "max_decodes",
                    "max_decode_bytes",
                    "max_upload_bytes",
                )
            },
        }
        if a.inference_rounds:
            results["inference"] = {
                "forward_beside_decodes": forward_beside_decodes(ckpt, images),
                "forward_in_process": forward_by_mode(ckpt, images, ("eager", "optimized")),
                **inference_before_after(
                    ckpt, images, Path(tmp) / "inference.log", a.clients, a.requests, a.inference_rounds
                ),
            }
        if a.only_inference:
            results["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
            print(json.dumps(results, indent=2))
            return 0
        limit = raw_forward_limit(ckpt, images)
        results["raw_forward_img_per_s_batch32"] = round(limit, 2)
        for mode in ("batching_on", "batching_off"):
            proc, url = start_server(
                ckpt, Path(tmp) / f"{mode}.log", *(() if mode == "batching_on" else ("--no-batching",))
            )
            try:
                results[mode] = [
                    asyncio.run(load(url, images, c, min(a.requests, 50 * c) if c == 1 else a.requests))
                    for c in a.clients
                ]
                if mode == "batching_on" and a.soak:
                    results["soak"] = asyncio.run(load(url, images, 32, a.soak))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        results["backends"] = backends_run(ckpt, images, Path(tmp), a.backends, max(a.clients), a.requests)
        if a.overload_clients:
            results["overload"] = {
                "admission_on": overload_run(
                    ckpt, images, Path(tmp) / "overload.log", a.overload_clients, a.overload_s
                ),
                "baseline_unbounded": overload_run(
                    ckpt, images, Path(tmp) / "unbounded.log", a.overload_clients, a.overload_s, *UNBOUNDED
                ),
            }
        results["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    top = max(a.clients)
    on = next(r for r in results["batching_on"] if r["clients"] == top)
    off = next(r for r in results["batching_off"] if r["clients"] == top)
    gain, spread = round(on["rps"] / off["rps"], 3), round(on["p99_ms"] / on["p50_ms"], 2)
    results["at_max_clients"] = {
        "clients": top,
        "service_over_raw_limit": round(on["rps"] / limit, 3),
        "batching_on_over_off": gain,
        "p99_over_p50": spread,
        "targets_met": {"batching_on_over_off >= 1.5": gain >= 1.5, "p99_over_p50 <= 3": spread <= 3},
    }
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
