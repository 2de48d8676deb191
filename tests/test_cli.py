"""The `breast-cancer` command as a user runs it (a separate process): --version, examples in --help, -v/-vv and
--set overrides checked by the config schema before anything heavy loads."""
import os, subprocess, sys
from pathlib import Path

import yaml

from breast_cancer import __version__
from breast_cancer.cli import main


def _run(*args, env=None):
    return subprocess.run([sys.executable, '-c', 'import sys; from breast_cancer.cli import main; sys.exit(main())', *args],
                          capture_output=True, text=True, env=env)


def test_version_and_help_examples():
    out = _run('--version')
    assert out.returncode == 0 and out.stdout.strip() == f'breast-cancer {__version__}'
    for cmd in ('train', 'report', 'evaluate', 'predict'):
        help_text = _run(cmd, '--help').stdout
        tail = help_text.rstrip().split('examples:')[-1].strip().splitlines()
        assert 'examples:' in help_text and 2 <= len(tail) <= 3 and all(l.strip().startswith('breast-cancer ') for l in tail), cmd


def test_bad_override_fails_with_the_schema_message(repo_root):
    out = _run('train', '--config', str(repo_root/'configs'/'demo.yaml'), '--set', 'train.epochs=0', '-v')
    assert out.returncode == 2
    assert "bad value for config key 'train.epochs': 0" in out.stderr and 'Traceback' not in out.stderr
    out = _run('train', '--config', str(repo_root/'configs'/'demo.yaml'), '--set', 'train.epochs')
    assert out.returncode == 2 and 'write it as key=value' in out.stderr


def test_report_overrides_written_as_config_files(repo_root, tmp_path, monkeypatch):
    "report --set: the resolved, overridden config is written under the reports folder and keeps its file name."
    import breast_cancer.report as R
    seen = {}
    def fake_run_reports(datasets, configs=None, **kw):
        import pandas as pd
        seen['configs'] = configs
        return pd.DataFrame({'dataset': ['mias'], 'status': ['ok']})
    monkeypatch.setattr(R, 'run_reports', fake_run_reports)
    assert main(['report', '--datasets', 'mias', '--config', str(repo_root/'configs'/'demo.yaml'), '--out-dir', str(tmp_path),
                 '--set', 'train.epochs=3', '--set', 'data.image_size=32']) == 0
    (cfg,) = seen['configs']
    assert Path(cfg) == tmp_path/'configs'/'demo.yaml'
    d = yaml.safe_load(Path(cfg).read_text())
    assert (d['train']['epochs'], d['data']['image_size'], d['name']) == (3, 32, 'demo')
