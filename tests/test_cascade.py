"""Integration tests of breast_cascade.cascade: the two-stage cascade end to end on the bundled sample (train, save,
load, predict three-class labels from files), thresholds that never see test rows, out-of-fold cross-validation,
single-stage (binary) mode and the run folder of run_from_config. Tiny: 32 px, 1-2 steps, tiny stand-in models
except for one run through the real ResNet-50 builder."""
import json, os
from pathlib import Path
import numpy as np, pandas as pd, pytest

keras = pytest.importorskip('keras')
from breast_cancer.core import ConfigError, DataError, seed_everything
from breast_cancer import data, train as T
from breast_cancer import cascade as C

TINY = {'name': 'tiny', 'data': {'image_size': 32, 'val_size': 0.2, 'test_size': 0.2, 'max_images': 60, 'folds': 2},
        'wavelet': None, 'model': {'weights': None},
        'train': {'epochs': 1, 'batch_size': 8, 'steps_per_epoch': 2, 'validation_steps': 1}}
PRED_COLUMNS = ['dataset', 'image_id', 'image_path', 'patient_id', 'split', 'fold', 'true_label', 'p_abnormal',
                'p_malignant', 'pred_label']


def tiny_build(config):
    "Stand-in for build_stage: a small conv net with the model contract (float32 [0, 1] in, one sigmoid out)."
    c = T.load_config(config)
    x = inp = keras.Input((c.data.image_size, c.data.image_size, c.data.channels))
    x = keras.layers.Conv2D(4, 3, strides=2, activation='relu')(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(1, activation='sigmoid')(x))


@pytest.fixture(scope='module', autouse=True)
def cache_env(isolated_dirs):
    return isolated_dirs


@pytest.fixture(scope='module')
def manifest():
    c = T.load_config(TINY)
    return T.cache_manifest(T.ensure_split(T.load_manifest(c), c), c, progress=False)


@pytest.fixture(scope='module')
def fitted(manifest, tmp_path_factory):
    run = tmp_path_factory.mktemp('fitted')
    cas = C.Cascade.from_config(TINY, tiny_build).fit(manifest, TINY, run)
    return cas, run


def test_end_to_end_save_load_predict_files(fitted, manifest, tmp_path, mias_sample):
    cas, run = fitted
    assert (run/'stage1'/'model.keras').exists() and (run/'stage2'/'model.keras').exists()
    cas.save(tmp_path/'cascade')
    assert sorted(p.name for p in (tmp_path/'cascade').iterdir()) == ['cascade.json', 'config.yaml', 'stage1.keras', 'stage2.keras']
    back = C.Cascade.load(tmp_path/'cascade')
    assert (back.threshold1, back.threshold2, back.config) == (cas.threshold1, cas.threshold2, cas.config)
    test = manifest[manifest.split == 'test']
    a, b = cas.predict(test), back.predict(test)
    np.testing.assert_allclose(a[['p_abnormal', 'p_malignant']], b[['p_abnormal', 'p_malignant']], atol=1e-6)
    assert set(a['label']) <= set(data.LABELS) and list(a['image_id']) == list(test['image_id'])
    # labels follow the thresholds
    exp = np.where(a.p_abnormal < cas.threshold1, 'normal', np.where(a.p_malignant >= cas.threshold2, 'malignant', 'benign'))
    assert list(a['label']) == list(exp)
    # files (PNG, the same pixels as 8-bit PGM and as DICOM) go through the same preprocessing as the cache
    src = Path(test['image_path'].iloc[0]); img = data.read_image(src)
    pgm = data.write_pgm(tmp_path/'x.pgm', np.round(img*255).astype(np.uint8))
    dcm = data.write_dicom(tmp_path/'x.dcm', np.round(img*255).astype(np.uint16))
    out = C.predict_files(tmp_path/'cascade', [src, pgm, dcm])
    assert [set(d) for d in out] == [{'path', 'p_abnormal', 'p_malignant', 'label'}]*3
    assert abs(out[0]['p_abnormal'] - a['p_abnormal'].iloc[0]) < 1e-5   # file path == manifest row
    assert abs(out[1]['p_abnormal'] - out[0]['p_abnormal']) < 1e-3          # PGM of the same pixels: same answer
    assert out[2]['label'] in data.LABELS and 0 <= out[2]['p_malignant'] <= 1   # DICOM (min-max windowed) is read too
    arr = back.predict([img])                                           # an array as read_image gives it
    assert abs(arr['p_abnormal'].iloc[0] - out[0]['p_abnormal']) < 1e-5
    with pytest.raises(DataError, match='not found'): C.predict_files(tmp_path/'cascade', [tmp_path/'nope.png'])
    (tmp_path/'empty').mkdir()
    with pytest.raises(DataError, match='not a saved cascade'): C.Cascade.load(tmp_path/'empty')


def test_stage2_scored_apart_on_true_abnormal_and_end_to_end(fitted, manifest):
    cas, _ = fitted
    test = manifest[manifest.split == 'test']
    pred = C.predictions_frame(cas, test)
    assert list(pred.columns[:10]) == PRED_COLUMNS and (pred['split'] == 'test').all()
    s = C.summarize_predictions(pred)
    assert list(s.index) == ['stage1', 'stage2_on_true_abnormal', 'end_to_end']
    assert s.loc['stage2_on_true_abnormal', 'n'] == (test.label != 'normal').sum()
    assert s.loc['end_to_end', 'n'] == len(test)
    ab = pred[pred.true_label != 'normal']
    assert s.loc['stage2_on_true_abnormal', 'accuracy'] == pytest.approx(((ab.stage2_label == 'malignant') == (ab.true_label == 'malignant')).mean())


def test_thresholds_never_see_test_rows(manifest, tmp_path):
    "Poison the test rows' labels: thresholds (and the trained weights) stay exactly the same."
    clean = C.Cascade.from_config(TINY, tiny_build).fit(manifest, TINY, tmp_path/'clean')
    test = manifest.split == 'test'
    flip = {'normal': 'malignant', 'benign': 'normal', 'malignant': 'normal'}
    poisoned = manifest.copy()
    poisoned.loc[test, 'label'] = poisoned.loc[test, 'label'].map(flip)
    poisoned['abnormal'] = poisoned['label'] != 'normal'
    poisoned['malignant'] = pd.array([pd.NA if l == 'normal' else l == 'malignant' for l in poisoned['label']], dtype='boolean')
    dirty = C.Cascade.from_config(TINY, tiny_build).fit(poisoned, TINY, tmp_path/'dirty')
    assert (clean.threshold1, clean.threshold2) == (dirty.threshold1, dirty.threshold2)
    assert (clean.threshold1, clean.threshold2) != (0.5, 0.5)          # they were really chosen from data
    for a, b in zip(clean.stage1.get_weights(), dirty.stage1.get_weights()): np.testing.assert_array_equal(a, b)
    with pytest.raises(DataError, match='validation rows only'): clean.choose_thresholds(manifest)


def test_threshold_rule_sensitivity_target(manifest, fitted):
    cas, _ = fitted
    val = manifest[manifest.split == 'val']
    c = cas.config.replace(**{'thresholds.rule': 'sensitivity', 'thresholds.target_sensitivity': 1.0})
    strict = C.Cascade(cas.stage1, cas.stage2, config=c).choose_thresholds(val)
    pa, _ = strict.probabilities(val)
    assert (pa[val['abnormal'].to_numpy()] >= strict.threshold1).all()  # every abnormal validation image caught


def test_cross_validate_out_of_fold(manifest, tmp_path):
    oof = C.cross_validate(TINY, manifest.drop(columns='split'), run_dir=tmp_path, build=tiny_build)
    assert list(oof.columns[:10]) == PRED_COLUMNS
    assert sorted(oof['image_id']) == sorted(manifest['image_id'])     # every image predicted exactly once
    assert oof.groupby('patient_id')['fold'].nunique().max() == 1
    for k in range(2):  # the held-out fold's patients were never in that fold's training/validation split
        used = set(pd.read_csv(tmp_path/'cv'/f'fold{k}'/'split.csv')['patient_id'])
        assert not used & set(oof.loc[oof.fold == k, 'patient_id'])
    assert (tmp_path/'oof_predictions.csv').exists()


def test_binary_mode_breakhis(tmp_path, breakhis_sample):
    cfg = {**TINY, 'name': 'bh', 'task': 'binary', 'datasets': [{'name': 'breakhis', 'root': str(breakhis_sample)}],
           'data': {'image_size': 32, 'channels': 3, 'val_size': 0.25, 'test_size': 0.25},
           'train': {**TINY['train'], 'augment': {'rotation': 90, 'flip': 'both'}}}
    run = C.run_from_config(cfg, run_dir=tmp_path, build=tiny_build)
    cas = C.Cascade.load(run)
    assert cas.stage1 is None and cas.task == 'binary'
    pred = pd.read_csv(run/'predictions.csv')
    assert pred['p_abnormal'].isna().all() and set(pred['pred_label']) <= {'benign', 'malignant'}
    assert set(pred['true_label']) <= {'benign', 'malignant'}


def test_run_from_config_real_resnet50_quick(tmp_path, repo_root):
    "The shipped demo preset through the real ResNet-50 builder, in quick mode (1 epoch of 2 steps at 32 px)."
    cfg = T.load_config(repo_root/'configs'/'demo.yaml').replace(**{'data.image_size': 32, 'data.max_images': 40,
                                                                     'wavelet': None, 'train.batch_size': 4})
    run = C.run_from_config(cfg, run_dir=tmp_path, quick=True)
    for f in ('config.yaml', 'split.csv', 'metadata.json', 'predictions.csv', 'summary.csv', 'cascade/stage1.keras',
              'cascade/stage2.keras', 'stage1/history.csv', 'stage2/history.csv'):
        assert (run/f).exists(), f
    pred = pd.read_csv(run/'predictions.csv')
    split = pd.read_csv(run/'split.csv')
    assert sorted(pred['image_id']) == sorted(split.loc[split.split == 'test', 'image_id'])
    assert T.load_config(run/'config.yaml').train.epochs == 1
    res = C.predict_files(run, [pred['image_path'].iloc[0]])
    assert res[0]['label'] in data.LABELS
