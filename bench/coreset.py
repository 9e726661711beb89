"""Coreset vs random subset vs full data at equal local steps: held-out token cosine to the teacher.

Per case (teacher x data) and seed, every site scores its training images with the
round-0 student (`Site.coreset_scores`: teacher k-means feature rank + warm-up gradient
quality rank) and sends its histogram, small bins merged (`SiteScores.sent_histogram`, as
the ClientApp sends it); `plan_budget` turns the summed histograms and the global budget
into each site's keep count; each site then trains one round
(`Site.train`, the real site step, `steps` steps) on (a) its coreset, (b) a random subset
of the same size, (c) all its training images, from the same seeded student, and each
student's held-out cosine to the teacher on the site's test split is measured (mean over
sites, weighted by held-out images). Figures: per seed, and mean / std over seeds of the
paired difference coreset - random. With `--rounds R` the steps are split over R FedAvg rounds
and every coreset is re-scored each round (`run_seed`); `scoring_s` sums every ranking's scoring.

Cases: teacher = `random` (seeded random-init ViT-Ti, as the tests use) or `fitted`
(a ResNet-18 stand-in teacher fitted here on the pooled training splits, as the demo
does; not a foundation model); data = `clean` (the synthetic generator's images),
`planted` (plus duplicates and saturated / blank / noise frames, fedus.coreset.planted) or
`cine` (each training image followed by 3 near-identical frames: 1 px shift, noise std 4), or
`corpus` (the public corpus at $FEDUS_CORPUS, one site per dataset, its own redundancy: frames of
one fetus, crops of one thyroid frame, frames of one lung video; the `fitted` teacher is then
fitted on the corpus' pooled training splits).

    python bench/coreset.py                    # all four cases, 5 seeds (CPU, ~10-30 min on 2 cores)
    python bench/coreset.py --cases random:clean --seeds 3
    python bench/coreset.py --cases fitted:clean --centres 3 --images-per-centre 300 --steps 60 --out ...
    python bench/coreset.py --cases fitted:corpus --steps 200 --out bench/results/coreset-corpus-cpu.json
    python bench/coreset.py --preset demo --cases fitted:clean    # the demo's own settings
    python bench/coreset.py --preset demo --cases fitted:clean --seeds 20 --without-full   # paired difference, more seeds
    python bench/coreset.py --preset demo --cases fitted:clean --seeds 10 --without-full --also-prefer hard
    python bench/coreset.py --preset demo --cases fitted:clean --rounds 3 --without-full --also-prefer hard --seeds 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.machine import machine, write_result  # noqa: E402
from bench.transfer import mean_state  # noqa: E402
from fedus.config import ConfigError, RunConfig  # noqa: E402
from fedus.coreset import plan_budget  # noqa: E402
from fedus.coreset.planted import add_cine_frames, plant  # noqa: E402
from fedus.data.manifest import read_manifest  # noqa: E402
from fedus.data.sites import list_sites  # noqa: E402
from fedus.data.synthetic import write_synthetic_corpus  # noqa: E402
from fedus.scenarios import corpus_manifest, load_scenario  # noqa: E402
from fedus.site import Site, derived_seed, initial_student, pick_device  # noqa: E402
from fedus.teacher_fit import fit_teacher  # noqa: E402

SETTINGS = dict(image_size=32, centres=2, images_per_centre=100, student="resnet10t", head_hidden=128,
                batch_size=16, steps=30, rounds=1, lr=1e-3, fit_steps=300, fit_lr=1e-3, fitted_blocks="2,")
TEACHERS = {"random": ("vit_tiny_patch16_224", "2"), "fitted": ("resnet18", None)}  # fitted: see teacher_spec
CASES = ["random:clean", "fitted:clean", "random:planted", "fitted:planted"]  # also: fitted:cine, fitted:corpus
CORPUS_SITE_COLUMN = "dataset"


def teacher_spec(p: dict, teacher: str) -> tuple[str, str]:
    """(arch, blocks); the fitted teacher's blocks are the setting's (the demo taps layer3)."""
    arch, blocks = TEACHERS[teacher]
    return arch, p["fitted_blocks"] if teacher == "fitted" else blocks


def config(p: dict, manifest: Path, teacher: str, seed: int, budget: float, weights: str = "",
           corpus: bool = False) -> RunConfig:
    arch, blocks = teacher_spec(p, teacher)
    data = (['data.source="manifest"', f'data.site-column="{CORPUS_SITE_COLUMN}"',
             f"data.max-images-per-site={p['max_images_per_site']}"] if corpus
            else [f"data.synthetic-centres={p['centres']}"])
    return RunConfig().with_overrides([
        f"teacher.arch={arch}", f'teacher.blocks="{blocks}"', f"student.arch={p['student']}",
        f"student.head-hidden={p['head_hidden']}", f"data.image-size={p['image_size']}", f'data.manifest="{manifest}"',
        *data, f"train.batch-size={p['batch_size']}",
        f"train.local-steps={p['steps'] // p['rounds']}", f"train.lr={p['lr']}", f"seed={seed}",
        f"rounds={p['rounds']}",
        "coreset.enabled=true", f"coreset.budget={budget}"] + ([f'teacher.weights="{weights}"'] if weights else []))


def held_out_cos(sites: list[Site], states: list[dict]) -> float:
    scores = [site.evaluate(state, 1) for site, state in zip(sites, states)]
    return sum(s["cos"] * s["num-examples"] for s in scores) / sum(s["num-examples"] for s in scores)


def run_seed(cfg: RunConfig, data: str, full: bool = True, also_prefer: tuple[str, ...] = ()) -> dict:
    """`also_prefer`: further coresets ranked the other way (`coreset.prefer`), named coreset_<prefer>,
    of the same per-site sizes as the run's own coreset and random subset.

    One round (`cfg.rounds` = 1): each site trains once from the seeded student and its own student is
    evaluated. More rounds: a federation without Flower, every subset in its own: each round every
    coreset is re-scored with its own global student (`coreset.rescore-every` = 1), the random subset
    is drawn again at the run's coreset sizes of that round, each site trains `local-steps` from the
    global student, and FedAvg (weighted by the images trained on, as the server does) makes the next;
    the last global student is evaluated."""
    n_sites = (len(list_sites(read_manifest(Path(cfg.data.manifest)), cfg.data.site_column)) if data == "corpus"
               else cfg.data.synthetic_centres)
    sites = [Site(cfg, i) for i in range(n_sites)]
    if data == "cine":
        for site in sites:
            add_cine_frames(site.data.train, cfg.seed)
    with_planted = data == "planted"
    kinds = [np.array(plant(site.data.train, cfg.seed)) if with_planted else None for site in sites]
    rankings = {"coreset": cfg.coreset} | {f"coreset_{p}": cfg.coreset.model_copy(update={"prefer": p})
                                           for p in also_prefer}
    names = [*rankings, "random"] + (["full"] if full else [])
    start = initial_student(cfg).state_dict()
    glob = dict.fromkeys(names, start)
    rng = np.random.default_rng(derived_seed(cfg.seed, "random-subset"))
    row = {"seed": cfg.seed, "n_train": [len(s.data.train) for s in sites], "kept": [], "threshold": [],
           "scoring_s": 0.0} | {f"planted_in_{n}": 0 for n in names if with_planted and n != "full"}
    for r in range(1, cfg.rounds + 1):
        subsets, plan = {}, None
        for name, ranking in rankings.items():
            scored = [site.coreset_scores(glob[name], r, ranking) for site in sites]
            row["scoring_s"] += sum(s.seconds for s in scored)
            if plan is None:  # the run's own coreset plans the sizes, as a federation would (sent histograms)
                plan = plan_budget([s.sent_histogram(cfg.coreset) for s in scored], cfg.coreset.budget)
            subsets[name] = [s.select(k, cfg.coreset.quota) for s, k in zip(scored, plan.keep)]
        subsets["random"] = [np.sort(rng.choice(len(site.data.train), k, replace=False))
                             for site, k in zip(sites, plan.keep)]
        if full:
            subsets["full"] = [None] * len(sites)
        row["kept"].append(plan.keep)
        row["threshold"].append(round(plan.threshold, 4))
        if with_planted:
            for name in (n for n in subsets if n != "full"):
                row[f"planted_in_{name}"] += sum(int((k[idx] != "clean").sum()) for k, idx in zip(kinds, subsets[name]))
        for name, picks in subsets.items():
            states = [site.train(glob[name], r, subset=pick)[0] for site, pick in zip(sites, picks)]
            if cfg.rounds == 1:
                row[f"cos_{name}"] = round(held_out_cos(sites, states), 5)
            else:
                glob[name] = mean_state(states, [len(p) if p is not None else len(s.data.train)
                                                 for p, s in zip(picks, sites)])
    if cfg.rounds == 1:  # the committed one-round results' layout
        row["kept"], row["threshold"] = row["kept"][0], row["threshold"][0]
    else:
        for name in names:
            row[f"cos_{name}"] = round(held_out_cos(sites, [glob[name]] * len(sites)), 5)
    row["scoring_s"] = round(row["scoring_s"], 2)
    return row


def summary(rows: list[dict]) -> dict:
    def stats(values: list[float]) -> dict:
        return {"mean": round(statistics.mean(values), 5),
                "std": round(statistics.stdev(values), 5) if len(values) > 1 else 0.0}

    names = [key[len("cos_"):] for key in rows[0] if key.startswith("cos_")]
    out = {name: stats([r[f"cos_{name}"] for r in rows]) for name in names}
    for name in (n for n in names if n.startswith("coreset")):
        diff = [r[f"cos_{name}"] - r["cos_random"] for r in rows]
        out[f"{name}_minus_random"] = stats(diff) | {
            "stderr": round(statistics.stdev(diff) / len(diff) ** 0.5, 5) if len(diff) > 1 else 0.0}
        out[f"{name}_beats_random_seeds"] = f"{sum(d > 0 for d in diff)}/{len(diff)}"
    return out


def demo_settings() -> dict:
    """The demo's own data, models and schedule (simulations/synthetic-devices.toml), so that "on the
    synthetic demo" means that: its centres, image size, teacher block, head, batch, and as many local
    steps as a demo site takes over all its rounds (here in one site step, without aggregation)."""
    scenario = load_scenario("synthetic-devices")
    c = scenario.config
    if c.teacher.arch != TEACHERS["fitted"][0]:
        raise SystemExit(f"the demo's teacher is {c.teacher.arch}; this benchmark fits {TEACHERS['fitted'][0]}")
    return dict(image_size=c.data.image_size, centres=c.data.synthetic_centres,
                images_per_centre=c.data.synthetic_images_per_centre, student=c.student.arch,
                head_hidden=c.student.head_hidden, batch_size=c.train.batch_size,
                steps=c.train.local_steps * c.rounds, rounds=1,
                lr=c.train.lr, fit_steps=scenario.fit_teacher_steps, fit_lr=scenario.fit_teacher_lr,
                fitted_blocks=c.teacher.blocks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=CASES, help="teacher:data, teacher in random/fitted, data in clean/planted")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--preset", choices=("small", "demo"), default="small",
                    help="small: 2 x 100 images, 32 px (minutes); demo: the demo's settings (synthetic-devices.toml)")
    ap.add_argument("--centres", type=int, default=None)
    ap.add_argument("--images-per-centre", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="local steps of each training run, all rounds together")
    ap.add_argument("--rounds", type=int, default=None,
                    help="split the steps over this many FedAvg rounds, every coreset re-scored each round "
                         "(default 1: one site step per site, no aggregation)")
    ap.add_argument("--max-images-per-site", type=int, default=0, help="corpus: whole leakage groups up to N (0: all)")
    ap.add_argument("--without-full", action="store_true",
                    help="train coreset and random subsets only (more seeds for the paired difference in the same time)")
    ap.add_argument("--also-prefer", nargs="*", default=[], choices=("hard",),
                    help="also train a coreset ranked the other way (coreset.prefer), same sizes, paired; "
                         "the run's own coreset is the default ranking, representative")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    p = (demo_settings() if args.preset == "demo" else dict(SETTINGS)) | {
        k: v for k, v in (("centres", args.centres), ("images_per_centre", args.images_per_centre),
                          ("steps", args.steps), ("rounds", args.rounds)) if v is not None} | {
        "max_images_per_site": args.max_images_per_site}
    if p["steps"] % p["rounds"]:
        raise SystemExit(f"error: {p['steps']} steps do not split into {p['rounds']} equal rounds")
    device, t0 = pick_device(), time.perf_counter()
    results, teacher_source = {}, {"random": "random init (seeded); agreement with this teacher, not a foundation model"}
    with tempfile.TemporaryDirectory() as tmp:
        manifests = {"synthetic": None, "corpus": None}
        fitted = {}  # data source -> (weights, source)
        for case in args.cases:
            teacher, data = case.split(":")
            source = "corpus" if data == "corpus" else "synthetic"
            if manifests[source] is None:
                manifests[source] = (corpus_manifest() if source == "corpus" else write_synthetic_corpus(
                    Path(tmp), p["centres"], p["images_per_centre"], p["image_size"], seed=0))
            manifest, corpus = manifests[source], source == "corpus"
            if teacher == "fitted" and source not in fitted:
                label = "the public corpus" if corpus else "the benchmark's synthetic corpus"
                cfg = fit_teacher(config(p, manifest, "fitted", 0, args.budget, corpus=corpus),
                                  Path(tmp) / f"teacher-{source}.safetensors", steps=p["fit_steps"], lr=p["fit_lr"],
                                  data_label=label)
                fitted[source] = (cfg.teacher.weights, cfg.teacher.source)
                teacher_source[f"fitted ({source})"] = cfg.teacher.source
            weights = fitted[source][0] if teacher == "fitted" else ""
            rows = []
            for seed in range(args.seeds):
                rows.append(run_seed(config(p, manifest, teacher, seed, args.budget, weights, corpus), data,
                                     full=not args.without_full, also_prefer=tuple(args.also_prefer)))
                print(case, rows[-1], flush=True)
            results[case] = {"figures": summary(rows), "rows": rows}
    cfg = config(p, Path("synthetic"), "random", 0, args.budget)
    result = {
        "benchmark": "coreset", "machine": machine(), "device": str(device),
        "settings": p | {"preset": args.preset, "budget": args.budget, "seeds": list(range(args.seeds)),
                         "subsets": ["coreset", *(f"coreset_{p}" for p in args.also_prefer), "random"]
                                    + ([] if args.without_full else ["full"]),
                         "coreset": cfg.coreset.model_dump(by_alias=True),
                         "training": ("one site step per site from the seeded round-0 student (no aggregation)"
                                      if p["rounds"] == 1 else
                                      f"{p['rounds']} FedAvg rounds of {p['steps'] // p['rounds']} local steps, each "
                                      "coreset re-scored every round with its own global student, the random subset "
                                      "drawn again every round at the coreset's sizes")
                                     + "; coreset, random and full runs share the student, steps and training seed",
                         "augment_policy": cfg.data.augment_policy, "mixup": cfg.train.mixup},
        "teacher": {name: dict(zip(("arch", "blocks"), teacher_spec(p, name.split()[0]))) | {"weights": source}
                    for name, source in teacher_source.items()},
        "data": (f"fedus synthetic B-mode generator, {p['centres']} centres x {p['images_per_centre']} images, "
                 f"{p['image_size']} px, corpus seed 0; per-site grouped train/test split (test fraction "
                 f"{cfg.data.test_fraction}); held-out cosine on each site's test split; 'planted' adds 9 copies "
                 f"of 3 images and 3 saturated, 3 blank, 3 noise frames to each site's training split; 'cine' follows "
                 f"each training image with 3 near-identical frames (1 px shift, grey-level noise std 4); 'corpus': "
                 f"the public corpus ($FEDUS_CORPUS/all_manifest.csv, not copied), one site per "
                 f"{CORPUS_SITE_COLUMN}, split by patient and near-duplicate group, "
                 f"{p['max_images_per_site'] or 'all'} images per site at most, {p['image_size']} px"),
        "seed": "per row: run seed (student init, k-means, warm-up, training order, random subset)",
        "cases": results, "wall_s": round(time.perf_counter() - t0, 1),
    }
    write_result(result, "coreset", "cpu" if device.type == "cpu" else "gpu", args.out)


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:  # e.g. no corpus at $FEDUS_CORPUS: one line, no traceback
        raise SystemExit(f"error: {err}")
