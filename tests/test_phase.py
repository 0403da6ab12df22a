"""The mean-field phase diagram against the published values (Schoenholz et al. 2017, tanh, sigma_b^2 = 0.05)
and the closed forms (tanh and ReLU without bias)."""
import math

import pytest

from src.analysis import phase


def test_the_critical_line_where_the_papers_put_it():
    assert phase.critical_weight_variance("tanh", 0.05) == pytest.approx(1.761, abs=2e-3)
    # without bias q* -> 0 only algebraically (~1/depth) at sigma_w^2 <= 1, so the iterated q* is a bit above 0
    assert phase.critical_weight_variance("tanh", 0.0) == pytest.approx(1.0, abs=5e-3)
    assert phase.critical_weight_variance("relu", 0.0) == pytest.approx(2.0, abs=1e-9)  # chi1 = sigma_w^2 / 2


@pytest.mark.parametrize("sw2, chi1, xi_c", [(1.0, 0.759, 3.6), (1.5, 0.939, 15.8), (1.7, 0.987, 75),
                                             (2.0, None, 25), (3.0, None, 9.1), (4.0, None, 7.0)])
def test_depth_scales_on_both_sides_of_the_line(sw2, chi1, xi_c):
    if chi1 is not None:  # ordered: c* = 1 and xi_c is the gradient's depth scale -1/ln chi1
        assert phase.chi1("tanh", sw2, 0.05) == pytest.approx(chi1, abs=1e-3)
        assert phase.c_fixed_point("tanh", sw2, 0.05)[1] == 1.0
        assert phase.correlation_depth("tanh", sw2, 0.05) == pytest.approx(-1 / math.log(chi1), rel=2e-2)
    else:  # chaotic: two inputs decorrelate to c* < 1, at a rate set by chi_c < 1
        assert phase.chi1("tanh", sw2, 0.05) > 1
        assert 0 < phase.c_fixed_point("tanh", sw2, 0.05)[1] < 1
    assert phase.correlation_depth("tanh", sw2, 0.05) == pytest.approx(xi_c, rel=2e-2)


def test_the_depth_scale_diverges_at_the_critical_point():
    crit = phase.critical_weight_variance("tanh", 0.05)
    assert phase.correlation_depth("tanh", crit, 0.05) > 1000
    assert phase.correlation_depth("tanh", crit, 0.05) > phase.correlation_depth("tanh", crit * 1.05, 0.05) \
        > phase.correlation_depth("tanh", crit * 1.3, 0.05)


def test_the_papers_inits_build_what_they_say(compose_cfg):
    import torch

    from src.config import build, validate

    cfg = compose_cfg(["init=gaussian", "init.weight_var=2.0", "init.bias_std=0.5", "activation=tanh",
                       "model.width=512", "model.depth=3"])
    data = build.data_module(cfg)
    net = build.network(cfg, data)
    hidden = net.layer_01
    assert hidden.weight.var().item() * 512 == pytest.approx(2.0, rel=0.05)
    assert hidden.bias.std().item() == pytest.approx(0.5, rel=0.15)
    crit = build.network(compose_cfg(["init=critical_orthogonal", "activation=relu", "model.width=64"]), data)
    w = crit.layer_01.weight.double()
    assert torch.allclose(w @ w.T, 2.0 * torch.eye(64, dtype=torch.float64), atol=1e-5)  # gain^2 = 2 for relu
    assert float(compose_cfg(["init=critical", "activation=tanh"]).init.weight_var) == pytest.approx(1.0, abs=5e-3)
    assert "init.bias_std=-1.0: must be a number >= 0" in validate.problems(compose_cfg(["init.bias_std=-1.0"]))
    with pytest.raises(Exception, match="sigmoid has no critical sigma_w"):  # no critical line to stand on
        compose_cfg(["init=critical", "activation=sigmoid"]).init.weight_var
    assert validate.problems(compose_cfg(["init=critical", "activation=sigmoid"])) == [
        "init.weight_var: sigmoid has no critical sigma_w^2 at sigma_b^2=0 (chi1 does not cross 1 for sigma_w^2 in "
        "[0.5, 8]): choose another activation or init"]
