"""The operator's one line per round (`fedus server` / `fedus simulate` print it as rounds finish)."""

from fedus.config import RunConfig
from fedus.runs import RunRecorder, round_line


def test_round_line_says_who_answered_the_loss_the_cosine_and_the_privacy_spent(tmp_path):
    rec = RunRecorder(tmp_path / "run", RunConfig(), {})
    rec.record(1, "train", {"a": {"train_loss_last": 2.0, "epsilon_total": 1.5}, "b": {"train_loss_last": 4.0}}, failed=1)
    rec.record_privacy(1, {"a": {"epsilon_total": 1.5, "epsilon_round": 1.5}})
    assert round_line(rec.summary, 1) == "round 1: 2 sites trained (1 failed), train loss 3, site epsilon up to 1.5"
    rec.record(1, "eval", {"a": {"cos": 0.5}, "b": {"cos": 0.7}})
    rec.record_counts(1, {"central_dp_epsilon": 4.25, "quorum_not_met": 1})
    line = round_line(rec.summary, 1)
    assert "2 sites evaluated" in line and "held-out cos 0.600" in line
    assert "central epsilon 4.25" in line and "quorum not met" in line
    assert round_line(rec.summary, 2) is None


def test_round_line_under_evaluate_with_train_shows_the_latest_evaluated_student(tmp_path):
    """A round's own global student is scored by the next round's train message: its line carries the
    previous round's cosine, labelled as such, rather than none."""
    rec = RunRecorder(tmp_path / "run", RunConfig(), {})
    rec.record(0, "eval", {"a": {"cos": 0.1}})
    rec.record(1, "train", {"a": {"train_loss_last": 2.0}})
    assert round_line(rec.summary, 1) == "round 1: 1 sites trained, train loss 2, held-out cos 0.100 (round 0's student)"
    rec.record(1, "eval", {"a": {"cos": 0.4}})
    rec.record(2, "train", {"a": {"train_loss_last": 1.0}})
    assert "held-out cos 0.400 (round 1's student)" in round_line(rec.summary, 2)
