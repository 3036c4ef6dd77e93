import subprocess
import sys

from click.testing import CliRunner

from gradstore_cli.main import cli


def test_help_lists_an_example():
    result = CliRunner().invoke(cli, ["-h"])
    assert result.exit_code == 0
    assert "Example:" in result.output


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "gradstore_cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "gradstore, version 0.1.0"
