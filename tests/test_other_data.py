"""Scoring a checkpoint on a data set other than its own is refused unless asked for (allow_other_data)."""

from __future__ import annotations

import pytest

from sdtool.errors import SdtoolError
from sdtool.evaluate import eval_checkpoint
from tests.ckpt_factory import make_ckpt

# digits at the fake checkpoint's 16x16: the same input size and class count, another data set
DIGITS_16 = ["data.input_size=16", "data.limit_test=40"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(make_ckpt(tmp_path_factory.mktemp("other") / "fake.safetensors", val_size=0))


def test_other_data_set_is_refused(ckpt):
    with pytest.raises(SdtoolError) as e:
        eval_checkpoint(ckpt, "digits", DIGITS_16, device="cpu")
    assert str(e.value) == (
        "checkpoint was trained on fake; --data names digits (same input size and class count); "
        "pass --allow-other-data to score it anyway"
    )


def test_other_data_set_by_set_names_the_option(ckpt):
    with pytest.raises(SdtoolError, match=r"--set data\.name=digits names digits"):
        eval_checkpoint(ckpt, None, ["data.name=digits", *DIGITS_16], device="cpu")


def test_allowed_with_a_warning(ckpt, capsys):
    rep = eval_checkpoint(ckpt, "digits", DIGITS_16, device="cpu", allow_other_data=True, progress=False)
    assert rep["data"] == "digits" and rep["n"] == 40
    err = capsys.readouterr().err
    assert "warning: checkpoint was trained on fake; --data names digits" in err and "--allow-other-data" in err


def test_same_data_set_elsewhere_is_allowed(ckpt, tmp_path, capsys):
    """The same data set under another root folder is a copy of it: no refusal, no warning."""
    rep = eval_checkpoint(ckpt, None, [f"data.root={tmp_path}"], device="cpu", progress=False)
    assert rep["data"] == "fake"
    assert "warning" not in capsys.readouterr().err


def test_size_mismatch_is_still_reported_first(ckpt):
    """Another data set of another input size gets the size error (with its fix), not the data-set one."""
    with pytest.raises(SdtoolError, match="takes 16x16 inputs"):
        eval_checkpoint(ckpt, "digits", ["data.limit_test=40"], device="cpu")


def test_options_carry_the_flag():
    from sdtool.deploy import BundleOptions
    from sdtool.exit_eval import RunOptions

    assert RunOptions().allow_other_data is False and BundleOptions().allow_other_data is False
    assert RunOptions(allow_other_data=True).allow_other_data


def test_early_exit_refuses_other_data(ckpt):
    from sdtool.exit_eval import RunOptions, eval_early_exit

    with pytest.raises(SdtoolError, match="checkpoint was trained on fake; --data names digits"):
        eval_early_exit(ckpt, RunOptions(data="digits", overrides=DIGITS_16, device="cpu"), quiet=True)
