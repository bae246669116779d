"""CLI wiring: lazy imports, python -m, data synth, error reporting without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys


def test_plugins_and_help_do_not_import_torch():
    code = ("import sys; from alm_kit.cli import main; main(['plugins']); "
            "print('TORCH' if 'torch' in sys.modules else 'LIGHT')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("LIGHT")


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "alm_kit", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("alm-kit ")


def test_data_synth_writes_train_and_test_sets(tmp_path, capsys):
    from alm_kit.cli import main

    out_dir = tmp_path / "synth"
    assert main(["data", "synth", str(out_dir), "--n-train", "8", "--n-test", "7", "--quiet", "--no-speech"]) == 0
    train = [json.loads(line) for line in (out_dir / "train.jsonl").read_text().splitlines()]
    test = json.loads((out_dir / "test.json").read_text())
    assert len(train) == 8 and len(test) == 7
    assert "wrote 8 training examples" in capsys.readouterr().out


def test_user_errors_print_one_line_and_exit_2(tmp_path, capsys):
    from alm_kit.cli import main

    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: recipe file not found") and "Traceback" not in err


def test_overrides_may_follow_options_and_unknown_arguments_are_refused(capsys):
    import pytest

    from alm_kit.cli import parse_args

    args = parse_args(["train", "r.yaml", "training.lr=3e-4", "--quiet", "training.seed=2"])
    assert args.quiet and args.overrides == ["training.lr=3e-4", "training.seed=2"]
    with pytest.raises(SystemExit):
        parse_args(["train", "r.yaml", "--quiet", "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["plugins", "x=1"])  # a command without overrides
