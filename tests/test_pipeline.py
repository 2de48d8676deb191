"""Issue 26 item 3: the tf.data pipeline reads the uint8/uint16 cache with TensorFlow's own ops, scales a batch in one op,
yields raw integers when the augmentation runs on the device, can hold the training images in memory; and training
wires the precision settings and the device augmentation. Tiny: 32 px, a few batches."""
import logging
from unittest import mock
import numpy as np, pandas as pd, pytest
import tensorflow as tf
from breast_cancer import augment as A, cache, train as T
from breast_cancer.core import seed_everything
from breast_cancer.io import write_dicom

TINY = {'name': 'tiny', 'data': {'image_size': 32, 'val_size': 0.2, 'test_size': 0.2, 'max_images': 40}, 'wavelet': None,
        'model': {'weights': None}, 'train': {'epochs': 1, 'batch_size': 8, 'steps_per_epoch': 2, 'validation_steps': 1,
                                              'augment': {'rotation': 20, 'flip': 'both'}}}

@pytest.fixture(scope='module')
def rows(isolated_dirs, mias_sample):
    c = T.load_config(TINY)
    return T.cache_manifest(T.ensure_split(T.load_manifest(c), c), c, progress=False)

def batches(ds, n=3): it = iter(ds); return [next(it) for _ in range(n)]

def test_cache_holds_the_model_input_in_uint8(rows):
    "Whole films are cached at exactly the model's input (square, padded), one byte a pixel: nothing to resize per image."
    a = np.load(rows.cache_path.iloc[0])
    assert a.shape == (32, 32) and a.dtype == np.uint8

def test_no_python_in_the_pipeline(rows):
    "Before: every image went through tf.numpy_function (a PyFunc op holding the GIL). Now TensorFlow reads and decodes the files."
    for c in (T.load_config(TINY), T.load_config({**TINY, 'data': {**TINY['data'], 'input': 'roi'}})):
        for training in (True, False):
            ds = T.make_dataset(T.cache_manifest(rows, c, progress=False), c, training=training)
            assert b'PyFunc' not in ds._as_serialized_graph().numpy()

def test_device_path_yields_raw_bytes_in_the_same_order(rows):
    "augment.place: device -> the training batches are the cached uint8 pixels, in the CPU path's order; validation stays float32."
    c = T.load_config(TINY); train = rows[rows.split == 'train']
    dev, cpu = c.replace(**{'train.augment.place': 'device'}), c.replace(**{'train.augment.place': 'cpu'})
    raw = batches(T.make_dataset(train, dev, training=True), 2)   # two batches: epoch 0 (steps_per_epoch 2)
    plain = batches(T.make_dataset(train, cpu.replace(**{'train.augment.enabled': False}), training=True))
    aug = batches(T.make_dataset(train, cpu, training=True))
    for k, ((r, y), (p, yp), (a, _)) in enumerate(zip(raw, plain, aug)):
        assert r.dtype == tf.uint8 and p.dtype == tf.float32
        np.testing.assert_array_equal(A.to_unit_float(r).numpy(), p.numpy()); np.testing.assert_array_equal(y, yp)
        # the CPU path's augmentation of batch k is keyed by (epoch 0, position k * batch): what the training step uses
        want = A.scale_and_augment(r, c.train.augment, A.batch_seed(c.seed, 0, k * 8))
        np.testing.assert_allclose(a.numpy(), want.numpy(), atol=1e-6)
    x, _ = next(iter(T.make_dataset(rows[rows.split == 'val'], dev)))
    assert x.dtype == tf.float32

def test_in_memory_batches_equal_file_batches(rows, caplog):
    "data.cache_in_memory: the training images are gathered from RAM, with the same batches, and the log says so."
    c = T.load_config(TINY); train = rows[rows.split == 'train']
    epoch = tf.Variable(0, dtype=tf.int64)
    with caplog.at_level(logging.INFO, logger='breast_cancer.train'):
        mem = T.make_dataset(train, c.replace(**{'data.cache_in_memory': True}), training=True, epoch=epoch)
    assert any(f'holding {len(train)} training images' in r.message and 'uint8) in memory' in r.message for r in caplog.records)
    files = T.make_dataset(train, c.replace(**{'data.cache_in_memory': False}), training=True, epoch=epoch)
    assert b'ReadFile' in files._as_serialized_graph().numpy() and b'ReadFile' not in mem._as_serialized_graph().numpy()
    for e in (0, 3):
        epoch.assign(e)
        for (a, ya), (b, yb) in zip(batches(mem), batches(files)):
            np.testing.assert_array_equal(a.numpy(), b.numpy()); np.testing.assert_array_equal(ya, yb)

def test_16_bit_and_mixed_caches(tmp_path, isolated_dirs, mias_sample):
    "A DICOM film is cached as uint16; with an 8-bit one in the same pipeline, raw batches are uint16 (8-bit × 257, exact)."
    rng = np.random.default_rng(0)
    films = [write_dicom(tmp_path / f'f{k}.dcm', rng.integers(0, 60000, (40, 30)).astype(np.uint16)) for k in range(2)]
    m = pd.DataFrame({'dataset': 't', 'image_id': ['a', 'b', 'c'], 'image_path': [str(f) for f in films] + [str(mias_sample / 'mdb001.png')],
                      'label': ['normal', 'benign', 'malignant'], 'abnormal': [False, True, True], 'malignant': [None, False, True],
                      'patient_id': ['p', 'q', 'r']})
    c = T.load_config(TINY); m = T.cache_manifest(m, c, progress=False)
    assert [np.load(p).dtype for p in m.cache_path] == [np.uint16, np.uint16, np.uint8]
    x, _ = next(iter(T.make_dataset(m, c, batch_size=3)))
    np.testing.assert_allclose(x.numpy()[..., 0], np.stack([cache.load_cached(p) for p in m.cache_path]), atol=1e-6)
    r, _ = next(iter(T.make_dataset(m, c.replace(**{'train.augment.place': 'device', 'train.steps_per_epoch': None}), training=True, batch_size=3)))
    assert r.dtype == tf.uint16
    np.testing.assert_allclose(np.sort(A.to_unit_float(r).numpy().reshape(3, -1).sum(1)), np.sort(x.numpy().reshape(3, -1).sum(1)), rtol=1e-5)

def test_compile_for_config_passes_xla_and_steps_per_execution(rows):
    from breast_cancer import model as M
    c = T.load_config(TINY)
    seed_everything(0, deterministic=False)   # as training does first: Keras refuses XLA under op determinism, which an earlier test may have left on
    settings = {'mixed_precision': False, 'mixed_precision_reason': 'test', 'xla': True, 'xla_reason': 'test', 'steps_per_execution': 3}
    with mock.patch.object(M, 'precision_settings', return_value=settings):
        net = T.compile_for_config(M.small_cnn((32, 32, 1)), c, 6)
        odd = T.compile_for_config(M.small_cnn((32, 32, 1)), c, 4)   # 3 does not divide 4 steps: Keras would run 6
    assert net.jit_compile is True and int(net.steps_per_execution) == 3
    assert int(odd.steps_per_execution) == 2

def test_training_with_device_augmentation(rows, tmp_path):
    "augment.place: device -> the callback of augment.install_device_augmentation comes first in each phase; metadata records it."
    import keras
    from breast_cancer import model as M
    c = T.load_config({**TINY, 'train': {**TINY['train'], 'epochs': 2, 'augment': {'place': 'device'}}})
    def two_phases(model, phases, compile, fit, train_bn):   # as model.fit_phases with fine-tuning: compile, fit; twice
        return {name: (compile(model, None, name), fit(model, name, k, k + 1))[1] for k, name in enumerate(('head', 'finetune'))}
    calls, order, real = [], [], A.install_device_augmentation
    class Probe(keras.callbacks.Callback):
        def __init__(self, name, inner=None): super().__init__(); self.name, self.inner = name, inner
        def set_model(self, model):
            super().set_model(model)
            if self.inner is not None: self.inner.set_model(model)
        def on_train_begin(self, logs=None):
            order.append(self.name)
            if self.inner is not None: self.inner.on_train_begin(logs)
        def on_epoch_begin(self, epoch, logs=None):
            if self.inner is not None: self.inner.on_epoch_begin(epoch, logs)
        def on_train_batch_begin(self, batch, logs=None):
            if self.inner is not None: self.inner.on_train_batch_begin(batch, logs)
        def on_train_end(self, logs=None):
            if self.inner is not None: self.inner.on_train_end(logs)
    def install(model, config, batch_size):
        calls.append(batch_size); return Probe('augment', real(model, config, batch_size))
    with mock.patch.object(A, 'install_device_augmentation', install), mock.patch.object(M, 'fit_phases', two_phases):
        T.train(M.small_cnn((32, 32, 1)), rows, c, run_dir=tmp_path / 'run', verbose=0, callbacks=[Probe('user')])
    assert calls == [8, 8] and order == ['augment', 'user'] * 2      # one per phase (head, then fine-tuning), first
    md = T.RunDir(tmp_path / 'run').read_metadata()
    assert md['pipeline']['augment_on'] == 'device' and md['pipeline']['cache_dtype'] == 'uint8' and 'xla' in md['precision']

def test_training_sees_the_same_batches_on_both_paths(rows):
    """The issue's equivalence, end to end: a model fit on `make_dataset` with the augmentation in its (XLA-compiled) training
    step sees, batch for batch and epoch for epoch, what the tf.data path feeds for the same seed (to one grey level:
    both warp 8-bit pixels and truncate, in float arithmetic that may round either way at a boundary)."""
    import keras
    from test_augment import Probe   # pytest puts tests/ on the path
    train = rows[rows.split == 'train']
    dev = T.load_config(TINY).replace(**{'train.augment.place': 'device', 'train.batch_size': 4})
    cpu = dev.replace(**{'train.augment.place': 'cpu'})
    epoch = tf.Variable(0, dtype=tf.int64)
    seed_everything(0, deterministic=False)   # also turns off op determinism an earlier test may have left on (it stops XLA)
    model = keras.Sequential([keras.Input((32, 32, 1)), Probe(), keras.layers.Conv2D(2, 3), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(1, activation='sigmoid')])
    model.compile(keras.optimizers.SGD(0.01), 'binary_crossentropy', jit_compile=True, steps_per_execution=2)
    follow = keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: epoch.assign(e))   # what train's _EpochWatch does
    model.fit(T.make_dataset(train, dev, training=True, epoch=epoch), epochs=2, steps_per_epoch=2, verbose=0,
              callbacks=[A.install_device_augmentation(model, dev, 4), follow])
    seen = model.layers[0].seen.numpy()
    assert int(model.layers[0].calls.numpy()) == 4
    for e in (0, 1):
        epoch.assign(e)
        for k, (x, _) in enumerate(batches(T.make_dataset(train, cpu, training=True, epoch=epoch), 2)):
            assert x.dtype == tf.float32 and np.abs(x.numpy() - seen[2 * e + k]).max() <= 1 / 255 + 1e-6, (e, k)
    assert np.abs(seen[0] - seen[2]).max() > 0.1   # another epoch, other augmentation
