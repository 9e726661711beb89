"""Teacher target cache: same targets as the live teacher, read back without it, wiped when they'd be stale."""

import importlib

import pytest
import torch

from fedus.config import ConfigError
from fedus.distill.target_cache import TargetCache, cache_fields
from fedus.models.teacher import Teacher
from fedus.site import Site


def _cfg(tiny_cfg, tmp_path, *extra):
    return tiny_cfg.with_overrides([f"train.target-cache-dir={str(tmp_path)!r}".replace("'", '"'),
                                    "train.target-views=1", *extra])


@pytest.fixture
def teacher_calls(monkeypatch):
    calls = {"images": 0}
    forward = Teacher.forward

    def counting(self, x):
        calls["images"] += x.shape[0]
        return forward(self, x)

    monkeypatch.setattr(Teacher, "forward", counting)
    return calls


def test_cached_targets_equal_the_live_teacher_on_the_same_view(tiny_cfg, tmp_path):
    site = Site(_cfg(tiny_cfg, tmp_path, "train.target-views=3"), 0)
    cache, views = site.targets
    items = [views[j] for j in (0, 4, 7, 8)]
    images, slots = torch.stack([i["image"] for i in items]).float() / 255, torch.stack([i["slot"] for i in items])
    assert images.dtype == torch.float32 and items[0]["image"].dtype == torch.uint8  # views are stored as bytes
    torch.testing.assert_close(images[1], views.draw(1, 1), atol=0.5 / 255, rtol=0)  # view k of image i, reproducible
    assert not torch.equal(views[3]["image"], views[4]["image"])  # and views differ
    live = site.teacher(images)
    first = cache.lookup(site.teacher, slots, images)  # computed and stored
    again = cache.lookup(site.teacher, slots, images)  # read back
    torch.testing.assert_close(first, live, rtol=2e-3, atol=2e-3)  # fp16 storage
    assert torch.equal(first, again) and cache.hits == 4 and cache.misses == 4


def test_a_second_run_reads_the_cache_and_never_calls_the_teacher(tiny_cfg, tmp_path, teacher_calls):
    cfg = _cfg(tiny_cfg, tmp_path)
    site = Site(cfg, 0)
    state0 = site.student().state_dict()
    _, m1 = site.train(state0, 1)
    assert teacher_calls["images"] > 0 and m1["target_cache_hit_rate"] < 1.0
    teacher_calls["images"] = 0
    again = Site(cfg, 0)  # a new process: opens the files on disk, draws the same views
    _, m2 = again.train(state0, 1)
    assert teacher_calls["images"] == 0 and m2["target_cache_hit_rate"] == 1.0


@pytest.mark.parametrize("change", ['teacher.blocks="1"', "data.image-size=48", "data.augment-policy=natural",
                                    "train.target-views=2"])
def test_a_changed_teacher_image_size_policy_or_k_invalidates(tiny_cfg, tmp_path, change):
    cfg = _cfg(tiny_cfg, tmp_path)
    images = torch.randint(0, 255, (4, 32, 32), dtype=torch.uint8)
    cache = TargetCache(tmp_path / "c", cache_fields(cfg, images), tokens=4, dim=8)
    cache.lookup(lambda x: torch.ones(len(x), 4, 8), torch.tensor([0, 1]), torch.zeros(2, 3, 32, 32))
    same = TargetCache(tmp_path / "c", cache_fields(cfg, images), tokens=4, dim=8)
    assert same.filled.sum() == 2 and float(same.targets[1].mean()) == 1.0
    changed = TargetCache(tmp_path / "c", cache_fields(cfg.with_overrides([change]), images), tokens=4, dim=8)
    assert changed.filled.sum() == 0
    other_data = TargetCache(tmp_path / "c", cache_fields(cfg, images.flip(0)), tokens=4, dim=8)
    assert other_data.filled.sum() == 0


def test_site_step_with_the_cache_lowers_the_loss_and_raises_held_out_cosine(tiny_cfg, tmp_path):
    site = Site(_cfg(tiny_cfg, tmp_path, "train.target-views=2", "train.local-steps=8"), 0)
    state0 = site.student().state_dict()
    state, metrics = site.train(state0, 1)
    assert metrics["loss_after"] < metrics["loss_before"]
    assert site.evaluate(state, 1)["cos"] > site.evaluate(state0, 1)["cos"]


def test_the_cache_is_for_token_mse_only(tiny_cfg):
    with pytest.raises(ConfigError, match="token-mse"):
        tiny_cfg.with_overrides(["train.target-views=4", "distill.loss=repulsive-kd"])


def test_loader_workers_read_stored_targets_and_only_unfilled_views_run_the_teacher(tiny_cfg, tmp_path, teacher_calls):
    """The fast path: workers read views and tokens from the memory maps; the training thread runs the teacher
    only for views not yet filled, and what it stores is what the next pass reads."""
    site = Site(_cfg(tiny_cfg, tmp_path, "train.target-views=2"), 0)
    cache, views = site.targets
    loader = torch.utils.data.DataLoader(views, batch_size=8, num_workers=2)
    first = [(b, cache.complete(site.teacher, b, b["image"].float() / 255)) for b in loader]
    assert all(int(b["filled"].sum()) == 0 for b, _ in first)
    assert teacher_calls["images"] == len(views) and cache.filled[:].sum() == len(views)
    teacher_calls["images"] = 0
    second = [(b, cache.complete(site.teacher, b, b["image"].float() / 255)) for b in loader]
    assert teacher_calls["images"] == 0 and all(bool(b["filled"].all()) for b, _ in second)
    for (b1, t1), (b2, t2) in zip(first, second):
        assert torch.equal(b1["slot"], b2["slot"]) and torch.equal(b1["image"], b2["image"])
        torch.testing.assert_close(t2, t1, rtol=2e-3, atol=2e-3)  # fp16 storage of the fresh tokens
        torch.testing.assert_close(t2, site.teacher(b2["image"].float() / 255), rtol=2e-3, atol=2e-3)


def test_stored_views_survive_a_restart_and_are_redrawn_if_their_file_is_lost(tiny_cfg, tmp_path):
    cfg = _cfg(tiny_cfg, tmp_path, "train.target-views=2")
    cache, views = Site(cfg, 0).targets
    before = views.view(3).clone()
    again = Site(cfg, 0).targets[1]
    assert again.cache.views_ready and torch.equal(again.view(3), before)
    (cache.root / "views.u8").unlink()
    redrawn = Site(cfg, 0).targets[1]
    assert torch.equal(redrawn.view(3), before)


def test_a_filled_cache_held_on_the_device_trains_exactly_as_through_the_loader(tiny_cfg, tmp_path, teacher_calls,
                                                                              monkeypatch):
    """train.cache-on-device: once every view is filled, the round's batches are gathers from device copies
    of the stored views and tokens - the loader path's batches (same sampler, same generator), so the
    student comes out bit-identical, without the teacher. A fill round keeps the loader path."""
    from fedus.distill.resident import use_resident

    cfg = _cfg(tiny_cfg, tmp_path, "train.target-views=2")
    site = Site(cfg.with_overrides(['train.cache-on-device="on"']), 0)
    cache, views = site.targets
    assert not use_resident(site.cfg.train, torch.device("cpu"), views)  # nothing filled yet
    state0 = site.student().state_dict()
    items = [views[j] for j in range(len(views))]  # fill every view, as epochs of fill rounds would
    with torch.no_grad():
        cache.lookup(site.teacher, torch.stack([i["slot"] for i in items]),
                     torch.stack([i["image"] for i in items]).float() / 255)
    assert use_resident(site.cfg.train, torch.device("cpu"), views)
    assert not use_resident(cfg.train, torch.device("cpu"), views)  # auto: only on CUDA
    results = {}
    for mode in ("off", "on"):  # "off" also fills the reference batch's slots (the plain images)
        teacher_calls["images"] = 0
        if mode == "on":  # no loader at all
            step_module = importlib.import_module("fedus.distill.site_step")  # (the package re-exports the function)
            monkeypatch.setattr(step_module, "site_loader", lambda *a, **k: pytest.fail("loader path used"))
        state, metrics = Site(cfg.with_overrides([f'train.cache-on-device="{mode}"']), 0).train(state0, 2)
        results[mode] = state, metrics
    (loader_state, loader_m), (resident_state, resident_m) = results["off"], results["on"]
    assert teacher_calls["images"] == 0 and resident_m["target_cache_hit_rate"] == 1.0
    assert resident_m["steps"] == loader_m["steps"] and resident_m["train_loss_last"] == loader_m["train_loss_last"]
    assert all(torch.equal(resident_state[k], loader_state[k]) for k in loader_state)
    assert not all(torch.equal(resident_state[k], state0[k]) for k in state0)  # it did train
