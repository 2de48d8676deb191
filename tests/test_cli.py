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
    for cmd in ('train', 'report', 'evaluate', 'predict', 'split'):
        help_text = _run(cmd, '--help').stdout
        tail = help_text.rstrip().split('examples:')[-1].strip().splitlines()
        assert 'examples:' in help_text and 2 <= len(tail) <= 3 and all(l.strip().startswith('breast-cancer ') for l in tail), cmd


def test_bad_override_fails_with_the_schema_message(repo_root):
    out = _run('train', '--config', str(repo_root/'configs'/'demo.yaml'), '--set', 'train.epochs=0', '-v')
    assert out.returncode == 2
    assert "bad value for config key 'train.epochs': 0" in out.stderr and 'Traceback' not in out.stderr
    out = _run('train', '--config', str(repo_root/'configs'/'demo.yaml'), '--set', 'train.epochs')
    assert out.returncode == 2 and 'write it as key=value' in out.stderr


def test_report_passes_overrides_to_the_batch(repo_root, tmp_path, monkeypatch):
    "report --set: the overrides go to run_reports, which writes the configs under the batch's lock (issue 25, bad case 5)."
    import breast_cancer.report as R
    seen = {}
    def fake_run_reports(datasets, configs=None, overrides=None, **kw):
        import pandas as pd
        seen.update(configs=configs, overrides=overrides)
        return pd.DataFrame({'dataset': ['mias'], 'status': ['ok']})
    monkeypatch.setattr(R, 'run_reports', fake_run_reports)
    assert main(['report', '--datasets', 'mias', '--config', str(repo_root/'configs'/'demo.yaml'), '--out-dir', str(tmp_path),
                 '--set', 'train.epochs=3', '--set', 'data.image_size=32']) == 0
    assert seen['overrides'] == ['train.epochs=3', 'data.image_size=32']
    assert not (tmp_path/'configs').exists()   # nothing written before the batch holds its lock


# ---------------------------------------------------------------- issue 25: hostile and careless input
import errno, signal, tempfile, time
import pandas as pd
import pytest
from breast_cancer.rundir import RunDir


def _manifest(folder: Path, name: str, mias_sample: Path) -> Path:
    "A two-image split manifest (one patient in train, one in test) written as `folder/name`."
    imgs = sorted(mias_sample.glob('mdb*.png'))[:2]
    path = folder/name
    pd.DataFrame({'split': ['train', 'test'], 'patient_id': ['p1', 'p2'], 'image_id': ['a', 'b'],
                  'image_path': [str(p) for p in imgs]}).to_csv(path, index=False)
    return path


def test_audit_default_page_stays_inside_runs(tmp_path, mias_sample, monkeypatch, capsys):
    "Bad 3: a manifest called '...csv' names the page '..': refused, nothing written beside the runs folder."
    monkeypatch.setenv('BREAST_CANCER_RUNS', str(tmp_path/'runs'))
    m = _manifest(tmp_path, '...csv', mias_sample)
    assert main(['audit', '--manifest', str(m)]) == 2
    err = capsys.readouterr().err
    assert "'..' is not a plain name" in err and 'pass --out PAGE.html' in err
    assert not (tmp_path/'audit.html').exists() and not (tmp_path/'runs').exists()


def test_train_workers_checked_before_the_cache_fills(tmp_path, monkeypatch, capsys):
    "Bad 6: --workers 0 / -1 are errors, and more workers than the machine holds needs --force-workers; nothing is cached first."
    monkeypatch.setenv('BREAST_CANCER_CACHE', str(tmp_path/'cache'))
    for n, says in (('0', '--workers 0: give 1 or more'), ('-1', '--workers -1: give 1 or more'),
                    ('100000', 'or fewer, or add --force-workers to start 100000 anyway')):
        assert main(['train', '--config', 'demo', '--set', 'data.image_size=32', '--workers', n]) == 2, n
        assert says in capsys.readouterr().err
    assert not (tmp_path/'cache').exists()
    assert '--force-workers' in _run('train', '--help').stdout


def _laughs(levels: int = 5) -> str:
    "A 'billion laughs' config: nested YAML aliases under a key the schema accepts (a dataset's options)."
    lines = ['datasets:', '- name: mias', '  options:', '    l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]']
    lines += [f'    l{i}: &l{i} [{", ".join([f"*l{i-1}"] * 9)}]' for i in range(1, levels)]
    return '\n'.join(lines) + '\n'


def test_billion_laughs_config_refused_at_once(tmp_path, capsys):
    "Bad 7: aliases are refused while the file loads; the message is one short line."
    f = tmp_path/'laughs.yaml'; f.write_text(_laughs())
    t0 = time.perf_counter()
    assert main(['configs', 'show', str(f), '--set', 'seed=1']) == 2
    out, err = capsys.readouterr()
    assert time.perf_counter() - t0 < 5 and out == ''
    assert f'config file {f}: YAML alias *l0 at line 5: aliases are not allowed' in err and len(err) < 400


@pytest.mark.parametrize('content, override, says', [
    (b'\x7fELF\x02\x01\x01\x00\xd0\xff' * 20, None, 'is not a text file'),
    (b'', None, 'is empty (or holds only comments)'),
    (b'# all commented out\n', None, 'is empty (or holds only comments)'),
    (b'train:\n  epochs: 2\n  epochs: 3\n', None, "duplicate key 'epochs' at lines 2 and 3"),
    (b'name: x\n' + b'#' * (1 << 20) + b'\n', None, 'is larger than 1 MB'),
    (b'name: x\n', 'train=null', "'train' is a section; this would reset all its keys"),
    (b'name: x\n', 'name=' + 'a' * 300, 'allowed: a plain name of at most 255 bytes'),
    (b'name: x\n', 'data.image_size=100000', "'data.image_size': 100000; allowed: an integer in [8, 4096]"),
])
def test_config_surprises_are_one_line_errors(tmp_path, capsys, content, override, says):
    "Poor: a binary, empty or oversized config, duplicate keys, a whole section set to null, a 300-byte name, a huge image size."
    f = tmp_path/'c.yaml'; f.write_bytes(content)
    assert main(['configs', 'show', str(f), *(['--set', override] if override else [])]) == 2
    err = capsys.readouterr().err
    assert err.startswith('breast-cancer configs: error: ') and says in err and len(err) < 600, err


def test_configs_show_prints_only_configs(capsys):
    "Poor: `configs show /etc/passwd` printed any file as a preset."
    assert main(['configs', 'show', '/etc/passwd']) == 2
    out, err = capsys.readouterr()
    assert out == '' and 'a config must be a mapping of keys to values' in err


def test_set_reaches_into_the_datasets_list(capsys):
    "Poor: `--set datasets.0.root=...` (and the message's own spelling `datasets[0].root`) sets the first dataset's root."
    assert main(['configs', 'show', 'demo', '--set', 'datasets.0.root=/data/mias', '--set', 'datasets[0].options={a: 1}']) == 0
    d = yaml.safe_load(capsys.readouterr().out)['datasets'][0]
    assert (d['root'], d['options']) == ('/data/mias', {'a': 1})
    assert main(['configs', 'show', 'demo', '--set', 'datasets.3.root=/x']) == 2
    assert "'datasets' is a list of 1; use an index from 0 to 0" in capsys.readouterr().err


def test_read_only_output_folder_is_named(tmp_path, mias_sample, monkeypatch, capsys):
    "Poor: a folder the command may not write in is named in one line, not a PermissionError traceback."
    ro = tmp_path/'ro'; ro.mkdir(); ro.chmod(0o555)
    if os.geteuid() == 0:   # root writes anywhere: stand in for the refusal the folder gives everyone else
        real = tempfile.mkstemp
        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and Path(dir) == ro: raise PermissionError(errno.EACCES, 'Permission denied', str(ro/'.audit.html.tmp'))
            return real(*args, dir=dir, **kwargs)
        monkeypatch.setattr(tempfile, 'mkstemp', mkstemp)
    try:
        assert main(['audit', '--manifest', str(_manifest(tmp_path, 'm.csv', mias_sample)), '--out', str(ro/'audit.html')]) == 2
    finally: ro.chmod(0o755)
    err = capsys.readouterr().err
    assert f'the folder {ro} is read-only or not yours' in err and 'Traceback' not in err


def test_predict_paths_checked_before_the_model_loads(tmp_path, capsys):
    "Poor: a folder given as an image is named as a folder; --out inside the model's run folder is refused, the file kept."
    run = tmp_path/'run'; (run/'cascade').mkdir(parents=True); RunDir(run).config_file.write_text('name: run\n')
    own = RunDir(run).predictions_file('test'); own.write_text('the run s own predictions\n')
    img = tmp_path/'x.png'; img.write_bytes(b'')
    assert main(['predict', '--model', str(run), str(run/'cascade')]) == 2
    assert 'is a folder, not an image file: pass its images' in capsys.readouterr().err
    assert main(['predict', '--model', str(run/'cascade'), str(img), '--out', str(own)]) == 2
    assert f'lies inside the model folder {run.resolve()}' in capsys.readouterr().err
    assert own.read_text() == 'the run s own predictions\n'


_SLOW_COMMAND = '''import sys, time
from pathlib import Path
import breast_cancer.cli as cli
from breast_cancer.core import atomic_path
def _configs(args):   # a command that is half-way through writing a file when the signal comes
    with atomic_path(Path(sys.argv[1])/'out.txt') as tmp:
        Path(tmp).write_text('half'); print('ready', flush=True); time.sleep(60)
cli._configs = _configs
sys.exit(cli.main(['configs']))
'''

@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_stops_with_128_plus_n_and_cleans_up(tmp_path, signum):
    "Poor: a signal ends the command with 128+n, a one-line message and no temporary file left behind."
    # a job started in the background (nohup, CI) inherits SIGINT ignored: give the child a terminal's default, as a user has
    p = subprocess.Popen([sys.executable, '-c', _SLOW_COMMAND, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert p.stdout.readline().strip() == 'ready'
        p.send_signal(signum)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None: p.kill()
    assert p.returncode == 128 + signum, (p.returncode, err)
    assert f'stopped by {signal.Signals(signum).name}' in err and 'Traceback' not in err
    assert list(tmp_path.iterdir()) == []   # the half-written temporary file was removed


def test_no_tensorflow_log_lines_unless_vv(tmp_path):
    "Issue item 5: `prepare --set ...` imports TensorFlow; its C++ log (I0000, absl, oneDNN, cuInit) shows with -vv only."
    env = {k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}   # the command's own default, not the suite's
    env['BREAST_CANCER_CACHE'] = str(tmp_path/'cache')
    args = ['prepare', '--config', 'demo', '--set', 'data.image_size=32', '--set', 'data.max_images=4', '--set', 'wavelet=null']
    noise = ('I0000', 'absl::InitializeLog', 'oneDNN', 'cuInit', 'cpu_feature_guard', 'W0000', 'E0000')
    quiet = _run(*args, env=env)
    assert quiet.returncode == 0 and 'cached' in quiet.stdout, quiet.stderr[-2000:]
    assert not [l for l in quiet.stderr.splitlines() if any(n in l for n in noise)], quiet.stderr[-2000:]
    loud = _run(*args, '-vv', env=env)                 # the same command with -vv: the check above can see the lines
    assert loud.returncode == 0 and any(n in loud.stderr for n in noise), loud.stderr[-2000:]


def test_train_writes_the_model_card(tmp_path, isolated_dirs, monkeypatch, capsys):
    "Issue item 3: a finished `breast-cancer train` leaves MODEL_CARD.md in its run folder, built from its test predictions."
    import functools
    import breast_cancer.cascade as C
    monkeypatch.setattr(C, 'run_from_config', functools.partial(C.run_from_config, build=C.small_stage))   # a tiny stand-in network
    cfg = tmp_path/'tiny.yaml'
    cfg.write_text(yaml.safe_dump({'name': 'tiny', 'data': {'image_size': 32, 'val_size': 0.2, 'test_size': 0.2, 'max_images': 60},
                                   'wavelet': None, 'model': {'weights': None},
                                   'train': {'epochs': 1, 'batch_size': 8, 'steps_per_epoch': 2, 'validation_steps': 1}}))
    assert main(['train', '--config', str(cfg), '--run-dir', str(tmp_path/'run')]) == 0
    card = RunDir(tmp_path/'run').model_card_file
    assert f'model card: {card}' in capsys.readouterr().out
    text = card.read_text()
    assert text.startswith('# Model card: tiny') and 'Not for clinical use' in text
