"""Integration tests of what a researcher publishes (issue 14): the papers' numbers beside ours in the index, sample-size
marks, the leakage audit from the command line (a leak made on purpose must be caught), TensorBoard logs read back,
`predict --out` with breast-level scores, and the model card written by `breast-cancer evaluate`."""
import io, json, re
from pathlib import Path
import numpy as np, pandas as pd, pytest
from PIL import Image

from breast_cancer import data, report, audit as au
from breast_cancer.cli import main
from breast_cancer.config import load_config

SHARED_PUBLISHED = Path(__file__).resolve().parents[1].parent / 'shared' / 'PUBLISHED_RESULTS.md'


# ---------------------------------------------------------------- published numbers
def test_published_numbers_are_the_papers():
    "Every number of the transcription is in the shipped data file, and every number of the data file is in the transcription."
    if not SHARED_PUBLISHED.exists(): pytest.skip('../shared/PUBLISHED_RESULTS.md is not present')
    table_lines = [l for l in SHARED_PUBLISHED.read_text().splitlines() if l.startswith('|')]
    printed = {float(x) for l in table_lines for x in re.findall(r'(?<![\d,])\d+\.\d+', l)}
    pub = report.published_results()
    metrics = ['accuracy', 'specificity', 'sensitivity', 'precision', 'f1', 'roc_auc', 'train_accuracy']
    ours = {float(v) for k in metrics for v in pub[k].dropna()}
    as_printed = lambda v: {round(v, 4), round(100 * v, 2)}
    anywhere = {float(x) for x in re.findall(r'(?<![\d,])\d+\.\d+', SHARED_PUBLISHED.read_text())}   # tables and prose (IDC, BreakHis)
    assert all(as_printed(v) & anywhere for v in ours), sorted(v for v in ours if not as_printed(v) & anywhere)
    assert all(p in {x for v in ours for x in as_printed(v)} for p in printed), sorted(p for p in printed if not {p, p / 100} & ours)
    text = SHARED_PUBLISHED.read_text()
    assert '0.8328' in text and report.REPORTED['stage2']['idc']['roc_auc'] == 0.8328


def _fake_report(out: Path, dataset: str, stage: dict, run='demo'):
    d = out / dataset; d.mkdir(parents=True, exist_ok=True)
    (d / f'{run}.status.json').write_text(json.dumps(dict(dataset=dataset, run_name=run, status='ok', error='')))
    (d / f'{run}.html').write_text('<html></html>')
    rec = report.metrics_record(dataset, {'stage1': stage, 'stage2': stage}, quick=True,
                                audit=dict(ok=True, summary='leakage audit of 40 images: no leak found: 0 patient(s)'))
    (d / f'{run}.metrics.json').write_text(json.dumps(rec))


def test_index_sets_published_numbers_and_sample_size_beside_ours(tmp_path):
    small = dict(accuracy=(0.6, 0.5, 0.7), specificity=(1.0, 1.0, 1.0), sensitivity=(0.5, 0.2, 0.8), n=12, n_patients=6,
                 n_positive=4, n_negative=8)
    _fake_report(tmp_path, 'mias', small)
    report.write_index(tmp_path)
    md, page = (tmp_path / 'summary.md').read_text(), (tmp_path / 'index.html').read_text()
    for s in ('98.7%', '98.41%', '98.56%',                      # cascade paper, Table 1, MIAS, as printed (not reproduced)
              '6 / 12',                                         # patients / images behind our figure
              'too few to estimate (6 patients &lt; 30, 4 positive &lt; 10, 8 negative &lt; 10)',   # Markdown cells are HTML-escaped
              r'100.0% (degenerate interval\: too few cases)',   # not shown as a plain CI (Markdown: the colon escaped)
              'All published results', 'VGG-16', 'ResNet-18 ImageNet transfer', '94.67%', '83.28%',   # every source's numbers
              'patient-level split', 'no leak found'):
        assert s in md, s
    assert 'too few to estimate' in page and 'All published results' in page and 'to be entered' not in md + page
    summary = pd.read_csv(tmp_path / 'summary.csv')
    assert summary.loc[0, 'n_patients'] == 6 and summary.loc[0, 'reported_accuracy'] == 0.987


# ---------------------------------------------------------------- leakage audit
def _augmented_copy(a, rng):
    b = np.rot90(a[:, ::-1], int(rng.integers(4)))                         # a flip and a 90° rotation
    b = np.clip(b * rng.uniform(.85, 1.15) + rng.uniform(-.05, .05) + rng.normal(0, .02, b.shape), 0, 1)
    buf = io.BytesIO(); Image.fromarray((b * 255).astype(np.uint8)).save(buf, 'JPEG', quality=75)
    return Image.open(buf)


def test_audit_catches_augmented_copies_across_train_and_test(tmp_path, isolated_dirs):
    m = data.patient_split(data.load_mias().head(40), test_size=0.3, val_size=0.2, seed=1)
    cols = ['dataset', 'image_id', 'image_path', 'patient_id', 'label', 'split']
    m[cols].to_csv(clean := tmp_path / 'clean.csv', index=False)
    assert main(['audit', '--manifest', str(clean), '--out', str(tmp_path / 'clean.html')]) == 0
    rng, rows = np.random.default_rng(3), []
    train = m[m.split == 'train'].head(3)
    for k, r in enumerate(train.itertuples()):
        _augmented_copy(data.read_image(r.image_path), rng).save(p := tmp_path / f'aug{k}.jpg')
        rows.append(dict(dataset='mias', image_id=f'aug{k}', image_path=str(p), patient_id=f'other{k}', label=r.label, split='test'))
    leaky = pd.concat([m[cols], pd.DataFrame(rows)], ignore_index=True)
    leaky.to_csv(bad := tmp_path / 'leaky.csv', index=False)
    assert main(['audit', '--manifest', str(bad), '--out', str(tmp_path / 'leaky.html')]) == 1
    audit = au.audit_split(leaky)
    assert sorted(audit.near_duplicates.image_b) == ['aug0', 'aug1', 'aug2']
    assert sorted(audit.near_duplicates.image_a) == sorted(train.image_id)
    assert (tmp_path / 'leaky.html').read_text().count('data:image/png;base64,') == 6


def test_audit_of_the_bundled_split_is_clean(isolated_dirs, repo_root, capsys):
    assert main(['audit', '--config', str(repo_root / 'configs' / 'demo.yaml')]) == 0
    out = capsys.readouterr().out
    assert 'leakage audit of 322 images: no leak found' in out and (isolated_dirs / 'runs' / 'demo' / 'audit.html').exists()


# ---------------------------------------------------------------- tracking
def test_training_writes_tensorboard_events(isolated_dirs, tmp_path):
    import keras, tensorflow as tf
    from breast_cancer import train as T
    c = load_config({'name': 'tb', 'data': {'image_size': 32, 'max_images': 40, 'val_size': 0.2, 'test_size': 0.2},
                       'wavelet': None, 'model': {'weights': None},
                       'train': {'epochs': 2, 'batch_size': 8, 'steps_per_epoch': 3, 'validation_steps': 1}})
    m = T.cache_manifest(T.ensure_split(T.load_manifest(c), c), c, progress=False)
    net = keras.Sequential([keras.Input((32, 32, 1)), keras.layers.Conv2D(2, 3, strides=2), keras.layers.GlobalAveragePooling2D(),
                            keras.layers.Dense(1, activation='sigmoid')])
    T.train(net, m, c, run_dir=tmp_path / 'run', verbose=0)
    events = sorted((tmp_path / 'run' / 'tensorboard' / 'stage1').rglob('events.out.tfevents.*'))
    assert events
    tags = {}
    for f in events:
        for e in tf.compat.v1.train.summary_iterator(str(f)):
            for v in e.summary.value: tags.setdefault((f.parent.name, v.tag), []).append(e.step)
    assert sorted(tags[('train', 'learning_rate')]) == list(range(6))   # one value per step: 2 epochs x 3 steps
    assert len(tags[('validation', 'epoch_loss')]) == 2 and ('train', 'augmented inputs') in tags


# ---------------------------------------------------------------- evaluate: model card
def test_evaluate_writes_a_model_card(tmp_path, capsys):
    rng = np.random.default_rng(0); n = 80
    label = np.array(['normal', 'benign', 'malignant'])[rng.integers(0, 3, n)]
    pred = pd.DataFrame({'dataset': 'ddsm', 'image_id': [f'i{k}' for k in range(n)], 'image_path': '', 'split': 'test', 'fold': 0,
                         'patient_id': [f'p{k // 4}' for k in range(n)], 'true_label': label,
                         'p_abnormal': np.where(label == 'normal', .3, .7) + rng.normal(0, .2, n).clip(-.29, .29),
                         'p_malignant': np.where(label == 'malignant', .6, .4) + rng.normal(0, .2, n).clip(-.39, .39)})
    pred['pred_label'] = np.where(pred.p_abnormal < .5, 'normal', np.where(pred.p_malignant >= .5, 'malignant', 'benign'))
    run = tmp_path / 'run'; run.mkdir(); pred.to_csv(run / 'predictions.csv', index=False)
    pd.DataFrame({'image_id': pred.image_id, 'patient_id': pred.patient_id, 'laterality': ['L', 'L', 'R', 'R'] * (n // 4),
                  'view': ['CC', 'MLO'] * (n // 2), 'density': rng.integers(1, 5, n)}).to_csv(run / 'split.csv', index=False)
    (run / 'config.yaml').write_text('name: card\nevaluate:\n  breast_aggregation: max\n')
    assert main(['evaluate', '--run', str(run), '--n-boot', '50']) == 0
    card = (run / 'MODEL_CARD.md').read_text()
    assert 'model card:' in capsys.readouterr().out
    for s in ('## Intended use', '## Quantitative analyses', 'views aggregated by max', '| density | 1 |', 'breast level', '## Reporting checklist'):
        assert s in card, s
    assert 'too few to estimate' in card          # density groups of ~20 images from 5 patients are marked, not dropped


# ---------------------------------------------------------------- predict --out
def test_predict_out_writes_probabilities_thresholds_and_breast_scores(isolated_dirs, tmp_path, capsys):
    import keras
    from breast_cancer import cascade as C, train as T
    tiny = {'name': 'tiny-predict', 'data': {'image_size': 32, 'val_size': 0.2, 'test_size': 0.2, 'max_images': 40},
            'wavelet': None, 'model': {'weights': None}, 'train': {'epochs': 1, 'batch_size': 8, 'steps_per_epoch': 1, 'validation_steps': 1}}
    def build(config):
        x = inp = keras.Input((32, 32, 1)); x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(2, 3)(x))
        return keras.Model(inp, keras.layers.Dense(1, activation='sigmoid')(x))
    c = load_config(tiny); m = T.cache_manifest(T.ensure_split(T.load_manifest(c), c), c, progress=False)
    cas = C.Cascade.from_config(c, build).fit(m, c, tmp_path / 'run'); cas.save(tmp_path / 'cascade')
    imgs = [str(p) for p in m.image_path[:4]]
    pd.DataFrame({'image_path': imgs, 'patient_id': ['A', 'A', 'A', 'B'], 'laterality': ['L', 'L', 'R', 'L'],
                  'view': ['CC', 'MLO', 'CC', 'CC']}).to_csv(views := tmp_path / 'views.csv', index=False)
    assert main(['predict', '--model', str(tmp_path / 'cascade'), *imgs, '--out', str(out := tmp_path / 'p.csv'), '--views', str(views)]) == 0
    err = capsys.readouterr().err
    assert f'abnormal when p_abnormal >= {cas.threshold1:.4f}' in err and f'malignant when p_malignant >= {cas.threshold2:.4f}' in err
    t = pd.read_csv(out)
    assert list(t.columns[:6]) == ['image_path', 'p_abnormal', 'p_malignant', *C.PREDICT_EXTRA[:2], 'pred_label']
    assert len(t) == 4 and (t.threshold_malignant == cas.threshold2).all()
    np.testing.assert_allclose(t.breast_p_malignant[:2], t.p_malignant[:2].mean(), rtol=1e-6)   # A-L: mean of its CC and MLO
    np.testing.assert_allclose(t.breast_p_malignant[2:], t.p_malignant[2:], rtol=1e-6)           # one-view breasts
    exp = np.where(t.p_abnormal < cas.threshold1, 'normal', np.where(t.p_malignant >= cas.threshold2, 'malignant', 'benign'))
    assert list(t.pred_label) == list(exp)


def test_mlflow_logger_logs_params_metrics_and_artifacts(tmp_path, monkeypatch):
    "tracking: mlflow, against a stand-in mlflow module (the real one is an optional extra): what reaches the run."
    import sys, types
    from breast_cancer import train as T
    calls = []
    fake = types.SimpleNamespace(**{name: (lambda name: lambda *a, **k: calls.append((name, a, k)))(name)
                                    for name in ('set_tracking_uri', 'set_experiment', 'start_run', 'log_params', 'log_metrics',
                                                 'log_artifact', 'end_run')})
    monkeypatch.setitem(sys.modules, 'mlflow', fake)
    monkeypatch.delenv('MLFLOW_TRACKING_URI', raising=False)
    c = load_config({'name': 'mlf', 'tracking': 'mlflow', 'model': {'weights': None}})
    (stage := tmp_path / 'run' / 'stage1' / 'checkpoints').mkdir(parents=True); (stage / 'best.keras').write_text('x')
    cbs = T.tracking_callbacks(c, tmp_path / 'run', 'stage1')
    assert [type(cb).__name__ for cb in cbs] == ['TensorBoard', 'LearningRateLogger', 'MLflowLogger']
    cb = cbs[-1]; cb.on_train_begin(); cb.on_epoch_end(0, {'loss': 0.5, 'val_auc': 0.6, 'bad': float('nan')}); cb.on_train_end()
    names = [n for n, _, _ in calls]
    assert names == ['set_tracking_uri', 'set_experiment', 'start_run', 'log_params', 'log_metrics', 'log_artifact', 'end_run']
    params = calls[3][1][0]
    assert params['train.epochs'] == '20' and params['tracking'] == 'mlflow' and params['config_hash'] == c.hash()
    assert calls[4][1][0] == {'loss': 0.5, 'val_auc': 0.6} and calls[4][2] == {'step': 0}
    assert calls[0][1][0] == (tmp_path / 'mlruns').resolve().as_uri()   # runs/mlruns: one store for all runs
