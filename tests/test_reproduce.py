"""src.reproduce's tables from hand-made run records (no training): values come from the runs, pipes are
escaped, each check says whether it holds, and the README block is replaced, not appended."""
from __future__ import annotations

from src import reproduce


def _row(name, params, metrics, history, tags=None):
    return {"name": name, "params": params, "metrics": metrics, "tags": tags or {},
            "history": lambda key: history.get(key, [])}


def test_he_depth_table_and_check():
    rows = [_row("init=lecun", {"init": "lecun"}, {"val/acc": 0.1}, {"backprop_ratio": [(0, 4e-5), (10, 1e-4)]},
                 {"verdict": "vanishing"}),
            _row("init=he", {"init": "he"}, {"val/acc": 0.94}, {"backprop_ratio": [(0, 1.08)]}, {"verdict": "converged"})]
    text = reproduce.markdown("he_depth", rows, 12.0, ["python", "-m", "src.train", "-m", "experiment=he_depth"], False)
    assert "| init=lecun | 4e-05 | 0.1 | vanishing | ≈4e-5; stalls |" in text
    assert "| init=he | 1.08 | 0.94 | converged |" in text
    assert "**holds**" in text and "12 s wall time" in text
    rows[1]["history"] = lambda key: [(0, 50.0)]  # He's ratio far from 1: the check must say so
    assert "**does NOT hold**" in reproduce.markdown("he_depth", rows, 1.0, ["x"], False)


def test_pipes_are_escaped_and_missing_cells_say_so():
    rows = [_row("activation=sigmoid,model.depth=3", {"activation": "sigmoid", "model.depth": "3"}, {}, {})]
    text = reproduce.markdown("moons_sigmoid_vs_relu", rows, 1.0, ["x"], True)
    assert "mean \\|old−new\\|/lr" in text and "\\|Δ\\|/lr 280…1100" in text
    assert "| — |" in text and "(quick)" in text


def test_readme_block_is_replaced(tmp_path):
    (tmp_path / "a.md").write_text("### `a`\nfull\n")
    (tmp_path / "a.quick.md").write_text("### `a` (quick)\nquick\n")
    (tmp_path / "b.quick.md").write_text("### `b` (quick)\nquick b\n")
    readme = tmp_path / "repo" / "README.md"
    readme.parent.mkdir()
    readme.write_text(f"intro\n{reproduce.START}\nold table\n{reproduce.END}\nrest\n")
    reproduce.update_readme(tmp_path, readme)
    text = readme.read_text()
    assert "old table" not in text and "full" in text and "quick b" in text and "\nquick\n" not in text
    assert text.startswith("intro\n") and text.endswith("rest\n")
