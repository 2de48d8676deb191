"""Integration tests of the report batch: papermill runs of the real templates in quick mode, HTML embedding, the index,
failure isolation and the never-overwrite-a-good-report rule. Quick mode: tiny images, 1 epoch of 2 steps, weights=None."""
import json, os, re
from pathlib import Path
import numpy as np, pandas as pd
import pytest

from breast_cancer.report import (REPORTED, ReportFailed, embedded_images, execute_notebook, external_images, paper_tables,
                                  run_reports, summary_frame, _write_demo_template)


MIN_FIGURES = {'mias': 10, 'breakhis': 6, 'idc': 7}


@pytest.fixture(scope='module')
def env(isolated_dirs):
    "Runs, the image cache and reports in this module's temporary folder (the kernels inherit the variables)."
    return isolated_dirs


@pytest.fixture(scope='module')
def idc_root(env):
    from breast_cancer.fixtures import make_idc_tree
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
    assert bh2.reported_accuracy == pytest.approx(0.9467)                  # published_results.yaml, as the paper prints it
    md = (out / 'summary.md').read_text()
    assert 'Table 1' in md and 'Table 2' in md and '94.67%' in md and '98.7%' in md   # BreakHis and the cascade paper's MIAS
    assert 'too few to estimate' in md and 'leakage audit of' in md                    # sample-size marks, the audit's result


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
    stages = json.loads(Path(res['metrics']).read_text())['stages']
    assert (stages['stage1']['accuracy']['value'], stages['stage2']['accuracy']['value']) == (0.6, 0.3)
    with pytest.raises(ReportFailed, match='/nonexistent/python'):  # the registered (bogus) kernel is used when asked for by name
        execute_notebook(demo, tmp_path / 'out' / 'demo2', {}, kernel_name='python3', progress=False, timeout=60)


def test_report_stages_are_the_cascade_stages(batch):
    """metrics.json's stage 1 is normal vs abnormal on every test image, stage 2 benign vs malignant on the true abnormals:
    recomputed from the run's predictions.csv, and carried into the index as model 1 and model 2."""
    out, _ = batch
    m = json.loads((out / 'mias' / 'default-quick.metrics.json').read_text())
    pred = pd.read_csv(Path(m['run_dir']) / 'predictions.csv')
    t1, t2 = m['thresholds']['stage1'], m['thresholds']['stage2']
    abnormal = pred.true_label != 'normal'
    said_abnormal = pred.p_abnormal >= t1
    ab = pred[abnormal]
    said_malignant, malignant = ab.p_malignant >= t2, ab.true_label == 'malignant'
    s1, s2 = m['stages']['stage1'], m['stages']['stage2']
    assert (s1['n'], s2['n']) == (len(pred), int(abnormal.sum())) and s1['n'] > s2['n'] > 0
    assert s1['accuracy']['value'] == pytest.approx((said_abnormal == abnormal).mean())
    assert s1['sensitivity']['value'] == pytest.approx(said_abnormal[abnormal].mean())
    assert s1['specificity']['value'] == pytest.approx((~said_abnormal[~abnormal]).mean())
    assert s2['accuracy']['value'] == pytest.approx((said_malignant == malignant).mean())
    if malignant.any(): assert s2['sensitivity']['value'] == pytest.approx(said_malignant[malignant].mean())
    summary = pd.read_csv(out / 'summary.csv').set_index(['dataset', 'model'])
    assert summary.loc[('mias', 'model 1 (normal vs abnormal)'), 'n'] == s1['n']
    assert summary.loc[('mias', 'model 2 (benign vs malignant)'), 'n'] == s2['n']
    assert summary.loc[('mias', 'model 2 (benign vs malignant)'), 'accuracy'] == pytest.approx(s2['accuracy']['value'])


def parse_published(text: str) -> dict:
    "{(stage, dataset): {metric: fraction}} from PUBLISHED_RESULTS.md: the cascade paper's Tables 1-2, BreakHis and IDC."
    out, names = {}, {'MIAS': 'mias', 'DDSM': 'ddsm', 'CBIS-DDSM': 'cbis_ddsm'}
    cascade = text.split('## Wavelet + ResNet-50 two-stage cascade', 1)[1].split('\n## ', 1)[0]
    for stage, part in (('stage1', cascade.split('Table 1', 1)[1].split('Table 2', 1)[0]), ('stage2', cascade.split('Table 2', 1)[1])):
        for ds, acc, spec, sens in re.findall(r'^\| *([A-Z-]+) *\| *([\d.]+) *\| *([\d.]+) *\| *([\d.]+) *\|$', part, re.M):
            out[(stage, names[ds])] = dict(accuracy=float(acc) / 100, specificity=float(spec) / 100, sensitivity=float(sens) / 100)
    breakhis = text.split('## BreakHis', 1)[1].split('\n## ', 1)[0]
    out[('stage2', 'breakhis')] = dict(accuracy=float(re.search(r'accuracy (0\.\d+)', breakhis)[1]))
    idc = text.split('## IDC', 1)[1].split('\n## ', 1)[0]
    out[('stage2', 'idc')] = dict(accuracy=float(re.search(r'accuracy ([\d.]+)% on', idc)[1]) / 100,
                                  roc_auc=float(re.search(r'ROC AUC (0\.\d+)', idc)[1]))
    return out


@pytest.fixture(scope='module')
def published(published_results_md):
    "The published numbers, read from ../shared/PUBLISHED_RESULTS.md (skip without it)."
    pub = parse_published(published_results_md.read_text())
    assert pub[('stage1', 'mias')] == pytest.approx(dict(accuracy=.987, specificity=.9841, sensitivity=.9856))  # the parser works
    return pub


def _decimals(v: float) -> int:
    "How many decimals a number was written with (0.947 -> 3)."
    return next(d for d in range(1, 9) if abs(round(v, d) - v) < 1e-12)


def _printed(v: float) -> str:
    "A published fraction as a percentage with the decimals the paper printed (0.9841 -> '98.41%', 0.88 -> '88%')."
    return f'{100 * v:.{max(_decimals(v) - 2, 0)}f}%'


MODELS = {'stage1': 'model 1 (normal vs abnormal)', 'stage2': 'model 2 (benign vs malignant)'}


def shown_published(published) -> list:
    """Every reported number the summary and paper tables show, checked to be the published one (to the decimals it
    was entered with) in the right model's row; returns (stage, dataset, metric, value) of those compared."""
    reports = [dict(dataset=d, run_name='r', status='ok', good_metrics={'stages': {'stage1': {}, 'stage2': {}}})
               for d in sorted({d for _, d in published})]
    summary = summary_frame(reports).set_index(['dataset', 'model'])
    tables = paper_tables(summary.reset_index())
    models, compared = MODELS, []
    for (stage, dataset), metrics in published.items():
        for k, value in metrics.items():
            shown = summary.loc[(dataset, models[stage]), f'reported_{k}']
            if pd.isna(shown): continue                                    # not entered (yet): nothing shown
            entered = round(value, _decimals(shown))                       # the published number as precisely as entered
            assert shown == pytest.approx(entered, abs=1e-9), (stage, dataset, k, shown, value)
            if k != 'roc_auc':
                row = tables[models[stage]].set_index('dataset').loc[dataset]
                assert row[f'{k} reported (not reproduced)'] == _printed(entered), (stage, dataset, k)
            compared.append((stage, dataset, k, entered))
    return compared


def test_reports_show_the_published_numbers(published):
    compared = shown_published(published)
    assert ('stage2', 'breakhis', 'accuracy') in [c[:3] for c in compared], compared   # at least one is entered


def test_batch_index_shows_the_published_numbers(published, batch):
    "The batch's own summary.csv and summary.md carry the published numbers in the same rows."
    models, compared = MODELS, shown_published(published)
    out, _ = batch
    csv = pd.read_csv(out / 'summary.csv').set_index(['dataset', 'model'])
    md = (out / 'summary.md').read_text()
    for stage, dataset, k, entered in compared:
        if (dataset, models[stage]) in csv.index and k != 'roc_auc':
            assert csv.loc[(dataset, models[stage]), f'reported_{k}'] == pytest.approx(entered, abs=1e-9), (stage, dataset, k)
            assert _printed(entered) in md


@pytest.mark.slow  # a second full papermill run (ResNet-50 and VGG16)
def test_comparative_study_quick(env):
    out = env / 'cmp'
    res = run_reports('mias', template='comparative_study', out_dir=out, quick=True, progress=False)
    assert res.status[0] == 'ok', res.error[0]
    page = Path(res.html[0]).read_text()
    assert external_images(page) == [] and embedded_images(page) >= 2
    m = json.loads(Path(res.metrics[0]).read_text())
    assert set(m['backbones']) == {'resnet50', 'vgg16'}
    assert 'compare_auc' in m


# ------------------------------------------------------------------ issue 25: hostile input, locks, kernel environment
def _tiny_notebook(path: Path, *cells: str) -> Path:
    "A template: a parameters cell, then `cells`."
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook
    params = new_code_cell("dataset = 'mias'\nconfig = None\noutput_dir = '.'\nreport_dir = '.'\nquick = False\nrun_name = 'x'\ndata_root = None",
                           metadata={'tags': ['parameters']})
    nbformat.write(new_notebook(cells=[params, *map(new_code_cell, cells)],
                                metadata={'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}}), path)
    return path


TF_NOISE = ('absl::InitializeLog', 'I0000', 'oneDNN', 'cpu_feature_guard', 'cuInit')


def test_report_kernel_starts_without_tensorflow_noise(tmp_path, monkeypatch):
    """The kernel's environment turns TensorFlow's C++ log off before anything imports TensorFlow: a template whose first
    cell imports it, run from a parent with no TF_CPP_MIN_LOG_LEVEL, renders none of its start-up lines."""
    monkeypatch.delenv('TF_CPP_MIN_LOG_LEVEL', raising=False)
    nb = _tiny_notebook(tmp_path / 'tf.ipynb', "import tensorflow as tf\nprint('sum', float(tf.constant(1.0) + 1))")
    page = Path(execute_notebook(nb, tmp_path / 'out' / 'tf', {}, progress=False)['html']).read_text()
    assert 'sum 2.0' in page
    assert not [s for s in TF_NOISE if s in page], [s for s in TF_NOISE if s in page]


def _lock_holder(folder: Path):
    "A process that holds the reports folder's lock (as a running batch does) until its stdin closes."
    import subprocess, sys
    code = ("import sys\nfrom breast_cancer.core import folder_lock\n"
            f"with folder_lock({str(folder)!r}, 'reports folder'):\n    print('held', flush=True); sys.stdin.read()")
    p = subprocess.Popen([sys.executable, '-c', code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == 'held'
    return p


def test_refused_batch_writes_no_config(tmp_path):
    "Batch B (with --set overrides) is refused while batch A holds the folder, and A's config files stay as they were."
    from breast_cancer.core import LockedError
    out = tmp_path / 'reports'
    a_cfg = out / 'configs' / 'batch-a' / 'default.yaml'; a_cfg.parent.mkdir(parents=True)
    a_cfg.write_text('seed: 1\n')                                    # what batch A's reports are reading
    before = {p: p.read_bytes() for p in out.rglob('*') if p.is_file() and p.name != '.lock'}
    holder = _lock_holder(out)
    try:
        with pytest.raises(LockedError, match='in use'):
            run_reports('mias', out_dir=out, overrides=['seed=777'], template=_write_demo_template(tmp_path / 'demo.ipynb'),
                        progress=False)
    finally:
        holder.stdin.close(); holder.wait(timeout=30)
    after = {p: p.read_bytes() for p in out.rglob('*') if p.is_file() and p.name != '.lock'}
    assert after == before, sorted(set(after) ^ set(before))


def test_overrides_go_to_the_batch_own_config(tmp_path):
    "With the lock free, the overridden config is written into configs/<batch>/ and the report reads that file."
    out = tmp_path / 'reports'
    res = run_reports('mias', out_dir=out, overrides=['seed=777'], template=_write_demo_template(tmp_path / 'demo.ipynb'),
                      run_name='demo', progress=False, index=False)
    assert res.status[0] == 'ok', res.error[0]
    cfg = Path(res.config[0])
    assert cfg.parent.parent == out / 'configs' and cfg.name == 'default.yaml' and 'seed: 777' in cfg.read_text()
    assert json.loads(Path(res.metrics[0]).read_text())['config'] == str(cfg)


def test_unwritable_reports_folder_is_named(tmp_path):
    from breast_cancer.core import ConfigError
    blocker = tmp_path / 'file'; blocker.write_text('x')
    with pytest.raises(ConfigError, match=f'reports folder {blocker}/reports cannot be created'):
        run_reports('mias', out_dir=blocker / 'reports', template=_write_demo_template(tmp_path / 'demo.ipynb'), progress=False)


HOSTILE = ['<svg onload=alert(1)>', '<img src=x>', 'a|b', '`tick`', '=cmd', '[x](javascript:alert(1))', '__init__', '![p](http://x.test/p.png)']


@pytest.fixture(scope='module')
def hostile_run(env, mias_sample):
    """A quick cascade run on a CSV dataset: 50 women of the bundled mini-MIAS split by patient, plus near-duplicate copies
    of 8 abnormal films saved under hostile image ids (each its own patient) in another split than their original."""
    from PIL import Image
    from breast_cancer.cascade import run_from_config
    from breast_cancer.config import load_config
    from breast_cancer.data import load_mias, patient_split
    from breast_cancer.io import read_image
    m = load_mias(mias_sample)
    m = patient_split(m[m.patient_id.isin(m.patient_id.unique()[:50])], test_size=0.3, val_size=0.2, seed=0)
    rows = m[['image_id', 'image_path', 'patient_id', 'label', 'split']].to_dict('records')
    rng = np.random.default_rng(0); d = env / 'hostile-data'; d.mkdir()
    for k, (bad, src) in enumerate(zip(HOSTILE, m[m.label != 'normal'].head(len(HOSTILE)).itertuples())):
        a = np.clip(read_image(src.image_path) + rng.normal(0, .01, (256, 256)), 0, 1)
        Image.fromarray((a * 255).astype(np.uint8)).save(p := d / f'copy{k}.png')
        rows.append(dict(image_id=bad, image_path=str(p), patient_id=f'copy-{k}', label=src.label,
                         split='test' if src.split == 'train' else 'train'))
    pd.DataFrame(rows).to_csv(csv := d / 'images.csv', index=False)
    cfg = load_config({'name': 'hostile', 'task': 'cascade', 'datasets': [{'name': 'csv', 'root': str(csv), 'options': {}}]})
    return run_from_config(cfg, run_dir=env / 'runs' / 'hostile', quick=True)


@pytest.fixture(scope='module')
def hostile_report(env, hostile_run):
    out = env / 'hostile-reports'
    res = run_reports('mias', out_dir=out, quick=True, run_name='hostile', progress=False,
                      parameters={'run_dir': str(hostile_run), 'learn': False})
    return out, res


def test_hostile_ids_render_as_text(hostile_report):
    "Ids from data reach the page as text: no live element, no link, no external image, and the report still renders."
    out, res = hostile_report
    assert res.status[0] == 'ok', res.error[0]
    page = Path(res.html[0]).read_text()
    m = json.loads(Path(res.metrics[0]).read_text())
    assert m['audit']['near_duplicates'] >= len(HOSTILE), m['audit']    # every hostile id went through the audit table
    import html
    assert not [bad for bad in HOSTILE if html.escape(bad, quote=False) not in page]   # ... and is shown as it is
    for live in ('<svg onload', '<img src=x>', 'href="javascript', 'src="http://x.test'):
        assert live not in page, live
    assert external_images(page) == []
    assert not [s for s in TF_NOISE if s in page]                        # a full report: no TensorFlow log


def test_report_refreshes_and_links_the_model_card(hostile_report, hostile_run):
    "The batch leaves MODEL_CARD.md in the run folder, and the page links it by a path relative to the report's folder."
    from breast_cancer.rundir import RunDir
    out, res = hostile_report
    card = RunDir(hostile_run).model_card_file
    assert card.exists() and '## Quantitative analyses' in card.read_text()
    page = Path(res.html[0]).read_text()
    links = re.findall(r'href="([^"]*MODEL_CARD\.md)"', page)
    assert links and not os.path.isabs(links[0]), links
    from urllib.parse import unquote
    assert (Path(res.html[0]).parent / unquote(links[0])).resolve() == card.resolve()


def test_corrupt_predictions_are_named(tmp_path):
    "A report on a run whose predictions.csv is cut short fails with the file's name in its error, not a KeyError of a cell."
    from breast_cancer.config import load_config
    from breast_cancer.rundir import RunDir
    run = RunDir(tmp_path / 'broken-run'); run.path.mkdir(); run.write_config(load_config('demo'))
    pred = run.predictions_file('test'); pred.write_text('dataset,image_id,image_pa\n')        # truncated while written
    res = run_reports('mias', out_dir=tmp_path / 'reports', quick=True, run_name='broken', progress=False, index=False,
                      parameters={'run_dir': str(run.path), 'learn': False})
    assert res.status[0] == 'failed' and f'predictions file {pred}' in res.error[0], res.error[0]


def test_demo_report_says_whether_the_preset_learns(env):
    """`make reports` (config demo): the page boxes the demo and quotes the recorded learning curve of the preset, backbone and
    stand-in CNN, with its number of test images and patients; the batch leaves the run's MODEL_CARD.md, linked (issue 25)."""
    out = env / 'demo-reports'
    res = run_reports('mias', configs='demo', out_dir=out, quick=True, progress=False, index=False)
    assert list(res.status) == ['ok'], res[['status', 'error']].to_string()
    page = Path(res.html[0]).read_text()
    assert 'Demo run, not a result' in page and 'Can this preset learn?' in page
    assert "resnet50 (this run's model)" in page and 'stand-in' in page and 'test images of' in page
    assert 'so its figures below stay near chance' in page
    assert re.search(r'href="[^"]*MODEL_CARD\.md"', page)
