"""src.reproduce's tables from hand-made run records (no training): values come from the runs, pipes are
escaped, each check says whether it holds, and the README's summary is rebuilt from the tables, not appended."""
from __future__ import annotations

from src.reproduce.results import END, START, markdown, summary_row, update_readme
from src.reproduce.runner import StudyRun


def _row(name, params, metrics, history, tags=None):
    return {"name": name, "params": params, "metrics": metrics, "tags": tags or {},
            "history": lambda key: history.get(key, [])}


def test_he_depth_table_and_check():
    rows = [_row("init=lecun", {"init": "lecun"}, {"val/acc": 0.1}, {"backprop_ratio": [(0, 4e-5), (10, 1e-4)]},
                 {"verdict": "vanishing"}),
            _row("init=he", {"init": "he"}, {"val/acc": 0.94}, {"backprop_ratio": [(0, 1.08)]}, {"verdict": "converged"})]
    text = markdown("he_depth", StudyRun(rows, 12.0, ["python", "-m", "src.train", "-m", "experiment=he_depth"]), False)
    assert "| init=lecun | 4e-05 | 0.1 | vanishing | ≈4e-5; stalls |" in text
    assert "| init=he | 1.08 | 0.94 | converged |" in text
    assert "**holds**" in text and "12 s wall time" in text
    rows[1]["history"] = lambda key: [(0, 50.0)]  # He's ratio far from 1: the check must say so
    assert "**does NOT hold**" in markdown("he_depth", StudyRun(rows, 1.0, ["x"]), False)


def test_pipes_are_escaped_and_missing_cells_say_so():
    rows = [_row("activation=sigmoid,model.depth=3", {"activation": "sigmoid", "model.depth": "3"}, {}, {})]
    text = markdown("moons_sigmoid_vs_relu", StudyRun(rows, 1.0, ["x"]), True)
    assert "mean \\|old−new\\|/lr" in text and "\\|Δ\\|/lr 280…1100" in text
    assert "| — |" in text and "(quick)" in text


def test_the_readme_summary_is_rebuilt_from_the_tables(tmp_path):
    """One row per preset, a full run's table before a quick one's, each with its runs, wall time and checks;
    the old block replaced, the text around it kept."""
    rows = [_row("init=lecun", {"init": "lecun"}, {"val/acc": 0.1}, {"backprop_ratio": [(0, 4e-5)]}),
            _row("init=he", {"init": "he"}, {"val/acc": 0.94}, {"backprop_ratio": [(0, 1.08)]})]
    (tmp_path / "he_depth.md").write_text(markdown("he_depth", StudyRun(rows, 166.4, ["x"]), False))
    (tmp_path / "he_depth.quick.md").write_text(markdown("he_depth", StudyRun(rows[:1], 9.0, ["x"]), True))
    (tmp_path / "cures.quick.md").write_text(markdown("cures", StudyRun([], 3.0, ["x"]), True))
    readme = tmp_path / "repo" / "README.md"
    readme.parent.mkdir()
    readme.write_text(f"intro\n{START}\nold table\n{END}\nrest\n")
    update_readme(tmp_path, readme)
    text = readme.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    he = next(line for line in text.splitlines() if "`he_depth`" in line)
    assert "(quick)" not in he and "| 2 runs, 166 s |" in he
    assert "lecun's ratio < 1e-3 and He's within [0.1, 10]: **holds**" in he
    cures = next(line for line in text.splitlines() if "`cures`" in line)
    assert "(quick)" in cures and "| 0 runs, 3 s |" in cures and "**cannot be checked (" in cures
    assert summary_row("he_depth", "### `he_depth`\nno numbers here\n", "x.md").endswith("| — | — |")


def test_the_checks_of_the_seed_presets_answer_from_their_runs():
    """Each check says holds on runs that show the seed's finding, and does NOT hold on runs that do not."""
    reach = {"val/acc": [(0, 0.1), (100, 0.6)]}
    rows = [_row("s", {"activation": "sigmoid", "init": "small_normal"}, {}, {"val/acc": [(0, 0.1), (300, 0.2)]}),
            _row("r", {"activation": "relu", "init": "he"}, {}, reach)]
    assert "slowest to reach test acc 0.5: **holds**" in markdown("mnist_40_20", StudyRun(rows, 1.0, ["x"]), False)
    rows[0]["history"] = lambda key: reach.get(key, [])  # learns as fast as ReLU/He: not the slowest
    assert "**does NOT hold**" in markdown("mnist_40_20", StudyRun(rows, 1.0, ["x"]), False)

    run = [_row("deep", {}, {"val/acc": 0.8}, {"train/acc": [(0, 0.1), (300, 0.6)], "train/loss": [(0, 2.3), (449, 0.5)]})]
    assert "then an escape (final val/acc ≥ 0.5): **holds**" in markdown("mnist_deep_sigmoid", StudyRun(run, 1.0, ["x"]), False)
    run[0]["history"] = lambda key: {"train/acc": [(0, 0.6)], "train/loss": [(0, 2.3), (449, 0.5)]}.get(key, [])
    assert "**does NOT hold**" in markdown("mnist_deep_sigmoid", StudyRun(run, 1.0, ["x"]), False)  # no stall

    moons = [_row("sig", {"activation": "sigmoid", "model.depth": "3"}, {"val/acc": 0.88, "weight_change/total_over_lr/layer_00": 658.0}, {}),
             _row("relu", {"activation": "relu", "model.depth": "2"}, {"val/acc": 0.96, "weight_change/total_over_lr/layer_00": 268.0}, {})]
    assert markdown("moons_sigmoid_vs_relu", StudyRun(moons, 1.0, ["x"]), False).count("**holds**") == 2

    line = [_row("line_fit", {}, {}, {}, {"verdict": "vanishing"})]
    assert "the verdict is converged, not vanishing: **does NOT hold**" in markdown("line_fit", StudyRun(line, 1.0, ["x"]), False)
