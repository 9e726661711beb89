"""Update transfer: held-out cosine after R rounds with fp32, fp16 and int8-delta students on the wire.

In-process, no Flower: a few synthetic sites train with `fedus.site.Site.train`, the plain mean of
their students is the aggregate, and every variant uses the same seeds, so the wire is the only
difference. Each round the global student goes down through the variant's dtype (int8-delta: fp16)
and each site's student comes back through it (int8-delta: int8 delta + fp32 scales, each site's
residual carried to its next round as client/app.py keeps it in context.state). Reported per variant:
mean held-out token cosine to the teacher over the sites after every round, bytes per site per round
up and down, and how far its final student is from fp32 transfer's.

    python bench/transfer.py            # CPU, small settings, a few minutes
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.machine import machine, write_result  # noqa: E402
from fedus.config import RunConfig  # noqa: E402
from fedus.site import Site, initial_student  # noqa: E402
from fedus.transfer import INT8_DELTA, decode, decode_delta, encode, encode_delta, nbytes  # noqa: E402

PRESETS = {
    "cpu": dict(sites=3, rounds=4, steps=6, lr=1e-3, image_size=32, batch_size=16, images=60,
                teacher="vit_tiny_patch16_224", student="resnet10t", head_hidden=256, seed=0),
}
VARIANTS = ["fp32", "fp16", INT8_DELTA]


def mean_state(states: list[dict[str, torch.Tensor]], weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    """The mean (plain, or weighted as FedAvg weights by examples), in fp64; integer buffers cast back."""
    w = torch.tensor(weights or [1.0] * len(states), dtype=torch.float64)
    w = w / w.sum()
    return {k: torch.einsum("s,s...->...", w, torch.stack([s[k].double() for s in states])).to(states[0][k].dtype)
            for k in states[0]}


def run(dtype: str, sites: list[Site], p: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg = sites[0].cfg
    state = initial_student(cfg, sites[0].teacher).state_dict()
    residuals: list[dict | None] = [None] * len(sites)
    cos, up, down, began = [], [], [], time.perf_counter()
    for r in range(1, p["rounds"] + 1):
        wire = encode(state, dtype)
        received = decode(wire, dtype, state)  # what every site starts from
        down.append(nbytes(wire))
        back = []
        for i, site in enumerate(sites):
            new, _ = site.train(received, r, p["rounds"])
            if dtype == INT8_DELTA:
                payload, scales, residuals[i] = encode_delta(new, received, residuals[i])
                back.append(decode_delta(payload, scales, received))
                up.append(nbytes(payload) + nbytes(scales))
            else:
                sent = encode(new, dtype)
                back.append(decode(sent, dtype, received))
                up.append(nbytes(sent))
        state = mean_state(back)
        cos.append(sum(s.evaluate(state, r)["cos"] for s in sites) / len(sites))
        print(f"{dtype} round {r}: cos {cos[-1]:.5f}", flush=True)
    row = {"transfer": dtype, "cos_per_round": [round(c, 6) for c in cos], "cos_final": round(cos[-1], 6),
           "bytes_up_per_site_round": sum(up) / len(up), "bytes_down_per_site_round": sum(down) / len(down),
           "seconds": round(time.perf_counter() - began, 1)}
    return row, state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    args = ap.parse_args()
    p = PRESETS[args.preset]
    torch.set_num_threads(min(2, torch.get_num_threads()))
    cfg = RunConfig().with_overrides({
        "teacher.arch": p["teacher"], "student.arch": p["student"], "student.head-hidden": p["head_hidden"],
        "data.image-size": p["image_size"], "data.synthetic-centres": p["sites"],
        "data.synthetic-images-per-centre": p["images"], "train.batch-size": p["batch_size"],
        "train.local-steps": p["steps"], "train.lr": p["lr"], "rounds": p["rounds"], "seed": p["seed"],
        "eval.probe-rounds": "0",  # held-out cosine only: probes are not what transfer changes
    })
    sites = [Site(cfg, i) for i in range(p["sites"])]
    cos0 = sum(s.evaluate(initial_student(cfg, sites[0].teacher).state_dict(), 1)["cos"] for s in sites) / len(sites)
    rows, finals = [], {}
    for dtype in VARIANTS:
        row, finals[dtype] = run(dtype, sites, p)
        rows.append(row)
    ref, fp32_up = finals["fp32"], rows[0]["bytes_up_per_site_round"]
    for row in rows:
        final = finals[row["transfer"]]
        diff = torch.cat([(final[k] - ref[k]).flatten() for k in ref if ref[k].is_floating_point()])
        norm = torch.cat([ref[k].flatten() for k in ref if ref[k].is_floating_point()])
        row |= {"cos_minus_fp32": round(row["cos_final"] - rows[0]["cos_final"], 6),
                "bytes_up_vs_fp32": round(row["bytes_up_per_site_round"] / fp32_up, 4),
                "final_student_rel_l2_vs_fp32": float(diff.norm() / norm.norm()),
                "final_student_max_abs_vs_fp32": float(diff.abs().max())}
        print(row, flush=True)
    write_result({
        "benchmark": "transfer", "machine": machine(), "preset": args.preset,
        "settings": p | {"aggregate": "plain mean of the site students (no Flower)", "loss": "token-mse",
                         "mixup": cfg.train.mixup, "augment": cfg.train.augment,
                         "int8_delta": "per-channel (>= 2-D) / per-tensor (1-D) fp32 scales, error feedback, "
                                       "fp16 download, float tensors < 1024 elements as fp32"},
        "provenance": {"teacher": cfg.teacher.source, "data": f"synthetic B-mode demo corpus "
                       f"({p['sites']} centres x {p['images']} images, fedus.data.synthetic)", "seed": p["seed"]},
        "cos_round0": round(cos0, 6), "variants": rows,
        "note": "held-out token cosine to the (random-init) teacher, mean over the sites' test splits",
    }, "transfer", args.preset)


if __name__ == "__main__":
    main()
