#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""compare.py - `make bench`: kvd against Open MPI and this machine's memory.

Runs, interleaved within each round (A B C A B C ...), for several rounds:
  kvbench (copying buffers), kvbench --zero-copy, MPI_Allreduce (when built),
  and the roofline probe;
then prints, per size, the medians over the rounds: kvd's busbw in both modes,
MPI's, their ratios, and kvd's fraction of the bound for the bytes its
algorithm must move (see the README's performance section for the counts).

Extra rows: the p50 latency at the smallest size, many small keys against
one large key, N = 4 ranks, and kvd's CPU use while 4 idle ranks wait.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

BUILD = os.environ.get("KVD_BUILD", "build")


def run_json(cmd, env=None):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout)


def size_label(n):
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def parse_sizes(s):
    out = []
    for t in s.split(","):
        mul = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1].upper(), 1)
        out.append(int(float(t.rstrip("KkMmGg")) * mul))
    return out


def median_rows(runs, key):
    """runs: list of JSON results; returns {size: median of row[key]}"""
    by = {}
    for r in runs:
        for row in r["rows"]:
            by.setdefault(row["size"], []).append(row[key])
    return {s: statistics.median(v) for s, v in by.items()}


def progress(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def idle_cpu(ranks, seconds):
    """kvd's and the waiting ranks' CPU use with `ranks` connected, no ops."""
    tmp = tempfile.mkdtemp(prefix="kvbench-idle.")
    sock = os.path.join(tmp, "kvd.sock")
    kvd = subprocess.Popen([f"{BUILD}/bin/kvd", "--socket", sock],
                           stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.01)
        time.sleep(0.2)
        # the ranks: init one key, then rank 0 waits in a pushpull the others never join
        prog = os.path.join(tmp, "idle.py")
        env = dict(os.environ, KVD_SOCKET=sock, KVD_JOB="idle",
                   KVD_NUM_WORKERS=str(ranks))
        procs = []
        for r in range(ranks):
            e = dict(env, KVD_RANK=str(r))
            procs.append(subprocess.Popen(
                [f"{BUILD}/bench/idle_rank", str(seconds + 2)], env=e))
        time.sleep(1.0)

        def ticks(pid):
            with open(f"/proc/{pid}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            return int(parts[11]) + int(parts[12])  # utime + stime

        hz = os.sysconf("SC_CLK_TCK")
        t0 = {p.pid: ticks(p.pid) for p in procs + [kvd]}
        time.sleep(seconds)
        t1 = {p.pid: ticks(p.pid) for p in procs + [kvd]}
        for p in procs:
            p.kill()
            p.wait()
        kvd_pct = 100.0 * (t1[kvd.pid] - t0[kvd.pid]) / hz / seconds
        rank_pct = max(100.0 * (t1[p.pid] - t0[p.pid]) / hz / seconds for p in procs)
        return kvd_pct, rank_pct
    finally:
        kvd.terminate()
        kvd.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="4K,64K,1M,16M,64M,256M")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer sizes and rounds")
    ap.add_argument("--no-extras", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.sizes, a.rounds, a.iters = "4K,1M,16M", 1, 10
    sizes = parse_sizes(a.sizes)
    n = a.ranks

    mpi = None
    if shutil.which("mpirun") and os.path.exists(f"{BUILD}/bench/mpi_allreduce"):
        mpi = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(n),
               "--mca", "btl", "self,vader", f"{BUILD}/bench/mpi_allreduce"]
    common = ["--sizes", a.sizes, "--iters", str(a.iters)]
    runs = {"copy": [], "zc": [], "mpi": [], "roof": []}
    for rnd in range(a.rounds):
        progress(f"round {rnd + 1} of {a.rounds}: kvd copying")
        runs["copy"].append(run_json([f"{BUILD}/bin/kvbench", "-n", str(n), "--json"] + common))
        progress(f"round {rnd + 1} of {a.rounds}: kvd zero-copy")
        runs["zc"].append(run_json([f"{BUILD}/bin/kvbench", "-n", str(n), "--json",
                                    "--zero-copy"] + common))
        if mpi:
            progress(f"round {rnd + 1} of {a.rounds}: MPI_Allreduce")
            runs["mpi"].append(run_json(mpi + ["--json"] + common))
        progress(f"round {rnd + 1} of {a.rounds}: roofline")
        runs["roof"].append(run_json([f"{BUILD}/bench/roofline", "--ranks", str(n),
                                      "--sizes", a.sizes, "--json"]))

    bus_c = median_rows(runs["copy"], "busbw_gbs")
    bus_z = median_rows(runs["zc"], "busbw_gbs")
    p50_c = median_rows(runs["copy"], "p50_us")
    p50_z = median_rows(runs["zc"], "p50_us")
    bus_m = median_rows(runs["mpi"], "busbw_gbs") if runs["mpi"] else {}
    p50_m = median_rows(runs["mpi"], "p50_us") if runs["mpi"] else {}
    # roofline: the in-place limit (best of 1 and all threads) and memory bandwidth
    limit, membw = {}, {}
    for r in runs["roof"]:
        for row in r["rows"]:
            s = row["size"]
            if row["kind"] == "inplace":
                limit.setdefault(s, []).append(row["busbw_gbs"])
                membw.setdefault(s, []).append(row["mem_gbs"])
    limit = {s: statistics.median(v) for s, v in limit.items()}
    membw = {s: statistics.median(v) for s, v in membw.items()}

    # bytes moved per byte of key, N ranks: in-place limit 2N; zero-copy: read N,
    # write N+1 (the value too); copying: copy in 2N, read N + write N+1 in the
    # sum, copy out 2N (direct rounds: copy in 2N, read N + write 1, copy out 2N)
    print(f"# make bench: {n} ranks, f32, median of {a.rounds} interleaved rounds, "
          f"{a.iters} steps each; busbw in GB/s")
    print(f"# machine: {os.cpu_count()} CPUs; {platform_line()}")
    hdr = (f"{'size':>6} {'kvd copy':>9} {'kvd zc':>8} {'MPI':>8} {'copy/MPI':>9} "
           f"{'zc/MPI':>7} {'limit':>7} {'zc/limit':>9} {'copy/bound':>11}")
    print(hdr)
    for s in sizes:
        m = bus_m.get(s)
        lim = limit.get(s, 0)
        alg_limit_time = 2 * n * s / (membw.get(s, 1) * 1e9)  # time at memory speed
        # copying must move (6N+1) bytes per key byte through the engine path,
        # (5N+1) through direct rounds; bound = bytes / membw
        direct = s <= (1 << 20)
        moved = (5 * n + 1) if direct else (6 * n + 1)
        bound_time = moved * s / (membw.get(s, 1) * 1e9)
        copy_time = p50_c.get(s, 0) * 1e-6
        print(f"{size_label(s):>6} {bus_c.get(s, 0):9.2f} {bus_z.get(s, 0):8.2f} "
              f"{(m if m is not None else float('nan')):8.2f} "
              f"{(bus_c.get(s, 0) / m if m else float('nan')):9.2f} "
              f"{(bus_z.get(s, 0) / m if m else float('nan')):7.2f} "
              f"{lim:7.2f} {(bus_z.get(s, 0) / lim if lim else 0):9.2f} "
              f"{(bound_time / copy_time if copy_time else 0):11.2f}")
    s0 = sizes[0]
    if p50_m:
        print(f"# p50 latency at {size_label(s0)}: kvd copying {p50_c[s0]:.1f} us, "
              f"zero-copy {p50_z[s0]:.1f} us, MPI {p50_m[s0]:.1f} us "
              f"(kvd/MPI {p50_c[s0] / p50_m[s0]:.2f})")
    if a.no_extras:
        return
    progress("extras: many small keys, 4 ranks, idle CPU")
    many = run_json([f"{BUILD}/bin/kvbench", "-n", str(n), "--json", "--sizes", "4K",
                     "--keys", "1000", "--async", "1000", "--iters", "10"])
    one = run_json([f"{BUILD}/bin/kvbench", "-n", str(n), "--json", "--sizes", "4M",
                    "--iters", "10"])
    mb, ob = many["rows"][0]["busbw_gbs"], one["rows"][0]["busbw_gbs"]
    print(f"# 1000 keys x 4K async per step: busbw {mb:.2f}; one 4M key: {ob:.2f} "
          f"(ratio {mb / ob:.2f})")
    four = run_json([f"{BUILD}/bin/kvbench", "-n", "4", "--json", "--sizes", a.sizes,
                     "--iters", str(a.iters)])
    four_z = run_json([f"{BUILD}/bin/kvbench", "-n", "4", "--json", "--zero-copy",
                       "--sizes", a.sizes, "--iters", str(a.iters)])
    four_m = (run_json(mpi[:4] + ["4"] + mpi[5:] + ["--json"] + common) if mpi else None)
    print("# 4 ranks (one run): size, kvd copy, kvd zero-copy, MPI busbw; p50 us")
    for i, s in enumerate(sizes):
        c, z = four["rows"][i], four_z["rows"][i]
        mm = four_m["rows"][i] if four_m else None
        print(f"#  {size_label(s):>6} {c['busbw_gbs']:8.2f} {z['busbw_gbs']:8.2f} "
              f"{(mm['busbw_gbs'] if mm else float('nan')):8.2f}   p50 {c['p50_us']:.1f} / "
              f"{z['p50_us']:.1f} / {(mm['p50_us'] if mm else float('nan')):.1f}")
    if os.path.exists(f"{BUILD}/bench/idle_rank"):
        kp, rp = idle_cpu(4, 10)
        print(f"# idle, 4 ranks connected, one waiting in a round, 10 s: kvd {kp:.2f}% "
              f"of a core, busiest rank {rp:.2f}%")


def platform_line():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
