"""
``make bench``: every figure with its goal and an anchor measured in the same run, as one table.

P1 trigger scale (1,000 waits in one loop: ours, the floor of a bare GET on the same HTTP stack, and the official
provider's trigger), P2 a 200 MB download vs curl from the same server, the fake and a static file server (P1, P2
and the join: median of three rounds, with the spread), P3 validating and uploading 50,000 requests / 200 MB vs
stdlib json and curl, API calls per 1-hour wait, the join of 1,000,000 rows, 1,000,000 structured answers written as
typed Parquet (``BENCH_TYPED_ROWS`` sets another size) and the one-task job over 1,000,000 requests, alone and under
a queue holding two of its shards.
``--only p1,p2`` runs some steps (for iterating on one figure; docs/performance.md's table is a full run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from statistics import median
from typing import Any

from benchmarks.common import API_KEY, MB, Row, fake_server, free_port, run_child, spread, table

P1_N, P1_INTERVAL, P1_DURATION = 1000, 5.0, 30.0
#: P1 and P2 run this many times, interleaved; the table shows the median and, in brackets, the lowest and highest.
ROUNDS = 3
#: The join of 1,000,000 rows: at least this fast, at flat memory.
JOIN_GOAL_ROWS_PER_S = 150_000
#: Rows of the typed Parquet step (benchmarks/typed.py); its peak RSS is also measured at a tenth of them.
TYPED_ROWS = int(os.environ.get("BENCH_TYPED_ROWS", "1000000"))


def machine() -> str:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


def child_env(server_conn: str, official_conn: str) -> dict[str, str]:
    return {"AIRFLOW_CONN_OPENAI_DEFAULT": server_conn, "AIRFLOW_CONN_OPENAI_OFFICIAL": official_conn}


def official_available() -> bool:
    try:
        import airflow.providers.openai.triggers.openai  # noqa: F401
    except Exception:
        return False
    return True


def p1(rows: list[Row]) -> None:
    from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook

    impls = [("floor", "floor", []), ("ours", "ours", []), ("frozen", "ours", ["--gc-freeze"])]
    if official_available():
        impls.append(("official", "official", []))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in impls}
    with fake_server("--latency", "0.05", "--scenario", "stall") as server:
        os.environ["AIRFLOW_CONN_OPENAI_DEFAULT"] = server.connection()
        hook = OpenAIBatchHook()
        line = b'{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":{"model":"m","input":"x"}}\n'
        file_id = hook.upload_file(line).id
        batches = ",".join(hook.create_batch(file_id, "/v1/embeddings").id for _ in range(20))
        env = child_env(server.connection(), server.connection("openai"))
        # Rounds interleave the implementations, so a busy moment on the machine lands on all of them.
        for _ in range(ROUNDS):
            for name, impl, extra in impls:
                args = ["--impl", impl, "--n", str(P1_N), "--interval", str(P1_INTERVAL)]
                args += ["--duration", str(P1_DURATION), "--batches", batches]
                args += ["--stats-url", f"http://127.0.0.1:{server.port}/_fake/stats", *extra]
                runs[name].append(run_child("benchmarks.trigger_scale", *args, env=env))
    ours, floor, frozen, official = runs["ours"], runs["floor"], runs["frozen"], runs.get("official")

    def of(results: list[dict[str, Any]], key: str, scale: float = 1.0) -> list[float]:
        return [scale * r[key] for r in results]

    def anchors(key: str, fmt: str, unit: str, scale: float = 1.0) -> str:
        parts = [f"floor: {spread(of(floor, key, scale), fmt)}{unit}"]
        if official:
            parts.append(f"official: {spread(of(official, key, scale), fmt)}{unit}")
        else:
            parts.append("official: not installed")
        return "; ".join(parts)

    cpu_ratio = [o["cpu_ms_per_poll"] / f["cpu_ms_per_poll"] for o, f in zip(ours, floor, strict=True)]
    rows.append(
        Row(
            f"P1 CPU per poll (N={P1_N}, {P1_INTERVAL:.0f} s poll, 50 ms latency, {P1_DURATION:.0f} s)",
            f"{spread(of(ours, 'cpu_ms_per_poll'), '{:.2f}')} ms = {spread(cpu_ratio, '{:.2f}')}x floor",
            "<= 1.2x floor",
            anchors("cpu_ms_per_poll", "{:.2f}", " ms"),
            median(cpu_ratio) <= 1.2,
        )
    )
    share = [r["polls"] / r["ideal_polls"] for r in ours]
    rows.append(
        Row(
            f"P1 polls made / ideal ({P1_N:,} x {P1_DURATION / P1_INTERVAL:.0f} = {ours[0]['ideal_polls']:,.0f})",
            f"{spread([100 * v for v in share], '{:.1f}')} %",
            ">= 95 %",
            anchors_share(floor, official),
            median(share) >= 0.95,
        )
    )
    rows.append(
        Row(
            "P1 p99 event-loop lag (10 ms ticker)",
            f"{spread(of(ours, 'p99_lag_ms'), '{:.1f}')} ms",
            "<= 50 ms",
            anchors("p99_lag_ms", "{:,.0f}", " ms"),
            median(of(ours, "p99_lag_ms")) <= 50,
        )
    )
    rows.append(
        Row(
            "P1 max event-loop lag outside full-GC pauses",
            f"{spread(of(ours, 'max_lag_outside_gc_ms'), '{:.1f}')} ms",
            "<= 100 ms",
            anchors("max_lag_outside_gc_ms", "{:,.0f}", " ms"),
            median(of(ours, "max_lag_outside_gc_ms")) <= 100,
        )
    )
    heap = median(of(ours, "heap_objects"))
    gc_pause = spread(of(ours, "full_gc_max_ms"), "{:.0f}")
    rows.append(
        Row(
            "P1 max event-loop lag, full GCs included",
            f"{spread(of(ours, 'max_lag_ms'), '{:.1f}')} ms (longest full GC {gc_pause} ms, heap {heap:,.0f} objects)",
            "-",
            anchors("max_lag_ms", "{:,.0f}", " ms"),
            None,
        )
    )
    rows.append(
        Row(
            "P1 max event-loop lag with gc.freeze() after start-up",
            f"{spread(of(frozen, 'max_lag_ms'), '{:.1f}')} ms",
            "<= 100 ms",
            "-",
            median(of(frozen, "max_lag_ms")) <= 100,
        )
    )
    rows.append(
        Row(
            "P1 extra RSS per waiting trigger",
            f"{spread(of(ours, 'extra_rss_per_wait', 1 / 1024), '{:.1f}')} KB",
            "<= 50 KB",
            anchors("extra_rss_per_wait", "{:,.0f}", " KB", 1 / 1024),
            median(of(ours, "extra_rss_per_wait")) <= 50 * 1024,
        )
    )


def anchors_share(floor: list[dict[str, Any]], official: list[dict[str, Any]] | None) -> str:
    def share(results: list[dict[str, Any]]) -> str:
        return spread([100 * r["polls"] / r["ideal_polls"] for r in results], "{:.1f}") + " %"

    return f"floor: {share(floor)}; " + (f"official: {share(official)}" if official else "official: not installed")


def _curl(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run(["curl", "-sS", "--fail", "-H", f"Authorization: Bearer {API_KEY}", *args], check=True)
    return time.perf_counter() - started


@contextlib.contextmanager
def static_server(path: Path) -> Iterator[str]:
    """``benchmarks.download --serve``: the file by ``sendfile`` in its own process; yields the base URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.download", "--serve", str(path), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the static file server did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait(10)


#: P2's servers: the fake (what P2 has always measured) and a static file server that is never the bottleneck, so its
#: ratio to curl is the client's own cost. Goal on each: (local path, file:// ObjectStoragePath) as a ratio to curl.
P2_GOALS: dict[str, tuple[float | None, float | None]] = {"fake server": (2.0, 2.0), "static file server": (1.5, None)}


def p2(rows: list[Row], work: Path) -> None:
    from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook

    big = work / "output.jsonl"
    body = json.dumps({"answer": "x" * 3900})
    lines = 0
    with big.open("w") as out:
        while out.tell() < 200 * MB - 16_384:  # just under the Batch API's 200 MB file limit
            out.write(f'{{"custom_id": "r{lines}", "response": {{"status_code": 200, "body": {body}}}}}\n')
            lines += 1
    modes = ("local", "objectstorage")
    curl: dict[str, list[float]] = {name: [] for name in P2_GOALS}
    results: dict[tuple[str, str], list[dict[str, Any]]] = {(name, mode): [] for name in P2_GOALS for mode in modes}
    with fake_server() as server, static_server(big) as static_url:
        os.environ["AIRFLOW_CONN_OPENAI_DEFAULT"] = server.connection()
        file_id = OpenAIBatchHook().upload_file(big).id
        static_conn = json.dumps({"conn_type": "openai_batch", "host": static_url, "password": API_KEY})
        servers = {
            "fake server": (server.base_url, server.connection(), file_id),
            "static file server": (static_url, static_conn, "file-static"),
        }
        for base_url, _, name_id in servers.values():  # warm: the file in the page cache for everyone
            _curl("-o", str(work / "curl.jsonl"), f"{base_url}/files/{name_id}/content")
        for _ in range(ROUNDS):
            for name, (base_url, conn, name_id) in servers.items():
                # Interleaved, and dirty pages of the previous 200 MB written out first, so no run pays for another's.
                os.sync()
                curl[name].append(_curl("-o", str(work / "curl.jsonl"), f"{base_url}/files/{name_id}/content"))
                for mode in modes:
                    os.sync()
                    target = work / f"dl-{mode}.jsonl"
                    args = ["--file-id", name_id, "--dest", str(target), "--mode", mode]
                    result = run_child("benchmarks.download", *args, env={"AIRFLOW_CONN_OPENAI_DEFAULT": conn})
                    assert (result["bytes"], result["lines"]) == (big.stat().st_size, lines), result
                    results[name, mode].append(result)
    for name, goals in P2_GOALS.items():
        for mode, goal in zip(modes, goals, strict=True):
            label = f"{'local path' if mode == 'local' else 'file:// ObjectStoragePath'}, {name}"
            rss = [r["extra_rss"] / MB for r in results[name, mode]]
            rows.append(
                Row(
                    f"P2 download 200 MB to {label}: extra peak RSS",
                    f"{spread(rss, '{:.1f}')} MB",
                    "<= 32 MB",
                    "-",
                    max(rss) <= 32,
                )
            )
            walls = [r["wall"] for r in results[name, mode]]
            ratio = [wall / c for wall, c in zip(walls, curl[name], strict=True)]
            rows.append(
                Row(
                    f"P2 download 200 MB to {label}: wall time",
                    f"{spread(walls, '{:.2f}')} s = {spread(ratio, '{:.2f}')}x curl",
                    f"<= {goal:g}x curl" if goal is not None else "-",
                    f"curl from the same server: {spread(curl[name], '{:.2f}')} s",
                    median(ratio) <= goal if goal is not None else None,
                )
            )


def p3(rows: list[Row], work: Path) -> None:
    source = work / "requests.jsonl"
    filler = "y" * 3_990  # 50,000 lines just under the 200 MB limit
    with source.open("w") as out:
        for i in range(50_000):
            request = {
                "custom_id": f"req-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"{i} {filler}"}]},
            }
            out.write(json.dumps(request) + "\n")
    size_mb = source.stat().st_size / MB
    with fake_server() as server:
        env = {"AIRFLOW_CONN_OPENAI_DEFAULT": server.connection()}
        ours = run_child("benchmarks.upload", "--path", str(source), env=env)
        stdlib = run_child("benchmarks.upload", "--path", str(source), "--mode", "stdlib", env=env)
        curl = _curl("-o", os.devnull, "-F", "purpose=batch", "-F", f"file=@{source}", f"{server.base_url}/files")
    speed = size_mb / ours["validate_wall"]
    rows.append(
        Row(
            f"P3 validation speed (50,000 requests, {size_mb:.0f} MB)",
            f"{speed:,.0f} MB/s",
            ">= 150 MB/s",
            f"stdlib json.loads per line: {size_mb / stdlib['validate_wall']:,.0f} MB/s",
            speed >= 150,
        )
    )
    rows.append(
        Row(
            "P3 validate + upload: extra peak RSS",
            f"{ours['extra_rss'] / MB:.1f} MB",
            "<= 64 MB",
            "-",
            ours["extra_rss"] <= 64 * MB,
        )
    )
    rows.append(
        Row(
            "P3 upload wall time (after validation)",
            f"{ours['upload_wall']:.2f} s",
            "-",
            f"curl -F: {curl:.2f} s",
            None,
        )
    )


def polls(rows: list[Row]) -> None:
    ours = run_child("benchmarks.polls", "--impl", "ours-default")
    # A batch the fake refused (an input it no longer accepts) would end at once and make a meaningless figure.
    assert ours["batch_status"] == "completed", f"the 1 h batch did not complete: {ours}"
    fixed = run_child("benchmarks.polls", "--impl", "ours-fixed")
    anchor = f"fixed 60 s cadence: {fixed['polls']}"
    if official_available():
        official = run_child("benchmarks.polls", "--impl", "official")
        anchor += f"; official provider default: {official['polls']}"
    rows.append(
        Row(
            "API calls per wait (default sensor, batch taking 1 h)",
            f"{ours['polls']} polls (end noticed after {ours['noticed_after_s'] / 60:.1f} min)",
            "-",
            anchor,
            None,
        )
    )


def lookup(rows: list[Row]) -> None:
    ours = run_child("benchmarks.lookup", "--window", "dag-run")
    fixed = run_child("benchmarks.lookup", "--window", "fixed-48h")
    worst = ours["retry_nothing_to_find_list_calls"]
    rows.append(
        Row(
            f"List calls per create, account with {ours['account_batches']:,} batches from the last 48 h "
            "(first try / retry / retry with nothing to find; run started 10 min ago)",
            f"{ours['first_try_list_calls']} / {ours['retry_found_list_calls']} / {worst}",
            "<= 2",
            f"fixed 48 h window: {fixed['first_try_list_calls']} / {fixed['retry_found_list_calls']} / "
            f"{fixed['retry_nothing_to_find_list_calls']}",
            worst <= 2,
        )
    )


def join(rows: list[Row], work: Path) -> None:
    from benchmarks.join import PER_SHARD, SHARDS, generate

    folder = work / "join"
    folder.mkdir()
    generate(folder)
    # Its time moves by a quarter from one run to the next on this VM (the spill writes ~1 GB through the page
    # cache): like P1 and P2, the median of ROUNDS runs with the spread.
    results = [run_child("benchmarks.join", "--folder", str(folder)) for _ in range(ROUNDS)]
    assert all(result["rows"] == SHARDS * PER_SHARD for result in results)
    speeds = [result["rows"] / result["wall"] for result in results]
    rows.append(
        Row(
            f"Join {SHARDS * PER_SHARD:,} requests across {SHARDS} shards: wall time",
            f"{spread([r['wall'] for r in results], '{:.1f}')} s ({spread(speeds, '{:,.0f}')} rows/s)",
            f">= {JOIN_GOAL_ROWS_PER_S:,} rows/s",
            "before its bulk index and batched look-ups: 35,000 rows/s (28 s)",
            median(speeds) >= JOIN_GOAL_ROWS_PER_S,
        )
    )
    rows.append(
        Row(
            "Join 1,000,000 requests: extra peak RSS",
            f"{spread([r['extra_rss'] / MB for r in results], '{:.1f}')} MB",
            "flat (no growth with rows)",
            "-",
            None,
        )
    )


#: The one-task job over 1,000,000 requests: the fake's batches stay in progress this long, so the job defers once
#: while they run (the wait is the batches' own time and is reported apart from the job's).
JOB_IN_PROGRESS_S = 20


def job(rows: list[Row], work: Path) -> None:
    from benchmarks.job import REQUESTS, generate

    folder = work / "job"
    folder.mkdir()
    source = folder / "requests.jsonl"
    generate(source)
    with fake_server("--in-progress", str(JOB_IN_PROGRESS_S)) as server:
        env = {"AIRFLOW_CONN_OPENAI_DEFAULT": server.connection()}
        stats = f"http://127.0.0.1:{server.port}/_fake/stats"
        args = ["--source", str(source), "--destination", str(folder / "joined.jsonl"), "--stats-url", stats]
        result = run_child("benchmarks.job", *args, env=env)
    assert result["counts"]["succeeded"] == REQUESTS
    queued = job_in_a_queue(source, folder)
    rows.append(
        Row(
            f"One-task job over {REQUESTS:,} requests ({result['batches']} batches): the job's own wall time "
            "(validate, shard, upload, create, download, join, write)",
            f"{result['own_wall']:.1f} s (+ {result['waiting_wall']:.1f} s waiting for the batches)",
            "-",
            "-",
            None,
        )
    )
    rows.append(
        Row(
            f"One-task job over {REQUESTS:,} requests: extra peak RSS / API calls",
            f"{result['extra_rss'] / MB:.0f} MB / {result['api_calls']} calls",
            "-",
            "-",
            None,
        )
    )
    rows.append(
        Row(
            f"One-task job over {REQUESTS:,} requests: triggers (batches watched by each)",
            f"{result['triggers']} ({', '.join(map(str, result['batches_per_trigger']))})",
            "= 1",
            "-",
            result["triggers"] == 1,
        )
    )
    # The ideal is the input's shards (not the batches the job made: a shard cut smaller would hide in them), two
    # at a time through the queue, each taking the fake's batch time; the job's own work and wake-ups come on top.
    shards = -(-REQUESTS // QUEUE_SHARD_REQUESTS)
    ideal = JOB_BATCH_S * -(-shards // QUEUE_SHARDS)
    rows.append(
        Row(
            f"One-task job over {REQUESTS:,} requests under a queue holding {QUEUE_SHARDS} of its {shards} shards "
            f"(learned from the first refusal; {queued['queue_refusals']} refusals, {queued['batches']} batches): wall "
            f"time vs the queue-limited ideal ({shards} batches of {JOB_BATCH_S:.1f} s, {QUEUE_SHARDS} in flight = "
            f"{ideal:.0f} s)",
            f"{queued['total_wall']:.0f} s = {queued['total_wall'] / ideal:.2f}x ideal",
            "<= 1.15x ideal",
            "-",
            queued["total_wall"] / ideal <= 1.15,
        )
    )
    per_million = queued["own_wall"] * 1_000_000 / REQUESTS
    rows.append(
        Row(
            "One-task job under the queue: the job's own time per million requests (validate, shard, upload, create, "
            "collect, join, write; wake-ups included)",
            f"{per_million:.1f} s",
            "<= 15 s",
            f"the same job without a queue: {result['own_wall'] * 1_000_000 / REQUESTS:.1f} s",
            per_million <= 15,
        )
    )
    rows.append(
        Row(
            "One-task job under the queue: peak RSS of the process (extra over its start)",
            f"{queued['peak_rss'] / MB:.0f} MB ({queued['extra_rss'] / MB:.0f} MB)",
            "<= 256 MB",
            "-",
            queued["peak_rss"] / MB <= 256,
        )
    )


def typed(rows: list[Row], work: Path) -> None:
    """1,000,000 structured answers joined and written as typed Parquet (benchmarks/typed.py), ROUNDS rounds."""
    from benchmarks.typed import run

    rows.extend(run(work, TYPED_ROWS, ROUNDS))


#: The queue-limited run: shards of 50,000 embedding requests, a request queue of two shards.
QUEUE_SHARD_REQUESTS = 50_000
QUEUE_SHARDS = 2
#: A batch's own time on the fake there (validating + in progress + finalizing).
JOB_BATCH_S = 0.2 + JOB_IN_PROGRESS_S + 0.2


def job_in_a_queue(source: Path, folder: Path) -> dict[str, Any]:
    """The same job against an account whose embeddings request queue holds two shards (OpenAI's request limit)."""
    limit = f"text-embedding-3-small={QUEUE_SHARDS * QUEUE_SHARD_REQUESTS}"
    with fake_server("--in-progress", str(JOB_IN_PROGRESS_S), "--request-queue-limit", limit) as server:
        env = {"AIRFLOW_CONN_OPENAI_DEFAULT": server.connection()}
        stats = f"http://127.0.0.1:{server.port}/_fake/stats"
        args = ["--source", str(source), "--destination", str(folder / "queued.jsonl"), "--stats-url", stats]
        result = run_child("benchmarks.job", *args, env=env)
    from benchmarks.job import REQUESTS

    assert result["counts"]["succeeded"] == REQUESTS, result["counts"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="p1,polls,lookup,p2,p3,join,typed,job", help="comma-separated steps to run")
    wanted = parser.parse_args().only.split(",")
    started = time.monotonic()
    load = os.getloadavg()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="openai-batch-bench-") as folder:
        os.environ.setdefault("AIRFLOW_HOME", str(Path(folder) / "airflow"))
        work = Path(folder)
        for name, step in (("p1", p1), ("polls", polls), ("lookup", lookup)):
            if name in wanted:
                step(rows)
        for name, step_with_files in (("p2", p2), ("p3", p3), ("join", join), ("typed", typed), ("job", job)):
            if name in wanted:
                step_with_files(rows, work)
    print()
    print(f"Machine: {machine()}")
    print(f"Load average (1 min) at start: {load[0]:.1f}, at end: {os.getloadavg()[0]:.1f}")
    print(table(rows))
    missed = [r.figure for r in rows if r.met is False]
    print(
        f"\n{len(rows)} figures, {sum(r.met is True for r in rows)} goals met, {len(missed)} missed; "
        f"{time.monotonic() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
