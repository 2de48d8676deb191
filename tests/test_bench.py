"""The benchmarks' one home (issue 24): `bench` loads without TensorFlow, the old names still resolve from their old
modules, `breast-cancer bench NAME` gives each benchmark only its own flags, and the learnability check (moved here
from tests/test_train.py with `bench_learn`). Tiny: seconds each, apart from the two learnability runs."""
import argparse, subprocess, sys
import pytest

from breast_cancer import bench
from breast_cancer.cli import build_parser, main

CLI = 'import sys; from breast_cancer.cli import main; sys.exit(main(sys.argv[1:]))'
TINY = {'name': 'tiny', 'data': {'image_size': 32, 'val_size': 0.2, 'test_size': 0.2}, 'wavelet': None,
        'model': {'weights': None},
        'train': {'epochs': 1, 'batch_size': 8, 'steps_per_epoch': 2, 'validation_steps': 1}}


def _bench_parsers() -> dict[str, argparse.ArgumentParser]:
    "The sub-parsers of `breast-cancer bench`, by benchmark name."
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    inner = next(a for a in sub.choices['bench']._actions if isinstance(a, argparse._SubParsersAction))
    return dict(inner.choices)


def _flags(parser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings} - {'-h', '--help'}


# ---------------------------------------------------------------- the module
def test_bench_imports_without_tensorflow():
    code = "import sys, breast_cancer.bench; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ['False', 'False']


def test_help_does_not_import_bench():
    code = ("import sys, contextlib; from breast_cancer.cli import main\n"
            "with contextlib.suppress(SystemExit): main(['--help'])\n"
            "print('breast_cancer.bench' in sys.modules, 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert out.stdout.split()[-2:] == ['False', 'False'], out.stdout[-500:] + out.stderr[-2000:]


@pytest.mark.parametrize('module, name, new', [
    ('train', 'learnability', 'bench_learn'), ('train', 'synthetic_task', 'synthetic_task'),
    ('train', 'add_lesion', 'add_lesion'), ('train', 'bench_pipeline', 'bench_pipeline'), ('train', 'bench_distribute', 'bench_distribute'),
    ('data', 'bench_cache', 'bench_cache'), ('evaluate', 'benchmark_bootstrap', 'bench_bootstrap'), ('histo', 'bench_load_idc', 'bench_load_idc'),
    ('wavelet', 'bench_wavelet', 'bench_wavelet'), ('wavelet', 'bench_cache_scale', 'bench_cache_scale')])
def test_old_names_resolve_to_bench(module, name, new):
    import importlib
    assert getattr(importlib.import_module(f'breast_cancer.{module}'), name) is getattr(bench, new)


def test_aliases_are_exported():
    assert bench.learnability is bench.bench_learn and bench.benchmark_bootstrap is bench.bench_bootstrap
    assert {'benchmark_bootstrap', 'bench_bootstrap', 'add_bench_parsers', 'run_bench'} <= set(bench.__all__)
    from breast_cancer import learn
    assert {'learnability', 'bench_learn'} <= set(learn.__all__)   # the learnability check has its own module


# ---------------------------------------------------------------- the command line
def test_each_benchmark_has_only_its_own_flags():
    parsers = _bench_parsers()
    assert list(parsers) == ['wavelet', 'cache', 'cache-scale', 'idc', 'bootstrap', 'learn', 'pipeline', 'distribute']
    assert _flags(parsers['cache-scale']) == {'--films', '--size', '--n', '--workers', '--repeats', '--fill-repeats', '--film-shape'}
    assert _flags(parsers['learn']) == {'--config', '--models', '--steps', '--every', '--size', '--batch-size', '--task', '--amplitude', '--kind', '--time-limit', '--record'}
    assert _flags(parsers['wavelet']) == {'--n', '--size', '--workers', '--sigma', '--repeats'}
    assert [n for n, p in parsers.items() if '--films' in _flags(p)] == ['cache-scale']
    assert [n for n, p in parsers.items() if '--config' in _flags(p)] == ['learn', 'pipeline', 'distribute']


def test_flags_take_the_functions_defaults_and_types():
    p = build_parser()
    a = p.parse_args(['bench', 'learn'])
    assert (a.bench, a.config, a.steps, a.eval_every, a.image_size, a.models) == ('learn', 'demo', 200, 20, None, ('backbone', 'small_cnn'))
    a = p.parse_args(['bench', 'cache-scale', '--film-shape', '240x150', '--n', '60'])
    assert (a.film_shape, a.n_patches, a.films) == ((240, 150), 60, 128)
    a = p.parse_args(['bench', 'distribute', '--xla', '--size', '32'])
    assert (a.xla, a.mixed_precision, a.image_size, a.backbone) == (True, False, 32, None)


def test_bench_help_lists_flags_and_an_example():
    out = subprocess.run([sys.executable, '-c', CLI, 'bench', 'learn', '--help'], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    text = ' '.join(out.stdout.split())   # argparse wraps to the terminal's width
    assert '--every EVAL_EVERY' in text and 'steps between test-AUC measurements (default: 20)' in text
    assert '--films' not in text
    assert 'breast-cancer bench learn --config demo --size 64 --every 25 --time-limit 900' in text


def test_a_flag_of_another_benchmark_is_refused(capsys):
    with pytest.raises(SystemExit) as e: main(['bench', 'learn', '--films', '3'])
    assert e.value.code == 2 and 'unrecognized arguments: --films 3' in capsys.readouterr().err
    with pytest.raises(SystemExit): main(['bench', 'cache-scale', '--film-shape', '240'])
    assert "'240': give rows x columns" in capsys.readouterr().err


def test_bench_bootstrap_runs_from_the_shell():
    out = subprocess.run([sys.executable, '-c', CLI, 'bench', 'bootstrap', '--n', '300', '--patients', '60', '--n-boot', '50',
                          '--compare-sklearn', '5'], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert 'n_images=300, n_patients=60, n_boot=50' in out.stdout and 'speedup=' in out.stdout


def test_bench_idc_runs_in_process(capsys):
    assert main(['bench', 'idc', '--n', '200', '--patients', '3']) == 0
    assert 'load_idc: 200 files, 3 patients' in capsys.readouterr().out


def test_bench_cache_takes_a_mias_folder(capsys, mias_sample, isolated_dirs):
    assert main(['bench', 'cache', '--mias', str(mias_sample), '--n', '4', '--size', '32', '--workers', '1']) == 0
    out = capsys.readouterr().out
    assert 'longer side 32' in out and 'warm (reused)' in out
    assert main(['bench', 'cache', '--mias', '/nonexistent/mias']) == 2


# ---------------------------------------------------------------- the learnability check (from tests/test_train.py)
@pytest.fixture(scope='module')
def cache_env(isolated_dirs):
    "Private cache/runs folders for this module."
    return isolated_dirs


def test_learnability_small_cnn_learns_an_easy_signal(cache_env, tmp_path):
    "The tiny learnability check: a few steps on bright discs; the loss falls and the test AUC is far above chance."
    curve = bench.bench_learn({**TINY, 'train': {'batch_size': 16}}, models=('small_cnn',), steps=40, eval_every=20,
                              amplitude=0.8, size=0.1, kind='disc', workdir=tmp_path, log_fn=None,
                              overrides={'train.clr.maximal_learning_rate': 0.05})
    print(curve.to_string())
    assert list(curve['step']) == [20, 40, 40] and curve['final'].tolist() == [False, False, True]
    assert curve['loss'].iloc[1] < curve['loss'].iloc[0]
    assert curve['test_auc'].iloc[-1] > 0.8
    assert curve['p_max'].iloc[-1] - curve['p_min'].iloc[-1] > 0.1    # not a constant prediction


def test_bench_learn_trains_the_preset_as_given(cache_env, tmp_path, monkeypatch):
    "No hidden recipe: both models train with the config's optimizer and schedule; only `overrides` change them."
    from breast_cancer import model as bc_model, train as T   # bench calls train.train through its module: patched there
    from breast_cancer.config import load_config
    from breast_cancer.model import small_cnn
    seen = []
    monkeypatch.setattr(bc_model, 'build_model', lambda *a, **k: small_cnn((32, 32, 1), blocks=1, width=4))
    def fake_train(net, task, c, **k):   # records what each model would train with; the callback measures the untrained net
        seen.append((k['run_dir'].name, c.train.optimizer, c.get('train.clr.maximal_learning_rate'))); k['callbacks'][0].set_model(net)
    monkeypatch.setattr(T, 'train', fake_train)
    bench.bench_learn({**TINY, 'model': {'weights': None}}, steps=2, eval_every=2, workdir=tmp_path, log_fn=None)
    cfg = load_config(TINY)
    assert seen == [(n, cfg.train.optimizer, cfg.train.clr.maximal_learning_rate) for n in ('resnet50', 'small_cnn')]
    seen.clear()
    bench.learnability({**TINY, 'model': {'weights': None}}, steps=2, eval_every=2, workdir=tmp_path / 'b', log_fn=None,
                       overrides={'train.clr.maximal_learning_rate': 0.02}, task='faint')
    assert [s[2] for s in seen] == [0.02, 0.02]                             # an explicit key reaches both models


def test_the_demo_preset_holds_the_from_scratch_settings():
    "The settings under which a random-init ResNet-50 learns are the demo preset's own (issue 25), not a bench override."
    from breast_cancer.config import load_config
    c = load_config('demo')
    assert c.model.weights is None
    assert (c.train.optimizer, c.train.clr.initial_learning_rate, c.train.clr.maximal_learning_rate) == ('adam', 1e-4, 1e-3)
    assert not hasattr(bench, 'FROM_SCRATCH')
