"""Re-run a preset's study and write OUR numbers next to what the seed or paper reported.

    python -m src.reproduce <preset> [--quick] [--reread] [overrides ...]
    python -m src.reproduce readme      # the README's table of reproduced results, from docs/results/*.md

runs `python -m src.train -m experiment=<preset> ...`, reads the child runs back from MLflow and writes
docs/results/<preset>.md. `--quick` runs a shorter study (the step counts the tests use); its table says so.
Extra overrides go to every run (`data=digits`).
"""
import argparse
import sys
from pathlib import Path

from src.reproduce.results import markdown, update_readme
from src.reproduce.runner import latest_study, run_study
from src.reproduce.studies import STUDIES
from src.tracking.store import resolve_uri


def main(argv: list[str]) -> int:
    if argv[:1] == ["readme"]:
        update_readme(Path(argv[1] if len(argv) > 1 else "docs/results"))
        return 0
    p = argparse.ArgumentParser(prog="python -m src.reproduce", description=__doc__.splitlines()[0])
    p.add_argument("preset", choices=sorted(STUDIES))
    p.add_argument("--quick", action="store_true", help="shorter runs (the step counts the tests use)")
    p.add_argument("--out", default="docs/results", help="folder for <preset>.md")
    p.add_argument("--reread", action="store_true",
                   help="run nothing: tabulate the preset's latest multirun in the tracking store that was run "
                        "with exactly the overrides given")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run, e.g. data=digits")
    a = p.parse_intermixed_args(argv)  # overrides may follow --quick
    uri = resolve_uri(None)
    run = latest_study(a.preset, uri, a.quick, a.overrides) if a.reread else run_study(a.preset, a.quick, a.overrides, uri)
    out = Path(a.out) / f"{a.preset}{'.quick' if a.quick else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    figure = None
    if STUDIES[a.preset].figure:
        png = out.with_suffix(".png")
        try:
            STUDIES[a.preset].figure(run.rows, png)
            figure = png.name
        except Exception as e:  # noqa: BLE001 - the table is the result; a figure that fails is reported
            print(f"figure: could not draw {png}: {e}", file=sys.stderr)
    text = markdown(a.preset, run, a.quick, figure)
    out.write_text(text)
    print(text)
    print(f"written: {out}")
    return 0


sys.exit(main(sys.argv[1:]))
