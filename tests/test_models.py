import pytest
import torch

from fedus.config import ConfigError, StudentConfig, TeacherConfig
from fedus.models import create_student, create_teacher, save_state


@pytest.mark.parametrize("arch", ["vit_tiny_patch16_224", "resnet10t"])
def test_teacher_weights_round_trip_through_timm_loading(tmp_path, arch):
    torch.manual_seed(0)
    cfg = TeacherConfig(arch=arch, blocks="1")
    made = create_teacher(cfg, 32)
    path = save_state(made.backbone.state_dict(), tmp_path / "teacher.safetensors")
    fresh = create_teacher(cfg, 32)  # different random init
    loaded = create_teacher(cfg.model_copy(update={"weights": str(path)}), 32)
    x = torch.rand(2, 3, 32, 32)
    assert not torch.allclose(made(x), fresh(x))
    assert torch.equal(made(x), loaded(x))
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


def test_a_random_init_teacher_is_the_same_in_every_process_of_a_run():
    """Deployed, every site and every round builds the teacher in a fresh process: without weights it is
    drawn from the run's seed, or the sites would distil toward different teachers (and a new one each
    round). The global RNG is left as it was; a weights file wins over the seed."""
    cfg, x = TeacherConfig(blocks="1"), torch.rand(2, 3, 32, 32)
    torch.manual_seed(0)
    before = torch.rand(3)
    a = create_teacher(cfg, 32, seed=7)
    after = torch.rand(3)
    torch.manual_seed(123)  # another process, elsewhere in its RNG stream
    b, c = create_teacher(cfg, 32, seed=7), create_teacher(cfg, 32, seed=8)
    assert torch.equal(a(x), b(x)) and not torch.allclose(a(x), c(x))
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), before) and torch.equal(torch.rand(3), after)


def test_teacher_blocks_and_combine():
    t2 = create_teacher(TeacherConfig(blocks="2"), 32)
    cat = create_teacher(TeacherConfig(blocks="3,7,11", combine="concat"), 32)
    assert t2.dim == 192 and t2.grid == (2, 2)
    assert cat.dim == 3 * 192
    with pytest.raises(ConfigError, match="equal width"):
        create_teacher(TeacherConfig(arch="resnet10t", blocks="2", combine="mean"), 32)


def test_bad_models_and_weights_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown timm model"):
        create_teacher(TeacherConfig(arch="vit_nonexistent_model"), 32)
    with pytest.raises(ConfigError, match="not found"):
        create_teacher(TeacherConfig(weights=str(tmp_path / "missing.safetensors")), 32)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file")
    with pytest.raises(ConfigError, match="cannot load weights") as err:
        create_teacher(TeacherConfig(weights=str(junk)), 32)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("arch", ["resnet10t", "vit_tiny_patch16_224", "mobilenetv3_small_050"])
def test_student_tokens_align_to_teacher_grid(arch):
    teacher = create_teacher(TeacherConfig(), 64)  # 4x4 grid
    student = create_student(StudentConfig(arch=arch, head_hidden=64), teacher.dim, teacher.grid, 64, seed=0)
    again = create_student(StudentConfig(arch=arch, head_hidden=64), teacher.dim, teacher.grid, 64, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), again.state_dict().values()))
    x = torch.rand(2, 3, 64, 64)
    assert student(x).shape == teacher(x).shape


def test_teacher_is_pruned_after_its_last_block_and_gives_the_same_tokens():
    """The frozen teacher keeps only what its chosen blocks need; the tokens are the full model's."""
    from fedus.config import parse_blocks
    from fedus.models.backbones import create_backbone
    from fedus.models.teacher import Teacher

    torch.manual_seed(0)
    teacher = create_teacher(TeacherConfig(arch="resnet18", blocks="2,"), 64)
    full = create_backbone("resnet18", 64)
    missing = full.load_state_dict(teacher.backbone.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith(("layer3", "layer4")) for k in missing)
    reference = Teacher(full, parse_blocks("2,"), "mean", 64)
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(teacher(x), reference(x))
    assert sum(p.numel() for p in teacher.parameters()) < 0.25 * sum(p.numel() for p in reference.parameters())
