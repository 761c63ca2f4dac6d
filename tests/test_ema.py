"""Teacher <- student schedule: nothing during burn-in, a full copy at burn_in_iter, then EMA."""
import copy

import pytest
import torch
from torch import nn

from semiseg.semi.ema import copy_weights, ema_update, freeze, update_teacher


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)  # float running stats + int64 num_batches_tracked
        self.register_buffer("counter", torch.zeros(2, dtype=torch.int32))
        self.register_buffer("flags", torch.zeros(2, dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(x))


def _trained_pair() -> tuple[Net, Net]:
    torch.manual_seed(0)
    teacher, student = Net(), Net()
    student.train()
    for _ in range(3):
        student(torch.randn(8, 3))  # moves running stats and num_batches_tracked
    student.counter += 7
    student.flags[1] = True
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    return freeze(teacher), student


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_no_update_before_burn_in():
    teacher, student = _trained_pair()
    before = _state(teacher)
    for it in range(5):
        assert update_teacher(teacher, student, it, burn_in_iter=5, decay=0.9) is None
    after = _state(teacher)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_copy_at_burn_in_includes_integer_buffers():
    teacher, student = _trained_pair()
    assert int(student.bn.num_batches_tracked) == 3
    assert update_teacher(teacher, student, 5, burn_in_iter=5, decay=0.9) == "copy"
    t, s = teacher.state_dict(), student.state_dict()
    for name in s:
        assert torch.equal(t[name], s[name]), name
    assert int(teacher.bn.num_batches_tracked) == 3
    assert teacher.counter.tolist() == [7, 7] and teacher.flags.tolist() == [False, True]
    # a copy, not an alias: changing the student later leaves the teacher unchanged
    with torch.no_grad():
        student.linear.weight.add_(1.0)
    assert not torch.equal(teacher.linear.weight, student.linear.weight)


def test_ema_after_burn_in_blends_floats_and_copies_integers():
    teacher, student = _trained_pair()
    t0, s0 = _state(teacher), _state(student)
    assert update_teacher(teacher, student, 6, burn_in_iter=5, decay=0.75) == "ema"
    t1 = teacher.state_dict()
    for name, value in s0.items():
        if value.is_floating_point():
            torch.testing.assert_close(t1[name], 0.75 * t0[name] + 0.25 * value)
        else:
            assert torch.equal(t1[name], value), name
    assert not torch.equal(t1["linear.weight"], s0["linear.weight"])


def test_repeated_ema_converges_to_student_geometrically():
    teacher, student = _trained_pair()
    gap0 = (teacher.linear.bias - student.linear.bias).abs()
    for _ in range(10):
        ema_update(teacher, student, decay=0.5)
    torch.testing.assert_close((teacher.linear.bias - student.linear.bias).abs(), gap0 * 0.5 ** 10)


def test_teacher_stays_frozen_through_updates():
    teacher, student = _trained_pair()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    copy_weights(teacher, student)
    ema_update(teacher, student, decay=0.5)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_mismatched_architectures_are_rejected():
    teacher, student = _trained_pair()
    other = copy.deepcopy(student)
    other.extra = nn.Linear(1, 1)
    with pytest.raises(ValueError, match="differ"):
        copy_weights(teacher, other)
