"""Entry point: `python -m src.gradcheck [overrides]`: autograd against central differences on the configured
model (src.analysis.gradcheck). Exits 1 above gradcheck.tol, 2 on a bad config."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from src.analysis import gradcheck


def run(cfg) -> tuple[list[gradcheck.ParamCheck], float]:
    """Build the configured model and a batch of its data, check them; the rows and the max relative error."""
    from src.config import build

    torch.manual_seed(cfg.seed)
    data = build.data_module(cfg)
    net = build.network(cfg, data)
    x, y = data.train_set.tensors
    n = cfg.gradcheck.batch
    y = y[:n].double() if data.task == "regression" else y[:n]
    loss = (lambda out, t: F.mse_loss(out, t.view_as(out))) if data.task == "regression" else F.cross_entropy
    results = gradcheck.check(net, x[:n], y, cfg.gradcheck.samples, cfg.gradcheck.eps, cfg.gradcheck.tol, cfg.seed,
                              loss_fn=loss)
    return results, max((r.max_rel_error for r in results), default=0.0)


def main(argv: list[str]) -> int:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from src.config import validate
    from src.data.datasets import DataFilesMissing

    try:
        with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
            cfg = compose(config_name="gradcheck", overrides=argv)
        validate.check(cfg)
        results, worst = run(cfg)
    except (HydraException, OmegaConfBaseException, validate.ConfigError, DataFilesMissing) as e:
        print("config error:\n  " + str(e).replace("\n", "\n  "), file=sys.stderr)
        return 2
    tol = cfg.gradcheck.tol
    print(gradcheck.table(results, tol))
    skipped = sum(r.skipped for r in results)
    note = f" ({skipped} entries skipped: their perturbation crossed a kink)" if skipped else ""
    verdict = "PASS" if worst <= tol else "FAIL"
    print(f"{verdict}: max relative error {worst:.3e} (tolerance {tol:.1e}, eps {cfg.gradcheck.eps:.0e}, float64){note}")
    return gradcheck.exit_code(results, tol)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
