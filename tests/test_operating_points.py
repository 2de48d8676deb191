"""Operating points and calibration (issue 27, items 2-3): sensitivity at a fixed specificity and the reverse, the
expected calibration error, their patient-bootstrap CIs in the metrics tables, and the 'specificity' threshold rule
from the config down to the cascade."""
import numpy as np, pandas as pd, pytest
from sklearn import metrics as skm

from breast_cancer import metrics as bm, evaluate as ev, report
from breast_cancer import cascade as C
from breast_cancer.config import load_config

NEW = ['sens@spec90', 'sens@spec95', 'spec@sens90', 'spec@sens95', 'brier', 'ece']


def _roc_reference(y, s, target, which):
    "Best sensitivity (specificity) among every threshold of sklearn's ROC whose specificity (sensitivity) >= target."
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    return tpr[1 - fpr >= target - 1e-9].max() if which == 'sens' else (1 - fpr)[tpr >= target - 1e-9].max()


def test_sens_at_spec_on_a_known_roc():
    # positives .9 .8 .6 .3, negatives .7 .5 .2 .1: one negative above .6, two above .3
    y, s = [1, 1, 1, 1, 0, 0, 0, 0], [.9, .8, .6, .3, .7, .5, .2, .1]
    assert bm.sens_at_spec(y, s, 0.75) == pytest.approx(0.75) and bm.sens_at_spec(y, s, 0.9) == pytest.approx(0.5)
    assert bm.spec_at_sens(y, s, 0.9) == pytest.approx(0.5) and bm.spec_at_sens(y, s, 0.7) == pytest.approx(0.75)
    assert bm.sens_at_spec([1, 1, 0, 0], [.9, .5, .5, .1], 0.9) == 0.5    # a tie moves together: no interpolation
    rng = np.random.default_rng(0)
    yr = rng.random(500) < .3; sr = np.round(rng.random(500) * .7 + yr * .3, 2)   # many ties
    for t in (0.9, 0.95):
        assert bm.sens_at_spec(yr, sr, t) == pytest.approx(_roc_reference(yr, sr, t, 'sens'), abs=1e-12)
        assert bm.spec_at_sens(yr, sr, t) == pytest.approx(_roc_reference(yr, sr, t, 'spec'), abs=1e-12)


def test_ece_near_zero_when_calibrated_and_large_when_overconfident():
    rng = np.random.default_rng(1)
    p = rng.random(20000); y = rng.random(20000) < p
    assert bm.expected_calibration_error(y, p) < 0.02
    over = np.where(p > .5, 1 - (1 - p) / 10, p / 10)
    assert bm.expected_calibration_error(y, over) > 0.15
    assert bm.expected_calibration_error([0, 1], [0., 1.]) == 0.0


def test_ci_columns_exist_in_every_metrics_table():
    rng = np.random.default_rng(2)
    g = np.repeat(np.arange(80), 3); y = (rng.random(80) < .4)[g]; s = np.clip(.3 * y + .7 * rng.random(240), 0, 1)
    m = bm.binary_metrics(y, s, groups=g, n_boot=200)
    assert list(m.table.index[-len(NEW):]) == NEW and tuple(m.table.index) == bm.BINARY_METRICS
    for k in NEW:
        lo, hi = m.interval(k)
        assert np.isfinite([lo, hi]).all() and lo <= hi, k
    assert m['sens@spec90'] == pytest.approx(bm.sens_at_spec(y, s, .9)) and m['brier'] == pytest.approx(skm.brier_score_loss(y, s))
    assert m['ece'] == pytest.approx(bm.expected_calibration_error(y, s))
    wide = bm.metrics_table({'a': m}, NEW, text=False)
    assert {(k, c) for k in NEW for c in ('value', 'lower', 'upper')} <= set(wide.columns)
    rec = report.metrics_record('mias', {'stage1': m})['stages']['stage1']
    assert all(set(rec[k]) == {'value', 'lo', 'hi'} for k in NEW)
    views = pd.DataFrame({'patient_id': g.astype(str), 'laterality': np.tile(['L', 'R', 'L'], 80), 'y': y, 'score': s})
    br = bm.aggregate_breasts(views, truth='y')   # breast level goes through the same binary_metrics
    assert set(NEW) <= set(bm.binary_metrics(br['y_true'], br['score'], groups=br['patient_id'], n_boot=50).table.index)


def test_specificity_rule_reaches_its_target_on_validation():
    rng = np.random.default_rng(3)
    y = rng.random(400) < .3; p = np.clip(.25 * y + rng.random(400) * .75, 0, 1)
    for target in (0.8, 0.9, 0.95):
        t = bm.choose_threshold(y, p, 'specificity', target_specificity=target)
        assert ((p[~y] < t).mean()) >= target
        assert (p[y] >= t).mean() == pytest.approx(bm.sens_at_spec(y, p, target))   # the best sensitivity there
    assert bm.choose_threshold(y, p, 'sensitivity', 0.9) == bm.choose_threshold(y, p, rule='sensitivity', target_sensitivity=0.9)


def test_cascade_passes_target_specificity(monkeypatch):
    rng = np.random.default_rng(4)
    n = 200; abnormal = rng.random(n) < .4; malignant = np.where(abnormal, rng.random(n) < .5, np.nan)
    pa = np.clip(.3 * abnormal + .7 * rng.random(n), 0, 1); pm = rng.random(n)
    val = pd.DataFrame({'split': 'val', 'abnormal': abnormal, 'malignant': pd.array(malignant, dtype=object)})
    val['malignant'] = val['malignant'].where(abnormal, None)
    monkeypatch.setattr(C.Cascade, 'probabilities', lambda self, m, batch_size=None: (pa, pm))
    cfg = load_config('demo').replace(**{'thresholds.rule': 'specificity', 'thresholds.target_specificity': 0.95})
    cas = C.Cascade(object(), object(), config=cfg).choose_thresholds(val)
    assert cas.threshold1 == bm.choose_threshold(abnormal, pa, 'specificity', target_specificity=0.95)
    assert (pa[~abnormal] < cas.threshold1).mean() >= 0.95


def test_roc_figure_marks_the_operating_points():
    y = np.r_[np.ones(10), np.zeros(10)]; s = np.r_[[.9] * 8, [.2] * 2, [.7] * 3, [.1] * 7]
    fig = ev.plot_roc(y, s, n_boot=0, threshold=0.5)
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(t.startswith('sens@spec90: sens 0.80') for t in texts) and any(t.startswith('sens@spec95') for t in texts)
    assert 'threshold 0.50: sens 0.80, spec 0.70' in texts
