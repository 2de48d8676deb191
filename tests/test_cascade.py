"""Integration tests of breast_cascade.cascade: the two-stage cascade end to end on the bundled sample (train, save,
load, predict three-class labels from files), thresholds that never see test rows, out-of-fold cross-validation,
single-stage (binary) mode and the run folder of run_from_config. Tiny: 32 px, 1-2 steps, tiny stand-in models
except for one run through the real ResNet-50 builder."""
import json, os, subprocess, sys
from pathlib import Path
import numpy as np, pandas as pd, pytest

import keras
from breast_cancer.core import ConfigError, DataError, seed_everything
from breast_cancer import data, train as T
from breast_cancer.config import load_config
from breast_cancer.rundir import RunDir
from breast_cancer import cascade as C

TINY_DICT = {'name': 'tiny', 'data': {'image_size': 32, 'val_size': 0.2, 'test_size': 0.2, 'max_images': 60, 'folds': 2},
        'wavelet': None, 'model': {'weights': None},
        'train': {'epochs': 1, 'batch_size': 8, 'steps_per_epoch': 2, 'validation_steps': 1}}
TINY = load_config(TINY_DICT)   # resolved once, here at the call site: library functions take a Config
PRED_COLUMNS = list(data.PREDICTION_COLUMNS)
tiny_build = C.small_stage  # the package's one stand-in network (model.small_cnn) at the config's input size


@pytest.fixture(scope='module', autouse=True)
def cache_env(isolated_dirs):
    return isolated_dirs


@pytest.fixture(scope='module')
def manifest():
    c = TINY
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
    assert set(a['pred_label']) <= set(data.LABELS) and list(a['image_id']) == list(test['image_id'])
    # labels follow the thresholds
    exp = np.where(a.p_abnormal < cas.threshold1, 'normal', np.where(a.p_malignant >= cas.threshold2, 'malignant', 'benign'))
    assert list(a['pred_label']) == list(exp)
    # files (PNG, the same pixels as 8-bit PGM and as DICOM) go through the same preprocessing as the cache
    src = Path(test['image_path'].iloc[0]); img = data.read_image(src)
    pgm = data.write_pgm(tmp_path/'x.pgm', np.round(img*255).astype(np.uint8))
    dcm = data.write_dicom(tmp_path/'x.dcm', np.round(img*255).astype(np.uint16))
    out = C.predict_files(tmp_path/'cascade', [src, pgm, dcm])
    assert [list(d) for d in out] == [['image_path', 'p_abnormal', 'p_malignant', *C.PREDICT_EXTRA[:2], 'pred_label']]*3
    assert abs(out[0]['p_abnormal'] - a['p_abnormal'].iloc[0]) < 1e-5   # file path == manifest row
    assert abs(out[1]['p_abnormal'] - out[0]['p_abnormal']) < 1e-3          # PGM of the same pixels: same answer
    assert out[2]['pred_label'] in data.LABELS and 0 <= out[2]['p_malignant'] <= 1   # DICOM (min-max windowed) is read too
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
    cfg = {**TINY_DICT, 'name': 'bh', 'task': 'binary', 'datasets': [{'name': 'breakhis', 'root': str(breakhis_sample)}],
           'data': {'image_size': 32, 'channels': 3, 'val_size': 0.25, 'test_size': 0.25},
           'train': {**TINY_DICT['train'], 'augment': {'rotation': 90, 'flip': 'both'}}}
    run = C.run_from_config(cfg, run_dir=tmp_path, build=tiny_build)   # the one cascade function that resolves a config itself
    cas = C.Cascade.load(run)
    assert cas.stage1 is None and cas.task == 'binary'
    pred = pd.read_csv(run/'predictions.csv')
    assert pred['p_abnormal'].isna().all() and set(pred['pred_label']) <= {'benign', 'malignant'}
    assert set(pred['true_label']) <= {'benign', 'malignant'}
    # the saved cascade reproduces predictions.csv from the image files (scores that vary, so a constant cannot pass)
    res = pd.DataFrame(C.predict_files(run, list(pred['image_path'])))
    assert pred['p_malignant'].std() > 1e-4
    np.testing.assert_allclose(res['p_malignant'], pred['p_malignant'], atol=1e-5)
    assert list(res['pred_label']) == list(pred['pred_label'])


@pytest.mark.slow  # the report batch in test_report.py runs the same quick ResNet-50 path
def test_run_from_config_real_resnet50_quick(tmp_path):
    "The shipped demo preset through the real ResNet-50 builder, in quick mode (1 epoch of 2 steps at 32 px)."
    cfg = load_config('demo').replace(**{'data.image_size': 32, 'data.max_images': 40,
                                        'wavelet': None, 'train.batch_size': 4})
    run = C.run_from_config(cfg, run_dir=tmp_path, quick=True)
    for f in ('config.yaml', 'split.csv', 'metadata.json', 'predictions.csv', 'summary.csv', 'cascade/stage1.keras',
              'cascade/stage2.keras', 'stage1/history.csv', 'stage2/history.csv'):
        assert (run/f).exists(), f
    pred = pd.read_csv(run/'predictions.csv')
    split = pd.read_csv(run/'split.csv')
    assert sorted(pred['image_id']) == sorted(split.loc[split.split == 'test', 'image_id'])
    assert RunDir(run).read_config().train.epochs == 1
    # the saved cascade, loaded from disk, reproduces predictions.csv on the same images (from their files)
    res = pd.DataFrame(C.predict_files(run, list(pred['image_path'])))
    np.testing.assert_allclose(res['p_abnormal'], pred['p_abnormal'], atol=1e-5)
    np.testing.assert_allclose(res['p_malignant'], pred['p_malignant'], atol=1e-5)
    assert list(res['pred_label']) == list(pred['pred_label'])


def synthetic_cascade_images(folder: Path, n_per_label: int = 40, size: int = 32, seed: int = 0) -> pd.DataFrame:
    """Images where one feature says abnormal and another malignant, each independent of the other target:
    abnormal images are very bright or very dark (normal ones mid-grey), malignant ones are striped, and so are half
    of the normal ones. A model trained for one target has nothing to extrapolate from on the other."""
    from PIL import Image
    rng = np.random.default_rng(seed); folder.mkdir(parents=True, exist_ok=True)
    stripes = np.where(np.arange(size) % 2 == 0, 0.08, -0.08)[:, None] * np.ones((1, size))
    rows = []
    for label in data.LABELS:
        for i in range(n_per_label):
            striped = label == 'malignant' or (label == 'normal' and i % 2 == 0)
            level = 0.5 if label == 'normal' else (0.15, 0.85)[(i // 2) % 2]   # benign and malignant alike
            img = level + rng.normal(0, 0.03, (size, size)) + (stripes if striped else 0)
            path = folder / f'{label}_{i:03d}.png'
            Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)
            rows.append(dict(image_id=path.stem, image_path=str(path), patient_id=path.stem, label=label))
    return data.make_manifest(rows, 'synthetic')


def test_each_stage_learns_its_own_target(tmp_path):
    "Stage 1 must score abnormal (brightness) and stage 2 malignant (stripes): swapping the two targets fails here."
    from sklearn.metrics import roc_auc_score
    from breast_cancer.model import small_cnn
    cfg = {'name': 'swap', 'seed': 0, 'wavelet': None, 'model': {'weights': None},
           'data': {'image_size': 32, 'val_size': 0.2, 'test_size': 0.25},
           'train': {'epochs': 8, 'batch_size': 16, 'optimizer': 'adam', 'class_imbalance': 'none', 'restore_best': False,
                     'augment': {'enabled': False}, 'clr': {'initial_learning_rate': 3e-3, 'maximal_learning_rate': 1e-2}}}
    manifest = synthetic_cascade_images(tmp_path / 'images')
    build = lambda c: small_cnn((32, 32, 1), blocks=2, width=8)
    cfg = load_config(cfg)
    cas = C.Cascade.from_config(cfg, build).fit(manifest, cfg, tmp_path / 'run')
    split = pd.read_csv(tmp_path / 'run' / 'split.csv', dtype={'image_id': str})
    test = C.predictions_frame(cas, manifest[manifest.image_id.isin(split.loc[split.split == 'test', 'image_id'])])
    assert len(test) >= 24 and set(test.true_label) == set(data.LABELS)
    abnormal, ab = test.true_label != 'normal', test[test.true_label != 'normal']
    auc1 = roc_auc_score(abnormal, test.p_abnormal)                          # stage 1 on its own target
    auc2 = roc_auc_score(ab.true_label == 'malignant', ab.p_malignant)      # stage 2 on its own target
    print(f'stage 1: AUC for abnormal {auc1:.2f}; stage 2: AUC for malignant {auc2:.2f}')
    assert auc1 >= 0.95 and auc2 >= 0.95, (auc1, auc2)   # 1.00 and 1.00; with the targets swapped 0.80 and 0.65


def test_library_functions_take_a_config_not_a_dict():
    "Only run_from_config resolves a config; the rest say so when handed a dict or a path."
    for call in (lambda: C.small_stage(TINY_DICT), lambda: C.quick_config('demo'), lambda: C.Cascade(config=TINY_DICT),
                 lambda: C.cross_validate(TINY_DICT), lambda: C.prepare(TINY_DICT)):
        with pytest.raises(ConfigError, match='load_config'): call()


def test_one_prediction_column_set(fitted, manifest, tmp_path, mias_sample):
    """predictions.csv, Cascade.predict, predict_table and the CLI's JSON all name their columns from one definition:
    data.PREDICTION_COLUMNS, plus cascade.PREDICT_EXTRA for what only a prediction of new images carries."""
    cas, _ = fitted
    contract, extra = list(data.PREDICTION_COLUMNS), list(C.PREDICT_EXTRA)
    test = manifest[manifest.split == 'test']
    run = RunDir(tmp_path/'run'); run.path.mkdir(); cas.save(run.cascade.path)
    run.write_predictions(C.predictions_frame(cas, test))
    assert list(run.read_predictions().columns[:len(contract)]) == contract                       # predictions.csv
    files = list(test['image_path'][:2])
    by_files, by_rows = cas.predict(files), cas.predict(test.head(2))
    assert set(by_files.columns) <= set(contract) and set(by_rows.columns) <= set(contract)       # Cascade.predict
    assert 'label' not in by_files and 'path' not in by_files
    table = C.predict_table(run.path, files)
    assert set(table.columns) <= set(contract) | set(extra) and set(extra[:2]) <= set(table.columns)
    assert [list(r) for r in C.predict_files(run.path, files)] == [list(table.columns)] * 2     # predict_files: its rows
    out = subprocess.run([sys.executable, '-c', 'import sys; from breast_cancer.cli import main; sys.exit(main())',
                          'predict', '--model', str(run.path), *files],
                         capture_output=True, text=True, env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'})
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(l) for l in out.stdout.splitlines() if l.startswith('{')]
    assert [list(r) for r in rows] == [list(table.columns)] * 2                                   # the CLI's JSON
    np.testing.assert_allclose([r['p_malignant'] for r in rows], table['p_malignant'], atol=1e-5)


# ---------------------------------------------------------------- a saved cascade's integrity (issue 25)
def _edit_stage(src: Path, dst: Path, old: bytes, new: bytes) -> Path:
    "A copy of the saved cascade `src` whose stage2.keras has `old` replaced by `new` inside its config.json."
    import shutil, zipfile
    shutil.copytree(src, dst)
    with zipfile.ZipFile(src/'stage2.keras') as z: parts = {n: z.read(n) for n in z.namelist()}
    assert old in parts['config.json']
    parts['config.json'] = parts['config.json'].replace(old, new)
    with zipfile.ZipFile(dst/'stage2.keras', 'w') as z:
        for n, b in parts.items(): z.writestr(n, b)
    return dst

def test_saved_cascade_files_are_checked(fitted, tmp_path, mias_sample):
    "An edited .keras (sigmoid -> linear), a truncated one, a broken cascade.json or a missing threshold: an error naming the file."
    import shutil
    from breast_cancer.core import file_sha256
    cas, _ = fitted
    saved = cas.save(tmp_path/'cascade')
    meta = json.loads((saved/'cascade.json').read_text())
    assert meta['sha256'] == {f: file_sha256(saved/f) for f in ('stage1.keras', 'stage2.keras')}
    linear = _edit_stage(saved, tmp_path/'linear', b'"sigmoid"', b'"linear"')
    with pytest.raises(DataError, match=r'linear/stage2.keras: its SHA-256 differs from the one .*cascade.json recorded'):
        C.Cascade.load(linear)
    shutil.copytree(saved, tmp_path/'cut'); f = tmp_path/'cut'/'stage1.keras'; f.write_bytes(f.read_bytes()[:3000])
    with pytest.raises(DataError, match='cut/stage1.keras: its SHA-256 differs'): C.Cascade.load(tmp_path/'cut')
    with pytest.raises(DataError, match='cut/stage1.keras: not a loadable Keras model'): C._load_keras(f)
    (tmp_path/'cut'/'cascade.json').write_text('{"task": "cascade", "thre')
    with pytest.raises(DataError, match='cut/cascade.json: not a readable JSON file'): C.Cascade.load(tmp_path/'cut')
    (tmp_path/'cut'/'cascade.json').write_text(json.dumps({k: v for k, v in meta.items() if k != 'threshold1'}))
    with pytest.raises(DataError, match=r'cut/cascade.json: threshold1 is missing, not a number in \[0, 1\]'): C.Cascade.load(tmp_path/'cut')
    # were the checksum forged too, the linear stage's outputs are no probabilities: predicting refuses them
    meta2 = dict(meta, sha256=dict(meta['sha256'], **{'stage2.keras': file_sha256(linear/'stage2.keras')}))
    (linear/'cascade.json').write_text(json.dumps(meta2))
    edited = C.Cascade.load(linear)
    last = edited.stage2.layers[-1]; last.set_weights([np.full_like(w, 5.0) for w in last.get_weights()])
    with pytest.raises(DataError, match=r'stage2 \(model .*\) gave outputs outside \[0, 1\]'):
        edited.predict([mias_sample/'mdb001.png'])
    # a folder where an image file belongs
    with pytest.raises(DataError, match=f'{mias_sample} is a folder, not an image file'): C.predict_table(saved, [mias_sample])
