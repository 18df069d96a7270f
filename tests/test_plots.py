"""`megatron-moe-ext plot-metrics` on a hand-written run log."""

import json

from megatron_moe_ext.cli import main
from megatron_moe_ext.plots import plot_metrics, series


def _log(path, n=5):
    with open(path, "w") as f:
        for it in range(1, n + 1):
            f.write(json.dumps({"kind": "train", "iteration": it, "lm loss": 8.0 - it,
                                "moe_ext/layer_1/expert_load": [0.5 - 0.01 * it, 0.5 + 0.01 * it]}) + "\n")
        f.write(json.dumps({"kind": "valid", "iteration": n, "lm loss": 3.5}) + "\n")


def test_series_and_plot(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _log(a)
    _log(b, 3)
    rows = [json.loads(line) for line in open(a)]
    assert series(rows, "lm loss") == ([1, 2, 3, 4, 5], [7.0, 6.0, 5.0, 4.0, 3.0])
    assert series(rows, "valid:lm loss") == ([5], [3.5])
    png = tmp_path / "m.png"
    drawn = plot_metrics([str(a), str(b)], ["lm loss", "valid:lm loss", "moe_ext/layer_1/expert_load",
                                            "moe_ext/absent"], str(png))
    assert drawn == {"lm loss": 8, "valid:lm loss": 2, "moe_ext/layer_1/expert_load": 5, "moe_ext/absent": 0}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_refuses_to_write_over_a_run_log_and_bad_records(tmp_path, capsys):
    a = tmp_path / "a.jsonl"
    _log(a)
    before = a.read_bytes()
    assert main(["plot-metrics", str(a), "--keys", "lm loss", "--output", str(a)]) == 2
    assert a.read_bytes() == before and "is one of the run logs" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "train", "iteration": 1}\nnot json\n')
    assert main(["plot-metrics", str(bad), "--keys", "lm loss", "--output", str(tmp_path / "x.png")]) == 2
    assert "line 2" in capsys.readouterr().err
    assert main(["plot-metrics", str(a), "--keys", "lm loss", "--output", str(tmp_path / "ok.png")]) == 0
