"""The loss registry and the three distillation losses (token-mse, masked-consistency, repulsive-kd)."""

import math

import pytest
import torch
import torch.nn.functional as F

from fedus.config import ConfigError, DistillConfig, RepulsiveKdConfig
from fedus.distill.clock import RoundClock
from fedus.distill.losses import StepInputs, create_loss, create_objective, list_losses, parse_loss_spec, token_mse
from fedus.distill.losses.masked_consistency import (
    band_keep, band_stop, consistency_weights, masked_pixel_mse, patch_mask, scaled_patch, weighted_token_mse,
)
from fedus.distill.losses.repulsive_kd import beta_at, repulsive_terms, similarity, split_soft_ce, teacher_targets
from fedus.distill.site_step import site_step
from fedus.evaluation.site_eval import teacher_agreement
from fedus.site import Site, initial_student

LOSSES = ["token-mse", "masked-consistency", "repulsive-kd"]


# --- registry -----------------------------------------------------------------------------------

def test_registry_lists_creates_and_combines():
    assert set(LOSSES) <= set(list_losses())
    assert create_loss("repulsive-kd").views == 2
    assert parse_loss_spec("token-mse:1.0, repulsive-kd:0.5") == [("token-mse", 1.0), ("repulsive-kd", 0.5)]
    objective = create_objective(DistillConfig(loss="token-mse:1.0,repulsive-kd:0.5"))
    assert [(t.name, w) for t, w in objective.terms] == [("token-mse", 1.0), ("repulsive-kd", 0.5)]
    assert objective.views == 2


@pytest.mark.parametrize("spec", ["nosuch", "token-mse:x", "token-mse:-1", "", "token-mse,token-mse"])
def test_bad_loss_specs_are_one_line_config_errors(spec):
    with pytest.raises(ConfigError) as err:
        create_objective(DistillConfig(loss=spec))
    assert "\n" not in str(err.value)


def test_aux_modules_are_in_the_students_state_dict(tiny_cfg):
    plain = initial_student(tiny_cfg).state_dict()
    assert not any(k.startswith("distill.") for k in plain)  # token-mse adds nothing
    cfg = tiny_cfg.with_overrides(["distill.loss=masked-consistency:1,repulsive-kd:0.5"])
    a, b = initial_student(cfg).state_dict(), initial_student(cfg).state_dict()
    extra = {k for k in a if k.startswith("distill.")}
    assert any(k.startswith("distill.masked_consistency.projectors.") for k in extra)
    assert any(k.startswith("distill.masked_consistency.decoder.") for k in extra)
    assert "distill.repulsive_kd.log_scale" in extra
    assert all(torch.equal(a[k], b[k]) for k in a)  # seeded: server and every site build the same student


# --- token-mse ----------------------------------------------------------------------------------

def test_token_mse_zero_at_teacher_and_finite_gradients():
    t = torch.randn(2, 4, 8)
    assert token_mse(t, t).item() == 0.0
    s = torch.randn(2, 4, 8, requires_grad=True)
    token_mse(s, t).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


# --- masked-consistency -------------------------------------------------------------------------

@pytest.mark.parametrize("size,low,high", [(32, 0.25, 0.6), (33, 0.1, 0.3), (64, 0.5, 1.5)])
def test_band_stop_removes_exactly_the_band(size, low, high):
    x = torch.rand(2, 3, size, size, dtype=torch.float64)
    out = band_stop(x, low, high)
    spec_in, spec_out = torch.fft.fft2(x.float()), torch.fft.fft2(out)
    keep = band_keep(size, size, low, high).bool()
    assert (~keep).any() and keep.any()
    assert spec_out[..., ~keep].abs().max() < 1e-3  # the annulus is gone
    torch.testing.assert_close(spec_out[..., keep], spec_in[..., keep], atol=1e-3, rtol=1e-4)  # the rest untouched
    fy, fx = torch.fft.fftfreq(size).view(-1, 1), torch.fft.fftfreq(size).view(1, -1)
    r = (fy**2 + fx**2).sqrt() / 0.5
    assert torch.equal(~keep, (r >= low) & (r < high))  # the band is an annulus of the centred spectrum


def test_patch_mask_ratio_and_scaled_patches():
    g = torch.Generator().manual_seed(0)
    assert scaled_patch(16, 224) == 16 and scaled_patch(16, 448) == 32 and scaled_patch(16, 32) == 2
    m = patch_mask(4, 32, 4, 0.5, g)
    assert m.shape == (4, 1, 32, 32) and set(m.unique().tolist()) == {0.0, 1.0}
    assert torch.allclose(m.mean((1, 2, 3)), torch.full((4,), 0.5))
    blocks = m[:, 0].unfold(1, 4, 4).unfold(2, 4, 4)  # each 4x4 patch is all-masked or all-visible
    assert ((blocks.amin((-1, -2)) == blocks.amax((-1, -2)))).all()


def test_consistency_weights_rise_with_teacher_consistency():
    torch.manual_seed(0)
    a = torch.randn(3, 6, 16)
    noise = torch.randn(3, 6, 16)
    levels = torch.linspace(0.0, 3.0, 6).view(1, 6, 1)  # token 0 identical in both views ... token 5 noisy
    b = a + levels * noise
    w = consistency_weights(a, b, temperature=0.1)
    assert torch.allclose(w.mean(1), torch.ones(3), atol=1e-5)  # normalised: mean weight 1
    cos = F.cosine_similarity(a, b, dim=-1)
    for i in range(3):
        order = cos[i].argsort()
        assert (w[i][order].diff() >= 0).all()  # weight increases with consistency
    ws = consistency_weights(a, b, temperature=0.1, per="sample")
    assert (ws[:, 0] - ws[:, -1]).abs().max() == 0 and torch.allclose(ws[:, 0].sum(), torch.tensor(3.0))


def test_masked_consistency_terms_zero_at_target_and_finite_gradients():
    t = torch.randn(2, 4, 8)
    w = consistency_weights(t, t + 0.1 * torch.randn_like(t), 0.1)
    assert weighted_token_mse(t, t, w).item() == 0.0
    assert weighted_token_mse(t + 1, t, torch.ones(2, 4)).item() == pytest.approx(token_mse(t + 1, t).item())
    img, mask = torch.rand(2, 1, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float()
    assert masked_pixel_mse(img, img, mask).item() == 0.0
    assert masked_pixel_mse(img * (1 - mask), img, 1 - mask).item() == 0.0  # only masked pixels count
    s = torch.randn(2, 4, 8, requires_grad=True)
    p = torch.rand(2, 1, 8, 8, requires_grad=True)
    (weighted_token_mse(s, t, w) + masked_pixel_mse(p, img, mask)).backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(p.grad).all()


# --- repulsive-kd -------------------------------------------------------------------------------

def test_diag_plus_off_is_the_full_soft_cross_entropy():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(6, 6), 1)
    log_q = torch.log_softmax(torch.randn(6, 6) * 3, 1)
    diag, off = split_soft_ce(p, log_q)
    full = -(p * log_q).sum(1).mean()
    torch.testing.assert_close(diag + off, full)
    torch.testing.assert_close(diag, -(p.diagonal() * log_q.diagonal()).mean())


def test_floor_bounds_the_repulsive_regime():
    p = torch.full((4, 4), 0.25)
    log_q = torch.log_softmax(torch.eye(4) * 1e4, 1)  # off-diagonal Q ~ 0: log Q -> -inf without a guard
    _, off = split_soft_ce(p, log_q, q_floor=1e-4)
    assert torch.isfinite(off) and off.item() <= -math.log(1e-4) * 0.75 + 1e-5


def test_beta_follows_the_global_clock_whatever_the_local_step_count():
    cfg = RepulsiveKdConfig()
    assert beta_at(0.0, cfg) == pytest.approx(2.0)
    assert beta_at(1.0, cfg) == pytest.approx(-0.8)
    assert beta_at(2.0 / 2.8, cfg) == pytest.approx(0.0, abs=1e-12)
    assert 2.0 / 2.8 == pytest.approx(0.714, abs=5e-4)
    rounds = 7
    for server_round in range(1, rounds + 1):
        for fraction in (0.0, 0.5):
            betas = {beta_at(RoundClock(server_round, rounds).progress(int(fraction * n), n), cfg) for n in (2, 10, 50)}
            assert max(betas) - min(betas) < 1e-12  # sites with 2, 10 or 50 local steps agree
    assert beta_at(RoundClock(1, rounds).progress(0, 13), cfg) == pytest.approx(2.0)
    assert beta_at(RoundClock(rounds, rounds).progress(13, 13), cfg) == pytest.approx(-0.8)
    # 5 rounds of 20 steps: 0 at 71.4 %, i.e. step 57.1 % of round 4 (progress (3 + 0.571) / 5)
    assert beta_at(RoundClock(4, 5).progress(11.4286, 20), cfg) == pytest.approx(0.0, abs=1e-4)


def test_repulsive_kd_minimum_at_the_teacher_and_finite_gradients():
    """With beta = 1 the loss is the soft CE: at student = teacher (scale = teacher's / tau) it is at its
    minimum, the entropy of P, and the gradient vanishes."""
    torch.manual_seed(0)
    cfg = RepulsiveKdConfig(q_floor=1e-30)
    t1, t2 = torch.randn(8, 16), torch.randn(8, 16)
    s1, s2 = t1.clone().requires_grad_(), t2.clone().requires_grad_()
    scale = torch.tensor(cfg.teacher_logit_scale / cfg.tau, requires_grad=True)
    diag, off = repulsive_terms(s1, s2, t1, t2, scale, cfg)
    (diag + off).backward()
    p = teacher_targets(t1, t2, cfg)
    entropy = -(p * p.log()).sum(1).mean()
    p21 = teacher_targets(t2, t1, cfg)
    entropy = (entropy - (p21 * p21.log()).sum(1).mean()) / 2
    torch.testing.assert_close(diag + off, entropy)
    assert s1.grad.abs().max() < 1e-5 and scale.grad.abs() < 1e-5
    # elsewhere, with the repulsive sign, gradients are finite and non-zero
    s1 = torch.randn(8, 16, requires_grad=True)
    diag, off = repulsive_terms(s1, s2.detach(), t1, t2, torch.tensor(5.0), RepulsiveKdConfig())
    (diag - 0.8 * off).backward()
    assert torch.isfinite(s1.grad).all() and s1.grad.abs().sum() > 0
    assert similarity(t1, t1).diagonal().allclose(torch.ones(8))


# --- each loss in the site step: lowers itself, raises held-out agreement -----------------------

def _fixed_objective_value(objective, student, teacher, views, progress):
    was = student.training
    student.eval()
    with torch.no_grad():
        out = objective(StepInputs(student, teacher, views, torch.Generator().manual_seed(123), progress))
    student.train(was)
    return out.loss.item()


@pytest.mark.parametrize("loss", LOSSES)
def test_a_few_site_steps_lower_the_loss_and_raise_held_out_cosine(tiny_cfg, loss):
    cfg = tiny_cfg.with_overrides([f"distill.loss={loss}", "train.local-steps=6", "train.lr=1e-3", "train.batch-size=8"])
    site = Site(cfg, 0)
    student, teacher = initial_student(cfg, site.teacher), site.teacher
    objective = create_objective(cfg.distill, mixup=False)
    fixed = site.data.train_augmented(cfg.data.augment_policy, views=2)
    torch.manual_seed(0)
    batch = [fixed[i] for i in range(8)]
    views = [torch.stack([b["image"] for b in batch]), torch.stack([b["view2"] for b in batch])]
    cpu = torch.device("cpu")
    before = _fixed_objective_value(objective, student, teacher, views, 0.5)
    cos_before = teacher_agreement(student, teacher, site.data, 64, cpu)["cos"]
    train_set = site.data.train_augmented(cfg.data.augment_policy, objective.views)
    result = site_step(student, teacher, train_set, views[0], cfg.train, 0, cpu, cfg.distill, RoundClock(2, 3))
    after = _fixed_objective_value(objective, student, teacher, views, 0.5)
    cos_after = teacher_agreement(student, teacher, site.data, 64, cpu)["cos"]
    assert math.isfinite(result.metrics["train_loss_last"])
    assert after < before, (loss, before, after)
    assert cos_after > cos_before + 0.05, (loss, cos_before, cos_after)
    assert result.metrics["progress_end"] == pytest.approx(2 / 3)
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    if loss == "repulsive-kd":  # beta over round 2 of 3: from 2.0 - 2.8/3 downwards
        assert 2.0 - 2.8 * 2 / 3 < result.metrics["train_rkd_beta"] < 2.0 - 2.8 / 3


def test_combined_with_token_mse_the_base_term_is_not_counted_twice():
    alone = create_loss("repulsive-kd", DistillConfig(loss="repulsive-kd"))
    combined = create_objective(DistillConfig(loss="token-mse:1.0,repulsive-kd:0.5")).terms[1][0]
    assert alone.base_weight == 1.0 and combined.base_weight == 0.0


def test_the_client_carries_the_servers_clock_to_the_site_step(tiny_cfg, task_identity):
    """progress is computed from the server's round and total, not from this config or local steps."""
    from flwr.app import Context, RecordDict

    from client.app import app as client_app
    from wire import server_message

    cfg = tiny_cfg.with_overrides(["distill.loss=repulsive-kd", "train.local-steps=2", "rounds=3"])
    msg = server_message(initial_student(cfg).state_dict(), {"server-round": 2, "rounds": 4})
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config=cfg.to_flat())
    reply = client_app(msg, context)
    assert not reply.has_error(), reply.error
    metrics = dict(reply.content["metrics"])
    assert metrics["progress_end"] == pytest.approx(0.5)  # end of round 2 of the server's 4
    assert metrics["train_rkd_beta"] == pytest.approx(2.0 - 2.8 * (1 + 0.25) / 4)  # mean over steps 0 and 1
