"""bench/ablation.py's side-by-side table: the paper's Table 1 and fedus's figures in the right cells."""

from __future__ import annotations

from bench.ablation import METRICS, PAPER_TABLE1, ROWS, figures, side_by_side


def _parse(markdown: str) -> tuple[str, list[str], dict[str, dict[str, str]]]:
    lines = markdown.splitlines()
    table = [line for line in lines if line.startswith("|")]
    head = [c.strip() for c in table[0].strip("|").split("|")]
    rows = {}
    for line in table[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(head, cells))
    return lines[0], head, rows


def test_paper_and_fedus_figures_land_in_their_own_columns_and_rows():
    # every fedus figure distinct (row index, metric index), and never equal to a paper figure
    ours = {our: {key: round(0.01 * i + 0.001 * j + 0.0001, 4) for j, (_, key) in enumerate(METRICS)}
            for i, (_, _, our) in enumerate(ROWS) if our != "teacher"}
    ours["natural"]["busi_cls_f1"] = None  # a figure fedus does not have
    caption, head, rows = _parse(side_by_side(ours, "resnet18 stand-in fitted here at 64 px"))

    assert head[0] == "arm (paper row)" and len(head) == 1 + 2 * len(METRICS)
    assert head[1:3] == ["DDTI Dice paper", "DDTI Dice fedus"]
    for label, paper_row, our_row in ROWS:
        row = rows[f"{label} ({paper_row})"]
        for name, key in METRICS:
            paper = PAPER_TABLE1[paper_row][key]
            assert row[f"{name} paper"] == ("-" if paper is None else f"{paper:.4f}"), (paper_row, name)
            mine = (ours.get(our_row) or {}).get(key)
            assert row[f"{name} fedus"] == ("-" if mine is None else f"{mine:.4f}"), (our_row, name)
    assert rows["distilled, ultrasound aug. (R50-Distill-US)"]["BUSI Dice paper"] == "0.6083"
    assert rows["distilled, natural aug. (R50-Distill-Default)"]["BUSI F1 fedus"] == "-"
    assert rows["teacher (DINOv3 ViT-B/16)"]["DDTI Dice fedus"] == "-"  # no fedus teacher figures given

    # the caption states both teachers
    assert "Teachers differ" in caption and "DINOv3 ViT-B/16" in caption and "224 px" in caption
    assert "resnet18 stand-in fitted here at 64 px" in caption


def test_figures_read_the_named_model_at_busi_and_ddti_only():
    row = {"random_init_cls_acc": "0.5", "student_cls_acc": "0.7", "student_seg_dice": "0.4", "student_cls_f1": "",
           "teacher_seg_dice": "0.9"}
    sites = {"busi": dict(row), "ddti_roi": {"student_seg_dice": "0.6", "student_seg_iou": "0.45"},
             "hc18": {"student_seg_dice": "0.99"}}
    got = figures(sites, "student")
    assert got["busi_cls_acc"] == 0.7 and got["busi_seg_dice"] == 0.4 and got["busi_cls_f1"] is None
    assert got["ddti_seg_dice"] == 0.6 and got["ddti_seg_iou"] == 0.45 and got["ddti_cls_acc"] is None
    assert figures(sites, "random_init")["busi_cls_acc"] == 0.5
    assert figures({}, "student")["busi_seg_dice"] is None
