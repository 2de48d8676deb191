"""Integration tests of breast_cancer.train: config validation, the tf.data pipeline on the bundled sample,
run folders, resume after an interruption, and determinism for a seed on CPU. Tiny: 32 px, a few steps, tiny models."""
import json, os
from pathlib import Path
import numpy as np, pandas as pd, pytest

import keras
from breast_cancer.core import ConfigError, DataError, seed_everything
from breast_cancer import data, train as T
from breast_cancer.model import small_cnn

TINY = {'name': 'tiny', 'data': {'image_size': 32, 'val_size': 0.2, 'test_size': 0.2}, 'wavelet': None,
        'model': {'weights': None},
        'train': {'epochs': 1, 'batch_size': 8, 'steps_per_epoch': 2, 'validation_steps': 1}}


def tiny_model(config=None, seed=None):
    "The package's stand-in network (model.small_cnn) at the config's input size, seeded."
    if seed is not None: seed_everything(seed)
    size = 32 if config is None else T.load_config(config).data.image_size
    return small_cnn((size, size, 1))


@pytest.fixture(scope='module')
def cache_env(isolated_dirs):
    "Private cache/runs folders for this module."
    return isolated_dirs


@pytest.fixture(scope='module')
def manifest(cache_env, mias_sample):
    "A 60-image stratified subset of the bundled MIAS sample, split by patient and cached at 32 px."
    c = T.load_config({**TINY, 'data': {**TINY['data'], 'max_images': 60}})
    m = T.ensure_split(T.load_manifest(c), c)
    return T.cache_manifest(m, c, progress=False)


# ---------------------------------------------------------------- config
def test_config_errors_name_key_and_allowed(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch' \(did you mean 'epochs'\?\)"):
        T.load_config({'train': {'epoch': 3}})
    with pytest.raises(ConfigError, match=r"unknown config key 'bogus'.*allowed keys in the top level are name, task"):
        T.load_config({'bogus': 1})
    with pytest.raises(ConfigError, match=r"'train.clr.mode': 'cosine'; allowed: one of 'triangular', 'triangular2', 'exp_range'"):
        T.load_config({'train': {'clr': {'mode': 'cosine'}}})
    with pytest.raises(ConfigError, match=r"'task': 'three'; allowed: one of 'cascade', 'binary'"):
        T.load_config({'task': 'three'})
    with pytest.raises(ConfigError, match=r"'train.batch_size': 0; allowed: an integer >= 1"):
        T.load_config({'train': {'batch_size': 0}})
    with pytest.raises(ConfigError, match=r"'train.augment.rotation': 270"):
        T.load_config({'train': {'augment': {'rotation': 270}}})
    with pytest.raises(ConfigError, match="wavelet"):
        T.load_config({'wavelet': {'wavelet': 'db4', 'levels': 4}})
    bad = tmp_path/'bad.yaml'; bad.write_text('train:\n  epochs: 2\n  optimiser: sgd\n')
    with pytest.raises(ConfigError, match=rf"'train.optimiser' \(did you mean 'optimizer'\?\).*in {bad}"):
        T.load_config(bad)
    with pytest.raises(ConfigError, match='not found'): T.load_config(tmp_path/'missing.yaml')


def test_presets_load_and_round_trip(repo_root):
    for name in ('demo', 'paper_resnet50_cascade'):
        c = T.load_config(name)
        assert T.load_config(repo_root/'breast_cancer'/'configs'/f'{name}.yaml') == c == T.load_config(f'configs/{name}.yaml')
        assert T.load_config(c.to_dict()) == c
    paper = T.load_config('paper_resnet50_cascade')
    assert (paper.model.backbone, paper.model.weights, paper.train.epochs, paper.train.batch_size) == ('resnet50', 'imagenet', 20, 32)
    assert paper.wavelet['level'] == 4 and paper.wavelet['wavelet'].startswith('db')
    demo = T.load_config('demo')
    assert demo.model.weights is None and demo.data.image_size <= 64 and demo.task == 'cascade'


def test_distribute_names_still_import_from_train():
    "The strategies, the custom step and the launcher moved to `distribute`; `train` re-exports every one of them."
    from breast_cancer import distribute as D
    assert len(D.__all__) >= 18
    for name in D.__all__: assert getattr(T, name) is getattr(D, name) and name in T.__all__, name


# ---------------------------------------------------------------- pipeline
def test_dataset_matches_cache_and_targets(manifest):
    c = T.load_config(TINY)
    val = manifest[manifest.split == 'val']
    x, y = next(iter(T.make_dataset(val, c, training=False, target='abnormal', batch_size=len(val))))
    assert x.shape == (len(val), 32, 32, 1) and float(x.numpy().min()) >= 0 and float(x.numpy().max()) <= 1
    np.testing.assert_array_equal(y.numpy(), val['abnormal'].to_numpy().astype('float32'))
    first = data.load_cached(val['cache_path'].iloc[0])      # square 32 px cache: no padding, so equal to the cache
    np.testing.assert_allclose(x.numpy()[0, ..., 0], first, atol=1e-5)
    _, y2 = next(iter(T.make_dataset(manifest, c, training=False, target='malignant', batch_size=1000)))
    assert len(y2) == int(manifest['malignant'].notna().sum())  # stage 2 sees abnormal images only


def test_augmentation_changes_images_reproducibly(manifest):
    c = T.load_config({**TINY, 'train': {**TINY['train'], 'augment': {'rotation': 90, 'flip': 'both', 'shear': 10}}})
    rows = manifest[manifest.split == 'train']
    a = next(iter(T.make_dataset(rows, c, training=True)))[0].numpy()
    b = next(iter(T.make_dataset(rows, c, training=True)))[0].numpy()
    np.testing.assert_array_equal(a, b)                       # same seed, same batch
    plain = next(iter(T.make_dataset(rows, c.replace(**{'train.augment.enabled': False}), training=True)))[0].numpy()
    assert np.abs(a - plain).mean() > 0.01                    # augmentation did something
    assert a.min() >= 0 and a.max() <= 1


def test_oversampling_balances_the_epoch(manifest):
    c = T.load_config({**TINY, 'train': {**TINY['train'], 'steps_per_epoch': None, 'class_imbalance': 'oversample',
                                         'augment': {'enabled': False}}})
    rows = manifest[manifest.split == 'train']
    ys = np.concatenate([y.numpy() for _, y in T.make_dataset(rows, c, training=True)])
    n_major = max(rows['abnormal'].sum(), (~rows['abnormal']).sum())
    assert len(ys) == 2 * n_major and ys.sum() == n_major


def test_roi_mode_crops_the_lesion(cache_env, mias_sample):
    c = T.load_config({**TINY, 'data': {'image_size': 32, 'input': 'roi', 'roi_context': 0.0}})
    m = data.load_dataset('mias')
    m = m[m.image_id == 'mdb001']                              # one large circumscribed mass
    m = T.cache_manifest(m, c, progress=False)
    full = data.load_cached(m['cache_path'].iloc[0]); les = m['lesions'].iloc[0][0]
    x = next(iter(T.make_dataset(m, c, training=False, batch_size=1)))[0].numpy()[0, ..., 0]
    r0, c0, rad = int(les['row']), int(les['col']), int(les['radius'])
    crop = full[max(0, r0-rad):r0+rad, max(0, c0-rad):c0+rad]
    assert abs(x.mean() - crop.mean()) < 0.05 and abs(x.mean() - full.mean()) > 0.05


def test_roi_mode_uses_roi_files_whole(cache_env, mias_sample):
    "CBIS-DDSM style: an ROI crop shipped as its own file (roi_path) is cached and fed whole in ROI mode."
    c = T.load_config({**TINY, 'data': {'image_size': 32, 'input': 'roi'}})
    m = data.load_dataset('mias')
    m = m[m.image_id.isin(['mdb001', 'mdb003'])].copy()
    m['roi_path'] = [str(mias_sample/'mdb002.png'), None]     # mdb001's "ROI file" is another film, for the test
    m = T.cache_manifest(m, c, progress=False)
    x = next(iter(T.make_dataset(m, c, training=False, batch_size=2)))[0].numpy()[..., 0]
    whole = data.load_cached(m['cache_path'].iloc[0])
    assert abs(x[0].mean() - np.asarray(data.read_image(mias_sample/'mdb002.png')).mean()) < 0.02
    assert whole.shape[0] == 256                                # ROI mode caches at the source resolution


# ---------------------------------------------------------------- train, run folder, resume, determinism
class StopAfter(keras.callbacks.Callback):
    "Simulate a killed run: raise at the end of epoch `n` (0-based)."
    def __init__(self, n): super().__init__(); self.n = n
    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.n: raise KeyboardInterrupt(f'killed after epoch {epoch}')


class Epochs(keras.callbacks.Callback):
    def __init__(self): super().__init__(); self.seen = []
    def on_epoch_begin(self, epoch, logs=None): self.seen.append(epoch)


def test_run_folder_contents(manifest, tmp_path):
    c = T.load_config(TINY)
    T.train(tiny_model(seed=0), manifest, c, run_dir=tmp_path, stage='stage1', verbose=0)
    for f in ('config.yaml', 'split.csv', 'metadata.json', 'stage1/model.keras', 'stage1/history.csv',
              'stage1/history.json', 'stage1/checkpoints/best.keras'):
        assert (tmp_path/f).exists(), f
    assert T.load_config(tmp_path/'config.yaml') == c
    md = json.loads((tmp_path/'metadata.json').read_text())
    assert md['manifest_hash'] == T.manifest_hash(manifest) and md['n_images'] == len(manifest)
    assert md['packages']['keras'] and md['hardware']['cpu_count'] and 'tf_devices' in md['hardware'] and 'git_commit' in md
    split = pd.read_csv(tmp_path/'split.csv')
    assert split.groupby('patient_id')['split'].nunique().max() == 1  # no patient in two splits
    hist = json.loads((tmp_path/'stage1'/'history.json').read_text())
    assert {'loss', 'val_loss', 'accuracy', 'auc', 'precision', 'sensitivity', 'specificity'} <= set(hist)


def test_resume_continues_from_the_saved_epoch(manifest, tmp_path):
    c = T.load_config({**TINY, 'train': {**TINY['train'], 'epochs': 4}})
    net = tiny_model(seed=0)
    with pytest.raises(KeyboardInterrupt):
        T.train(net, manifest, c, run_dir=tmp_path, verbose=0, callbacks=[StopAfter(1)])
    log = pd.read_csv(tmp_path/'stage1'/'history.csv')
    assert log['epoch'].tolist() == [0, 1] and not (tmp_path/'stage1'/'model.keras').exists()
    seen = Epochs()
    T.train(tiny_model(seed=1), manifest, c, run_dir=tmp_path, verbose=0, callbacks=[seen])  # a fresh process would do this
    assert seen.seen == [1, 2, 3]          # killed before epoch 1's backup (the last callback): epoch 1 runs again, not from scratch
    log = pd.read_csv(tmp_path/'stage1'/'history.csv')
    assert log['epoch'].tolist() == [0, 1, 2, 3]              # the CSV log was cut back and appended to, header once
    assert json.loads((tmp_path/'stage1'/'history.json').read_text())['epoch'] == [0, 1, 2, 3]
    assert (tmp_path/'stage1'/'model.keras').exists() and not any((tmp_path/'stage1'/'backup').glob('*'))


class EpochEndProbe(keras.callbacks.Callback):
    "At each epoch's end (after train's own callbacks, before the backup): what is on disk; raise at epoch `stop`."
    def __init__(self, stage_dir, stop=None): super().__init__(); self.sd, self.stop, self.seen = stage_dir, stop, []
    def on_epoch_end(self, epoch, logs=None):
        state = self.sd.backup_state()
        self.seen.append((epoch, None if state is None else state['epoch'], pd.read_csv(self.sd.history_csv)['epoch'].tolist(),
                          json.loads(self.sd.best_meta.read_text())['best'] <= logs['val_loss']))
        if epoch == self.stop: raise KeyboardInterrupt(f'killed at the end of epoch {epoch}, before its backup')


def test_backup_comes_last_and_a_resume_equals_an_uninterrupted_run(manifest, tmp_path):
    "Issue 25, bad 1: the backup of an epoch is written after its history row and best check; a run killed in between resumes equal."
    c = T.load_config({**TINY, 'train': {**TINY['train'], 'epochs': 3}, 'tracking': 'none'})
    whole = EpochEndProbe(T.RunDir(tmp_path/'whole').stage('stage1'))
    T.train(tiny_model(seed=0), manifest, c, run_dir=tmp_path/'whole', verbose=0, callbacks=[whole])
    # when any other callback sees epoch e end, the row of e and the best check are on disk, and the backup still says e
    assert [(e, b, rows) for e, b, rows, _ in whole.seen] == [(0, None, [0]), (1, 1, [0, 1]), (2, 2, [0, 1, 2])]
    assert all(best_checked for *_, best_checked in whole.seen)
    sd = T.RunDir(tmp_path/'killed').stage('stage1')
    with pytest.raises(KeyboardInterrupt):
        T.train(tiny_model(seed=0), manifest, c, run_dir=sd.path.parent, verbose=0, callbacks=[EpochEndProbe(sd, stop=0)])
    assert sd.backup_state() is None and pd.read_csv(sd.history_csv)['epoch'].tolist() == [0]   # row written, backup not
    T.train(tiny_model(seed=0), manifest, c, run_dir=sd.path.parent, verbose=0)
    pd.testing.assert_frame_equal(pd.read_csv(sd.history_csv), pd.read_csv(tmp_path/'whole'/'stage1'/'history.csv'))
    for a, b in zip(keras.saving.load_model(sd.model).get_weights(),
                    keras.saving.load_model(tmp_path/'whole'/'stage1'/'model.keras').get_weights()): np.testing.assert_array_equal(a, b)


def test_a_history_with_a_hole_is_refused_on_resume(manifest, tmp_path):
    "A backup past an epoch that has no row in history.csv (written by an older version) is a clear error, not a silent hole."
    c = T.load_config({**TINY, 'train': {**TINY['train'], 'epochs': 3}, 'tracking': 'none'})
    with pytest.raises(KeyboardInterrupt):
        T.train(tiny_model(seed=0), manifest, c, run_dir=tmp_path, verbose=0, callbacks=[StopAfter(1)])
    sd = T.RunDir(tmp_path).stage('stage1')
    assert sd.backup_state()['epoch'] == 1
    sd.history_csv.write_text(sd.history_csv.read_text().splitlines()[0] + '\n')      # the row of epoch 0 lost
    with pytest.raises(T.TrainingError, match=r"history.csv has no row for epoch\(s\) \[0\], yet the backup resumes at epoch 1"):
        T.train(tiny_model(seed=0), manifest, c, run_dir=tmp_path, verbose=0)


def test_stale_temporary_checkpoints_are_removed_at_the_next_start(manifest, tmp_path):
    "A worker killed while saving leaves `.best.<pid>.tmp.keras`; the next train on the folder (holding its lock) removes it."
    c = T.load_config({**TINY, 'tracking': 'none'})
    stale = tmp_path/'stage1'/'checkpoints'/'.best.99999.tmp.keras'
    stale.parent.mkdir(parents=True); stale.write_bytes(b'half a zip')
    T.train(tiny_model(seed=0), manifest, c, run_dir=tmp_path, verbose=0)
    assert not stale.exists() and not list(tmp_path.rglob('.*.tmp*'))


def test_a_stage_with_one_class_is_refused_before_training(manifest, tmp_path):
    "Issue 25: training rows of one class are refused, naming the stage, the split and the counts, before any run folder is made."
    one = manifest.assign(abnormal=np.where(manifest['split'] == 'train', True, manifest['abnormal']))
    with pytest.raises(DataError, match=r"stage1 \(abnormal\) cannot train: its 'train' split holds one class only "
                                        r"\(not abnormal: 0, abnormal: 37\)"):
        T.train(tiny_model(), one, T.load_config(TINY), run_dir=tmp_path/'run', verbose=0)
    assert not (tmp_path/'run').exists()


def test_deterministic_for_a_seed(manifest, tmp_path):
    c = T.load_config({**TINY, 'train': {**TINY['train'], 'epochs': 2}})
    runs = []
    for i, seed in enumerate((0, 0, 1)):
        cs = c.replace(seed=seed)
        h = T.train(tiny_model(seed=seed), manifest, cs, run_dir=tmp_path/f'r{i}', verbose=0)
        runs.append((h.history['loss'], keras.saving.load_model(tmp_path/f'r{i}'/'stage1'/'model.keras').get_weights()))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1]): np.testing.assert_array_equal(a, b)
    assert runs[0][0] != runs[2][0]


def test_library_functions_take_a_resolved_config(manifest, tmp_path):
    "The config is resolved once, at the call site: a dict, a path or a preset name is refused with a message that says so."
    for bad in (TINY, 'demo', tmp_path/'c.yaml'):
        with pytest.raises(ConfigError, match=r"train takes a Config, got \w+: resolve it once at the call site"):
            T.train(tiny_model(), manifest, bad, run_dir=tmp_path, verbose=0)
    for name, call in (('make_dataset', lambda: T.make_dataset(manifest, TINY)), ('init_run_dir', lambda: T.init_run_dir(TINY)),
                       ('stage_done', lambda: T.stage_done(tmp_path, 'stage1', TINY, manifest))):
        with pytest.raises(ConfigError, match=f'{name} takes a Config'): call()
    assert not list(tmp_path.iterdir())                       # refused before anything was written


def test_no_validation_rows_is_a_clear_error(manifest, tmp_path):
    c = T.load_config(TINY).replace(**{'data.val_size': 0.0})
    with pytest.raises(DataError, match=r'no validation rows for stage1 \(abnormal\): set data.val_size > 0'):
        T.train(tiny_model(), manifest.drop(columns='split'), c, run_dir=tmp_path, verbose=0)


def test_clr_schedule_from_config():
    "The config picks the model module's CLR class; step size defaults to 2 epochs of steps."
    from breast_cancer import model as M
    for mode, cls in (('triangular', M.TriangularCyclicalLearningRate), ('triangular2', M.Triangular2CyclicalLearningRate),
                      ('exp_range', M.ExponentialCyclicalLearningRate)):
        c = T.load_config({'train': {'clr': {'mode': mode, 'gamma': 0.99, 'initial_learning_rate': 0.001,
                                             'maximal_learning_rate': 0.01}}})
        s = T.clr_schedule(c, steps_per_epoch=5)
        assert type(s) is cls and s.get_config()['step_size'] == 10
        assert float(s(0)) == pytest.approx(0.001) and float(s(20)) == pytest.approx(0.001)
        if mode != 'exp_range': assert float(s(10)) == pytest.approx(0.01)   # peak after one step size
    assert T.clr_schedule(c.replace(**{'train.clr.step_size': 7}), 5).get_config()['step_size'] == 7


# ---------------------------------------------------------------- issue 12: fine-tuning, LR, class weights
# (the learnability checks moved to tests/test_bench.py with the benchmark)
class _PhaseProbe(keras.callbacks.Callback):
    "Records, per fit call, the trainable weights and the learning rate the optimizer applies at each step."
    def __init__(self): super().__init__(); self.trainable, self.lrs = [], []
    def on_train_begin(self, logs=None):
        self.trainable.append(sorted(w.path for w in self.model.trainable_weights)); self.lrs.append([])
    def on_train_batch_begin(self, batch, logs=None):
        self.lrs[-1].append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))


def test_fine_tune_config_phases_train_what_they_claim(manifest, tmp_path):
    "train.fine_tune with a local weights file: head only, then the top block without BN; the CLR reaches the optimizer."
    weights = tmp_path / 'resnet50_local.weights.h5'
    keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(weights)
    c = T.load_config({**TINY, 'model': {'weights': str(weights), 'freeze': 'base'},
                       'train': {**TINY['train'], 'epochs': 2, 'fine_tune': {'head_epochs': 1, 'unfreeze_blocks': 1, 'lr': 0.001},
                                 'clr': {'initial_learning_rate': 0.001, 'maximal_learning_rate': 0.01, 'step_size': 2}}})
    from breast_cancer.model import build_model, TriangularCyclicalLearningRate
    model = build_model('resnet50', (32, 32, 1), weights=str(weights), freeze='base')
    probe = _PhaseProbe()
    T.train(model, manifest, c, run_dir=tmp_path / 'run', callbacks=[probe], verbose=0)
    head, top = probe.trainable
    assert head == ['p_positive/bias', 'p_positive/kernel']
    assert len(top) == 2 + 6 and all(p.startswith(('conv5_block3_', 'p_positive/')) and '_bn/' not in p for p in top), top
    assert {p.split('/')[0] for p in top} == {'p_positive', 'conv5_block3_1_conv', 'conv5_block3_2_conv', 'conv5_block3_3_conv'}
    clr = TriangularCyclicalLearningRate(0.001, 0.01, 2)
    expected = [float(clr(i)) for i in range(2)]                    # a fresh optimizer each phase: steps 0, 1
    np.testing.assert_allclose(probe.lrs[0], expected, rtol=1e-6)                       # phase 1: train.clr
    np.testing.assert_allclose(probe.lrs[1], [v * 0.1 for v in expected], rtol=1e-6)    # phase 2: peak = fine_tune.lr
    hist = T.history_from_csv(tmp_path / 'run' / 'stage1' / 'history.csv')
    assert hist['epoch'] == [0, 1]                                   # one log across both phases


def test_class_weights_reach_the_loss(manifest, tmp_path):
    "With lr 0 and no BN/dropout, the logged loss equals the class-weighted mean of the per-image losses, not the plain mean."
    c = T.load_config({**TINY, 'train': {'epochs': 1, 'batch_size': 64, 'steps_per_epoch': None, 'class_imbalance': 'class_weights',
                                        'augment': {'enabled': False}, 'bn_refresh_batches': 0, 'restore_best': False,
                                        'clr': {'initial_learning_rate': 0.0, 'maximal_learning_rate': 0.0}}})
    seed_everything(0)  # no BatchNorm: training-mode and inference-mode losses must be the same function
    model = keras.Sequential([keras.Input((32, 32, 1)), keras.layers.Conv2D(4, 3, strides=2, activation='relu'),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1, activation='sigmoid')])
    rows, y = T.target_rows(manifest[manifest['split'] == 'train'], 'abnormal')
    x = np.concatenate([np.asarray(b) for b in T.make_dataset(rows, c, labels=False)])
    p = np.clip(keras.ops.convert_to_numpy(model(x)).reshape(-1).astype('float64'), 1e-7, 1 - 1e-7)
    losses = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert (len(y), int(y.sum())) == (37, 14)                        # the fixture's training rows: 23 normal, 14 abnormal
    assert T.class_weights(y) == pytest.approx({0: 37 / 46, 1: 37 / 28})   # balanced, n / (2 n_class): the minority weighs more
    w = np.where(y == 1, 37 / 28, 37 / 46)                            # known values, not class_weights' own output
    h = T.train(model, manifest, c, run_dir=tmp_path / 'run', verbose=0)
    assert h.history['loss'][0] == pytest.approx((w * losses).sum() / len(y), rel=1e-4)
    assert abs((w * losses).sum() / len(y) - losses.mean()) > 1e-3


# ---------------------------------------------------------------- issue 25, bad 1: kill -9 at an epoch boundary, then resume
# A run in a fresh process (run_from_config with the stand-in CNN), killed by SIGKILL at one chosen write into its stage
# folder: an audit hook counts every file opened for writing and every rename there. KILL_AFTER=<name> kills at the first
# write after the first one touching <name> (the recipe: kill -9 once the backup's training_metadata.json appears).
KILLED = '''
import os, signal, sys
RUN, AT, AFTER, n, armed = os.path.abspath(sys.argv[2]) + os.sep, int(os.environ.get('KILL_AT') or 0), os.environ.get('KILL_AFTER'), [0], [False]
def hook(event, args):
    if event == 'open':
        path, mode, flags = (list(args) + [None, None])[:3]
        if not (isinstance(mode, str) and any(m in mode for m in 'wax+')) and not (mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR)): return
        paths = [path]
    elif event == 'os.rename': paths = list(args[:2])
    else: return
    paths = [os.path.abspath(os.fsdecode(p)) for p in paths if isinstance(p, (str, bytes, os.PathLike))]
    if not any(p.startswith(RUN + 'stage') for p in paths): return
    n[0] += 1
    if (AT and n[0] == AT) or armed[0]: os.kill(os.getpid(), signal.SIGKILL)
    if AFTER and any(p.endswith(AFTER) for p in paths): armed[0] = True
if __name__ == '__main__':   # a cache fill with several processes re-imports this script in each of them
    sys.addaudithook(hook)
    from breast_cancer import cascade, model
    build = lambda c: model.small_cnn((c.data.image_size, c.data.image_size, c.data.channels))
    cascade.run_from_config(sys.argv[1], run_dir=sys.argv[2], build=build, verbose=0)
    print('WRITES', n[0], flush=True)
'''

KILL_CONFIG = {'name': 'killed', 'task': 'binary', 'wavelet': None, 'model': {'weights': None}, 'tracking': 'none', 'seed': 3,
               'data': {'image_size': 32, 'val_size': 0.25, 'test_size': 0.25, 'max_images': 60},
               'train': {'epochs': 3, 'batch_size': 8, 'steps_per_epoch': 2, 'validation_steps': 2}}

def run_killable(tmp, run_dir, **env):
    import subprocess, sys
    p = subprocess.run([sys.executable, str(tmp/'killed.py'), str(tmp/'killed.yaml'), str(run_dir)], capture_output=True,
                       text=True, timeout=600, env={**os.environ, **{k: str(v) for k, v in env.items()}})
    return p.returncode, p.stdout + p.stderr

@pytest.fixture(scope='module')
def uninterrupted(cache_env, mias_sample, tmp_path_factory):
    "The script, its config (cached in this process), and one uninterrupted run of it."
    tmp = tmp_path_factory.mktemp('killed')
    (tmp/'killed.py').write_text(KILLED)
    c = T.load_config(KILL_CONFIG); (tmp/'killed.yaml').write_text(c.to_yaml())
    T.cache_manifest(T.load_manifest(c), c, progress=False)
    rc, out = run_killable(tmp, tmp/'whole')
    assert rc == 0, out[-3000:]
    return tmp, T.RunDir(tmp/'whole'), int(out.split('WRITES')[-1].split()[0])

def killed_then_resumed(uninterrupted, name, **kill):
    tmp, whole, _ = uninterrupted
    rc, out = run_killable(tmp, tmp/name, **kill)
    assert rc == -9, (rc, out[-3000:])                                         # it was killed
    rc, out = run_killable(tmp, tmp/name)
    assert rc == 0, out[-3000:]
    got = T.RunDir(tmp/name)
    pd.testing.assert_frame_equal(pd.read_csv(got.stage('stage2').history_csv), pd.read_csv(whole.stage('stage2').history_csv))
    a, b = got.read_predictions(), whole.read_predictions()
    pd.testing.assert_frame_equal(a, b)                                         # the same predictions, to the last digit
    assert got.read_metadata().get('threshold2') == whole.read_metadata().get('threshold2')

def test_kill_9_once_the_backup_appears_then_resume_equals_uninterrupted(uninterrupted):
    "The issue's recipe: SIGKILL at the first write after the backup's training_metadata.json; the rerun equals an uninterrupted run."
    killed_then_resumed(uninterrupted, 'after_backup', KILL_AFTER='training_metadata.json')

@pytest.mark.slow
@pytest.mark.parametrize('at', [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
def test_kill_9_at_every_write_of_the_stage_then_resume_equals_uninterrupted(uninterrupted, at):
    "SIGKILL at the at-th write into the stage folder (the first two epochs' ends and the phase start), then the same run again."
    if at >= uninterrupted[2]: pytest.skip(f'the run writes {uninterrupted[2]} times into its stage folder')
    killed_then_resumed(uninterrupted, f'at{at}', KILL_AT=at)
