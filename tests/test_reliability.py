"""Reliability (issue 16): names that cannot escape their folders, finite config numbers, a non-finite loss that stops
training without marking it done, one writer per run/reports folder (two real processes), clear messages for
hostile or broken inputs, MIAS Info.txt quirks, the file modes of atomic writes, and a resumed run that ends with the
same weights as an uninterrupted one. Tiny: 32 px, a few steps, model.small_cnn."""
import json, os, socket, stat, subprocess, sys, time
from pathlib import Path
import numpy as np, pandas as pd, pytest, yaml

import keras
from breast_cancer.core import (ConfigError, DataError, LockedError, TrainingError, atomic_path, atomic_write_text,
                                folder_lock, seed_everything)
from breast_cancer import cascade as C, data, model as M, train as T
from breast_cancer.cli import main
from breast_cancer.fixtures import make_mias_tree, make_mias_archive

ROOT = Path(__file__).resolve().parents[1]
TINY = {'name': 'tiny', 'data': {'image_size': 32, 'val_size': 0.2, 'test_size': 0.2, 'max_images': 60}, 'wavelet': None,
        'model': {'weights': None},
        'train': {'epochs': 1, 'batch_size': 8, 'steps_per_epoch': 2, 'validation_steps': 1, 'restore_best': False}}


def tiny_config(**dotted): return T.load_config(TINY).replace(**dotted)

def net(seed=0):
    seed_everything(seed)
    return M.small_cnn((32, 32, 1), blocks=2, width=4)

def cli(*args, timeout=600):
    "Run `breast-cancer ARGS` in a fresh Python process that imports this checkout."
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL='2', MPLBACKEND='Agg')
    return subprocess.Popen([sys.executable, '-c', 'import sys; from breast_cancer.cli import main; sys.exit(main())', *map(str, args)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope='module')
def manifest(isolated_dirs, mias_sample):
    c = tiny_config()
    return T.cache_manifest(T.ensure_split(T.load_manifest(c), c), c, progress=False)


# ---------------------------------------------------------------- 1. names never become paths unchecked
@pytest.mark.parametrize('name', ['/', '../x', '../../x', '/tmp/elsewhere', 'a/b', '..', '.', 'a\\b', ''])
def test_config_name_must_be_plain(name):
    with pytest.raises(ConfigError, match=r"bad value for config key 'name'.*allowed: a plain name"):
        T.load_config({'name': name})

def test_run_folder_that_leads_outside_runs_is_refused(isolated_dirs, tmp_path):
    "A plain name whose runs/<name> is a link to elsewhere: resolved and refused before anything is written."
    outside = tmp_path/'outside'; outside.mkdir()
    runs = Path(os.environ['BREAST_CANCER_RUNS']); runs.mkdir(parents=True, exist_ok=True)
    (runs/'linked').symlink_to(outside)
    with pytest.raises(ConfigError, match=r'resolves to .*outside, outside .*runs'):
        T.init_run_dir(tiny_config(name='linked'))
    assert list(outside.iterdir()) == []
    free = T.init_run_dir(tiny_config(name='linked'), run_dir=outside/'chosen')  # --run-dir stays free
    assert (free/'config.yaml').exists()

@pytest.mark.parametrize('run_name', ['../../x', '/tmp/x', 'a/b'])
def test_report_run_name_must_be_plain(tmp_path, run_name, capsys):
    rc = main(['report', '--datasets', 'mias', '--run-name', run_name, '--out-dir', str(tmp_path/'reports'), '--quick'])
    assert rc == 2 and 'is not a plain name' in capsys.readouterr().err
    assert not (tmp_path/'reports').exists() or not any((tmp_path/'reports').rglob('*.ipynb'))
    assert not (tmp_path/'x').exists() and not (tmp_path.parent/'x').exists()

def test_report_names_dot_and_dotdot_are_refused():
    from breast_cancer.report import _run_names
    for name in ('..', '.'):
        with pytest.raises(ConfigError, match='is not a plain name'): _run_names([None], name, quick=False)
    with pytest.raises(ConfigError, match="report name .* '..' is not a plain name"): _run_names([Path('/x/...yaml')], None, quick=False)
    assert _run_names([None], '..', quick=True) == ['..-quick']  # a plain name again: stays inside its folder


# ---------------------------------------------------------------- 3. finite numbers, non-finite loss
@pytest.mark.parametrize('text, key', [('train: {clr: {initial_learning_rate: .nan}}', 'train.clr.initial_learning_rate'),
                                       ('data: {test_size: .nan}', 'data.test_size'),
                                       ('train: {momentum: .inf}', 'train.momentum'),
                                       ('train: {epochs: .inf}', 'train.epochs'),         # was a raw OverflowError
                                       ('train: {clr: {maximal_learning_rate: -.inf}}', 'train.clr.maximal_learning_rate')])
def test_config_numbers_must_be_finite(tmp_path, text, key):
    (tmp_path/'c.yaml').write_text(text)
    with pytest.raises(ConfigError, match=rf"bad value for config key '{key}'.*in {tmp_path/'c.yaml'}"):
        T.load_config(tmp_path/'c.yaml')

class PoisonAt(keras.callbacks.Callback):
    "Set every weight to NaN when epoch `at` (0-based) begins."
    def __init__(self, at): super().__init__(); self.at = at
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.at: self.model.set_weights([np.full_like(w, np.nan) for w in self.model.get_weights()])

def test_nan_loss_stops_and_is_not_marked_done(manifest, tmp_path):
    c = tiny_config(**{'train.epochs': 3})
    with pytest.raises(TrainingError, match=r'stage1 \(abnormal\) in .*: the loss became nan in epoch 2 of 3 \(at batch 1\)'):
        T.train(net(), manifest, c, run_dir=tmp_path, verbose=0, callbacks=[PoisonAt(1)])
    s = tmp_path/'stage1'
    assert not (s/'done.json').exists() and not (s/'model.keras').exists()
    assert not T.stage_done(tmp_path, 'stage1', c, manifest)          # a rerun trains again instead of skipping
    assert pd.read_csv(s/'history.csv')['epoch'].tolist() == [0, 1]   # stopped in epoch 2: epoch 3 never ran
    assert not any((s/'backup').glob('*'))                            # no half-poisoned backup to resume
    T.train(net(), manifest, c, run_dir=tmp_path, verbose=0)         # the rerun without the poison finishes
    assert T.stage_done(tmp_path, 'stage1', c, manifest)


# ---------------------------------------------------------------- 4. one writer per folder (real processes)
def _wait_for_lock(lock, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if lock.exists() and lock.read_text().strip(): return json.loads(lock.read_text())
        if proc.poll() is not None: pytest.fail(f'first process ended before locking: {proc.communicate()}')
        time.sleep(0.2)
    pytest.fail('the first process never took the lock')

def test_second_train_on_one_run_folder_exits_naming_the_holder(tmp_path, isolated_dirs):
    cfg = tmp_path/'tiny.yaml'; cfg.write_text(yaml.safe_dump({**TINY, 'train': {**TINY['train'], 'epochs': 2}}))
    run = tmp_path/'run'
    first = cli('train', '--config', cfg, '--run-dir', run)
    try:
        owner = _wait_for_lock(run/'.lock', first)
        assert owner['pid'] == first.pid and owner['host'] == socket.gethostname()
        t0 = time.time(); second = cli('train', '--config', cfg, '--run-dir', run)
        out, err = second.communicate(timeout=300)
        assert second.returncode == 2, err
        assert f'run folder {run} is in use by PID {first.pid} on host {socket.gethostname()}' in err
        assert first.poll() is None or first.returncode == 0  # the first one was not disturbed
        out, err = first.communicate(timeout=600)
        assert first.returncode == 0, err[-2000:]
    finally:
        if first.poll() is None: first.kill()
    assert (run/'stage2'/'done.json').exists() and (run/'.lock').read_text() == ''
    log = pd.read_csv(run/'stage2'/'history.csv')
    assert log['epoch'].tolist() == [0, 1]  # one writer: no duplicated history rows

def test_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, '-c', 'pass']); dead.wait()
    (tmp_path/'.lock').write_text(json.dumps({'pid': dead.pid, 'host': socket.gethostname(), 'since': 'earlier'}))
    with caplog.at_level('WARNING', logger='breast_cancer'):
        with folder_lock(tmp_path, 'run folder'): assert json.loads((tmp_path/'.lock').read_text())['pid'] == os.getpid()
    assert f'taking over the stale lock of PID {dead.pid}' in caplog.text

def test_report_batch_locks_its_folder(tmp_path):
    out = tmp_path/'reports'
    holder = subprocess.Popen([sys.executable, '-c', f"import sys\nfrom breast_cancer.core import folder_lock\n"
                               f"with folder_lock({str(out)!r}, 'reports folder'): print('locked', flush=True); sys.stdin.read()"],
                              env=dict(os.environ, PYTHONPATH=str(ROOT)), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        from breast_cancer.report import run_reports
        with pytest.raises(LockedError, match=rf'reports folder {out} is in use by PID {holder.pid}'):
            run_reports('mias', out_dir=out, quick=True, progress=False)
        assert not list(out.rglob('*.status.json'))
    finally: holder.communicate('', timeout=60)


# ---------------------------------------------------------------- 6. messages
def test_folder_as_config(tmp_path, capsys):
    assert main(['train', '--config', str(tmp_path)]) == 2
    assert f'--config {tmp_path} is a folder: pass a YAML file' in capsys.readouterr().err

def test_lambda_layer_model_names_the_file(tmp_path):
    x = inp = keras.Input((32, 32, 1))
    x = keras.layers.Lambda(lambda t: t * 2.0)(x)
    m = keras.Model(inp, keras.layers.Dense(1, activation='sigmoid')(keras.layers.GlobalAveragePooling2D()(x)))
    C.Cascade(None, m, config=tiny_config(task='binary')).save(tmp_path/'casc')
    with pytest.raises(DataError, match=rf"{tmp_path/'casc'/'stage2.keras'}: refused to load: the model holds a Lambda layer"):
        C.Cascade.load(tmp_path/'casc')

def _dicom(path, ts=None, pixels=None):
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    meta = FileMetaDataset(); meta.TransferSyntaxUID = ts or ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = '1.2.840.10008.5.1.4.1.1.1.2'; meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset(); ds.file_meta = meta
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 16, 16, 16, 12, 11, 0, 1
    ds.PhotometricInterpretation = 'MONOCHROME2'
    ds.PixelData = pixels if pixels is not None else np.arange(256, dtype=np.uint16).tobytes()
    if ts is not None: ds['PixelData'].VR = 'OB'; ds['PixelData'].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True); return path

@pytest.mark.parametrize('cut', [140, 200, 300, -100, -1])
def test_truncated_dicom_does_not_suggest_decoders(tmp_path, cut):
    raw = _dicom(tmp_path/'ok.dcm').read_bytes()
    assert data.read_image(tmp_path/'ok.dcm').shape == (16, 16)
    (tmp_path/'cut.dcm').write_bytes(raw[:cut])
    with pytest.raises(DataError, match='cut.dcm: cannot read DICOM') as e: data.read_image(tmp_path/'cut.dcm')
    assert 'pylibjpeg' not in str(e.value) and 'download it again' in str(e.value)

def test_compressed_dicom_without_decoder_suggests_one(tmp_path):
    import importlib.util
    if any(importlib.util.find_spec(m) for m in ('libjpeg', 'jpeg_ls', 'gdcm')): pytest.skip('a JPEG-LS decoder is installed here')
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless
    p = _dicom(tmp_path/'jls.dcm', ts=JPEGLSLossless, pixels=encapsulate([b"\xff\xd8" + b"\0" * 60]))
    with pytest.raises(DataError, match=r'(?s)jls.dcm: its pixel data is compressed \(JPEG-LS .*pip install pylibjpeg'):
        data.read_image(p)

def test_mias_checksum_error_names_the_archive_not_a_temporary_folder(tmp_path, mias_sample, monkeypatch):
    arc, sums = make_mias_archive(tmp_path/'all-mias.tar.gz', mias_sample)
    (tmp_path/'data'/'checksums').mkdir(parents=True)
    (tmp_path/'data'/'checksums'/'mias.sha256').write_text(''.join(f'{h}  {n}\n' for n, h in sums.items()))
    monkeypatch.setenv('BREAST_CANCER_DATA', str(tmp_path/'data'))
    bad, _ = make_mias_archive(tmp_path/'bad.tar.gz', mias_sample, corrupt='mdb003.pgm')
    with pytest.raises(DataError) as e: data.download('mias', tmp_path/'out', url=str(bad), progress=False)
    msg = str(e.value)
    assert msg.startswith(bad.resolve().as_uri()) and '1 with a wrong SHA-256 (mdb003.pgm)' in msg
    assert '/.out.' not in msg and f'nothing was written to {tmp_path/"out"}' in msg
    assert not (tmp_path/'out').exists() and not list(tmp_path.glob('.out.*'))


# ---------------------------------------------------------------- 7. MIAS Info.txt quirks (through load_mias)
def test_mias_info_quirks(tmp_path, caplog):
    root = make_mias_tree(tmp_path/'m')
    good = (root/'Info.txt').read_text()
    (root/'Info.txt').write_bytes(b'\xef\xbb\xbf' + good.encode())
    ref = data.load_mias(root)
    assert ref.label.tolist() == ['benign', 'normal', 'malignant', 'benign', 'malignant', 'normal']
    (root/'Info.txt').write_text(good + 'mdb001 G CIRC B 535 425 197\n')
    with caplog.at_level('WARNING', logger='breast_cancer'): again = data.load_mias(root)
    assert 'line 9: exact repeat of line 2' in caplog.text and len(again.lesions[0]) == 1
    (root/'Info.txt').write_text(good + 'mdb002 G CIRC M 100 100 10\n')
    with pytest.raises(DataError, match=r"lines 3 and 9 contradict each other for mdb002 \(NORM and a lesion\): 'mdb002 G NORM' vs"):
        data.load_mias(root)
    (root/'Info.txt').write_text(good + 'mdb006 D NORM\n')
    with pytest.raises(DataError, match=r'lines 8 and 9 contradict each other for mdb006 \(two density codes\)'): data.load_mias(root)
    (root/'Info.txt').write_text(good.replace('535 425 197', '535 1425 197'))
    with pytest.raises(DataError, match=r'line 2: lesion centre \(535, 1425\) lies outside the 1024x1024 film'): data.load_mias(root)


# ---------------------------------------------------------------- 8. file modes
def test_atomic_writes_get_the_mode_of_a_normal_write(manifest, tmp_path):
    old = os.umask(0o022)
    try:
        mode = lambda p: stat.S_IMODE(p.stat().st_mode)
        (tmp_path/'plain.txt').write_text('x'); assert mode(tmp_path/'plain.txt') == 0o644
        atomic_write_text(tmp_path/'a.txt', 'x'); assert mode(tmp_path/'a.txt') == 0o644
        with atomic_path(tmp_path/'d', is_dir=True) as d: (d/'f').write_text('x')
        assert mode(tmp_path/'d') == 0o755
        run = T.init_run_dir(tiny_config(), manifest, tmp_path/'run')
        assert {f: oct(mode(run/f)) for f in ('config.yaml', 'split.csv', 'metadata.json')} == dict.fromkeys(
            ('config.yaml', 'split.csv', 'metadata.json'), '0o644')
        os.umask(0o027); atomic_write_text(tmp_path/'b.txt', 'x'); assert mode(tmp_path/'b.txt') == 0o640
    finally: os.umask(old)
    assert mode(Path(manifest['cache_path'].iloc[0])) == 0o666 & ~old  # a cache .npy, written under the same umask


# ---------------------------------------------------------------- 9. a resumed epoch gets its own data order
class StopAfter(keras.callbacks.Callback):
    "Simulate a kill at the end of epoch `n` (0-based), before its backup (which runs after every other callback): epoch n reruns."
    def __init__(self, n): super().__init__(); self.n = n
    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.n: raise KeyboardInterrupt

class WeightSums(keras.callbacks.Callback):
    "Record a checksum of the weights after every epoch."
    def __init__(self): super().__init__(); self.sums = {}
    def on_epoch_end(self, epoch, logs=None): self.sums[epoch] = float(sum(np.abs(w).sum() for w in self.model.get_weights()))

def _weights(run): return keras.saving.load_model(run/'stage1'/'model.keras', compile=False).get_weights()

# stop >= 1: the resumed run starts from another network (net(5)), so its weights can only come from the backup of epoch
# stop - 1. A kill before the first backup restarts the stage from its seed (tests/test_train.py's kill -9 tests).
@pytest.mark.parametrize('steps, stop', [(2, 1), pytest.param(None, 1, marks=pytest.mark.slow)])   # slow: make test-all
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(manifest, tmp_path, steps, stop):
    c = tiny_config(**{'train.epochs': 3, 'train.steps_per_epoch': steps, 'train.validation_steps': 1})
    whole = WeightSums(); T.train(net(0), manifest, c, run_dir=tmp_path/'whole', verbose=0, callbacks=[whole])
    with pytest.raises(KeyboardInterrupt):
        T.train(net(0), manifest, c, run_dir=tmp_path/'cut', verbose=0, callbacks=[StopAfter(stop)])
    resumed = WeightSums(); T.train(net(5), manifest, c, run_dir=tmp_path/'cut', verbose=0, callbacks=[resumed])
    assert sorted(resumed.sums) == list(range(stop, 3))   # the interrupted epoch runs again, from the previous backup
    assert all(resumed.sums[e] == whole.sums[e] for e in resumed.sums), (whole.sums, resumed.sums)
    for a, b in zip(_weights(tmp_path/'whole'), _weights(tmp_path/'cut')): np.testing.assert_array_equal(a, b)
    h1, h2 = (pd.read_csv(tmp_path/r/'stage1'/'history.csv') for r in ('whole', 'cut'))
    np.testing.assert_array_equal(h1['loss'].to_numpy(), h2['loss'].to_numpy())

def test_each_epoch_has_its_own_order(manifest):
    "Epoch e's batches depend on (seed, e) only: the same for a fresh pipeline, different for another epoch."
    c = tiny_config(**{'train.augment.enabled': False, 'train.steps_per_epoch': None})
    rows = manifest[manifest['split'] == 'train']
    def image_sums(e): return np.concatenate([x.numpy().reshape(len(x), -1).sum(1) for x, _ in T.make_dataset(rows, c, training=True, epoch=e)])
    e0, e1, e1_again = image_sums(0), image_sums(1), image_sums(1)
    assert len(e0) == len(rows)                                  # one pass over the training rows per epoch
    np.testing.assert_array_equal(e1, e1_again)                  # a fresh pipeline at epoch 1: the same order
    assert not np.array_equal(e0, e1)                            # another epoch: another order
    np.testing.assert_allclose(np.sort(e0), np.sort(e1), rtol=1e-6)  # of the same images
