"""The edge between the Hydra config and the code: validation before anything runs, and building from it."""

from functools import lru_cache

from omegaconf import OmegaConf

# ${div:a,b} = a / b, for a value that scales with another key: a deep linear net's learning rate
# ${div:0.08,${model.depth}} (Saxe et al. 2014 scale it with 1/depth). OmegaConf has no arithmetic of its own.
if not OmegaConf.has_resolver("div"):
    OmegaConf.register_new_resolver("div", lambda a, b: float(a) / float(b))


@lru_cache(maxsize=None)
def _critical_var(activation: str, bias_std: float = 0.0) -> float:
    """sigma_w^2 on the mean-field critical line of `activation` for this bias (src/analysis/phase.py)."""
    from src.analysis.phase import critical_weight_variance

    return critical_weight_variance(activation, float(bias_std) ** 2)


# ${critical_var:tanh,0.0}: the weight variance at the edge of chaos (conf/init/critical*.yaml); OmegaConf calls a
# resolver on every access, hence the cache.
if not OmegaConf.has_resolver("critical_var"):
    OmegaConf.register_new_resolver("critical_var", _critical_var)
    OmegaConf.register_new_resolver("sqrt", lambda x: float(x) ** 0.5)
