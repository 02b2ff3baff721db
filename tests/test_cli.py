"""The command line: list, show, and one-line errors with exit status 2."""

import pytest

from memforge.cli import main


def test_list_shows_components_and_presets(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("titans.mlp", "baseline.causal", "titans.lmm_tiny"):
        assert name in out


def test_list_one_kind(capsys):
    assert main(["list", "--kind", "retention"]) == 0
    out = capsys.readouterr().out
    assert "titans.adaptive_decay" in out and "titans.mlp" not in out


def test_show_preset_with_overrides(capsys):
    assert main(["show", "titans.lmm_tiny", "--set", "memory.depth=3"]) == 0
    out = capsys.readouterr().out
    assert "depth = 3" in out and "parameters" in out and "spec_id" in out


def test_show_spec_file(tmp_path, capsys):
    assert main(["show", "titans.lmm_tiny", "--format", "json"]) == 0
    text = capsys.readouterr().out
    path = tmp_path / "spec.json"
    path.write_text(text[text.index("{"): text.rindex("}") + 1])
    assert main(["show", str(path)]) == 0
    assert 'impl = "titans.lmm"' in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["show", "titans.lmn_tiny"], "did you mean 'titans.lmm_tiny'"),
        (["show", "titans.lmm_tiny", "--set", "memory.depth=0"], "'depth' must be >= 1"),
        (["show", "missing.toml"], "no such spec file"),
        (["list", "--kind", "memroy"], "did you mean 'memory'"),
    ],
)
def test_user_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
