"""Augmentation ablation on the public corpus, side by side with the reference paper's Table 1.

The paper (DINOv3 ViT-B/16 -> ResNet-50, /work/shared/notes/references.md) compares a
ResNet-50 at random init (R50-Rand), distilled with ImageNet-style augmentation
(R50-Distill-Default) and distilled with ultrasound augmentation (R50-Distill-US), by
frozen linear probes on DDTI segmentation and BUSI segmentation + classification. Here
the same three arms run federated on the four public centres of $FEDUS_CORPUS
(`simulations/ablation-augment.toml`) through the real `fedus simulate` CLI:

- one stand-in teacher is fitted once (`fedus.teacher_fit`, as `fedus simulate` would) and
  the same file is given to every arm, so the arms differ only in `data.augment-policy`;
- `natural` and `ultrasound` are one `fedus simulate` run each (private FEDUS_CACHE and
  FLWR_HOME; every process started is killed by PID afterwards);
- random init is the round-0 student, which every run probes at every site; both runs
  must agree on it (same seed, same splits), which is checked;
- the figures are read from each run's `report/sites.csv` (linear probes on each site's
  held-out split: `cls_acc`, `cls_f1` macro, `seg_dice`, `seg_iou`; the student's are
  from the last round);
- the fit and both runs use a snapshot of the working tree taken at the start (others may be
  editing the checkout meanwhile), and the run configs must differ only in the policy.

The teacher is NOT the paper's: theirs is DINOv3 ViT-B/16 at 224 px, ours a small
network fitted here on the corpus at 64 px. Every output says so.

    python bench/ablation.py            # the ablation (CPU: 33 min on 2 busy cores, 16 of them the teacher fit)
    python bench/ablation.py --smoke    # pipeline check only: 1 round, 1 step, tiny caps (not a result)
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCENARIO = ROOT / "simulations" / "ablation-augment.toml"
ARMS = ("natural", "ultrasound")
SITES = {"busi": "busi", "ddti": "ddti_roi"}  # table prefix -> site name in the corpus (`dataset` column)
SMOKE = ["rounds=1", "train.local-steps=1", "data.max-images-per-site=60", "eval.seg-probe-steps=5"]

# Table 1 of the paper (frozen encoders, linear probing), copied from references.md. Not fedus results.
PAPER = "DINOv3 ViT-B/16 -> ResNet-50, domain-constrained distillation (MIDL 2026 submission), Table 1"
PAPER_TEACHER = ("DINOv3 ViT-B/16 (86 M params, self-supervised foundation model), frozen, 224 px; ResNet-50 student "
                 "distilled on ~162 K unlabelled B-mode images from 40 public datasets (batch 512, 1000 epochs), "
                 "centrally")
PAPER_TABLE1 = {
    "R50-Rand": {"ddti_seg_dice": 0.6028, "ddti_seg_iou": 0.4647, "busi_seg_dice": 0.4365, "busi_seg_iou": 0.3369,
                 "busi_cls_acc": 0.6115, "busi_cls_f1": 0.4204},
    "R50-Distill-Default": {"ddti_seg_dice": 0.7378, "ddti_seg_iou": 0.6252, "busi_seg_dice": 0.5771,
                            "busi_seg_iou": 0.4857, "busi_cls_acc": 0.7325, "busi_cls_f1": 0.7037},
    "R50-Distill-US": {"ddti_seg_dice": 0.7334, "ddti_seg_iou": 0.6192, "busi_seg_dice": 0.6083,
                       "busi_seg_iou": 0.5259, "busi_cls_acc": 0.7452, "busi_cls_f1": 0.6768},
    "DINOv3 ViT-B/16": {"ddti_seg_dice": 0.6503, "ddti_seg_iou": 0.4743, "busi_seg_dice": 0.2384,
                        "busi_seg_iou": 0.1729, "busi_cls_acc": None, "busi_cls_f1": None},
}
# (label in the table, the paper's row, fedus's row)
ROWS = [("random init", "R50-Rand", "random_init"), ("distilled, natural aug.", "R50-Distill-Default", "natural"),
        ("distilled, ultrasound aug.", "R50-Distill-US", "ultrasound"), ("teacher", "DINOv3 ViT-B/16", "teacher")]
METRICS = [("DDTI Dice", "ddti_seg_dice"), ("DDTI IoU", "ddti_seg_iou"), ("BUSI Dice", "busi_seg_dice"),
           ("BUSI IoU", "busi_seg_iou"), ("BUSI acc", "busi_cls_acc"), ("BUSI F1", "busi_cls_f1")]
PROBES = ("cls_acc", "cls_f1", "seg_dice", "seg_iou")


def teacher_statement(ours: str) -> str:
    return f"Teachers differ: the paper's = {PAPER_TEACHER}. fedus's = {ours}."


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def side_by_side(ours: dict[str, dict[str, float | None]], teacher: str) -> str:
    """Markdown: one row per arm, each metric as a (paper, fedus) column pair; '-' where a figure does not exist.

    `ours`: fedus row key (random_init / natural / ultrasound / teacher) -> metric key -> value."""
    head = ["arm (paper row)"] + [f"{name} {who}" for name, _ in METRICS for who in ("paper", "fedus")]
    lines = [f"Frozen linear probes: {PAPER} vs fedus (federated, 4 public centres). " + teacher_statement(teacher), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, paper_row, our_row in ROWS:
        cells = [f"{label} ({paper_row})"]
        for _, key in METRICS:
            cells += [_cell(PAPER_TABLE1[paper_row].get(key)), _cell((ours.get(our_row) or {}).get(key))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


def _value(text: str) -> float | bool | str | None:
    """A sites.csv cell as written by fedus.reports: '' = none, True/False, a number, or a name."""
    if text in ("", "True", "False"):
        return None if text == "" else text == "True"
    try:
        return float(text)
    except ValueError:
        return text


def figures(sites: dict[str, dict[str, str]], who: str) -> dict[str, float | None]:
    """`who` = random_init / student / teacher: the table's metrics from one run's sites.csv rows."""
    return {f"{prefix}_{m}": _float((sites.get(site) or {}).get(f"{who}_{m}"))
            for prefix, site in SITES.items() for m in PROBES}


class LoadSampler(threading.Thread):
    """1-minute load average every `every` s: how busy the shared machine was during the runs."""

    def __init__(self, every: float = 15.0):
        super().__init__(daemon=True)
        self.every, self.samples, self.stop = every, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append(round(os.getloadavg()[0], 2))
            self.stop.wait(self.every)

    def summary(self) -> dict:
        s = self.samples or [0.0]
        return {"min": min(s), "mean": round(sum(s) / len(s), 2), "max": max(s), "samples": len(s),
                "every_s": self.every}


def settings(cfg) -> dict:
    """The run config every arm ran with, but for the policy (per arm) and the temporary paths."""
    out = cfg.model_copy(update={"run_dir": ""}).to_dict()
    out["data"] |= {"manifest": "$FEDUS_CORPUS/all_manifest.csv", "augment-policy": "per arm: natural | ultrasound"}
    out["teacher"]["weights"] = "teacher.safetensors, fitted once by this benchmark, the same file for both arms"
    return out


def snapshot_code(dest: Path) -> dict:
    """Copy the working tree's files (git-tracked and untracked-not-ignored: code, scenarios, pyproject) to
    `dest`, so every arm runs the same code even while others edit the checkout; returns its fingerprint."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")
    digest, count = hashlib.sha256(), 0
    for name in sorted(n.decode() for n in listed if n):
        src = ROOT / name
        if not src.is_file():  # deleted in the working tree
            continue
        data = src.read_bytes()
        digest.update(name.encode() + b"\0" + data)
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(data)
        count += 1
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"git_head": head, "working_tree_sha256": digest.hexdigest(), "files": count,
            "note": "all arms (and the teacher fit) ran from this snapshot of the working tree, not the live checkout"}


def run_arm(args: list[str], run_dir: Path, env: dict[str, str], timeout: float) -> float:
    """`fedus simulate ...` in its own process group; whatever happens, every process it started is killed."""
    from fedus.processes import flower_home_pids, kill_flower_home

    cmd = [sys.executable, "-m", "fedus", "simulate", "--run-dir", str(run_dir), *args]
    print("$ " + " ".join(cmd), flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=env["PYTHONPATH"], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # anything left in its group
            except ProcessLookupError:
                pass
            kill_flower_home(run_dir / "flwr-home")  # what Flower detached into other sessions
    seconds = time.perf_counter() - start
    left = flower_home_pids(run_dir / "flwr-home")
    if rc != 0 or left:
        tail = (run_dir.parent / f"{run_dir.name}.log").read_text()[-3000:]
        raise RuntimeError(f"fedus simulate failed (rc {rc}, still alive: {left}):\n{tail}")
    return seconds


def read_sites(run_dir: Path) -> dict[str, dict[str, str]]:
    with open(run_dir / "report" / "sites.csv") as f:
        return {row["site"]: row for row in csv.DictReader(f)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="pipeline check (1 round, 1 step, tiny caps); not a result")
    ap.add_argument("--keep", type=Path, default=None, help="keep the run dirs here (default: a temporary folder)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per arm")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    began, load = time.perf_counter(), LoadSampler()
    load.start()
    overrides = SMOKE if args.smoke else []
    with tempfile.TemporaryDirectory(prefix="fedus-ablation-") as tmp:
        work = (args.keep or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        code = work / "code"
        code_state = snapshot_code(code)
        # fedus.scenarios' default corpus is beside the checkout, which the snapshot is not: pin it first
        os.environ.setdefault("FEDUS_CORPUS", str(ROOT.parent / "shared" / "corpus"))
        sys.path.insert(0, str(code))  # fedus, bench, server, client from the snapshot from here on
        from bench.machine import machine, write_result
        from fedus.scenarios import corpus_root, load_scenario
        from fedus.teacher_fit import fit_teacher

        scenario = load_scenario(str(code / SCENARIO.relative_to(ROOT)), overrides)  # fails if the corpus is absent
        fit_steps = 3 if args.smoke else scenario.fit_teacher_steps
        env = dict(os.environ, FEDUS_CACHE=str(work / "cache"), FLWR_HOME=str(work / "flwr-home"),
                   FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", OMP_NUM_THREADS="1",
                   FEDUS_CORPUS=str(corpus_root()), PYTHONPATH=str(code))
        where = subprocess.run([sys.executable, "-c", "import fedus, server, client; print(fedus.__file__, "
                                "server.__file__, client.__file__)"], env=env, cwd=code, capture_output=True,
                               text=True, check=True).stdout.split()
        if not all(Path(w).is_relative_to(code) for w in where):
            raise RuntimeError(f"the snapshot is not what subprocesses import: {where}")
        # one teacher for every arm: fitted once, exactly as `fedus simulate` fits it when given no weights
        t0 = time.perf_counter()
        fitted = fit_teacher(scenario.config, work / "teacher.safetensors", steps=fit_steps, lr=scenario.fit_teacher_lr,
                             data_label=f"'{scenario.name}'")
        fit_s = time.perf_counter() - t0
        teacher = fitted.teacher
        common = ["--scenario", str(code / SCENARIO.relative_to(ROOT)),
                  "--set", f"teacher.weights={json.dumps(teacher.weights)}",
                  "--set", f"teacher.source={json.dumps(teacher.source)}"]
        for item in overrides:
            common += ["--set", item]
        arms, sites, walls, configs = {}, {}, {}, {}
        for arm in ARMS:
            run_dir = work / f"run-{arm}"
            policy = ["--set", f'data.augment-policy="{arm}"']
            walls[arm] = round(run_arm(common + policy, run_dir, env, args.timeout), 1)
            sites[arm] = read_sites(run_dir)
            summary = json.loads((run_dir / "summary.json").read_text())
            ran = summary["config"]
            if (ran["data"]["augment-policy"], ran["teacher"]["weights"]) != (arm, teacher.weights):
                raise RuntimeError(f"run {run_dir} did not use policy {arm} and the shared teacher file")
            configs[arm] = json.dumps(ran | {"run-dir": "", "data": ran["data"] | {"augment-policy": ""}},
                                      sort_keys=True)
            arms[arm] = {"wall_s": walls[arm], "status": summary.get("status"),
                         "teacher_source": summary["provenance"]["teacher"]["source"],
                         "augment_policy": ran["data"]["augment-policy"],
                         "student": summary["provenance"]["student"],
                         "sites": {name: {k: _value(v) for k, v in row.items()} for name, row in sites[arm].items()}}
            print(f"{arm}: {walls[arm]:.0f} s", flush=True)
    load.stop.set()

    ours = {arm: figures(sites[arm], "student") for arm in ARMS}
    ours["random_init"] = figures(sites["ultrasound"], "random_init")
    ours["teacher"] = figures(sites["ultrasound"], "teacher")
    consistent = {who: figures(sites["natural"], who) == ours[who] for who in ("random_init", "teacher")}
    ours_teacher = (f"{teacher.arch} (blocks '{teacher.blocks}'), a stand-in {teacher.source}; "
                    f"{scenario.config.data.image_size} px; ResNet-50 student distilled federated "
                    f"({scenario.config.rounds} rounds x {scenario.config.train.local_steps} local steps x batch "
                    f"{scenario.config.train.batch_size} per site, FedAvg over 4 centres)")
    table = side_by_side(ours, ours_teacher)
    cfg = scenario.config
    result = {
        "benchmark": "ablation", "smoke": args.smoke, "machine": machine(), "device": "cpu",
        "command": " ".join(["python", "bench/ablation.py", *sys.argv[1:]]),
        "scenario": str(SCENARIO.relative_to(SCENARIO.parent.parent)), "overrides": overrides,
        "settings": settings(fitted),
        "arms": {"random_init": "the round-0 student (seed 0), probed in round 0 of every run",
                 "natural": "data.augment-policy = natural", "ultrasound": "data.augment-policy = ultrasound",
                 "differ_only_in": "data.augment-policy (same teacher file, seed, splits, steps, probes)"},
        "seeds": {"run": cfg.seed, "teacher_fit": cfg.seed,
                  "note": "run seed: student init, splits, caps, site-step and probe seeds (derived per site/round)"},
        "teacher": {"fedus": {"arch": teacher.arch, "blocks": teacher.blocks, "source": teacher.source,
                              "image_size": cfg.data.image_size, "fit_steps": fit_steps,
                              "fit_lr": scenario.fit_teacher_lr, "fit_s": round(fit_s, 1)},
                    "paper": PAPER_TEACHER, "statement": teacher_statement(ours_teacher)},
        "paper": {"source": PAPER, "table1": PAPER_TABLE1,
                  "note": "copied from /work/shared/notes/references.md; the paper's figures, not fedus results"},
        "fedus": ours,
        "code": code_state,
        "checks": {"run_configs_differ_only_in_policy": len(set(configs.values())) == 1,
                   "random_init_identical_in_both_runs": consistent["random_init"],
                   "teacher_identical_in_both_runs": consistent["teacher"]},
        "data": {name: {k: int(row[k]) for k in ("n_train", "n_test")} for name, row in sites["ultrasound"].items()},
        "probes": "frozen features; classification: pooled map -> StandardScaler + logistic regression (C=1, "
                  "balanced), accuracy and macro F1; segmentation: standardised map -> 1x1 conv, bilinear upsampling, "
                  f"BCE + soft Dice, {cfg.eval.seg_probe_steps} Adam steps, hard Dice / IoU per held-out image "
                  "(empty/empty = 1); fitted on each site's training split, scored on its held-out split",
        "runs": arms, "table_markdown": table,
        "wall_s": round(time.perf_counter() - began, 1), "load_avg_1m": load.summary(),
    }
    print(table)
    if not all(result["checks"].values()):
        print(f"WARNING: a consistency check failed: {result['checks']}", flush=True)
    out = args.out or (Path(tempfile.gettempdir()) / "ablation-smoke.json" if args.smoke
                       else ROOT / "bench" / "results" / "ablation-cpu.json")  # not the snapshot's (deleted)
    write_result(result, "ablation", "cpu", out)


if __name__ == "__main__":
    main()
