"""Augmentation policies: ultrasound (physical up, grey levels) vs natural (ImageNet-style)."""

import pytest
import torch
from torchvision.transforms import v2

from fedus.config import ConfigError, RunConfig
from fedus.data.augment import (
    AcousticShadow, DepthAttenuation, Haze, NaturalAugment, SpeckleReduction, UltrasoundAugment, create_augment,
)
from fedus.data.sites import load_site

SIZE = 32
SEEDS = range(300)


def _ramp() -> torch.Tensor:
    """Grey image, bright near the transducer (top), dark at depth, with speckle-like texture."""
    g = torch.Generator().manual_seed(0)
    depth = torch.linspace(1.0, 0.0, SIZE).view(SIZE, 1)
    texture = 0.1 * torch.rand(SIZE, SIZE, generator=g)
    return (0.9 * depth + texture).clamp(0, 1).expand(3, -1, -1).clone()


def _looks_upside_down(out: torch.Tensor) -> bool:
    q = SIZE // 4
    return out[:, :q].mean() < out[:, -q:].mean()


def _grey_images(n: int):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        yield torch.rand(1, SIZE, SIZE, generator=g).expand(3, -1, -1).clone()


def test_ultrasound_policy_never_flips_vertically():
    aug, image = UltrasoundAugment(SIZE), _ramp()
    for seed in SEEDS:
        torch.manual_seed(seed)
        assert not _looks_upside_down(aug(image)), seed
    assert not any(isinstance(t, v2.RandomVerticalFlip) for t in aug.pipeline.transforms)


def test_the_flip_check_would_see_a_vertical_flip():
    aug, image = NaturalAugment(SIZE), _ramp()
    flipped = 0
    for seed in range(100):
        torch.manual_seed(seed)
        flipped += _looks_upside_down(aug(image))
    assert 25 < flipped < 75  # natural flips vertically about half the time


def test_ultrasound_policy_keeps_grey_images_grey_and_in_range():
    aug = UltrasoundAugment(SIZE, blur_p=0.5, us_p=0.7)  # exercise every transform often
    for seed, image in zip(SEEDS, _grey_images(len(SEEDS))):
        torch.manual_seed(seed)
        out = aug(image)
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2]), seed
        assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize("transform", [DepthAttenuation(), AcousticShadow(), Haze(), SpeckleReduction()])
def test_each_ultrasound_transform_acts_on_all_channels_alike(transform):
    for seed, image in zip(range(50), _grey_images(50)):
        torch.manual_seed(seed)
        out = transform(image)
        assert out.shape == image.shape
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_depth_attenuation_fades_with_depth_only():
    image = torch.ones(3, SIZE, SIZE)
    for seed in range(20):
        torch.manual_seed(seed)
        out = DepthAttenuation()(image)
        assert torch.equal(out[:, :, :1].expand_as(out), out)  # constant across each row
        assert (out[0, :, 0].diff() <= 0).all() and out[0, 0, 0] == 1.0 and out[0, -1, 0] < 1.0


def test_acoustic_shadow_darkens_a_band_below_a_reflector_never_brightens():
    image = torch.full((3, SIZE, SIZE), 0.8)
    for seed in range(20):
        torch.manual_seed(seed)
        out = AcousticShadow()(image)
        assert (out <= image).all()
        assert torch.equal(out[:, : int(0.2 * SIZE)], image[:, : int(0.2 * SIZE)])  # shadows start below 20 % depth
        assert out[:, -1].min() < 0.8 * 0.85  # and reach the bottom
        dark_cols = (out[0, -1] < 0.79).float()
        assert 0 < dark_cols.sum() < SIZE  # a band, not the whole width


def test_haze_lowers_contrast_and_speckle_reduction_smooths_but_keeps_edges():
    g = torch.Generator().manual_seed(0)
    edge = torch.zeros(1, SIZE, SIZE)
    edge[:, :, SIZE // 2:] = 0.8
    speckled = (edge + 0.2 * torch.rand(1, SIZE, SIZE, generator=g)).expand(3, -1, -1).clone()
    torch.manual_seed(0)
    hazy = Haze()(speckled)
    assert hazy.std() < speckled.std()
    torch.manual_seed(0)
    smooth = SpeckleReduction(amount=(1.0, 1.0))(speckled)
    left, right = smooth[0, :, : SIZE // 2 - 1], smooth[0, :, SIZE // 2 + 1:]
    assert left.std() < speckled[0, :, : SIZE // 2 - 1].std()  # speckle reduced
    assert right.mean() - left.mean() > 0.7  # the edge survives


def test_policy_selection_and_unknown_names():
    assert isinstance(create_augment("ultrasound", SIZE), UltrasoundAugment)
    assert isinstance(create_augment("natural", SIZE), NaturalAugment)
    with pytest.raises(ConfigError, match="unknown augment policy 'imagenet'"):
        create_augment("imagenet", SIZE)
    with pytest.raises(ConfigError) as err:
        RunConfig().with_overrides(["data.augment-policy=imagenet"])
    assert "\n" not in str(err.value)
    assert RunConfig().data.augment_policy == "ultrasound"


def test_site_data_gives_policy_views_and_a_second_draw(synthetic_manifest):
    cfg = RunConfig().with_overrides([f'data.manifest="{synthetic_manifest}"', "data.image-size=32"])
    site = load_site(cfg.data, 0, 0)
    natural = site.train_augmented("natural", views=2)
    assert isinstance(natural.augment, NaturalAugment)
    torch.manual_seed(0)
    item = natural[0]
    assert item["image"].shape == item["view2"].shape == (3, 32, 32)
    assert not torch.equal(item["image"], item["view2"])  # independent draws
    assert "view2" not in site.train_augmented("ultrasound")[0]
    assert torch.equal(site.train_augmented("ultrasound").images, site.train.images)  # pixels shared, not copied
