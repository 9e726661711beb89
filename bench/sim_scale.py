"""Simulation at scale: 100 virtual sites, 2 rounds, on Flower's Ray simulation runtime, on this machine.

Each virtual site is a synthetic centre with its own scanner profile. Flower's
Ray backend runs the ClientApp in a few long-lived actor processes (one per
`--cpus-per-site` share of the machine), each serving many sites in turn; fedus
keeps one frozen teacher per process (fedus.site.shared_teacher) and a small
LRU of decoded site data, so memory does not grow with the number of sites.

Reported: wall time, rounds and sites answered per round, peak memory of every
process the run started (PSS summed, so shared library pages count once; and
the largest single process's RSS), how many ClientApp worker processes there
were, and how many teachers were built (one log line per build).

    python bench/sim_scale.py                     # 100 sites, 2 rounds (~10 min on 2 cores)
    python bench/sim_scale.py --sites 20          # quicker look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.machine import machine, write_result  # noqa: E402
from fedus.config import RunConfig  # noqa: E402
from fedus.processes import flower_home_pids  # noqa: E402
from fedus.simulate import simulate  # noqa: E402

SETTINGS = {
    "teacher.arch": "vit_tiny_patch16_224", "student.arch": "resnet10t", "student.head-hidden": 128,
    "data.image-size": 32, "data.synthetic-images-per-centre": 16, "train.batch-size": 8,
    "train.local-steps": 2, "eval.probe-rounds": "none", "seed": 0,
}


def _kib(pid: int, file: str, field: str) -> int:
    try:
        for line in open(f"/proc/{pid}/{file}"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cmd(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kind(cmd: str) -> str:
    """A process's role: the Flower or Ray executable it runs."""
    words = cmd.split()
    if not words:
        return "?"
    if words[0].startswith("ray::"):
        return words[0]
    for w in words[:3]:
        name = Path(w).name
        if name.startswith(("flower-", "flwr", "raylet", "gcs_server")) or "ray" in name:
            return name
    return Path(words[1] if Path(words[0]).name.startswith("python") and len(words) > 1 else words[0]).name


class MemoryWatch(threading.Thread):
    """Samples every process started for one FLWR_HOME (they carry it in their environment)."""

    def __init__(self, flwr_home: Path, every: float = 1.0):
        super().__init__(daemon=True)
        self.home, self.every, self.stop = flwr_home, every, threading.Event()
        self.peak_pss_kib = self.peak_rss_kib = self.peak_processes = 0
        self.workers: set[int] = set()
        self.peak_rss_by_kind: dict[str, int] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            pids = flower_home_pids(self.home)
            self.peak_processes = max(self.peak_processes, len(pids))
            self.peak_pss_kib = max(self.peak_pss_kib, sum(_kib(p, "smaps_rollup", "Pss") for p in pids))
            self.peak_rss_kib = max([self.peak_rss_kib, *(_kib(p, "status", "VmRSS") for p in pids)])
            for p in pids:
                kind = _kind(_cmd(p))
                self.peak_rss_by_kind[kind] = max(self.peak_rss_by_kind.get(kind, 0), _kib(p, "status", "VmRSS"))
                if kind == "ray::ClientAppActor":
                    self.workers.add(p)
            self.stop.wait(self.every)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cpus-per-site", type=float, default=1.0, help="Flower client resources (Ray CPUs per site)")
    ap.add_argument("--timeout", type=float, default=3000)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    cfg = RunConfig().with_overrides(SETTINGS | {"rounds": args.rounds, "data.synthetic-centres": args.sites,
                                                 "scenario": "bench-sim-scale"})
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        (run_dir / "flwr-home").mkdir(parents=True)
        watch = MemoryWatch((run_dir / "flwr-home").resolve())
        watch.start()
        load_before = list(os.getloadavg())  # other work on the machine slows the figures: say so
        began = time.perf_counter()
        error = None
        try:
            simulate(cfg, args.sites, run_dir, timeout=args.timeout, cpus_per_site=args.cpus_per_site)
        except Exception as err:  # the result records a failure too
            error = str(err)
        wall = time.perf_counter() - began
        watch.stop.set()
        watch.join()
        summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
        log = (run_dir / "flwr-run.log").read_text(errors="replace") if (run_dir / "flwr-run.log").is_file() else ""
    rounds = summary.get("rounds", [])
    result = {
        "machine": machine(),
        "settings": SETTINGS | {"sites": args.sites, "rounds": args.rounds, "cpus_per_site": args.cpus_per_site},
        "teacher": {"arch": SETTINGS["teacher.arch"], "weights": "random init (throughput and memory only)"},
        "data": f"fedus synthetic generator, {args.sites} centres x {SETTINGS['data.synthetic-images-per-centre']} "
                "images (each centre its own scanner profile), grouped 80/20 split, seed 0",
        "status": summary.get("status", "no summary"), "error": error,
        "wall_s": round(wall, 1),
        "sites_trained_per_round": {r["round"]: len(r.get("train", {})) for r in rounds if r["round"] > 0},
        "sites_evaluated_per_round": {r["round"]: len(r.get("eval", {})) for r in rounds},
        "sites_failed_per_round": {r["round"]: r.get("aggregate", {}).get("train_sites_failed", 0) for r in rounds
                                   if r["round"] > 0},
        "load_average_before_after": [load_before, list(os.getloadavg())],
        "peak_memory_pss_all_processes_mib": round(watch.peak_pss_kib / 1024),
        "peak_memory_rss_largest_process_mib": round(watch.peak_rss_kib / 1024),
        "peak_rss_by_process_kind_mib": {k: round(v / 1024) for k, v in sorted(watch.peak_rss_by_kind.items())},
        "peak_processes": watch.peak_processes,
        "clientapp_worker_processes": len(watch.workers),
        "teachers_built": log.count("fedus: teacher built"),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    write_result(result, "sim_scale", f"{args.sites}sites-cpu", args.out)


if __name__ == "__main__":
    main()
