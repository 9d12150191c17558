import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from shrinkcli import __version__
from shrinkcli.cli import app
from shrinkcli.config import DistillConfig, load_recipe, stage_config_from_recipe
from shrinkcli.errors import BadInputError

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_help_does_not_import_torch():
    code = "import sys; from shrinkcli.cli import app; import typer.main; " \
           "sys.argv=['shrink','--help'];\ntry:\n app()\nexcept SystemExit: pass\n" \
           "assert 'torch' not in sys.modules, 'torch imported by --help'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_info_json():
    result = runner.invoke(app, ["--json", "info"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)["summary"]
    assert info["device"].startswith(("cpu", "cuda")) and info["threads"] >= 1


def test_bad_override_is_one_line_exit_2():
    result = runner.invoke(app, ["distill", "--set", "epochs=many"])
    assert result.exit_code == 2
    assert "epochs" in result.stderr and "Traceback" not in result.output


def test_config_validation():
    with pytest.raises(BadInputError, match="unknown key"):
        DistillConfig.from_dict({"epoch": 3})
    with pytest.raises(BadInputError, match="stage_weights needs 4"):
        DistillConfig.from_dict({"stage_weights": [1, 2]})
    cfg = DistillConfig().apply_overrides(["stage_weights=1,0,0,2", "labels=false"])
    assert cfg.stage_weights == [1.0, 0.0, 0.0, 2.0] and cfg.labels is False


def test_recipe_common_and_stage_tables(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[common]\ninput_size = 64\nformat = "onnx"\n[distill]\nepochs = 2\n')
    cfg = stage_config_from_recipe(load_recipe(recipe), "distill")
    assert cfg.input_size == 64 and cfg.epochs == 2
    recipe.write_text('[distill]\nepochs = "two"\n')
    with pytest.raises(BadInputError, match="epochs"):
        stage_config_from_recipe(load_recipe(recipe), "distill")
