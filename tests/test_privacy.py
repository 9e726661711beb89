"""Sample-level DP at a site: DP-compatible students, epsilon = Opacus' own, a ledger that fails closed."""

import json

import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict
from opacus.accountants import RDPAccountant
from opacus.validators import ModuleValidator

from client.app import app as client_app
from fedus.config import ConfigError, StudentConfig
from fedus.models import create_student
from fedus.privacy import DPPlan, PrivacyLedger, PrivateTraining, epsilon
from fedus.reports.report import write_report
from fedus.runs import RunRecorder
from fedus.site import Site, initial_student
from server.strategy import FedusFedAvg
from wire import server_message

DP = ["privacy.enabled=true", "privacy.noise-multiplier=1.2", "train.local-steps=2"]


def _dp_cfg(tiny_cfg, tmp_path, *extra):
    return tiny_cfg.with_overrides(DP + [f'privacy.ledger-dir="{tmp_path / "ledgers"}"', *extra])


@pytest.mark.parametrize("arch", ["resnet10t", "resnet18", "vit_tiny_patch16_224", "mobilenetv3_small_100"])
def test_student_arch_is_dp_compatible_with_per_sample_grads(arch):
    torch.manual_seed(0)
    student = create_student(StudentConfig(arch=arch, head_hidden=16), 192, (2, 2), 32, 0, dp_compatible=True)
    assert ModuleValidator.validate(student, strict=True) == []
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in student.modules())
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    data = [{"image": torch.rand(3, 32, 32)} for _ in range(8)]
    dp = PrivateTraining(student, optimizer, data, DPPlan(1.0, 1.0, 0.5, 4, clipping="per-sample"), seed=0,
                         device=torch.device("cpu"))
    x = torch.rand(4, 3, 32, 32)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    student(x).pow(2).mean().backward()
    trainable = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad_sample is not None and p.grad_sample.shape == (4, *p.shape) for _, p in trainable)
    for _, p in trainable:  # per-sample grads are the batch grad, split by sample (mean loss)
        torch.testing.assert_close(p.grad_sample.sum(0) / 4, p.grad, rtol=1e-4, atol=1e-6)
    dp.optimizer.step()
    dp.close()
    assert dp.steps == 1 and all(not torch.equal(p, before[n]) for n, p in trainable)
    assert not hasattr(trainable[0][1], "grad_sample") or trainable[0][1].grad_sample is None


@pytest.mark.parametrize("arch", ["resnet10t", "resnet18", "vit_tiny_patch16_224", "mobilenetv3_small_100"])
def test_ghost_clipping_takes_the_same_clipped_step_as_per_sample_clipping(arch):
    """Ghost clipping (norms only, clipped gradient by book-keeping) and Opacus' stored per-sample
    gradients clip the same per-image gradients: with no noise, both hand the optimizer the same clipped mean gradient.
    The clipping norm is small enough that every image is clipped (checked), so a wrong norm would show."""
    from fedus.distill.losses import per_image_token_mse

    x, target = torch.rand(6, 3, 32, 32), torch.randn(6, 4, 192)
    steps, norms = {}, None
    for clipping in ("per-sample", "ghost"):
        student = create_student(StudentConfig(arch=arch, head_hidden=16), 192, (2, 2), 32, 0, dp_compatible=True)
        optimizer = torch.optim.SGD(student.parameters(), lr=1.0)
        data = [{"image": torch.rand(3, 32, 32)} for _ in range(12)]
        dp = PrivateTraining(student, optimizer, data, DPPlan(0.0, 0.05, 0.5, 6, clipping), seed=0,
                             device=torch.device("cpu"))
        dp.backward(per_image_token_mse(student(x), target))
        dp.optimizer.step()
        if clipping == "ghost":
            norms = dp.module.per_sample_gradient_norms
        steps[clipping] = {n: p.grad.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
        dp.close()
    assert norms.shape == (6,) and bool((norms > 0.05).all())
    assert steps["ghost"].keys() == steps["per-sample"].keys()
    for name, step in steps["per-sample"].items():
        torch.testing.assert_close(steps["ghost"][name], step, rtol=1e-3, atol=1e-8, msg=name)
    assert all(step.abs().max() > 0 for step in steps["ghost"].values())


@pytest.mark.parametrize("clipping", ["ghost", "per-sample"])
def test_the_noised_step_is_opacus_own_draw_for_draw(clipping):
    """fedus noises the summed gradient in place (no model-sized copies per step); the step must still be
    exactly Opacus' stock optimizer's: same generator draws, same sum, same division, two steps running."""
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

    from fedus.distill.losses import per_image_token_mse

    stock = DPOptimizerFastGradientClipping if clipping == "ghost" else DPOptimizer
    x, target = torch.rand(6, 3, 32, 32), torch.randn(6, 4, 192)
    grads = {}
    for version in ("fedus", "opacus"):
        student = create_student(StudentConfig(arch="resnet10t", head_hidden=16), 192, (2, 2), 32, 0,
                                 dp_compatible=True)
        data = [{"image": torch.rand(3, 32, 32)} for _ in range(12)]
        dp = PrivateTraining(student, torch.optim.SGD(student.parameters(), lr=0.1), data,
                             DPPlan(1.3, 0.5, 0.5, 6, clipping), seed=3, device=torch.device("cpu"))
        assert isinstance(dp.optimizer, stock) and type(dp.optimizer) is not stock
        if version == "opacus":
            dp.optimizer = stock(dp.optimizer.original_optimizer, noise_multiplier=1.3, max_grad_norm=0.5,
                                 expected_batch_size=6, loss_reduction="mean",
                                 generator=torch.Generator().manual_seed(4))
        for _ in range(2):
            dp.backward(per_image_token_mse(student(x), target))
            dp.optimizer.step()
            grads.setdefault(version, []).append([p.grad.clone() for p in student.parameters() if p.requires_grad])
            dp.optimizer.zero_grad(set_to_none=True)
        dp.close()
    for ours, theirs in zip(grads["fedus"], grads["opacus"]):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert not all(torch.equal(a, b) for a, b in zip(*grads["fedus"]))  # the second step drew new noise


@pytest.mark.parametrize("channels, stride, padding, dilation, bias, size", [
    (24, 1, 1, 1, True, 16),  # many positions, few channels: the per-sample gradient form (grouped convolution)
    (3, 2, 3, 1, True, 16),  # the same form for an RGB stem (unfold + bmm)
    (24, 2, 0, 1, False, 6),  # few positions, wide channels: the Gram (ghost) form
    (24, 1, 2, 2, True, 5),
])
def test_conv_norms_equal_the_norms_of_opacus_per_sample_gradients(channels, stride, padding, dilation, bias, size):
    from opacus.grad_sample.conv import compute_conv_grad_sample

    from fedus.privacy.ghost_norms import GROUPED_MIN_CHANNELS, conv2d_norm_sample, conv2d_weight_grad, ghost_is_cheaper

    torch.manual_seed(0)
    kernel = 7 if channels == 3 else 3
    conv = torch.nn.Conv2d(channels, 40, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias)
    x = torch.randn(5, channels, size, size)
    out = conv(x)
    backprops = torch.randn_like(out)
    positions, fan_in = out.shape[2] * out.shape[3], channels * kernel * kernel
    direct = positions * (fan_in + 40) >= fan_in * 40
    assert ghost_is_cheaper(positions, fan_in, 40) == (not direct) == (size < 16)  # both forms are exercised
    assert (channels >= GROUPED_MIN_CHANNELS) == (channels == 24)  # and both ways of the direct form
    per_sample = compute_conv_grad_sample(conv, [x], backprops)
    want = {p: g.reshape(5, -1).norm(dim=1) for p, g in per_sample.items()}
    formed = {}
    got = conv2d_norm_sample(conv, [x], backprops, formed)
    assert got.keys() == want.keys() and len(got) == 1 + bias
    for p in want:
        torch.testing.assert_close(got[p], want[p], rtol=1e-4, atol=1e-5)
    # the direct form hands over the per-sample gradients it built (book-keeping sums them clipped); the Gram form has none
    assert formed.keys() == (per_sample.keys() if direct else set())
    for p, g in formed.items():
        torch.testing.assert_close(g, per_sample[p], rtol=1e-4, atol=1e-5)
    # the batch's weight gradient (book-keeping's clipped sum): a matrix product on the 2x2 map, the kernel elsewhere
    torch.testing.assert_close(conv2d_weight_grad(conv, x, backprops), per_sample[conv.weight].sum(0),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(5, 24), (5, 7, 24), (5, 3, 40, 24)])  # one position; Gram form; direct form
def test_linear_norms_equal_the_norms_of_opacus_per_sample_gradients(shape):
    from opacus.grad_sample.linear import compute_linear_grad_sample

    from fedus.privacy.ghost_norms import ghost_is_cheaper, linear_norm_sample

    torch.manual_seed(0)
    layer = torch.nn.Linear(24, 16)
    x = torch.randn(*shape)
    backprops = torch.randn_like(layer(x))
    positions = x[0].numel() // 24
    direct = positions > 1 and not ghost_is_cheaper(positions, 24, 16)
    assert direct == (len(shape) == 4)
    per_sample = compute_linear_grad_sample(layer, [x], backprops)
    formed = {}
    got = linear_norm_sample(layer, [x], backprops, formed)
    assert got.keys() == per_sample.keys() == {layer.weight, layer.bias}
    for p, g in per_sample.items():
        torch.testing.assert_close(got[p], g.reshape(5, -1).norm(dim=1), rtol=1e-4, atol=1e-5)
    assert formed.keys() == (per_sample.keys() if direct else set())
    for p, g in formed.items():
        torch.testing.assert_close(g, per_sample[p], rtol=1e-4, atol=1e-5)


def test_timm_layer_norm_per_sample_gradients_are_functorchs():
    """timm's LayerNorm gets Opacus' LayerNorm sampler (registered by fedus.privacy.compat), not the
    slow functorch fallback: the same per-sample gradients."""
    from opacus.grad_sample import GradSampleModule
    from opacus.grad_sample.functorch import ft_compute_per_sample_gradient, prepare_layer
    from timm.layers.norm import LayerNorm

    import fedus.privacy.compat  # noqa: F401  (registers the sampler)

    torch.manual_seed(0)
    layer = LayerNorm(24)
    torch.nn.init.normal_(layer.weight)
    x, backprops = torch.randn(5, 7, 24), torch.randn(5, 7, 24)
    registered = GradSampleModule.GRAD_SAMPLERS[LayerNorm](layer, [x], backprops)
    prepare_layer(layer)
    reference = ft_compute_per_sample_gradient(layer, [x], backprops)
    assert registered.keys() == reference.keys() == {layer.weight, layer.bias}
    for p in reference:
        torch.testing.assert_close(registered[p], reference[p], rtol=1e-4, atol=1e-5)


def _opacus_epsilon(noise, rate, steps, delta):
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=noise, sample_rate=rate)
    return acc.get_epsilon(delta)


def test_epsilon_is_opacus_and_the_ledger_survives_a_restart(tiny_cfg, tmp_path):
    cfg = _dp_cfg(tiny_cfg, tmp_path)
    start = initial_student(cfg).state_dict()
    site = Site(cfg, 0)
    _, m1 = site.train(start, 1)
    assert m1["refused"] == 0 and m1["dp_steps"] == 2 and "loss_after" not in m1  # train losses stay home
    rate, delta = m1["sample_rate"], m1["delta"]
    assert delta == pytest.approx(1 / (10 * len(site.data.train)))
    assert m1["epsilon_total"] == pytest.approx(_opacus_epsilon(1.2, rate, 2, delta), abs=1e-6)
    path = tmp_path / "ledgers" / f"{site.name}.json"
    assert json.loads(path.read_text())["rounds"][0]["steps"] == 2

    restarted = Site(cfg, 0)  # new process: nothing in memory, only the file
    assert PrivacyLedger(path).epsilon(delta) == pytest.approx(m1["epsilon_total"], abs=1e-9)
    _, m2 = restarted.train(start, 2)
    assert m2["epsilon_total"] > m1["epsilon_total"]
    assert m2["epsilon_total"] == pytest.approx(_opacus_epsilon(1.2, rate, 4, delta), abs=1e-6)
    assert m2["epsilon_round"] == pytest.approx(m2["epsilon_total"] - m1["epsilon_total"])
    assert len(PrivacyLedger(path).history) == 2


def _two_round_budget(site, cfg):
    plan = DPPlan.for_site(len(site.data.train), cfg.train.batch_size, 1.2, 1.0)
    entry = (1.2, plan.sample_rate, cfg.train.local_steps)
    two, three = epsilon([entry] * 2, site.delta), epsilon([entry] * 3, site.delta)
    return (two + three) / 2


def test_a_budget_of_two_rounds_trains_two_and_refuses_the_third(tiny_cfg, tmp_path):
    cfg = _dp_cfg(tiny_cfg, tmp_path)
    site = Site(cfg, 0)
    budget = _two_round_budget(site, cfg)
    state = initial_student(cfg).state_dict()
    for rnd in (1, 2):
        state, m = site.train(state, rnd, epsilon_budget=budget)
        assert state is not None and m["refused"] == 0 and m["epsilon_total"] <= budget
    refused_state, m3 = site.train(state, 3, epsilon_budget=budget)
    assert refused_state is None and m3["refused"] == 1 and m3["refusal_code"] == 1
    assert m3["epsilon_projected"] > budget >= m3["epsilon_total"]
    assert len(PrivacyLedger(tmp_path / "ledgers" / f"{site.name}.json").history) == 2  # refusal spends nothing


def test_client_app_refuses_with_a_reason_and_the_server_carries_on(tiny_cfg, task_identity, tmp_path):
    cfg = _dp_cfg(tiny_cfg, tmp_path / "sim")
    site = Site(cfg, 0)
    budget = _two_round_budget(site, cfg)
    ledger = tmp_path / "site-0-ledger.json"  # the site's own file, named by its node config
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config=cfg.to_flat(),
                      node_config={"partition-id": 0, "num-partitions": 2, "epsilon-budget": budget,
                                   "privacy-ledger": str(ledger)})
    arrays = ArrayRecord(initial_student(cfg).state_dict())
    replies = []
    for rnd in (1, 2, 3):
        msg = server_message(arrays.to_torch_state_dict(), {"server-round": rnd}, cfg.federation.transfer_dtype)
        reply = client_app(msg, context)
        assert not reply.has_error(), reply.error
        replies.append(reply)
    assert [int(r.content["metrics"]["refused"]) for r in replies] == [0, 0, 1]
    assert "arrays" not in replies[2].content and int(replies[2].content["metrics"]["refusal_code"]) == 1
    assert len(PrivacyLedger(ledger).history) == 2 and not (tmp_path / "sim" / "ledgers").exists()

    # the server: round 3 with this refusing site and one that trained
    recorder = RunRecorder(tmp_path / "run", cfg, {})
    strategy = FedusFedAvg(cfg, recorder, min_train_nodes=1, min_available_nodes=1)
    strategy.sent = arrays
    other = replies[1]
    other.content["site"]["name"] = "other-site"
    out, _ = strategy.aggregate_train(3, [replies[2], other])
    got, want = out.to_torch_state_dict(), other.content["arrays"].to_torch_state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    entry = recorder.summary["rounds"][0]
    assert entry["train"][site.name]["refusal"] == "budget-exhausted"
    assert entry["aggregate"]["train_sites_refused"] == 1
    privacy = recorder.summary["privacy"]
    assert privacy[site.name]["refused_rounds"] == {"3": "budget-exhausted"}
    assert privacy["other-site"]["epsilon_total"] == pytest.approx(float(other.content["metrics"]["epsilon_total"]))
    report = (write_report(tmp_path / "run")["report_md"]).read_text()
    assert "Privacy and update validation" in report and "r3: budget-exhausted" in report


def test_dp_student_moves_towards_the_teacher_at_epsilon_below_8(tiny_cfg, tmp_path):
    cfg = _dp_cfg(tiny_cfg, tmp_path, "train.local-steps=15", "train.lr=1e-3", "student.arch=vit_tiny_patch16_224")
    site = Site(cfg, 0)
    start = initial_student(cfg).state_dict()
    before = site.evaluate(start, 1)
    state, m = site.train(start, 1)
    after = site.evaluate(state, 1)
    assert m["refused"] == 0 and 0 < m["epsilon_total"] <= 8
    assert after["cos"] > before["cos"] + 0.05


def test_a_layer_used_twice_under_ghost_clipping_is_a_config_error_that_names_per_sample():
    """Ghost clipping keeps one input and output gradient per layer; a tied layer would be clipped wrong,
    so it stops with a one-line setting to change, and per-sample clipping takes such a model."""
    from opacus import GradSampleModule

    from fedus.privacy.bookkeeping import BookkeepingModule

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(torch.relu(self.lin(x)))

    x = torch.randn(3, 4)
    ghost = BookkeepingModule(Tied(), 1.0)
    with pytest.raises(ConfigError, match='privacy.clipping = "per-sample"') as err:
        ghost.backward(ghost(x).pow(2).sum(1))
    assert "\n" not in str(err.value)
    per_sample = GradSampleModule(Tied(), loss_reduction="mean", strict=True)
    per_sample(x).pow(2).sum(1).mean().backward()
    assert per_sample.lin.weight.grad_sample.shape == (3, 4, 4)


def test_a_layer_whose_output_never_reaches_the_loss_gets_a_zero_clipped_gradient_under_ghost_clipping():
    """An unused branch (its output computed, then dropped) or a layer never called has a zero gradient for
    every image: ghost clipping gives it zero norms and a zero .grad, clips the rest exactly as without it,
    and does not mistake the next forward for a second use of the branch (weight tying)."""
    from fedus.privacy.bookkeeping import BookkeepingModule

    class Branched(torch.nn.Module):
        def __init__(self, unused: bool):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)
            if unused:
                self.aux, self.never = torch.nn.Linear(8, 2), torch.nn.Linear(3, 3)

        def forward(self, x):
            h = torch.relu(self.a(x))
            if hasattr(self, "aux"):
                self.aux(h)  # computed, never part of the loss
            return self.b(h)

    torch.manual_seed(0)
    plain, branched = Branched(False), Branched(True)
    branched.load_state_dict(plain.state_dict(), strict=False)
    ghosts = {"plain": BookkeepingModule(plain, 0.1), "branched": BookkeepingModule(branched, 0.1)}
    for step in range(3):
        x = torch.randn(5, 4)
        for g in ghosts.values():
            g.zero_grad(set_to_none=True)
            g.backward(g(x).pow(2).sum(1))
        norms = {k: g.get_norm_sample() for k, g in ghosts.items()}
        torch.testing.assert_close(norms["branched"], norms["plain"])
        assert bool((norms["plain"] > 0.1).all())  # every image clipped: a wrong norm would show in the step
        for name, p in plain.named_parameters():
            torch.testing.assert_close(branched.get_parameter(name).grad, p.grad, msg=name)
        for p in [*branched.aux.parameters(), *branched.never.parameters()]:
            assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))
