"""OP/BWT/FWT must match TRACE's definitions; a wrong sign or index would misrank every method."""

import numpy as np
import pytest

from clbench import cl_metrics

# zero-shot row, then rows after tasks 1..3 (hand-made)
R = np.array([
    [0.10, 0.20, 0.30],
    [0.80, 0.25, 0.35],
    [0.60, 0.70, 0.40],
    [0.50, 0.65, 0.90],
])


def test_op_is_mean_of_last_row():
    assert cl_metrics.overall_performance(R) == pytest.approx((0.50 + 0.65 + 0.90) / 3)


def test_bwt_is_trace_average_drop_from_just_learned():
    # (R[3,0]-R[1,0] + R[3,1]-R[2,1]) / 2 = (-0.30 + -0.05) / 2
    assert cl_metrics.backward_transfer(R) == pytest.approx(-0.175)


def test_fwt_compares_score_before_training_with_zero_shot():
    # task 2: R[1,1]-R[0,1] = 0.05; task 3: R[2,2]-R[0,2] = 0.10
    assert cl_metrics.forward_transfer(R) == pytest.approx(0.075)


def test_fwt_undefined_without_zero_shot_row():
    no_zero = R.copy()
    no_zero[0] = np.nan
    assert np.isnan(cl_metrics.forward_transfer(no_zero))


def test_other_bwt_conventions_are_labelled_variants():
    assert cl_metrics.bwt_clipped(R) == pytest.approx((-0.30 - 0.05) / 3)
    # max-drop: task1 max(0.8,0.6)-0.5 = 0.3; task2 max(0.7)-0.65 = 0.05
    assert cl_metrics.forgetting_max_drop(R) == pytest.approx(0.175)


def test_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match="shape"):
        cl_metrics.overall_performance(np.zeros((3, 3)))
