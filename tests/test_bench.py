"""The benchmarks' one home (issue 24): `bench` loads without TensorFlow, the old names still resolve from their old
modules, `breast-cancer bench NAME` gives each benchmark only its own flags, and the learnability check (moved here
from tests/test_train.py with `bench_learn`). Tiny: seconds each, apart from the two learnability runs."""
import argparse, subprocess, sys
import pytest

from breast_cancer import bench, speed
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
    assert list(parsers) == ['wavelet', 'cache', 'cache-scale', 'idc', 'bootstrap', 'learn', 'two-view', 'pipeline', 'distribute', 'gpu']
    assert _flags(parsers['cache-scale']) == {'--films', '--size', '--n', '--workers', '--repeats', '--fill-repeats', '--film-shape'}
    assert _flags(parsers['learn']) == {'--config', '--models', '--steps', '--every', '--size', '--batch-size', '--task', '--amplitude', '--kind', '--time-limit', '--record'}
    assert _flags(parsers['wavelet']) == {'--n', '--size', '--workers', '--sigma', '--repeats'}
    assert [n for n, p in parsers.items() if '--films' in _flags(p)] == ['cache-scale']
    assert [n for n, p in parsers.items() if '--config' in _flags(p)] == ['learn', 'two-view', 'pipeline', 'distribute', 'gpu']
    assert _flags(parsers['two-view']) == {'--config', '--steps', '--every', '--size', '--batch-size', '--amplitude', '--fusion', '--backbone', '--n-boot', '--time-limit'}
    assert _flags(parsers['pipeline']) == {'--config', '--size', '--batch-size', '--steps', '--warmup', '--repeats', '--model-steps', '--backbone'}
    assert _flags(parsers['gpu']) == {'--config', '--sizes', '--batch-size', '--steps', '--max-batch', '--out', '--backbone'}


def test_flags_take_the_functions_defaults_and_types():
    p = build_parser()
    a = p.parse_args(['bench', 'learn'])
    assert (a.bench, a.config, a.steps, a.eval_every, a.image_size, a.models) == ('learn', 'demo', 200, 20, None, ('backbone', 'small_cnn'))
    a = p.parse_args(['bench', 'cache-scale', '--film-shape', '240x150', '--n', '60'])
    assert (a.film_shape, a.n_patches, a.films) == ((240, 150), 60, 128)
    a = p.parse_args(['bench', 'pipeline'])
    assert (a.size, a.batch_size, a.model_steps) == (None, 32, 3)            # None: both 224 and 512 px
    a = p.parse_args(['bench', 'gpu', '--sizes', '32,64', '--max-batch', '8'])
    assert (a.sizes, a.max_batch, a.out, a.steps) == ((32, 64), 8, 'bench_gpu', 10)
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


# ---------------------------------------------------------------- the GPU path (issue 26): bench pipeline and bench gpu
TINY_PIPE = {'name': 'tiny', 'data': {'image_size': 32, 'max_images': 8}, 'wavelet': None}


def test_bench_pipeline_reports_before_after_model_and_t4_estimates(cache_env, capsys):
    "A tiny run: both pipelines (the 9e995e8 baseline and make_dataset), the CPU model rate, the ratios, the T4 lines."
    res = bench.bench_pipeline(TINY_PIPE, size=32, batch_size=4, steps=3, repeats=1, model_steps=1, backbone='small_cnn')
    assert {'config', 'batch_size', 'cores', 'device', 'backbone', 'results', 'steps', 'warmup'} <= set(res)
    (r,) = res['results']
    assert {'size', 'n_images', 'pipeline_images_per_s', 'baseline_images_per_s', 'speedup', 'batch_dtype', 'cache_bytes_per_image',
            'baseline_cache_bytes_per_image', 'model_images_per_s', 'pipeline_over_model', 't4_lines', 'keeps_t4_busy'} <= set(r)
    from breast_cancer.config import load_config
    from breast_cancer.train import load_manifest
    assert (r['size'], r['n_images'], r['batch_dtype'], res['device']) == (32, len(load_manifest(load_config(TINY_PIPE))), 'float32', 'CPU')
    assert r['baseline_images_per_s'] > 0 and r['pipeline_images_per_s'] > 0
    assert r['baseline_cache_bytes_per_image'] > 32 * 32 * 4   # the baseline's cache is float32 at 32 px
    assert list(r['model_images_per_s']) == ['float32']        # a CPU times float32 only
    assert r['pipeline_over_model']['float32'] == pytest.approx(r['pipeline_images_per_s'] / r['model_images_per_s']['float32'], rel=0.02)
    assert len(r['t4_lines']) == 2 and all('estimate, scaled by pixel count' in l for l in r['t4_lines'])
    assert set(r['keeps_t4_busy']) == {'float32', 'mixed precision'}
    out = capsys.readouterr().out
    assert 'pipeline before (9e995e8' in out and 'pipeline after' in out and 'after / before' in out
    assert 'pipeline / model' in out and 'T4 mixed precision (estimate' in out


def test_bench_pipeline_model_steps_0_skips_the_model_and_224_is_unscaled(cache_env, capsys):
    res = bench.bench_pipeline(TINY_PIPE, size=32, batch_size=4, steps=2, repeats=1, model_steps=0)
    assert res['results'][0]['model_images_per_s'] == {} and 'not timed (model_steps=0)' in capsys.readouterr().out
    lines, busy = speed._t4_lines(400.0, 224, 2)
    assert [l.split(':')[0] for l in lines] == ['T4 float32 (estimate)', 'T4 mixed precision (estimate)']
    assert busy == {'float32': True, 'mixed precision': False}


def test_the_baseline_is_the_old_pipeline(tmp_path):
    "The baseline reads float32 .npy files through numpy_function, pads to the size and augments per batch (old code path)."
    from breast_cancer.config import load_config
    import numpy as np
    src = tmp_path / 'a.npy'; np.save(src, np.full((20, 10), 200, np.uint8))
    (old,) = speed._old_cache([src], tmp_path / 'old')
    assert np.load(old).dtype == np.float32 and np.load(old).max() == pytest.approx(200 / 255)
    c = speed._bench_config({**TINY_PIPE, 'train': {'augment': {'enabled': False}}}, 16, 2)
    x = next(iter(speed._old_dataset([old], c))).numpy()
    assert x.shape == (2, 16, 16, 1) and x.dtype == np.float32
    assert x[0, :, :4].max() < 0.05 and x[0, 8, 8, 0] == pytest.approx(200 / 255, abs=0.01)   # padded left, image in the middle


def test_model_variants_by_device_and_dtype_policy_is_scoped():
    import keras
    assert speed._model_variants(False) == [('float32', False, False)]
    assert [v[0] for v in speed._model_variants(True)] == ['float32', 'mixed precision', 'mixed precision + XLA']
    assert [v[1:] for v in speed._model_variants(True, every=True)] == [(False, False), (False, True), (True, False), (True, True)]
    with pytest.raises(RuntimeError):
        with speed._dtype_policy(True): raise RuntimeError('a variant failed')
    assert keras.mixed_precision.dtype_policy().name == 'float32'


def test_largest_batch_stops_at_the_first_oom():
    import tensorflow as tf
    tried = []
    def fits(b):
        tried.append(b)
        try:
            if b > 100: raise tf.errors.ResourceExhaustedError(None, None, 'OOM when allocating tensor')
            return True
        except Exception as e: return not speed._is_oom(e)
    assert speed._largest_batch(fits, 1024) == 64 and tried == [32, 64, 128]
    assert speed._largest_batch(lambda b: True, 8) == 8


def test_bench_gpu_on_a_cpu_writes_json_and_markdown_and_says_no_gpu(cache_env, tmp_path, capsys):
    import json
    out = tmp_path / 'bench_gpu'
    assert main(['bench', 'gpu', '--config', _yaml(tmp_path), '--sizes', '32', '--steps', '2', '--max-batch', '8',
                 '--batch-size', '8', '--backbone', 'small_cnn', '--out', str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ['bench_gpu.json', 'bench_gpu.md']
    res = json.loads((out / 'bench_gpu.json').read_text())
    assert res['gpu'] is False and res['device'] == 'CPU'
    assert [(v['variant'], v['images_per_s'] is None) for v in res['variants']] == [
        ('float32', False), ('float32 + XLA', True), ('mixed precision', True), ('mixed precision + XLA', True)]
    (feed,) = res['feeds']
    assert (feed['size'], feed['batch_size'], feed['mixed_precision']) == (32, 8, False)
    assert feed['constant_images_per_s'] > 0 and feed['pipeline_images_per_s'] > 0
    md = (out / 'bench_gpu.md').read_text()
    assert 'No GPU was found' in md and '| 32 | 8 | float32 + XLA | not run: no GPU |' in md
    assert md.strip() in capsys.readouterr().out


def test_bench_gpu_refuses_a_file_as_its_folder(tmp_path, capsys):
    (tmp_path / 'f').write_text('x')
    assert main(['bench', 'gpu', '--sizes', '32', '--out', str(tmp_path / 'f')]) == 2
    assert 'is a file, not a folder' in capsys.readouterr().err


def _yaml(tmp_path) -> str:
    import yaml
    path = tmp_path / 'tiny.yaml'; path.write_text(yaml.safe_dump(TINY_PIPE)); return str(path)
