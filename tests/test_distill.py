import pytest
import torch

from fedus.distill import mixup, token_mse
from fedus.site import Site, initial_student


def test_token_mse_is_mean_over_tokens_of_squared_l2():
    s = torch.zeros(2, 3, 4)
    t = torch.zeros(2, 3, 4)
    t[0, 0] = 2.0  # one token off by (2,2,2,2): squared distance 16
    assert token_mse(s, t).item() == pytest.approx(16 / 6)


def test_mixup_same_image_convex_combination():
    g = torch.Generator().manual_seed(0)
    x = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)])
    m = mixup(x, g)
    assert m.min() >= 0 and m.max() <= 1 and m.shape == x.shape


def test_site_step_moves_the_student_towards_the_teacher(tiny_cfg):
    cfg = tiny_cfg.with_overrides(["train.local-steps=15", "train.lr=1e-3"])
    site = Site(cfg, 0)
    start = initial_student(cfg).state_dict()
    before = site.evaluate(start, 1)
    state, metrics = site.train(start, 1)
    after = site.evaluate(state, 1)
    assert metrics["loss_after"] < metrics["loss_before"]
    assert after["cos"] > before["cos"] + 0.05 and after["mse"] < before["mse"]
    assert metrics["steps"] == 15 and metrics["examples_seen"] == 15 * 16
    assert metrics["num-examples"] == len(site.data.train) and metrics["images_per_s"] > 0
    assert set(state) == set(start) and not torch.equal(state["head.net.0.weight"], start["head.net.0.weight"])
    # deterministic given (seed, round, site)
    state2, _ = Site(cfg, 0).train(start, 1)
    assert torch.equal(state["head.net.2.weight"], state2["head.net.2.weight"])


def test_site_evaluation_probes_at_round_zero(tiny_cfg):
    site = Site(tiny_cfg, 1)
    scores = site.evaluate(initial_student(tiny_cfg).state_dict(), 0)
    for key in ["cos", "mse", "cls_acc", "cls_f1", "seg_dice", "seg_iou", "teacher_cls_acc", "teacher_seg_dice"]:
        assert key in scores
    mid = site.evaluate(initial_student(tiny_cfg).state_dict(), 1)
    assert "cls_acc" not in mid  # probes only at first/last round by default


def test_fused_adamw_matches_the_default_one():
    """train.fused-optimizer: the same parameters after a few steps up to float rounding (rtol 1e-5,
    atol 1e-6); fused where torch has the kernel (CPU does in torch >= 2.4), the default where it has not."""
    from fedus.config import TrainConfig
    from fedus.distill.site_step import adamw, fused_available

    def trained(fused: bool) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                    torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4))  # (a bias before BN: grad ~0, noise)
        opt = adamw(model.parameters(), TrainConfig(lr=1e-2, fused_optimizer=fused))
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            loss = model(torch.randn(4, 3, 8, 8, generator=g)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return opt, [p.detach() for p in model.parameters()]

    (fused_opt, fused), (plain_opt, plain) = trained(True), trained(False)
    assert bool(fused_opt.defaults["fused"]) == fused_available(torch.device("cpu")) and not plain_opt.defaults["fused"]
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    meta = torch.zeros(2, device="meta", requires_grad=True)  # no fused kernel there: the fallback
    assert not adamw([meta], TrainConfig(fused_optimizer=True)).defaults["fused"]
