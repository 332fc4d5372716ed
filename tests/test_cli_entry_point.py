"""The CLI's entry point: python -m ddimctl, --version, --help without importing torch, a usage error's exit code."""

import subprocess
import sys


def run(*args, **kw):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, **kw)


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from ddimctl.cli import app\n"
        "from typer.testing import CliRunner\n"
        "r = CliRunner().invoke(app, ['--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "for cmd in ['sample', 'invert', 'reconstruct', 'interpolate', 'train']:\n"
        "    r = CliRunner().invoke(app, [cmd, '--help'])\n"
        "    assert r.exit_code == 0, r.output\n"
        "print('torch' in sys.modules)\n"
    )
    r = run("-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_python_dash_m_and_version():
    r = run("-m", "ddimctl", "--version")
    assert r.returncode == 0
    assert r.stdout.startswith("ddimctl ")


def test_unknown_option_is_a_usage_error():
    r = run("-m", "ddimctl", "sample", "--no-such-option")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
