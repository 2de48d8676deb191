"""Integration tests of the report batch: papermill runs of the real templates in quick mode, HTML embedding, the index,
failure isolation and the never-overwrite-a-good-report rule. Quick mode: tiny images, 1 epoch of 2 steps, weights=None."""
import json, os
from pathlib import Path
import pandas as pd
import pytest

from breast_cancer.report import (embedded_images, execute_notebook, external_images, run_reports, _write_demo_template)

MIN_FIGURES = {'mias': 10, 'breakhis': 6, 'idc': 7}


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    "Runs and reports in a temporary folder; the image cache stays shared (it is keyed by content)."
    root = tmp_path_factory.mktemp('reports')
    old = {k: os.environ.get(k) for k in ('BREAST_CANCER_RUNS', 'MPLBACKEND')}
    os.environ['BREAST_CANCER_RUNS'] = str(root / 'runs')
    yield root
    for k, v in old.items():
        if v is None: os.environ.pop(k, None)
        else: os.environ[k] = v


@pytest.fixture(scope='module')
def idc_root(env):
    from breast_cancer.histo import make_idc_tree
    return make_idc_tree(env / 'idc', n_patients=6, patches_per_patient=12, seed=0)


@pytest.fixture(scope='module')
def batch(env, idc_root):
    "One quick batch, two jobs in parallel: mias and breakhis on the bundled samples, idc on a generated tree, cmmd missing."
    out = env / 'out'
    res = run_reports('mias,breakhis,idc,cmmd', data_root={'idc': str(idc_root), 'cmmd': str(env / 'no-such-cmmd')},
                      out_dir=out, quick=True, jobs=2, progress=False)
    return out, res


def test_batch_status(batch):
    out, res = batch
    st = dict(zip(res.dataset, res.status))
    assert st == {'mias': 'ok', 'breakhis': 'ok', 'idc': 'ok', 'cmmd': 'failed'}, res[['dataset', 'status', 'error']].to_string()
    err = res.set_index('dataset').loc['cmmd', 'error']
    assert 'no-such-cmmd does not exist' in err
    assert list(res.run_name.unique()) == ['default-quick']


@pytest.mark.parametrize('dataset', ['mias', 'breakhis', 'idc'])
def test_outputs_and_embedding(batch, dataset):
    out, _ = batch
    d = out / dataset
    for suffix in ('.ipynb', '.html', '.metrics.json', '.status.json'):
        assert (d / f'default-quick{suffix}').exists(), suffix
    assert not list(d.glob('*.tmp')), 'temporary folders left behind'
    page = (d / 'default-quick.html').read_text()
    assert external_images(page) == []
    assert embedded_images(page) >= MIN_FIGURES[dataset], embedded_images(page)
    m = json.loads((d / 'default-quick.metrics.json').read_text())
    assert m['dataset'] == dataset and m['quick'] is True
    st = m['stages']
    assert 'stage2' in st and ('stage1' in st) == (dataset == 'mias')
    for name, stage in st.items():
        if stage['status'] == 'ok' and name in ('stage1', 'stage2', 'stage2_end_to_end', 'patient'):
            for k in ('accuracy', 'specificity', 'sensitivity'):
                assert set(stage[k]) == {'value', 'lo', 'hi'}
                v = stage[k]['value']
                assert v is None or 0 <= v <= 1
    s1 = st.get('stage1')
    if s1:  # mini-MIAS: 322 images, 20% of the patients held out
        assert 40 <= s1['n'] <= 90, s1['n']
    if dataset != 'mias': assert 'patient' in st


def test_index(batch):
    out, _ = batch
    index = (out / 'index.html').read_text()
    assert 'reported (not reproduced)' in index
    assert 'mias/default-quick.html' in index and 'breakhis/default-quick.html' in index
    assert 'no-such-cmmd does not exist' in index
    assert external_images(index) == []
    summary = pd.read_csv(out / 'summary.csv')
    assert set(summary.dataset) == {'mias', 'breakhis', 'idc', 'cmmd'}
    mias1 = summary[(summary.dataset == 'mias') & summary.model.str.startswith('model 1')].iloc[0]
    assert mias1.status == 'ok' and 0 <= mias1.accuracy <= 1 and mias1.accuracy_lo <= mias1.accuracy <= mias1.accuracy_hi
    bh2 = summary[(summary.dataset == 'breakhis') & summary.model.str.startswith('model 2')].iloc[0]
    assert bh2.reported_accuracy == pytest.approx(0.947)
    md = (out / 'summary.md').read_text()
    assert 'Table 1' in md and 'Table 2' in md and '94.7%' in md


def test_failed_rerun_keeps_good_report(batch, env):
    out, _ = batch
    good = out / 'mias' / 'default-quick.html'
    before, metrics_before = good.read_bytes(), (out / 'mias' / 'default-quick.metrics.json').read_bytes()
    broken = env / 'broken.yaml'
    broken.write_text('train:\n  epochz: 3\n')
    res = run_reports('mias', configs=broken, run_name='default', out_dir=out, quick=True, progress=False)
    assert res.status[0] == 'failed' and "epochz" in res.error[0], res.error[0]
    assert good.read_bytes() == before
    assert (out / 'mias' / 'default-quick.metrics.json').read_bytes() == metrics_before
    assert (out / 'mias' / 'default-quick.failed.html').exists()
    index = (out / 'index.html').read_text()
    assert 'earlier good report' in index and 'epochz' in index
    summary = pd.read_csv(out / 'summary.csv')
    row = summary[(summary.dataset == 'mias') & summary.model.str.startswith('model 1')].iloc[0]
    assert row.status == 'failed' and pd.notna(row.accuracy)  # the earlier good numbers are still shown


def test_kernel_is_this_python(tmp_path, monkeypatch):
    "A bogus registered `python3` kernelspec must not matter: the default kernel is this interpreter."
    spec = tmp_path / 'jupyter' / 'kernels' / 'python3'
    spec.mkdir(parents=True)
    (spec / 'kernel.json').write_text(json.dumps({'argv': ['/nonexistent/python', '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
                                                  'display_name': 'bogus', 'language': 'python'}))
    monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
    monkeypatch.setenv('JUPYTER_DATA_DIR', str(tmp_path / 'jupyter'))
    demo = _write_demo_template(tmp_path / 'demo.ipynb')
    res = execute_notebook(demo, tmp_path / 'out' / 'demo', {'accuracy': 0.6}, progress=False)
    assert json.loads(Path(res['metrics']).read_text())['stages']['stage1']['accuracy']['value'] == 0.6
    with pytest.raises(Exception):  # the registered (bogus) kernel is used when asked for by name
        execute_notebook(demo, tmp_path / 'out' / 'demo2', {}, kernel_name='python3', progress=False, timeout=60)


def test_comparative_study_quick(env):
    out = env / 'cmp'
    res = run_reports('mias', template='comparative_study', out_dir=out, quick=True, progress=False)
    assert res.status[0] == 'ok', res.error[0]
    page = Path(res.html[0]).read_text()
    assert external_images(page) == [] and embedded_images(page) >= 2
    m = json.loads(Path(res.metrics[0]).read_text())
    assert set(m['backbones']) == {'resnet50', 'vgg16'}
    assert 'compare_auc' in m
