"""Retries (hydra.sweeper.retry): a trial that fails of something listed as transient is tried
again with the same parameters, as a new trial, continuing from its checkpoint; the attempts are
linked; the failure budget counts only the last attempt."""

from __future__ import annotations

import pytest
from harness import ToyApp, by_number, error_lines, ok
from optuna.trial import TrialState

from mlflow_study_sweeper.errors import SweepConfigError
from mlflow_study_sweeper.trial.retry import RetryPolicy

COMPLETE, FAIL = TrialState.COMPLETE, TrialState.FAIL
ONE_TRIAL = ("hydra.sweeper.n_trials=1", "hydra.sweeper.pruner=none", "epochs=3")


def test_a_job_that_raises_a_listed_error_twice_then_succeeds_ends_complete_linked(curve):
    # max_failure_rate=0 would stop the sweep at the first failure that counts: none does
    proc = curve.run(
        *ONE_TRIAL,
        "checkpoint=true",
        "flaky=2",
        "hydra.sweeper.retry.max=2",
        "hydra.sweeper.retry.on=[ConnectionError]",
        "hydra.sweeper.max_failure_rate=0",
    )
    ok(proc)
    first, second, third = curve.study().get_trials()
    assert [t.state for t in (first, second, third)] == [FAIL, FAIL, COMPLETE]
    assert first.system_attrs["failure"] == second.system_attrs["failure"] == "transient"
    assert "ConnectionError: the data service" in first.user_attrs["fail_reason"]
    assert first.params == second.params == third.params  # the same parameters each time
    assert (second.user_attrs["retry_of_trial"], second.user_attrs["attempt"]) == (0, 2)
    assert (third.user_attrs["retry_of_trial"], third.user_attrs["attempt"]) == (1, 3)
    # each attempt went on from the checkpoint before it: one epoch each, the curve whole
    assert third.user_attrs["continues_trial"] == 1
    assert sorted(third.intermediate_values) == [0, 1, 2]
    (parent,), children = curve.runs()
    runs = by_number(children)
    assert runs[1].data.tags["retry_of"] == runs[0].info.run_id
    assert runs[2].data.tags["retry_of"] == runs[1].info.run_id
    assert runs[2].data.tags["attempt"] == "3"
    assert [runs[n].info.status for n in range(3)] == ["FAILED", "FAILED", "FINISHED"]
    assert runs[2].data.tags.get("best_run") == "true"
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["trials.retried"] == "2"
    assert parent.data.tags["trials.complete"] == "1"
    assert "(2 of them tried again)" in proc.stdout
    assert proc.stdout.count("FAIL (retried)") == 2  # the end's table
    assert "attempt 2 follows with its parameters" in proc.stdout


def test_the_last_attempt_counts_as_a_failure_and_the_sweep_moves_on(curve):
    proc = curve.run(
        *ONE_TRIAL,
        "flaky=2",
        "hydra.sweeper.retry.max=1",
        "hydra.sweeper.retry.on=[ConnectionError]",
        "hydra.sweeper.max_failure_rate=1.0",
    )
    ok(proc)
    first, second, third = curve.study().get_trials()
    assert first.system_attrs["failure"] == "transient"
    assert second.state == FAIL and second.system_attrs["failure"] == "error"  # counted
    assert second.user_attrs["attempt"] == 2
    assert third.state == COMPLETE and "retry_of_trial" not in third.user_attrs  # new params
    assert third.params != first.params


def test_a_message_pattern_matches_and_an_unlisted_error_is_not_retried(curve):
    ok(
        curve.run(
            *ONE_TRIAL,
            "flaky=1",
            "flaky_error=oom",
            "hydra.sweeper.retry.max=2",
            "hydra.sweeper.retry.on=['CUDA out of memory']",
        )
    )
    first, second = curve.study().get_trials()
    assert first.system_attrs["failure"] == "transient" and second.state == COMPLETE
    assert second.params == first.params


def test_an_unlisted_error_fails_as_before(curve):
    ok(
        curve.run(
            *ONE_TRIAL,
            "flaky=1",
            "hydra.sweeper.retry.max=2",
            "hydra.sweeper.retry.on=[KeyError, 'out of memory']",
            "hydra.sweeper.max_failure_rate=1.0",
        )
    )
    first, second = curve.study().get_trials()
    assert first.system_attrs["failure"] == "error" and "retry_of_trial" not in second.user_attrs
    (parent,), _ = curve.runs()
    assert parent.data.tags["trials.retried"] == "0"


def test_the_policy_matches_causes_and_subclasses():
    policy = RetryPolicy.from_settings({"max": 1, "on": ["OSError", "out of memory"]})
    assert policy.transient(ConnectionRefusedError("x"))  # a subclass
    try:
        try:
            raise TimeoutError("deep")
        except TimeoutError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert policy.transient(outer)  # found in its cause
    assert policy.transient(RuntimeError("CUDA out of memory. Tried"))
    assert not policy.transient(ValueError("bad value"))
    assert not RetryPolicy().transient(ConnectionError("no retries by default"))


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"max": -1, "on": ["OSError"]}, "retry.max=-1 must be a whole number >= 0"),
        ({"max": 2, "on": [3]}, "retry.on[0]=3 is not a string"),
        ({"max": 2, "on": ["torch.OutOfMemoryErorr"]}, "names no exception type"),
        ({"max": 2, "on": ["mlflow_study_sweeper.NoSuchError"]}, "names no exception type"),
        ({"max": 2, "on": ["(unclosed"]}, "neither an exception type nor a regular expression"),
        ({"max": 2, "on": []}, "retries nothing"),
        ({"max": 2, "on": ["OSError"], "tries": 3}, "has no setting 'tries'"),
    ],
)
def test_retry_settings_that_cannot_work_are_refused(settings, message):
    with pytest.raises(SweepConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        RetryPolicy.from_settings(settings)


@pytest.mark.parametrize(
    "override, message",
    [
        ("hydra.sweeper.retry.max=-1", "retry.max=-1 must be a whole number >= 0"),
        ("hydra.sweeper.retry.max=2", "retries nothing"),
        ("hydra.sweeper.retry.on=[3]", "retry.on[0]=3 is not a string"),
        ("hydra.sweeper.retry.on=[nosuch.Error]", "names no exception type"),
    ],
)
def test_bad_retry_input_is_one_error_line_and_creates_nothing(tmp_path, override, message):
    proc = ToyApp(tmp_path).run(override)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    errors = error_lines(proc)
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no store, no folder
