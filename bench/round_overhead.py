"""Round overhead of a real deployment on loopback: Flower/HTTP/process time versus the sites' own work.

One TLS + site-auth SuperLink (fedus.deployment.server.superlink), two
`fedus client start` processes (real SuperNodes, each site one intra-op thread),
and one `flwr run` per setting. Per round the run record has, measured at the
server, `train_wall_s` (train messages sent -> every reply in), `eval_wall_s`
and `round_wall_s` (train sent -> every eval reply in); each site reports
`train_seconds` / `eval_seconds` (its whole Site.train / Site.evaluate: data
decode, teacher and student build, losses, steps) and `seconds` (the step loop
alone). Overhead = what the phases took beyond the slower site's own work:

    overhead_s = (train_wall - max_site train_seconds) + (eval_wall - max_site eval_seconds)

i.e. Flower's message path (SuperLink, SuperNode, HTTP polling, object
push/pull), the process per message that runs the ClientApp (forked from the
site's preloaded forkserver with `--task-processes warm`, the default; a fresh
`flwr-clientapp` interpreter importing Python, torch and fedus with `fresh`;
each reply's `startup_seconds` measures it: the process's age when the
handler began, reported as `startup_s` per round, slower site per phase),
(de)serialisation; the server's aggregation + checkpoint is reported
apart (round_wall - train_wall - eval_wall). Bytes: the students as sent
(`bytes_up`/`bytes_down` in the record, payload only) and the SuperLink's own
Fleet traffic count for the run (objects and messages, eval included).

    python bench/round_overhead.py                   # ~60-70 min on 2 busy cores
    python bench/round_overhead.py --only tiny       # the fixed overhead alone
    python bench/round_overhead.py --only tiny --student vit_tiny_patch16_224 --out ...
    python bench/round_overhead.py --only tiny --student vit_tiny_patch16_224 --dtype fp16 \
        --evaluate-with-train on off --rounds 3     # evaluation carried by train messages vs apart
    python bench/round_overhead.py --only epochs4 --dtype fp16 --task-processes warm fresh
    python bench/round_overhead.py --only recipe224  # the reference recipe's per-image work, one local epoch
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import _thread
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.machine import machine, write_result  # noqa: E402
from fedus.deployment.certs import init_certs, site_keygen  # noqa: E402
from fedus.deployment.cli import server_config  # noqa: E402
from fedus.deployment.server import ServerSettings, register_site, submit_run, superlink  # noqa: E402
from fedus.processes import flower_home_pids, free_port, kill_flower_home  # noqa: E402

SITES = ["hospital-a", "hospital-b"]
# Synthetic images per site by rendered size (~80/20 grouped split): a work setting reads the corpus rendered at
# its own data.image-size, and the sites restart between sizes.
IMAGES_PER_SITE = {64: 800, 224: 400}
COMMON = {"teacher.arch": "vit_tiny_patch16_224", "data.image-size": 64, "eval.probe-rounds": "none",
          "eval.batch-size": 64, "seed": 0, "federation.round-timeout": 1800}
STUDENTS = {"resnet50": "ResNet-50 (timm, 25.6 M params with its ImageNet fc; fedus drops the fc, adds a distillation head)",
            "vit_tiny_patch16_224": "ViT-Ti/16 (timm)"}
# Realistic: the fedus default batch (32); steps so that one site's step is about a minute on one core here
# (ResNet-50: 20 steps = 640 images, one epoch of a site's ~640 training images; ViT-tiny is ~3x faster per
# image, so 48 steps = 1,536 images). Epochs4: four times that (FedAvg's usual 1-5 local epochs per round).
# Recipe224: the reference recipe's per-image work (DINOv3 ViT-B/16 -> ResNet-50 at 224 px; here a random-init
# ViT-B/16 of the same shape, cost only), one local epoch of a 400-image site (~320 training images, 10 steps).
# Tiny: one step of 8 images on a 40-image site: the fixed cost alone.
RECIPE224 = {"teacher.arch": "vit_base_patch16_224", "data.image-size": 224, "train.local-steps": 10,
             "train.batch-size": 32}
WORK = {
    "realistic": {"resnet50": {"train.local-steps": 20, "train.batch-size": 32},
                  "vit_tiny_patch16_224": {"train.local-steps": 48, "train.batch-size": 32}},
    "epochs4": {"resnet50": {"train.local-steps": 80, "train.batch-size": 32},
                "vit_tiny_patch16_224": {"train.local-steps": 192, "train.batch-size": 32}},
    "recipe224": {s: RECIPE224 for s in STUDENTS},
    "tiny": {s: {"train.local-steps": 1, "train.batch-size": 8, "data.max-images-per-site": 40} for s in STUDENTS},
}
PLAN = [  # (student, work, wire dtype, rounds): fp32 only where it costs little; its bytes do not depend on work
    ("resnet50", "tiny", "fp16", 2), ("vit_tiny_patch16_224", "tiny", "fp16", 2),
    ("resnet50", "realistic", "fp16", 2), ("vit_tiny_patch16_224", "realistic", "fp16", 2),
    ("resnet50", "epochs4", "fp16", 2), ("vit_tiny_patch16_224", "epochs4", "fp16", 2),
    ("resnet50", "tiny", "fp32", 2), ("vit_tiny_patch16_224", "tiny", "fp32", 2),
    ("resnet50", "recipe224", "fp16", 2), ("vit_tiny_patch16_224", "recipe224", "fp16", 2),
]


def image_size(student: str, work: str) -> int:
    return (COMMON | WORK[work][student])["data.image-size"]


def shared_note(load_before: list[float] | None) -> str:
    """What the seconds mean on this box; other jobs are named only when the load says they ran."""
    note = ("the server, SuperLink and both sites share this machine's two cores, where a real consortium "
            "gives each hospital its own machine")
    if load_before and load_before[0] > 0.5:
        note = (f"the 1-min load average was {load_before[0]:.2f} when the run began (earlier or other work on this "
                f"machine): absolute seconds may be noisy; {note}")
    return note


def _variant(every: int, with_train: bool) -> str:
    return f"every{every}-{'with-train' if with_train else 'apart'}"


def _sets(student: str, work: str, dtype: str, every: int = 1, with_train: bool = True) -> list[str]:
    values = COMMON | WORK[work][student] | {"student.arch": student, "federation.transfer-dtype": dtype,
                                            "federation.evaluate-every": every,
                                            "federation.evaluate-with-train": with_train,
                                            "scenario": f"bench-round-overhead-{student}-{work}-{dtype}-"
                                                        f"{_variant(every, with_train)}"}
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]  # TOML values: "str", 1.5, true


def _site_manifests(root: Path, size: int) -> dict[str, Path]:
    from fedus.data.synthetic import write_synthetic_corpus

    manifest = write_synthetic_corpus(root / f"corpus-{size}px", n_centres=len(SITES),
                                      images_per_centre=IMAGES_PER_SITE[size], size=size, seed=0)
    with open(manifest) as f:
        rows = list(csv.DictReader(f))
    centres = sorted({r["center"] for r in rows})
    out = {}
    for site, centre in zip(SITES, centres):  # each site's manifest holds only its own rows
        out[site] = manifest.parent / f"{site}.csv"
        with open(out[site], "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(r for r in rows if r["center"] == centre)
    return out


def _start_site(site: str, data: Path, port: int, root: Path, certs: Path, keys: Path,
                task_processes: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # one core per site: two sites, two cores
    cmd = [sys.executable, "-m", "fedus", "client", "start", "--site", site, "--data", str(data),
           "--server", f"localhost:{port}", "--root-cert", str(certs / "ca.crt"), "--key", str(keys / site),
           "--state", str(root / site), "--task-processes", task_processes]
    with open(root / f"{site}.log", "ab") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _stop_site(proc: subprocess.Popen, state: Path) -> None:
    """SIGTERM (fedus forwards it to its SuperNode's group), then SIGKILL whatever is left, by PID."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    pid_file = state / "supernode.pid"
    if pid_file.is_file():
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    kill_flower_home((state / "flwr-home").resolve())


class SiteWatch(threading.Thread):
    """Stops the benchmark (KeyboardInterrupt in the main thread) the moment a site process ends:
    a run would otherwise wait for it until its timeout."""

    def __init__(self, sites: dict[str, subprocess.Popen]):
        super().__init__(daemon=True)
        self.sites, self.done, self.died = sites, threading.Event(), None
        self.expected_stop = False  # while the sites are restarted on purpose

    def run(self) -> None:
        while not self.done.wait(2.0):
            if self.expected_stop:
                continue
            gone = [s for s, p in self.sites.items() if p.poll() is not None]
            if gone:
                self.died = f"site process(es) {gone} ended during the benchmark"
                _thread.interrupt_main()
                return


def _fleet_traffic(db: Path) -> dict:
    """The SuperLink's own count for the latest run: bytes it sent to / received from SuperNodes."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        sent, recv, runtime = con.execute(
            "SELECT bytes_sent, bytes_recv, clientapp_runtime FROM run ORDER BY rowid DESC LIMIT 1").fetchone()
    return {"bytes_to_sites": sent, "bytes_from_sites": recv, "clientapp_runtime_s": round(runtime, 2)}


def _round_rows(summary: dict) -> list[dict]:
    """One row per round that completed (trained and timed). A round's evaluate phase is there only if
    its student was evaluated apart (evaluate-with-train off, or the last round; evaluate-every may skip
    it); under evaluate-with-train its train messages also carry the previous round's evaluation, whose
    site work (eval_seconds, recorded under that round) counts as the train phase's."""
    rows = []
    rounds = {e["round"]: e for e in summary["rounds"]}
    for e in summary["rounds"]:
        agg, train = e.get("aggregate", {}), e.get("train", {})
        ev = e.get("eval", {}) if "eval_wall_s" in agg else {}  # evaluated apart, in this round
        previous = rounds.get(e["round"] - 1, {})
        carried = previous.get("eval", {}) if previous.get("aggregate", {}).get("eval_with_train") else {}
        if e["round"] < 1 or "round_wall_s" not in agg or not train:
            continue
        work_train = max(m.get("train_seconds", 0.0) + carried.get(s, {}).get("eval_seconds", 0.0)
                         for s, m in train.items())
        work_eval = max((m.get("eval_seconds", 0.0) for m in ev.values()), default=0.0)
        eval_wall = agg.get("eval_wall_s", 0.0) if ev else 0.0
        overhead = (agg["train_wall_s"] - work_train) + (eval_wall - work_eval)
        n = len(train)
        rows.append({
            "round": e["round"], "evaluated_apart": bool(ev), "carried_evaluation_of_previous": bool(carried),
            "round_wall_s": agg["round_wall_s"],
            "train_wall_s": agg["train_wall_s"], "eval_wall_s": eval_wall,
            "server_aggregate_checkpoint_s": round(agg["round_wall_s"] - agg["train_wall_s"] - eval_wall, 3),
            "site_train_seconds": {s: round(m["train_seconds"], 2) for s, m in train.items()},
            "site_step_seconds": {s: round(m["seconds"], 2) for s, m in train.items()},
            "site_eval_seconds": {s: round(m["eval_seconds"], 2) for s, m in (ev or carried).items()},
            # of the overhead: the fresh ClientApp process's start (spawn, imports, app load) before each handler
            "site_startup_seconds": {p: {s: round(m.get("startup_seconds", 0.0), 2) for s, m in d.items()}
                                     for p, d in (("train", train), ("eval", ev))},
            "startup_s": round(max(m.get("startup_seconds", 0.0) for m in train.values())
                               + max((m.get("startup_seconds", 0.0) for m in ev.values()), default=0.0), 2),
            "overhead_s": round(overhead, 2), "overhead_share": round(overhead / agg["round_wall_s"], 3),
            "train_phase_overhead_share": round((agg["train_wall_s"] - work_train) / agg["train_wall_s"], 3),
            "bytes_up_per_site": agg["bytes_up"] // n, "bytes_down_per_site": agg["bytes_down"] // n,
        })
    return rows


def _superlink_errors(log: Path, offset: int) -> dict[str, int]:
    """The SuperLink's unexpected errors since `offset` (e.g. its SQLite state 'database is locked')."""
    with open(log, "rb") as f:
        f.seek(offset)
        lines = f.read().decode(errors="replace").splitlines()
    out: dict[str, int] = {}
    for line in lines:
        if "[UnexpectedError:" in line:
            key = line.split("[UnexpectedError:", 1)[1].split("]", 1)[1].strip()[:80]
            out[key] = out.get(key, 0) + 1
    return out


def run_setting(student: str, work: str, dtype: str, rounds: int, env: dict, state: Path, every: int = 1,
                with_train: bool = True, task_processes: str = "warm") -> dict:
    """One `flwr run`; a run that fails still gives the rounds it completed (and their bytes)."""
    cfg = server_config(None, _sets(student, work, dtype, every, with_train), rounds, len(SITES))
    run_dir = state / f"{student}-{work}-{dtype}-{_variant(every, with_train)}-{task_processes}"
    link_log = state / "superlink.log"
    offset = link_log.stat().st_size
    began = time.perf_counter()
    out = {"student": student, "work": work, "transfer_dtype": dtype, "rounds": rounds, "evaluate_every": every,
           "evaluate_with_train": with_train, "task_processes": task_processes,
           "local_steps": cfg.train.local_steps, "batch_size": cfg.train.batch_size}
    try:
        submit_run(cfg, env, run_dir, timeout={"tiny": 600, "recipe224": 2400}.get(work, 1500))
    except Exception as err:  # the result records a failure too, with the SuperLink's own errors
        out["error"] = str(err)
        out["superlink_errors"] = _superlink_errors(link_log, offset)
    out["run_wall_s"] = round(time.perf_counter() - began, 1)
    if not (run_dir / "summary.json").is_file():
        return out
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = _round_rows(summary)
    trained = [e for e in summary["rounds"] if e.get("train") and "bytes_up" in e.get("aggregate", {})]
    if trained:
        first = trained[0]
        out |= {"student_params_sent": summary["provenance"]["student"]["params"],
                "images_per_site": {s: {"train": f["n_train"], "test": f["n_test"]} for s, f in summary["sites"].items()},
                "images_per_round_per_site": first["train"][SITES[0]]["examples_seen"],
                "bytes_up_per_site_per_round": first["aggregate"]["bytes_up"] // len(first["train"]),
                "bytes_down_per_site_per_round": first["aggregate"]["bytes_down"] // len(first["train"])}
    if rows:
        out |= {
            "rounds_detail": rows,
            "mean": {k: round(sum(r[k] for r in rows) / len(rows), 3) for k in
                     ("round_wall_s", "train_wall_s", "eval_wall_s", "overhead_s", "startup_s", "overhead_share",
                      "train_phase_overhead_share", "server_aggregate_checkpoint_s")},
            # per phase, over the rounds that had it (evaluate-every > 1 leaves rounds without evaluation)
            "site_work_mean_s": {k: round(statistics.mean(max(r[f"site_{k}_seconds"].values()) for r in rows
                                                          if r[f"site_{k}_seconds"]), 2)
                                 for k in ("train", "step", "eval")},
        }
    if "error" not in out:
        out["superlink_fleet_traffic_run"] = traffic = _fleet_traffic(state / "superlink.db")
        local = sum(m.get("train_seconds", 0) for e in summary["rounds"] for m in e.get("train", {}).values()) + sum(
            m.get("eval_seconds", 0) for e in summary["rounds"] for m in e.get("eval", {}).values())
        out["clientapp_runtime_minus_site_work_s"] = round(traffic["clientapp_runtime_s"] - local, 2)
    print(json.dumps({k: out.get(k) for k in ("student", "work", "transfer_dtype", "error", "mean", "site_work_mean_s",
                                              "bytes_up_per_site_per_round")}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=sorted(WORK), default=None, help="run only this work setting")
    ap.add_argument("--student", choices=sorted(STUDENTS), default=None, help="run only this student")
    ap.add_argument("--evaluate-every", type=int, nargs="+", default=[1],
                    help="federation.evaluate-every values, each setting run once per value (side by side)")
    ap.add_argument("--evaluate-with-train", choices=["on", "off"], nargs="+", default=["on"],
                    help="federation.evaluate-with-train values, each setting run once per value (side by side)")
    ap.add_argument("--task-processes", choices=["warm", "fresh"], nargs="+", default=["warm"],
                    help="sites' ClientApp processes (`fedus client start --task-processes`); with both, every "
                         "setting runs with each, side by side (the sites are restarted in between)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per run (default: the plan's)")
    ap.add_argument("--dtype", choices=["fp16", "fp32"], default=None, help="run only this wire dtype")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="work in this (new) folder and keep its logs")
    args = ap.parse_args()
    plan = [p for p in PLAN if args.only in (None, p[1]) and args.student in (None, p[0]) and args.dtype in (None, p[2])]
    carries = [c == "on" for c in args.evaluate_with_train]
    variants = [(p, e, c) for p in plan for e in args.evaluate_every for c in carries]  # side by side, in turn
    load_before = list(os.getloadavg())
    results: list[dict] = []
    error = None
    with tempfile.TemporaryDirectory(prefix="fedus-round-overhead-") as tmp:
        root = Path(tmp) if args.keep is None else args.keep.resolve()
        root.mkdir(parents=True, exist_ok=args.keep is None)
        sizes = sorted({image_size(student, work) for (student, work, _, _), _, _ in variants})
        manifests = {size: _site_manifests(root, size) for size in sizes}
        certs, keys = root / "certs", root / "keys"
        init_certs(certs, [])
        for site in SITES:
            site_keygen(site, keys)
        settings = ServerSettings(state=root / "server", certs=certs, port=free_port())
        sites: dict[str, subprocess.Popen] = {}
        watch = SiteWatch(sites)
        try:
            with superlink(settings) as env:
                for site in SITES:
                    register_site(keys / f"{site}.pub", site, env)
                groups = [(kind, size) for kind in args.task_processes for size in sizes]
                for i, (kind, size) in enumerate(groups):
                    if i:  # the sites restart with the other kind of task process or image size; the SuperLink stays
                        watch.expected_stop = True
                        for site, proc in sites.items():
                            _stop_site(proc, root / site)
                    for site in SITES:  # (a site retries until the SuperLink has let its previous connection go)
                        sites[site] = _start_site(site, manifests[size][site], settings.port, root, certs, keys, kind)
                    watch.expected_stop = False
                    if not i:
                        watch.start()
                    for (student, work, dtype, rounds), every, carry in variants:
                        if image_size(student, work) != size:
                            continue
                        results.append(run_setting(student, work, dtype, args.rounds or rounds, env,
                                                   settings.state.resolve(), every, carry, kind))
                        if "exceeded" in results[-1].get("error", ""):  # its ServerApp may still run: stop here
                            raise RuntimeError(results[-1]["error"])
        except (Exception, KeyboardInterrupt) as err:  # the result records how far it got, and why not further
            error = watch.died or f"{type(err).__name__}: {err}"
            for site in SITES:
                log = root / site / "supernode.log"
                if log.is_file():
                    error += f"\n--- {site} supernode.log (tail) ---\n" + log.read_text(errors="replace")[-1500:]
            print(error, file=sys.stderr)
        finally:
            watch.done.set()
            for site, proc in sites.items():
                _stop_site(proc, root / site)
        left = [pid for h in [settings.state / "flwr-home", *(root / s / "flwr-home" for s in SITES)]
                for pid in flower_home_pids(h.resolve())]
    load_after = list(os.getloadavg())

    def headline(student: str, work: str, dtype: str = "fp16", every: int = 1, carry: bool = True,
                 kind: str = "warm") -> dict | None:
        r = next((r for r in results if (r["student"], r["work"], r["transfer_dtype"], r["evaluate_every"],
                                         r["evaluate_with_train"], r["task_processes"])
                  == (student, work, dtype, every, carry, kind)), None)
        if r is None or "mean" not in r:
            return None
        return {"round_wall_s": r["mean"]["round_wall_s"], "site_train_s": r["site_work_mean_s"]["train"],
                "site_step_s": r["site_work_mean_s"]["step"], "site_eval_s": r["site_work_mean_s"]["eval"],
                "overhead_s": r["mean"]["overhead_s"], "startup_s": r["mean"]["startup_s"],
                "overhead_share": r["mean"]["overhead_share"],
                "train_phase_overhead_share": r["mean"]["train_phase_overhead_share"],
                "bytes_up_per_site_per_round": r["bytes_up_per_site_per_round"], "failed": r.get("error")}

    figures = {f"{s}/{w}" + (f"/evaluate-every-{e}" if e != 1 else "") + ("" if c else "/evaluation-apart")
               + ("" if k == "warm" else "/fresh-task-processes"): headline(s, w, every=e, carry=c, kind=k)
               for s in STUDENTS for w in WORK for e in args.evaluate_every for c in carries
               for k in args.task_processes}
    for s in STUDENTS:
        b16, b32 = (next((r.get("bytes_up_per_site_per_round") for r in results
                          if (r["student"], r["transfer_dtype"]) == (s, d)), None)
                    for d in ("fp16", "fp32"))
        if b16 and b32:
            figures[f"{s}/fp16_over_fp32_bytes"] = round(b16 / b32, 4)
    result = {
        "benchmark": "round_overhead", "machine": machine(),
        "deployment": ("loopback; one flower-superlink (TLS + SuperNode auth, one HTTPS port), two `fedus client start` "
                       "processes (flower-supernode; task processes 'warm': `--isolation process` + client/warm_superexec.py, "
                       "each message's ClientApp process forked from a preloaded forkserver; 'fresh': subprocess "
                       "isolation, a new flwr-clientapp interpreter per message), "
                       "`flwr run` per setting; sites OMP_NUM_THREADS=1 (two sites on two cores)"),
        "settings": {"common": COMMON, "work": WORK, "plan": [list(p) for p in PLAN if p in plan], "sites": SITES,
                     "evaluate_every": args.evaluate_every, "task_processes": args.task_processes, "evaluate_with_train": args.evaluate_with_train,
                     "rounds_override": args.rounds,
                     "overhead_definition": "(train_wall - slower site's train_seconds [+ its eval_seconds of the "
                                            "previous round's student, carried by the train message]) + (eval_wall - "
                                            "slower site's eval_seconds, in rounds evaluated apart); share = overhead / "
                                            "round_wall"},
        "provenance": {"teacher": "vit_tiny_patch16_224 (vit_base_patch16_224 in 'recipe224'), random init (no "
                                  "weights): cost only, not a foundation model",
                       "students": STUDENTS | {"init": "random init, seed 0"},
                       "data": "fedus synthetic generator, " + "; ".join(
                           f"{len(SITES)} centres x {IMAGES_PER_SITE[size]} images at {size} px" for size in sizes)
                               + ", grouped 80/20 split, seed 0 (each site its own manifest)"},
        "figures": figures, "runs": results, "error": error,
        "load_average_before_after": [load_before, load_after], "processes_left": left,
        "note": shared_note(load_before),
    }
    print(json.dumps(figures, indent=1))
    write_result(result, "round_overhead", "cpu", args.out)


if __name__ == "__main__":
    main()
