"""Wall time of the full per-site evaluation protocol at 224 px, split by part, for the teacher and a student.

What `fedus evaluate` runs per model at one site (and a site's last-round evaluate with
eval.protocol-at = last): feature extraction of the train and held-out splits, kNN, the
linear head (classification) and the stage decoder (segmentation) on every label fraction
x seed of the run config's `eval` section, timed inside `fedus.evaluation.protocol.run_protocol`
itself. The site is one dataset of the public corpus ($FEDUS_CORPUS, default ../shared/corpus;
BUSI: labels and masks), capped at --max-images images (whole leakage groups, like
data.max-images-per-site) so it fits a CPU session; the cap is in the JSON. Models are random
init, not a foundation model: wall time does not depend on weight values. A federated student
and a random-init student cost the same, so a full evaluation (teacher, federated student,
random init) is teacher + 2 x student.

The decoder fits dominate and do not shrink with the image cap (fixed steps, batch <= 32), so
on a small CPU the seeds can be cut (`--set eval.seeds=1`): every seed's fit is the same work,
and the JSON then also gives the total projected to --project-seeds (fedus's default, 3).
One torch thread by default: a simulated site gets one CPU (client-resources-num-cpus = 1),
and on a shared machine more threads than free cores slow small ops several-fold.

    python bench/eval_cost.py                                  # BUSI, 100 images, configured seeds, CPU
    python bench/eval_cost.py --set eval.seeds=1 --note "..."  # what bench/results/eval_cost-cpu.json ran
    python bench/eval_cost.py --max-images 0 --threads 0       # the whole site, torch's default threads
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.machine import machine, write_result  # noqa: E402
from fedus.config import ConfigError, EvalConfig, RunConfig  # noqa: E402
from fedus.evaluation.fractions import parse_fractions  # noqa: E402
from fedus.evaluation.protocol import run_protocol, site_groups, stage_fn  # noqa: E402
from fedus.scenarios import corpus_manifest  # noqa: E402
from fedus.site import Site, derived_seed  # noqa: E402

PRESETS = {
    # ViT-B/16: the size of the ultrasound foundation-model teachers fedus targets; ResNet-18: fedus's default student
    "cpu": dict(image_size=224, site="busi", max_images=100, teacher="vit_base_patch16_224", student="resnet18"),
}
RANDOM_INIT = "random init, not a foundation model (wall time does not depend on weight values)"


def site_config(p: dict, manifest: Path, overrides: list[str]) -> RunConfig:
    cfg = RunConfig.from_dict({
        "scenario": "bench-eval-cost",
        "data": {"source": "manifest", "manifest": str(manifest), "site-column": "dataset",
                 "image-size": p["image_size"], "max-images-per-site": p["max_images"]},
        "teacher": {"arch": p["teacher"]}, "student": {"arch": p["student"]}})
    return cfg.with_overrides(overrides)


def split_parts(timings: dict[str, float], fractions: list[float]) -> dict[str, float]:
    """run_protocol's timings -> the parts a user weighs: extraction, kNN, each head at 100 %, the sweep below it."""
    get = lambda key: round(timings.get(key, 0.0), 3)  # noqa: E731
    full = f"{max(fractions):g}"
    sweep = sum(v for k, v in timings.items() if k.split(":")[0] in ("cls", "seg") and k.split(":")[1] != full)
    return {"feature_extraction": get("extract"), "knn": get("knn"),
            f"linear_head_cls_at_{full}": get(f"cls:{full}"), f"stage_decoder_seg_at_{full}": get(f"seg:{full}"),
            "label_fraction_sweep": round(sweep, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--site", default=None, help="dataset (site) of the corpus; default: the preset's (busi)")
    ap.add_argument("--max-images", type=int, default=None, help="cap on the site's images (0 = all)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="run-config override, e.g. eval.seeds=1")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    ap.add_argument("--project-seeds", type=int, default=EvalConfig().seeds,
                    help="also give the total for this many seeds when eval.seeds differs (default: fedus's)")
    ap.add_argument("--note", default="", help="free text stored with the figures (e.g. what else was running)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    p = dict(PRESETS[args.preset])
    p["site"] = args.site or p["site"]
    p["max_images"] = p["max_images"] if args.max_images is None else args.max_images
    manifest = corpus_manifest()
    cfg = site_config(p, manifest, args.overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    site = Site(cfg, p["site"], manifest)
    began = time.perf_counter()
    data = site.data
    _ = data.train.images, data.test.images  # decode + resize every image once (a site does this once per process)
    load_s = time.perf_counter() - began
    groups = site_groups(data, manifest)
    fractions = parse_fractions(cfg.eval.label_fractions)
    seed = derived_seed(cfg.seed, "protocol", site.name)
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # torch's one-off lazy import (~5 s): not the first fit's cost
    models = []
    for name, arch in (("teacher", cfg.teacher.arch), ("student", cfg.student.arch)):
        model = site.teacher if name == "teacher" else site.student(None)
        fn = stage_fn(model.to(site.device), cfg.eval.decoder_stages)
        timings: dict[str, float] = {}
        began = time.perf_counter()
        rows = run_protocol(fn, data, groups, cfg.eval, seed, site.device, timings)
        total = time.perf_counter() - began
        heads = sum(v for k, v in timings.items() if k.startswith(("cls:", "seg:")))
        entry = {"model": name, "arch": arch, "weights": RANDOM_INIT, "total_s": round(total, 3),
                 f"total_s_projected_to_{args.project_seeds}_seeds": round(
                     total + heads * (args.project_seeds / cfg.eval.seeds - 1), 1),
                 "parts_s": split_parts(timings, fractions),
                 "per_fit_s": {k: round(v / cfg.eval.seeds, 3) for k, v in sorted(timings.items()) if ":" in k},
                 "extract_ms_per_image": round(1000 * timings["extract"] / (len(data.train) + len(data.test)), 2),
                 "result_rows": len(rows)}
        models.append(entry)
        print(entry, flush=True)
    by = {m["model"]: m["total_s"] for m in models}
    proj = {m["model"]: m[f"total_s_projected_to_{args.project_seeds}_seeds"] for m in models}
    n_images = len(data.train) + len(data.test)
    result = {
        "benchmark": __doc__.splitlines()[0], "machine": machine(), "device": str(site.device), "preset": args.preset,
        "settings": {
            "site": site.name, "corpus": "$FEDUS_CORPUS/all_manifest.csv (public corpus; not copied)",
            "max_images": p["max_images"], "image_size": p["image_size"], "n_train": len(data.train),
            "n_test": len(data.test), "n_train_labelled": int((data.train.labels >= 0).sum()),
            "n_train_masked": int(data.train.has_mask.sum()), "classes": data.classes,
            "eval": cfg.eval.model_dump(by_alias=True), "overrides": args.overrides,
            "fits_per_model": {"cls": len(fractions) * cfg.eval.seeds, "seg": len(fractions) * cfg.eval.seeds}},
        "provenance": {"teacher": f"{cfg.teacher.arch}: {RANDOM_INIT}", "student": f"{cfg.student.arch}: {RANDOM_INIT}"},
        "site_load_s": round(load_s, 3),
        "models": models,
        "full_protocol_per_site_s": round(by["teacher"] + 2 * by["student"], 1),
        f"full_protocol_per_site_s_projected_to_{args.project_seeds}_seeds": round(proj["teacher"] + 2 * proj["student"], 1),
        "full_protocol_per_site_is": "teacher + 2 x student (federated student and random-init student cost the same)",
        "reading": ("feature extraction scales with the site's images (extract_ms_per_image); the heads' cost does "
                    "not grow much with them (decoder: fixed steps x batch <= 32; linear head: small n); "
                    f"measured on {n_images} images"),
        "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]},
        "note": args.note,
    }
    write_result(result, "eval_cost", args.preset, args.out)


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:  # e.g. no corpus at $FEDUS_CORPUS: one line, no traceback
        raise SystemExit(f"error: {err}")
