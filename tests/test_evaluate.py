"""Integration tests for breast_cancer.evaluate and the modules it builds on (metrics, audit): metrics on Predictions
tables from disk, the real bundled images, the bootstrap against scikit-learn replicate by replicate, the names that
moved still importing from their old module, and data that cannot inject markup into the model card."""
import numpy as np, pandas as pd, pytest
from sklearn import metrics as skm

from breast_cancer import evaluate as ev, metrics as bm, audit
from breast_cancer.core import DataError, ConfigError


def _predictions(manifest: pd.DataFrame, seed: int = 0, single_stage: bool = False) -> pd.DataFrame:
    "A Predictions table for a manifest, with probabilities that are informative but imperfect."
    rng = np.random.default_rng(seed)
    lab = manifest['label'].to_numpy()
    pa = np.clip(np.where(lab != 'normal', .7, .3) + rng.normal(0, .25, len(lab)), 0, 1)
    pm = np.clip(np.where(lab == 'malignant', .65, .35) + rng.normal(0, .25, len(lab)), 0, 1)
    if single_stage: pa = np.full(len(lab), np.nan)
    pred = np.where(pm >= .5, 'malignant', 'benign')
    if not single_stage: pred = np.where(pa < .5, 'normal', pred)
    return pd.DataFrame({'dataset': manifest['dataset'], 'image_id': manifest['image_id'], 'image_path': manifest['image_path'],
                         'patient_id': manifest['patient_id'], 'split': 'test', 'fold': 0, 'true_label': lab,
                         'p_abnormal': pa, 'p_malignant': pm, 'pred_label': pred})


@pytest.fixture(scope='module')
def mias_predictions(mias_sample):
    from breast_cancer.data import load_mias
    return _predictions(load_mias(mias_sample))


def test_bootstrap_replicates_equal_sklearn_with_weights():
    "Each vectorised replicate equals scikit-learn on the same resampled images (as sample weights)."
    rng = np.random.default_rng(3)
    g = rng.integers(0, 40, 300); y = rng.random(300) < .4; s = np.round(rng.random(300) * .6 + y * .3, 2)
    pred = s >= .5
    codes, G = bm.group_codes(g, len(y))
    W = next(bm.bootstrap_weights(G, 5, seed=1))
    rc = bm._RankCurves(y, s, codes, G)
    auc, ap = rc.auc(*rc.weighted(W)), rc.average_precision(*rc.weighted(W))
    per = np.zeros((G, 4))
    for j, m in enumerate([y & pred, ~y & pred, y & ~pred, ~y & ~pred]): per[:, j] = np.bincount(codes[m], minlength=G)
    thr = bm._binary_from_counts(*(W @ per).T)
    for b in range(5):
        w = W[b, codes]
        assert auc[b] == pytest.approx(skm.roc_auc_score(y, s, sample_weight=w), abs=1e-12)
        assert ap[b] == pytest.approx(skm.average_precision_score(y, s, sample_weight=w), abs=1e-12)
        assert thr['sensitivity'][b] == pytest.approx(skm.recall_score(y, pred, sample_weight=w), abs=1e-12)
        assert thr['precision'][b] == pytest.approx(skm.precision_score(y, pred, sample_weight=w, zero_division=0), abs=1e-12)
        assert thr['f1'][b] == pytest.approx(skm.f1_score(y, pred, sample_weight=w, zero_division=0), abs=1e-12)
        assert thr['balanced_accuracy'][b] == pytest.approx(skm.balanced_accuracy_score(y, pred, sample_weight=w), abs=1e-12)


def test_skipped_replicates_are_counted():
    """3 patients, 'a' the only positive: a replicate lacks a positive when 'a' is never drawn ((2/3)^3) and lacks a
    negative when only 'a' is drawn ((1/3)^3): 9/27 = 1/3 of the replicates are skipped."""
    y = np.array([1, 1, 0, 0, 0, 0]); s = np.array([.9, .8, .3, .4, .2, .6]); g = ['a', 'a', 'b', 'b', 'c', 'c']
    m = bm.binary_metrics(y, s, groups=g, n_boot=3000, seed=0)
    assert m.n_skipped == pytest.approx(3000 / 3, rel=0.08)
    assert m.table['lower'].notna().all()


def test_cascade_metrics_from_csv(tmp_path, mias_predictions):
    path = tmp_path / 'predictions.csv'
    mias_predictions.to_csv(path, index=False)
    res = ev.cascade_metrics(path, n_boot=200)
    assert list(res.parts()) == ['stage1', 'stage2', 'end_to_end', 'three_class']
    assert res.stage1.n_images == 322 and res.stage1.n_groups == 161
    assert res.stage2.n_images == (mias_predictions.true_label != 'normal').sum()
    three = res.three_class.confusion
    assert three.to_numpy().sum() == 322 and list(three.index) == ['normal', 'benign', 'malignant']
    assert res.summary().shape == (3, 4)
    bad = mias_predictions.drop(columns='p_malignant'); bad.to_csv(path, index=False)
    with pytest.raises(DataError, match='p_malignant'): ev.cascade_metrics(path)


def test_single_stage_breakhis_patient_level(breakhis_sample, tmp_path):
    "Single-stage (histopathology) predictions on the real BreakHis sample: NA p_abnormal survives a CSV round trip."
    from breast_cancer.histo import load_breakhis
    manifest = load_breakhis(breakhis_sample)
    preds = _predictions(manifest, single_stage=True)
    preds.to_csv(tmp_path / 'p.csv', index=False)
    res = ev.cascade_metrics(tmp_path / 'p.csv', n_boot=200)
    assert res.single_stage and list(res.parts()) == ['stage2'] and res.stage2.n_images == 12
    pl = ev.patient_level(preds, 'p_malignant', n_boot=200)
    assert len(pl.patients) == manifest['patient_id'].nunique()
    five = pl.patients.set_index('patient_id').loc['14-25197']        # the patient with 4 images (4 magnifications)
    assert five['n_images'] == 4 and five['score'] == pytest.approx(preds.loc[preds.patient_id == '14-25197', 'p_malignant'].mean())
    assert not pl.patients['mixed'].any()
    rr = ev.recognition_rate(preds, n_boot=200)
    per = preds.assign(ok=preds.pred_label == preds.true_label).groupby('patient_id')['ok'].mean()
    assert rr['recognition_rate'] == pytest.approx(per.mean())


def _band(ax):
    "The (x, lower, upper) of the CI band that fill_between drew into ax."
    from matplotlib.collections import PolyCollection
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 1, ax.collections
    v = bands[0].get_paths()[0].vertices
    x = np.unique(np.round(v[:, 0], 9))
    lo = np.array([v[np.isclose(v[:, 0], xi), 1].min() for xi in x]); hi = np.array([v[np.isclose(v[:, 0], xi), 1].max() for xi in x])
    return x, lo, hi


def test_figures_on_real_images(mias_predictions):
    "The artists drawn: panels, images, labels, the curves sklearn computes, and CI bands around them."
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve
    p = mias_predictions; y, s = p.true_label != 'normal', p.p_abnormal
    wrong = p[p.pred_label != p.true_label]
    from breast_cancer.explain import plot_misclassified        # the gallery lives with the explanations
    fig = plot_misclassified(p, n=4)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 4 and f'4 of {len(wrong)} ({len(p)} images)' in fig._suptitle.get_text()
    for ax in shown:                                             # each panel is a misclassified image
        image_id, truth = ax.get_title().split('\n')[:2]
        t, pr = truth.replace('true ', '').split(' · pred ')
        assert t != pr and image_id in set(wrong.image_id)
    m = bm.binary_metrics(y, s, groups=p.patient_id, n_boot=100)
    fig = ev.plot_confusion(m)
    assert [(a.get_title(), a.get_xlabel(), a.get_ylabel()) for a in fig.axes] == [('counts', 'predicted', 'true'), ('% of true class', 'predicted', 'true')]
    assert sum(int(t.get_text()) for t in fig.axes[0].texts) == len(p)              # the counts add up to every image
    fig = ev.plot_roc(y, s, groups=p.patient_id, n_boot=50)
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ('1 − specificity (FPR)', 'sensitivity (TPR)')
    fpr, tpr, _ = skm.roc_curve(y, s)
    np.testing.assert_allclose(ax.lines[0].get_xdata(), fpr); np.testing.assert_allclose(ax.lines[0].get_ydata(), tpr)
    assert f'AUC {skm.roc_auc_score(y, s):.3f}' in ax.get_legend().get_texts()[0].get_text()
    x, lo, hi = _band(ax)
    curve = np.interp(x, fpr, tpr)
    assert np.all(lo <= hi + 1e-9) and np.mean((lo - 1e-9 <= curve) & (curve <= hi + 1e-9)) >= 0.9   # the band is around the curve
    assert np.median(hi - lo) > 0.02                                                                 # and it has a width
    fig = ev.plot_pr(y, s, groups=p.patient_id, n_boot=50)
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ('recall (sensitivity)', 'precision')
    prec, rec, _ = skm.precision_recall_curve(y, s)
    np.testing.assert_allclose(ax.lines[0].get_xdata(), rec); np.testing.assert_allclose(ax.lines[0].get_ydata(), prec)
    assert ax.lines[1].get_ydata()[0] == pytest.approx(y.mean())                                   # the prevalence line
    x, lo, hi = _band(ax)
    assert np.all(lo <= hi + 1e-9) and np.median(hi - lo) > 0.02
    fig = ev.plot_calibration(y, s, n_bins=10)
    ax, axh = fig.axes
    frac, mean = calibration_curve(y, s, n_bins=10, strategy='quantile')
    np.testing.assert_allclose(ax.lines[1].get_xdata(), mean); np.testing.assert_allclose(ax.lines[1].get_ydata(), frac)
    assert sum(r.get_height() for r in axh.patches) == len(p) and axh.get_xlabel() == 'predicted probability'
    from breast_cancer.wavelet import WaveletPreprocessor
    from breast_cancer.data import load_mias
    fig = ev.plot_wavelet_examples(load_mias().head(10), WaveletPreprocessor(), n=2)
    assert len(fig.axes) == 6 and sum(bool(a.images) for a in fig.axes) == 6
    plt.close('all')


def test_plot_history_from_run_dir(tmp_path):
    run = tmp_path / 'run'; (run / 'stage1').mkdir(parents=True)
    pd.DataFrame({'epoch': [0, 1, 2], 'loss': [.9, .6, .5], 'val_loss': [1., .8, .7], 'accuracy': [.5, .7, .8],
                  'val_accuracy': [.5, .6, .65]}).to_csv(run / 'stage1' / 'history.csv', index=False)
    fig = ev.plot_history(run)
    assert [a.get_title() for a in fig.axes] == ['loss', 'accuracy']
    assert list(fig.axes[0].lines[0].get_xdata()) == [1, 2, 3]
    (run / 'stage1' / 'history.csv').write_text('')
    with pytest.raises(DataError, match='history'): ev.plot_history(run)


def test_evaluate_run_uses_saved_thresholds(tmp_path, mias_predictions):
    "What the CLI calls: a run folder's predictions, evaluated with the thresholds the cascade saved; outputs written atomically."
    run = tmp_path / 'run'; (run / 'cascade').mkdir(parents=True)
    mias_predictions.to_csv(run / 'oof_predictions.csv', index=False)
    with pytest.raises(DataError, match='predictions.csv not found'): ev.evaluate_run(run, n_boot=50)
    res = ev.evaluate_run(run, 'oof', n_boot=50)                            # no saved cascade: thresholds 0.5
    y = mias_predictions.true_label != 'normal'
    assert res.stage1['sensitivity'] == pytest.approx(((mias_predictions.p_abnormal >= .5) & y).sum() / y.sum())
    (run / 'cascade' / 'cascade.json').write_text('{"threshold1": 0.3, "threshold2": 0.7}')
    res = ev.evaluate_run(run, 'oof_predictions.csv', n_boot=50)            # the file name still works
    assert res.stage1['sensitivity'] == pytest.approx(((mias_predictions.p_abnormal >= .3) & y).sum() / y.sum())
    table = pd.read_csv(run / 'oof_metrics.csv')
    assert set(table['part']) == {'stage1', 'stage2', 'end_to_end', 'three_class'}
    assert 'stage 1 0.300, stage 2 0.700' in (run / 'oof_metrics.md').read_text()
    assert not [p for p in run.iterdir() if p.name.endswith('.tmp')]
    (run / 'cascade' / 'cascade.json').write_text('{broken')
    with pytest.raises(DataError, match='cascade.json: not a readable JSON file'): ev.evaluate_run(run, 'oof', n_boot=50)


def test_clustered_delong_matches_patient_bootstrap():
    rng = np.random.default_rng(5)
    pid = np.repeat(np.arange(80), 5); y = (rng.random(80) < .5)[pid]
    u, v = rng.normal(size=80)[pid], rng.normal(size=80)[pid]          # patient effects, different for the two models
    a, b = y + u + .3 * rng.normal(size=400), .7 * y + v + .3 * rng.normal(size=400)
    dl, bs, naive = (bm.compare_auc(y, a, b, pid), bm.compare_auc(y, a, b, pid, method='bootstrap'), bm.compare_auc(y, a, b))
    assert dl.upper - dl.lower == pytest.approx(bs.upper - bs.lower, rel=0.2)
    assert naive.upper - naive.lower < 0.75 * (dl.upper - dl.lower)
    assert dl.delta == pytest.approx(skm.roc_auc_score(y, a) - skm.roc_auc_score(y, b))


def test_moved_names_import_from_their_old_modules():
    "Every name that left evaluate (for metrics or audit) or cascade (choose_threshold) is the same object at its old address."
    from breast_cancer import cascade, explain
    moved = {bm: ['BINARY_METRICS', 'MIN_PATIENTS', 'MIN_PER_CLASS', 'AGGREGATIONS', 'AUCComparison', 'Metrics', 'binary_metrics',
                  'bootstrap_weights', 'compare_auc', 'degenerate_interval', 'delong_covariance', 'metrics_table',
                  'multiclass_metrics', 'sample_size_note'],
             audit: ['NEAR_DUPLICATE_BITS', 'HASH_SIZE', 'SplitAudit', 'audit_html', 'audit_split', 'hash_distances', 'perceptual_hashes']}
    for mod, names in moved.items():
        for name in names:
            assert getattr(ev, name) is getattr(mod, name) and name in ev.__all__, name
    assert cascade.choose_threshold is bm.choose_threshold and 'choose_threshold' in cascade.__all__
    assert ev.grad_cam is explain.grad_cam                                   # later modules: lazily, through core.moved_names
    assert ev.plot_misclassified is explain.plot_misclassified
    with pytest.raises(AttributeError, match="no attribute 'nope'"): ev.nope


def test_metrics_imports_no_tensorflow_keras_or_matplotlib():
    "metrics is NumPy, SciPy and scikit-learn only: importing it (in a fresh process) loads no deep-learning or plotting library."
    import subprocess, sys
    code = ("import sys, breast_cancer.metrics, breast_cancer.audit; "
            "print(sorted(m for m in ('tensorflow', 'keras', 'matplotlib', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    assert out == '[]', out


def test_model_card_escapes_values_from_data(tmp_path, mias_predictions):
    "A subgroup value or image id from a CSV reaches the model card's Markdown (and nbconvert's HTML) as text, never as markup."
    run = tmp_path / 'run'; (run / 'cascade').mkdir(parents=True)
    evil = '<svg onload=alert(1)>'
    mias_predictions.to_csv(run / 'predictions.csv', index=False)
    split = mias_predictions[['image_id', 'patient_id']].assign(density=np.where(np.arange(len(mias_predictions)) % 2, evil, 'fatty|dense'))
    split.to_csv(run / 'split.csv', index=False)
    card = ev.model_card(run, n_boot=20)
    assert '<svg' not in card and '| density | &lt;svg onload=alert(1)&gt; |' in card
    assert '| density | fatty&#124;dense |' in card                   # a pipe in a value does not split the cell
    leak = audit.SplitAudit(pd.DataFrame(), pd.DataFrame(), pd.DataFrame({'image_a': [evil], 'split_a': ['train'], 'image_b': ['b'],
                            'split_b': ['test'], 'distance': [3], 'same_patient': [False]}), n_images=2)
    assert '<svg' not in leak._repr_markdown_() and '&lt;svg onload=alert(1)&gt;' in leak._repr_markdown_()


def test_audit_reports_a_fifo_instead_of_reading_it(tmp_path, mias_sample):
    """A FIFO (or a folder) given as an image path is named in a DataError and never opened: reading one would wait forever.
    Run in a child process with a time limit, so that a regression fails instead of hanging the suite."""
    import os, subprocess, sys
    os.mkfifo(fifo := tmp_path / 'film.pgm')
    code = f"""
from breast_cancer.audit import audit_split, _file_digest
from breast_cancer.core import DataError
from breast_cancer.data import load_mias, patient_split
m = patient_split(load_mias({str(mias_sample)!r}).head(12), test_size=0.3, val_size=0.2, seed=0)
m.loc[3, 'image_path'] = {str(fifo)!r}
print('digest', _file_digest({str(fifo)!r}), _file_digest({str(tmp_path)!r}))
try: audit_split(m)
except DataError as e: print('refused:', e)
"""
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert 'digest None None' in out.stdout, out.stdout + out.stderr
    assert f"{fifo} is a FIFO (named pipe)" in out.stdout and 'nothing was read' in out.stdout, out.stdout + out.stderr


def test_repeated_prediction_rows_are_refused(tmp_path, mias_predictions):
    "A predictions file with a row twice would count that image twice: evaluation refuses it, naming the file and the id."
    run = tmp_path / 'run'; run.mkdir()
    p = pd.concat([mias_predictions, mias_predictions.iloc[[5]]], ignore_index=True)
    p.to_csv(run / 'predictions.csv', index=False)
    with pytest.raises(DataError, match=rf"predictions file {run}/predictions.csv: 1 repeated row\(s\) of image_id \['{mias_predictions.image_id[5]}'\]"):
        ev.evaluate_run(run, n_boot=20)
    with pytest.raises(DataError, match='predictions table: 1 repeated row'): ev.cascade_metrics(p, n_boot=20)


def test_broken_predictions_file_is_named(tmp_path):
    (bad := tmp_path / 'predictions.csv').write_bytes(b'\xff\xfe\x00\x01"unclosed,\n')
    with pytest.raises(DataError, match=f'predictions file {bad} cannot be read'): ev.validate_predictions(bad)
