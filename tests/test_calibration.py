"""Calibration across modules (issue 27 item 2): a tiny two-stage run with `calibration: temperature` fits each stage's
temperature on validation rows only, lowers the validation ECE, chooses its thresholds on the calibrated scores, saves
the calibrators with the cascade and writes raw and calibrated probabilities. One tiny run (32 px, 2 steps) for all."""
import numpy as np, pandas as pd, pytest

from breast_cancer import cascade as C, train as T
from breast_cancer.calibrate import RAW_COLUMNS, fit_calibrator
from breast_cancer.config import load_config
from breast_cancer.metrics import choose_threshold, expected_calibration_error
from breast_cancer.rundir import RunDir

TINY = load_config({'name': 'tiny-calibrated', 'calibration': 'temperature', 'wavelet': None, 'model': {'weights': None},
                    'data': {'image_size': 32, 'val_size': 0.3, 'test_size': 0.2, 'max_images': 60},
                    'train': {'epochs': 1, 'batch_size': 8, 'steps_per_epoch': 2, 'validation_steps': 1}})


@pytest.fixture(scope='module', autouse=True)
def cache_env(isolated_dirs):
    return isolated_dirs


@pytest.fixture(scope='module')
def calibrated_run(tmp_path_factory):
    "The run folder, and every (labels, probabilities) that `fit_calibrator` was handed while the run trained."
    seen, real = [], C.fit_calibrator
    def spy(y_true, p, method='temperature'):
        seen.append((np.asarray(y_true, bool), np.asarray(p, float))); return real(y_true, p, method)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C, 'fit_calibrator', spy)
        run = C.run_from_config(TINY, run_dir=tmp_path_factory.mktemp('calibrated')/'run', build=C.small_stage)
    return RunDir(run), seen


def _val_rows(run: RunDir) -> pd.DataFrame:
    c = run.read_config()
    m = T.cache_manifest(T.ensure_split(T.load_manifest(c), c), c, progress=False)
    return m[m['split'] == 'val']


def test_temperature_fitted_on_validation_only_lowers_validation_ece(calibrated_run):
    run, seen = calibrated_run
    cas, val = C.Cascade.load(run.path), _val_rows(run)
    pa, pm = cas.probabilities(val); ab = val['malignant'].notna().to_numpy()
    truth = {'stage1': (val['abnormal'].astype(bool).to_numpy(), pa), 'stage2': (val['malignant'][ab].astype(bool).to_numpy(), pm[ab])}
    # the spy saw exactly two fits, on exactly the validation rows of each stage (their labels and raw scores), nothing else
    assert len(seen) == 2
    for (y_seen, p_seen), (stage, (y, p)) in zip(seen, truth.items()):
        assert len(p_seen) == len(p) < len(run.read_split()), stage
        np.testing.assert_array_equal(y_seen, y); np.testing.assert_allclose(p_seen, p, atol=1e-5)
    for stage, (y, p) in truth.items():
        cal = cas.calibrators[stage]
        assert cal.method == 'temperature' and cal.n == len(y)
        assert cal.temperature == pytest.approx(fit_calibrator(y, p, 'temperature').temperature, rel=1e-3)   # the val rows alone give it
        assert expected_calibration_error(y, cal.apply(p)) < expected_calibration_error(y, p), stage        # done-when: ECE falls


def test_calibrated_run_writes_raw_and_calibrated_and_thresholds_on_calibrated(calibrated_run):
    run, _ = calibrated_run
    cas, val, pred = C.Cascade.load(run.path), _val_rows(run), run.read_predictions()
    assert list(pred.columns[-2:]) == list(RAW_COLUMNS) and set(pred['split']) == {'test'}
    for stage, col in (('stage1', 'p_abnormal'), ('stage2', 'p_malignant')):
        np.testing.assert_allclose(pred[col], cas.calibrators[stage].apply(pred[f'{col}_raw']), atol=1e-6)
        assert not np.allclose(pred[col], pred[f'{col}_raw'])                                   # recalibrated for real
    pa, pm = cas.calibrate(*cas.probabilities(val)); ab = val['malignant'].notna().to_numpy()
    assert cas.threshold1 == pytest.approx(choose_threshold(val['abnormal'].astype(bool), pa), abs=1e-6)   # rule on calibrated scores
    assert cas.threshold2 == pytest.approx(choose_threshold(val['malignant'][ab].astype(bool), pm[ab]), abs=1e-6)
    assert list(pred['pred_label']) == list(C.cascade_labels(pred.p_abnormal, pred.p_malignant, cas.threshold1, cas.threshold2))
    table = C.predict_table(run.path, list(pred['image_path'][:2]))                              # new images: the same calibration
    assert list(table.columns[-2:]) == list(RAW_COLUMNS) and set(table.columns) <= set(pred.columns) | set(C.PREDICT_EXTRA)
    np.testing.assert_allclose(table['p_malignant'], pred['p_malignant'][:2], atol=1e-4)
