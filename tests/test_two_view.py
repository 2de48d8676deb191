"""Issue 28, the two-view (CC + MLO) breast-level model: breast pairs from the CBIS-DDSM and CMMD fixture trees, a
two-view model trained through the config's compile path, saved, reloaded and predicting per breast, and the tiny
version of `bench two-view`. Tiny: 32 px, a few steps."""
import warnings
import numpy as np, pandas as pd
import pytest

from breast_cancer.config import load_config
from breast_cancer.core import DataError
from breast_cancer.data import cache_images, load_dataset, patient_split
from breast_cancer.fixtures import make_cbis_fixture, make_cmmd_fixture


def _quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore'); return fn(*a, **k)


@pytest.fixture(scope='module')
def cbis(tmp_path_factory):
    "The CBIS-DDSM fixture tree's manifest, split by patient (its official split puts P_00001 in train and test)."
    m = _quiet(load_dataset, 'cbis_ddsm', make_cbis_fixture(tmp_path_factory.mktemp('cbis')/'cbis', extra_women=4))
    return m, patient_split(m.drop(columns='split'), 0.3, 0.0, seed=0)


def test_view_pairs_on_fixture_trees(cbis, tmp_path):
    from breast_cancer import data
    official, split = cbis
    with pytest.raises(DataError, match='patient P_00001 .* has images in more than one split'): data.view_pairs(official)
    pairs = data.view_pairs(split)   # the lazy re-export from data
    assert len(pairs) == split.groupby(['patient_id', 'laterality']).ngroups and pairs['image_id'].is_unique
    by = pairs.set_index('patient_id')
    assert by.loc['P_00001', 'n_views'] == 2 and by.loc['P_00004', 'n_views'] == 1 and pd.isna(by.loc['P_00004', 'image_path_MLO'])
    assert by.loc['P_00001', 'label'] == 'malignant' and by.loc['P_00005', 'label'] == 'benign'
    assert pairs.groupby('patient_id')['split'].nunique().max() == 1
    assert set(pairs['split']) == set(split['split'])
    dropped = data.view_pairs(split, one_view='drop')
    assert (dropped['n_views'] == 2).all() and len(dropped) == (pairs['n_views'] == 2).sum()
    # a breast whose CC is benign and whose MLO malignant is malignant
    conflict = split[split['patient_id'] == 'P_00005'].assign(label=['benign', 'malignant'])
    assert data.view_pairs(conflict)['label'].tolist() == ['malignant']
    cmmd = _quiet(load_dataset, 'cmmd', make_cmmd_fixture(tmp_path/'cmmd'))
    cp = data.view_pairs(cmmd)
    assert len(cp) == 4 and (cp['n_views'] == 2).all() and cp[['image_id_CC', 'image_id_MLO']].notna().all().all()
    with pytest.raises(DataError, match="no 'laterality' column.*data.views: \\[MLO\\]"): data.view_pairs(cmmd.drop(columns='laterality'))


def test_two_view_model_trains_saves_and_predicts_per_breast(cbis, tmp_path):
    import keras
    from breast_cancer import model as bc_model, train as bc_train, twoview
    c = load_config('demo').replace(**{'data.image_size': 32, 'train.batch_size': 4, 'model.views': 'two_view', 'model.fusion': 'attention'})
    pairs = twoview.view_pairs(cache_images(cbis[1], size=32, progress=False))
    net = bc_model.two_view_from_config(c, small=True)   # the lazy re-export from model
    bc_train.compile_for_config(net, c, steps_per_epoch=2)   # the run's optimizer and CLR schedule
    hist = net.fit(twoview.make_pair_dataset(pairs, c, training=True), epochs=1, steps_per_epoch=2, verbose=0)
    assert np.isfinite(hist.history['loss']).all()
    before = twoview.predict_breasts(net, pairs, c)
    net.save(tmp_path/'two_view.keras')
    after = twoview.predict_breasts(keras.models.load_model(tmp_path/'two_view.keras'), pairs, c)
    assert len(after) == len(pairs) and set(after['unit']) == {'breast'} and after['image_id'].tolist() == pairs['image_id'].tolist()
    np.testing.assert_allclose(after['p_abnormal'], before['p_abnormal'], atol=1e-6)


def test_bench_two_view_tiny(tmp_path):
    from breast_cancer.learn import bench_two_view
    curve = bench_two_view('demo', steps=4, eval_every=2, image_size=32, batch_size=8, n_boot=50, workdir=tmp_path, log_fn=None)
    assert sorted(curve['model'].unique()) == ['single view (image)', 'single view + mean', 'two-view (attention)']
    assert curve.groupby('model')['step'].max().tolist() == [4, 4, 4]
    assert curve['test_auc'].between(0, 1).all() and (curve['lower'] <= curve['upper']).all()


def test_breast_cancer_train_two_view_stage_on_cbis_fixture(tmp_path, isolated_dirs, monkeypatch, capsys):
    "`breast-cancer train` with model.views: two_view trains the stage on breasts; the saved cascade reloads and scores per breast."
    import functools, yaml
    import breast_cancer.cascade as C
    from breast_cancer.cli import main
    from breast_cancer.evaluate import cascade_metrics, run_thresholds
    from breast_cancer.rundir import RunDir
    root = make_cbis_fixture(tmp_path/'cbis', extra_women=8)
    monkeypatch.setattr(C, 'run_from_config', functools.partial(C.run_from_config, build=C.small_stage))   # small_cnn inside the two-view model
    cfg = tmp_path/'two_view.yaml'
    cfg.write_text(yaml.safe_dump({'name': 'tv', 'task': 'binary', 'wavelet': None,
                                   'datasets': [{'name': 'cbis_ddsm', 'root': str(root), 'options': {'official_split': False}}],
                                   'data': {'image_size': 32, 'val_size': 0.25, 'test_size': 0.25},
                                   'model': {'weights': None, 'views': 'two_view', 'fusion': 'mean'},
                                   'train': {'epochs': 1, 'batch_size': 4, 'steps_per_epoch': 2, 'validation_steps': 1}}))
    assert main(['train', '--config', str(cfg), '--run-dir', str(tmp_path/'run')]) == 0
    run = RunDir(tmp_path/'run')
    pred = run.read_predictions('test')
    assert set(pred['unit']) == {'breast'}
    cas = C.Cascade.load(run.path)
    assert cas.unit == 'breast' and set(cas.stage2.input) == {'views', 'mask'}
    # every image carries its breast's score: both views of a breast agree
    by_breast = pred.merge(cbis_sides(root), on='image_id').groupby(['patient_id', 'laterality'])['p_malignant'].nunique()
    assert (by_breast == 1).all()
    again = C.predictions_frame(cas, C.load_manifest(cas.config).merge(pred[['image_id']], on='image_id').assign(split='test'))
    np.testing.assert_allclose(again.set_index('image_id').loc[pred['image_id'], 'p_malignant'], pred['p_malignant'], atol=1e-5)
    assert cascade_metrics(pred, *run_thresholds(run.path), n_boot=50).stage2.n_images == len(pred)   # evaluation reads it as any run
    # `breast-cancer predict` on files: a views table groups them into breasts; without one, a clear error
    views = pred[['image_path', 'patient_id']].merge(cbis_sides(root).merge(pred[['image_id', 'image_path']], on='image_id'), on='image_path')
    views = views.merge(_quiet(load_dataset, 'cbis_ddsm', root)[['image_path', 'view']], on='image_path')
    table = C.predict_table(run.path, pred['image_path'].tolist(), views=views[['image_path', 'patient_id', 'laterality', 'view']])
    np.testing.assert_allclose(table['p_malignant'], pred['p_malignant'], atol=1e-5)
    assert (table['breast_p_malignant'] - table['p_malignant']).abs().max() < 1e-6
    with pytest.raises(DataError, match='reads two views per breast'): C.predict_table(run.path, pred['image_path'].tolist())


def cbis_sides(root):
    m = _quiet(load_dataset, 'cbis_ddsm', root)
    return m[['image_id', 'laterality']].drop_duplicates('image_id')
