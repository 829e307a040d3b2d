"""``collapse-jax universality``: a CI-sized table end to end, and one-line CLI errors.

The CI-sized table uses the static shape of test_models.py's large-n runs (n = 2000,
d = 2, G = 4, block 512), so in one session its kernels are already compiled.
"""

import csv
import json
import math

import numpy as np
import pytest

from collapse_jax._cli import main
from collapse_jax._driver import compile_count
from collapse_jax._universality import BEGIN, CSV_COLUMNS, END

CI_ARGS = ["--models", "poisson,gaussian,ridge,median", "--workflows", "augment", "--n", "2000",
           "--d", "2", "--generations", "2,4", "--trajectories", "512", "--block-size", "512",
           "--seed", "3", "--quiet"]


def test_ci_sized_table_regenerates_csv_markdown_figure_and_doc(tmp_path, capsys):
    doc = tmp_path / "universality.md"
    doc.write_text(f"# Title\n\nprose\n\n{BEGIN}\nold table\n{END}\n\nmore prose\n")
    out = tmp_path / "out"
    assert main(["universality", *CI_ARGS, "--out", str(out), "--update-doc", str(doc)]) == 0
    assert "largest |z|" in capsys.readouterr().out
    for name in ("universality.csv", "universality.md", "universality.png", "universality.pdf",
                 "universality.json"):
        assert (out / name).stat().st_size > 0, name
    text = (out / "universality.csv").read_text()
    assert "nan" not in text.lower() and "inf" not in text.lower()
    rows = list(csv.DictReader((out / "universality.csv").open()))
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert [(r["model"], r["generation"]) for r in rows] == [
        (m, g) for m in ("poisson", "gaussian", "ridge", "median") for g in ("2", "4")]
    for r in rows:
        g = int(r["generation"])
        ratio, se = float(r["variance_ratio"]), float(r["variance_ratio_se"])
        limit = float(r["limit"])
        basel = float(np.sum(1.0 / np.arange(1, g + 1) ** 2))
        assert math.isclose(limit, basel, rel_tol=1e-12)
        # the limit, within 5 SE + the O(1/n) allowance of test_engine.py
        assert abs(ratio - limit) <= 5 * se + 20 * g / 2000, r
        assert float(r["ci_low"]) < ratio < float(r["ci_high"]) and int(r["failed_fits"]) == 0
        assert abs(float(r["n_mse"]) - float(r["n_mse_limit"])) <= 5 * float(r["n_mse_se"]) + 0.1
    md = (out / "universality.md").read_text()
    assert "#### augment" in md and "| **limit** | 1.2500 | 1.4236 |" in md
    assert "| median | 1.5708 |" in md  # the efficiency column of the scale table
    new = doc.read_text()
    assert new.startswith("# Title\n\nprose\n\n" + BEGIN) and new.endswith(f"{END}\n\nmore prose\n")
    assert "old table" not in new and md.strip() in new
    assert "collapse-jax universality" in new  # the command that generated it
    meta = json.loads((out / "universality.json").read_text())
    assert meta["generations"] == [2, 4] and len(meta["configs"]) == 4
    assert (out / "cells" / "gaussian-augment" / "metrics.csv").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--models", "ols,poison"], "did you mean 'poisson'"),
        (["--workflows", "augmnt"], "did you mean 'augment'"),
        (["--models", "ols,ols"], "duplicates"),
        (["--generations", "2,x"], "comma-separated list of integers"),
        (["--generations", "0,3"], "positive integers"),
        (["--models", "gaussian", "--n", "3"], "n >= d + 2"),
        (["--ridge-penalty", "-1"], "ridge_penalty must be >= 0"),
        (["--trajectories", "0"], "trajectories must be a positive integer"),
        (["--update-doc", "{tmp}/plain.md"], "needs one"),
        (["--update-doc", "{tmp}/missing.md"], "is not a file"),
        (["--genrations", "5"], "did you mean --generations"),
    ],
)
def test_bad_input_is_one_line_exit_2_before_compiling(args, fragment, capsys, tmp_path):
    (tmp_path / "plain.md").write_text("no markers\n")
    args = [a.format(tmp=tmp_path) for a in args]
    before = compile_count()
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(["universality", "--out", str(tmp_path / "x"), *args]))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("collapse-jax"), err
    assert fragment in err
    assert compile_count() == before


def test_simulate_cli_takes_the_new_models(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(["simulate", "--model", "gaussian", "--design", "fixed", "--out",
                               str(tmp_path)]))
    assert exc.value.code == 2 and "design='fresh'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["simulate", "--model", "ridge", "--ridge-penalty", "x", "--out", str(tmp_path)])
