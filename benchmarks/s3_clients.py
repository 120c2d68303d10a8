"""Which S3 client should scoring fetch with? GET-heavy fetching, alone and with the decode.

    python -m benchmarks.s3_clients --objects 2000 --latency-objects 500 --latency-ms 20 \\
        --json benchmarks/results/s3-clients.json

One throwaway SeaweedFS, ``--objects`` synthetic scan cells (PNG), then two settings: the
server directly on loopback, and through ``benchmarks.latency_proxy`` at ``--latency-ms``
per request (each request delayed and counted, pipelined ones too; the proxy runs in a
child process so its CPU is not the client's). In each setting every client fetches the
same keys the way scoring does (``--threads`` fetch threads, ``--batch`` keys per call):

- ``obstore``: ``S3Store.get_many`` as shipped (one async gather per batch);
- ``obstore_sync``: ``obstore.get`` per key in each thread;
- ``boto3``: ``get_object`` per key in each thread (the store before any fast path);
- ``s3get``: the hand-written SigV4 + HTTP/1.1 pipelined client the project used to have
  (``benchmarks/s3get_baseline.py``), a batch per write on a kept-alive socket.

Reported per client: GET/s and client CPU ms per GET (the whole process's CPU: obstore's
Rust threads included), the server's CPU ms per GET (``weed``, from /proc), cells/s for
fetch + decode + resize (the scorer's ``prepare_cell``-equivalent ``model_input``) of the
same cells, and the end-to-end figure the choice is made on (``scoring_cells_per_s``): the
scorer's own shard pipeline (``malaria.scoring.infer.score_cells``: the same threads,
fetch batches, bounded queue and batched inference of the default model at the precision
this CPU trains in) with the client under test as its store's ``get_many``. ``os.getloadavg()`` is recorded before and after: on a
shared machine other work moves the figures.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

CLIENTS = ("obstore", "obstore_sync", "boto3", "s3get")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proxy_child(host: str, port: int, delay_ms: float, conn: Any) -> None:
    from benchmarks.latency_proxy import LatencyProxy

    with LatencyProxy(host, port, delay_ms) as proxy:
        conn.send(proxy.port)
        while conn.recv() == "count":
            conn.send(proxy.requests)


class ProxyProcess:
    """``LatencyProxy`` in a child process; ``requests()`` asks it for its count."""

    def __init__(self, host: str, port: int, delay_ms: float) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_proxy_child, args=(host, port, delay_ms, child),
                                        daemon=True)
        self._process.start()
        self.url = f"http://127.0.0.1:{self._conn.recv()}"

    def requests(self) -> int:
        self._conn.send("count")
        return int(self._conn.recv())

    def close(self) -> None:
        self._conn.send("stop")
        self._process.join(10)


def fetchers(bucket: str, endpoint: str) -> dict[str, Callable[[Sequence[str]], list[bytes]]]:
    """``fetch(keys) -> bytes per key`` for each client, all against ``endpoint``."""
    import boto3
    import obstore

    from benchmarks.s3get_baseline import PathStyleGetter
    from malaria.io.s3 import S3Store, reset_clients

    reset_clients()
    store = S3Store(bucket, endpoint_url=endpoint)
    reader = store.reader
    client = store.client
    getter = PathStyleGetter(endpoint, bucket, client.meta.region_name,
                             boto3.session.Session().get_credentials())

    def boto3_get(keys: Sequence[str]) -> list[bytes]:
        return [client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys]

    def must_be_bytes(answers: Sequence[object]) -> list[bytes]:
        assert all(isinstance(a, bytes) for a in answers), "a GET failed"
        return list(answers)  # type: ignore[arg-type]

    return {
        "obstore": lambda keys: must_be_bytes(store.get_many(keys)),
        "obstore_sync": lambda keys: [bytes(obstore.get(reader, k).bytes()) for k in keys],
        "boto3": boto3_get,
        "s3get": lambda keys: must_be_bytes(getter.get_many(keys)),
    }


class ClientStore:
    """The scorer's view of a store (``get_many``) with the GETs of one client."""

    def __init__(self, fetch: Callable[[Sequence[str]], list[bytes]]) -> None:
        self._fetch = fetch

    def get_many(self, keys: Sequence[str]) -> list[bytes]:
        return self._fetch(keys)


def load_bench_model(folder: Path) -> tuple[Any, str]:
    """The default model, saved at the precision the product trains in on this CPU and loaded
    the way scoring loads it; returns (LoadedModel, precision)."""
    from benchmarks.scoring import build_bench_model
    from malaria.scoring.model import ModelRef, load_model

    path = folder / "bench.keras"
    _, precision = build_bench_model(path)
    return load_model(ModelRef("bench-s3-clients", 0.5, "file", str(path))), precision


def scoring_pass(fetch: Callable[[Sequence[str]], list[bytes]], keys: Sequence[str],
                 sizes: dict[str, int], model: Any, args: argparse.Namespace) -> float:
    """Cells/s of the scorer's shard pipeline over ``keys``, a shard of ``--shard-size`` at
    a time, fetching through ``fetch``."""
    from malaria.scoring.due import Cell
    from malaria.scoring.infer import score_cells

    store = ClientStore(fetch)
    start = time.perf_counter()
    for first in range(0, len(keys), args.shard_size):
        cells = [Cell(key, "", sizes[key]) for key in keys[first:first + args.shard_size]]
        scored = score_cells(store, cells, model, concurrency=args.threads,  # type: ignore[arg-type]
                             keys_per_fetch=args.batch)
        assert all(error == "" for _, error in scored), "a cell failed to score"
    return len(keys) / (time.perf_counter() - start)


def decode(data: bytes, size: int) -> Any:
    from PIL import Image

    from malaria.dataset.decode import model_input

    with Image.open(io.BytesIO(data)) as image:
        return model_input(image, size)


def timed_pass(fetch: Callable[[Sequence[str]], list[bytes]], keys: Sequence[str], *,
               threads: int, batch: int, size: int | None, weed_pid: int) -> dict[str, float]:
    """Every key once through ``threads`` workers, ``batch`` keys per call; with ``size``,
    each cell is also decoded and resized in the worker that fetched it (as scoring does)."""
    batches = [keys[i:i + batch] for i in range(0, len(keys), batch)]

    def work(chunk: Sequence[str]) -> int:
        blobs = fetch(chunk)
        if size is not None:
            for blob in blobs:
                decode(blob, size)
        return sum(len(b) for b in blobs)

    weed_before = process_cpu_seconds(weed_pid)
    cpu_before, start = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total_bytes = sum(pool.map(work, batches))
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu_before
    weed = process_cpu_seconds(weed_pid) - weed_before
    return {"seconds": seconds, "per_s": len(keys) / seconds,
            "client_cpu_ms": 1000 * cpu / len(keys), "server_cpu_ms": 1000 * weed / len(keys),
            "bytes": total_bytes}


def measure(bucket: str, endpoint: str, keys: Sequence[str], args: argparse.Namespace,
            weed_pid: int, count: Callable[[], int] | None, model: Any,
            sizes: dict[str, int]) -> dict[str, Any]:
    clients = fetchers(bucket, endpoint)
    for fetch in clients.values():  # warm: connections, credentials, the event loop
        fetch(keys[:args.batch])
    rows: dict[str, Any] = {}
    for name in args.clients.split(","):
        before = count() if count else 0
        raw = timed_pass(clients[name], keys, threads=args.threads, batch=args.batch,
                         size=None, weed_pid=weed_pid)
        requests = (count() - before) if count else None
        e2e = timed_pass(clients[name], keys, threads=args.threads, batch=args.batch,
                         size=args.size, weed_pid=weed_pid)
        rows[name] = {
            "get_per_s": round(raw["per_s"], 1),
            "client_cpu_ms_per_get": round(raw["client_cpu_ms"], 3),
            "server_cpu_ms_per_get": round(raw["server_cpu_ms"], 3),
            "e2e_cells_per_s": round(e2e["per_s"], 1),
            "e2e_client_cpu_ms_per_cell": round(e2e["client_cpu_ms"], 3),
            "proxy_requests": requests,
            "scoring_cells_per_s": round(scoring_pass(clients[name], keys, sizes, model,
                                                       args), 1),
        }
        print(bucket, endpoint, name, rows[name], flush=True)
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from benchmarks.scoring import _upload, generate
    from malaria.core.layout import SCANS
    from malaria.io.s3 import S3Store, reset_clients
    from malaria.model.precision import reported_cpu_flags
    from malaria_dev.stack import StackConfig, load_stack_env, stack_down, stack_up

    state = Path(tempfile.mkdtemp(prefix="malaria-bench-s3-"))
    cfg = StackConfig.with_free_ports(state / "stack")
    load_before = os.getloadavg()
    status = stack_up(cfg, services=("s3",))
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.pop(name, None)
    load_stack_env(cfg)
    reset_clients()
    weed_pid = int(json.loads((cfg.state_dir / "run" / "seaweedfs.pid").read_text())["pid"])
    direct = status.s3_endpoint
    proxy: ProxyProcess | None = None
    try:
        cells = generate(args.objects, 1000)
        bucket = "bench-s3-clients"
        _upload(S3Store(bucket, endpoint_url=direct), [(f"{SCANS}{k}", d) for k, d in cells], 16)
        keys = [f"{SCANS}{k}" for k, _ in cells]
        sizes = {f"{SCANS}{k}": len(data) for k, data in cells}
        mean_size = sum(len(d) for _, d in cells) / len(cells)
        model, precision = load_bench_model(state)
        settings: dict[str, Any] = {
            "local": measure(bucket, direct, keys, args, weed_pid, None, model, sizes)}
        host, port = direct.removeprefix("http://").split(":")
        proxy = ProxyProcess(host, int(port), args.latency_ms)
        settings[f"latency_{args.latency_ms:g}ms"] = measure(
            bucket, proxy.url, keys[:args.latency_objects], args, weed_pid, proxy.requests,
            model, sizes)
    finally:
        if proxy is not None:
            proxy.close()
        stack_down(cfg)
    return {
        "objects": args.objects, "latency_objects": args.latency_objects,
        "latency_ms": args.latency_ms, "threads": args.threads, "batch": args.batch,
        "decode_size": args.size, "mean_object_bytes": round(mean_size),
        "settings": settings, "precision": precision,
        "cpu_flags": reported_cpu_flags(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "python": platform.python_version(),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=2000)
    parser.add_argument("--latency-objects", type=int, default=500)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64, help="keys per get_many call")
    parser.add_argument("--shard-size", type=int, default=2000, help="cells per scored shard")
    parser.add_argument("--size", type=int, default=80, help="model input size (cellnet: 80)")
    parser.add_argument("--clients", default=",".join(CLIENTS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
