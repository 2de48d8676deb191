"""breast_cancer.model: CLR == TFA's formula (also inside SGD), saving every head × named schedule, weights offline and
from a file, freezing/BN during fine-tuning, lr_find leaves the model untouched, MirroredStrategy on 2 logical CPUs."""
import json, os, re, subprocess, sys, textwrap, time
from pathlib import Path
import numpy as np
import pytest

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
import keras
import tensorflow as tf
from breast_cancer.core import ConfigError, WeightsUnavailableError
from breast_cancer.model import (BACKBONES, HEADS, BackbonePreprocess, CyclicalLearningRate,
                                 ExponentialCyclicalLearningRate, Specificity, Triangular2CyclicalLearningRate,
                                 TriangularCyclicalLearningRate, backbone_blocks, build_model, build_resnet50,
                                 compile_model, fine_tune, get_backbone, lr_find, resolve_weights,
                                 refresh_batchnorm, set_trainable_blocks, use_mixed_precision)

F = np.float32
SIZE = 32


def tfa_clr(step, initial, maximal, step_size, scale_fn, scale_mode):
    "tensorflow-addons' CyclicalLearningRate.__call__, op for op, in NumPy float32 (Keras 2 passed a float32 step)."
    initial, maximal, step_size, step = F(initial), F(maximal), F(step_size), F(step)
    cycle = np.floor(F(1) + step / (F(2) * step_size))
    x = np.abs(step / step_size - F(2) * cycle + F(1))
    mode_step = cycle if scale_mode == 'cycle' else step
    return F(initial + (maximal - initial) * np.maximum(F(0), F(1) - x) * F(scale_fn(mode_step)))


POLICIES = {  # name: (our schedule, TFA's scale_fn, TFA's scale_mode)
    'triangular': (lambda a, b, s: TriangularCyclicalLearningRate(a, b, s), lambda x: F(1.0), 'cycle'),
    'triangular2': (lambda a, b, s: Triangular2CyclicalLearningRate(a, b, s), lambda x: F(1) / (F(2) ** (x - F(1))), 'cycle'),
    'exp_range': (lambda a, b, s: ExponentialCyclicalLearningRate(a, b, s, gamma=0.99), lambda x: F(0.99) ** x, 'iterations'),
}


@pytest.mark.parametrize('policy', list(POLICIES))
@pytest.mark.parametrize('bounds', [(1e-4, 1e-2, 7), (1e-3, 6e-3, 10)])
def test_clr_matches_tfa_formula(policy, bounds):
    make, scale_fn, mode = POLICIES[policy]
    schedule = make(*bounds)
    steps = np.arange(101)
    ours = keras.ops.convert_to_numpy(schedule(steps))
    ref = np.array([tfa_clr(i, *bounds, scale_fn, mode) for i in steps])
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=2e-7, atol=0)
    # scalar int64 steps (what the optimizer passes) give the same values
    np.testing.assert_allclose([float(schedule(tf.constant(i, tf.int64))) for i in (0, 13, 100)], ref[[0, 13, 100]], rtol=2e-7)
    # the shape is right, not just self-consistent: lower bound at step 0, upper bound at the first peak
    assert ours[0] == F(bounds[0])
    np.testing.assert_allclose(ours[bounds[2]], F(bounds[0]) + (F(bounds[1]) - F(bounds[0])) *
                               (F(0.99) ** bounds[2] if policy == 'exp_range' else 1), rtol=1e-6)


def test_thesis_call_runs_unchanged_and_equals_triangular2():
    SAMPLE_SIZE, BATCH_SIZE = 1000, 32
    clr = CyclicalLearningRate(initial_learning_rate=1e-4, maximal_learning_rate=1e-2,
                               step_size=3*(SAMPLE_SIZE//BATCH_SIZE), scale_fn=lambda x: 1/(2.0**(x-1)), scale_mode='cycle')
    steps = np.arange(0, 600, 7)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(clr(steps)),
                                  keras.ops.convert_to_numpy(Triangular2CyclicalLearningRate(1e-4, 1e-2, 93)(steps)))
    with pytest.raises(ConfigError, match='custom scale_fn cannot be serialized'):
        clr.get_config()
    # no scale_fn = triangular, and it serializes
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(CyclicalLearningRate(1e-4, 1e-2, 93)(steps)),
                                  keras.ops.convert_to_numpy(TriangularCyclicalLearningRate(1e-4, 1e-2, 93)(steps)))


@pytest.mark.parametrize('policy', list(POLICIES))
def test_clr_applied_by_keras_sgd_equals_schedule(policy):
    "Single weight, gradient exactly 1, no momentum: the update at iteration i is -lr(i), inside a tf.function."
    schedule = POLICIES[policy][0](1e-4, 1e-2, 5)
    opt = keras.optimizers.SGD(learning_rate=schedule, momentum=0.0)
    w = keras.Variable(np.zeros(1, 'float32'))
    step = tf.function(lambda: opt.apply_gradients([(tf.ones(1), w)]))
    applied, reported = [], []
    for _ in range(40):
        reported.append(float(keras.ops.convert_to_numpy(opt.learning_rate)))
        w.assign(np.zeros(1, 'float32')); step(); applied.append(-float(w.numpy()[0]))
    expected = keras.ops.convert_to_numpy(schedule(np.arange(40)))
    # read eagerly, the optimizer's learning rate is the schedule's value to 1 ulp (a scalar pow vs a vectorised one);
    # inside the compiled step, grappler's graph rewrites may change the last bits (as for TFA's class under Keras 2)
    np.testing.assert_allclose(np.array(reported, 'float32'), expected, rtol=2e-7, atol=0)
    np.testing.assert_allclose(np.array(applied, 'float32'), expected, rtol=1e-5, atol=0)
    assert len(set(applied)) > 5                       # the rate really changes between updates


def test_clr_bad_arguments():
    with pytest.raises(ConfigError, match='scale_mode'): CyclicalLearningRate(1e-4, 1e-2, 5, scale_mode='epochs')
    with pytest.raises(ConfigError, match='step_size'): CyclicalLearningRate(1e-4, 1e-2, 0)


def test_specificity_matches_sklearn():
    from sklearn.metrics import confusion_matrix
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500); p = np.clip(0.3 * y + rng.random(500) * 0.7, 0, 1).astype('float32')
    w = rng.random(500).astype('float32')
    m = Specificity()
    for a in range(0, 500, 64): m.update_state(y[a:a+64], p[a:a+64, None])     # accumulates over batches
    tn, fp, _, _ = confusion_matrix(y, p > 0.5).ravel()
    np.testing.assert_allclose(float(m.result()), tn / (tn + fp), rtol=1e-6)
    m.reset_state(); m.update_state(y, p, sample_weight=w)
    tn, fp, _, _ = confusion_matrix(y, p > 0.5, sample_weight=w).ravel()
    np.testing.assert_allclose(float(m.result()), tn / (tn + fp), rtol=1e-5)
    m = Specificity(threshold=0.7); m.update_state(y, p)
    tn, fp, _, _ = confusion_matrix(y, p > 0.7).ravel()
    np.testing.assert_allclose(float(m.result()), tn / (tn + fp), rtol=1e-6)
    m.reset_state(); assert float(m.result()) == 0.0


SCHEDULES = {'triangular': TriangularCyclicalLearningRate(1e-4, 1e-2, 6),
             'triangular2': Triangular2CyclicalLearningRate(1e-4, 1e-2, 6),
             'exp_range': ExponentialCyclicalLearningRate(1e-4, 1e-2, 6, gamma=0.99)}


@pytest.fixture(scope='module')
def images():
    return np.random.default_rng(0).random((3, SIZE, SIZE, 1), dtype='float32')


@pytest.mark.parametrize('schedule', list(SCHEDULES))
@pytest.mark.parametrize('head', HEADS)
def test_save_load_every_head_and_schedule(head, schedule, images, tmp_path):
    model = build_resnet50((SIZE, SIZE, 1), weights=None, head=head)
    compile_model(model, SCHEDULES[schedule])
    model.optimizer.build(model.trainable_variables)
    model.optimizer.iterations.assign(17)
    before = keras.ops.convert_to_numpy(model(images))
    path = tmp_path / 'model.keras'
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(images)), before)
    lr = loaded.optimizer.get_config()['learning_rate']
    assert lr['registered_name'] == f'breast_cancer>{type(SCHEDULES[schedule]).__name__}'
    assert lr['config'] == SCHEDULES[schedule].get_config()
    assert int(loaded.optimizer.iterations.numpy()) == 17
    assert float(loaded.optimizer.learning_rate) == pytest.approx(float(SCHEDULES[schedule](17)), rel=1e-7)
    assert [m['config']['name'] for m in loaded.get_compile_config()['metrics']][-1] == 'specificity'
    assert len(loaded.trainable_weights) == len(model.trainable_weights)


def test_custom_scale_fn_model_does_not_save_silently(tmp_path):
    model = compile_model(build_resnet50((SIZE, SIZE, 1), weights=None),
                          CyclicalLearningRate(1e-4, 1e-2, 6, scale_fn=lambda x: 1 / (2.0 ** (x - 1))))
    with pytest.raises(ConfigError, match='Triangular2CyclicalLearningRate'):
        model.save(tmp_path / 'model.keras')


def closed_loopback_port() -> int:
    "A TCP port on 127.0.0.1 that nothing listens on: a connection there is refused at once."
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def test_imagenet_offline_error_names_file_url_and_folder(tmp_path, monkeypatch):
    "Offline = an empty Keras cache and a proxy on a closed loopback port: the real probe runs, nothing leaves the machine."
    monkeypatch.setenv('KERAS_HOME', str(tmp_path / 'keras'))
    port = closed_loopback_port()
    monkeypatch.setenv('HTTPS_PROXY', f'http://127.0.0.1:{port}')
    with pytest.raises(WeightsUnavailableError) as e:
        build_resnet50((SIZE, SIZE, 1), weights='imagenet')
    msg = str(e.value)
    assert f'127.0.0.1:{port} did not answer' in msg
    assert 'resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5' in msg
    assert re.search(r'https://\S+/resnet50_weights_tf_dim_ordering_tf_kernels_notop\.h5', msg)   # Keras's own URL (no host name here)
    assert str(tmp_path / 'keras' / 'models') in msg and 'weights=' in msg


def test_imagenet_offline_fails_fast_when_the_probe_hangs(tmp_path, monkeypatch):
    "A probe whose connect never returns (a black-holed network): resolve_weights gives up after `timeout`."
    import threading
    from breast_cancer import model as model_mod
    monkeypatch.setenv('KERAS_HOME', str(tmp_path / 'keras'))
    monkeypatch.delenv('HTTPS_PROXY', raising=False); monkeypatch.delenv('https_proxy', raising=False)
    release, probed = threading.Event(), []
    def hanging_connection(address, timeout=None, *args, **kwargs):
        probed.append(address); release.wait(60); raise OSError('released')
    monkeypatch.setattr(model_mod.socket, 'create_connection', hanging_connection)
    t0 = time.monotonic()
    try:
        with pytest.raises(WeightsUnavailableError, match='did not answer within 0.5 s'):
            resolve_weights('resnet50', 'imagenet', timeout=0.5)
        elapsed = time.monotonic() - t0
    finally: release.set()
    assert probed == [('storage.googleapis.com', 443)]      # the download host, probed once, never reached
    assert elapsed < 5, f'offline error after {elapsed:.1f} s with timeout=0.5 s'   # generous margin over 0.5 s


def test_imagenet_uses_the_keras_cache_when_present(tmp_path, monkeypatch):
    "A file already in $KERAS_HOME/models is used without the probe (md5 checked by Keras)."
    from breast_cancer import model as model_mod
    monkeypatch.setenv('KERAS_HOME', str(tmp_path))
    monkeypatch.setenv('HTTPS_PROXY', f'http://127.0.0.1:{closed_loopback_port()}')   # Keras's re-download is refused
    monkeypatch.setattr(model_mod, 'network_reachable', lambda *a, **k: pytest.fail('probed although the file is cached'))
    import socket
    def refuse(*a, **k): raise ConnectionRefusedError(111, 'Connection refused')  # no connection is attempted at all
    monkeypatch.setattr(socket, 'create_connection', refuse)
    (tmp_path / 'models').mkdir()
    (tmp_path / 'models' / BACKBONES['vgg16'].weights_file).write_bytes(b'not the real file')
    # the cached file is found (no probe), Keras's md5 check rejects it and tries to re-download: a clear error again
    with pytest.raises(WeightsUnavailableError, match='download failed.*Connection refused') as e:
        resolve_weights('vgg16', 'imagenet')
    assert 'Download vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 from' in str(e.value)


def test_network_reachable_on_loopback():
    "True for a listening loopback socket, False (at once) for a closed port."
    import socket
    from breast_cancer.model import network_reachable
    with socket.socket() as server:
        server.bind(('127.0.0.1', 0)); server.listen(1)
        assert network_reachable('127.0.0.1', server.getsockname()[1], timeout=2)
    assert not network_reachable('127.0.0.1', closed_loopback_port(), timeout=2)


@pytest.mark.parametrize('fmt', ['legacy_notop_h5', 'keras3_weights_h5'])
def test_weights_path_loads(fmt, tmp_path, images):
    source = build_resnet50((SIZE, SIZE, 1), weights=None)
    backbone = get_backbone(source)
    if fmt == 'legacy_notop_h5':   # the format of keras-applications' resnet50_..._notop.h5
        import h5py
        from keras.src.legacy.saving import legacy_h5_format
        path = tmp_path / BACKBONES['resnet50'].weights_file
        with h5py.File(path, 'w') as f: legacy_h5_format.save_weights_to_hdf5_group(f, backbone)
    else:
        path = tmp_path / 'resnet50_notop.weights.h5'; backbone.save_weights(path)
    target = build_resnet50((SIZE, SIZE, 1), weights=path)
    target.get_layer('p_positive').set_weights(source.get_layer('p_positive').get_weights())
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(target(images)), keras.ops.convert_to_numpy(source(images)))
    fresh = build_resnet50((SIZE, SIZE, 1), weights=None)
    assert not np.array_equal(get_backbone(fresh).weights[0].numpy(), backbone.weights[0].numpy())


def test_wrong_weights_file_is_a_clear_error(tmp_path):
    path = tmp_path / 'vgg16_notop.weights.h5'
    get_backbone(build_model('vgg16', (SIZE, SIZE, 1), weights=None)).save_weights(path)
    with pytest.raises(WeightsUnavailableError, match='resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5'):
        build_resnet50((SIZE, SIZE, 1), weights=path)
    with pytest.raises(WeightsUnavailableError, match='not found'):
        build_resnet50((SIZE, SIZE, 1), weights=tmp_path / 'missing.h5')


@pytest.mark.parametrize('name,shape,n_blocks,top', [('vgg16', (32, 32, 3), 5, 'block5'), ('vgg19', (32, 32, 1), 5, 'block5'),
                                                     ('inception_v3', (75, 75, 1), 11, 'mixed10'),
                                                     ('resnet50', (32, 48, 1), 16, 'conv5_block3')])
def test_backbones_blocks_and_preprocessing(name, shape, n_blocks, top):
    model = build_model(name, shape, weights=None)
    backbone = get_backbone(model)
    blocks = backbone_blocks(backbone)
    assert len(blocks) == n_blocks and blocks[-1][0] == top
    assert len({id(l) for _, ls in blocks for l in ls}) == sum(len(ls) for _, ls in blocks)   # no layer in two blocks
    x = np.random.default_rng(0).random((2, *shape), dtype='float32')
    pre = keras.ops.convert_to_numpy(model.get_layer('preprocess')(x))
    rgb = np.repeat(x, 3, -1) if shape[-1] == 1 else x
    module = getattr(keras.applications, BACKBONES[name].module)
    np.testing.assert_allclose(pre, module.preprocess_input(rgb * 255), atol=1e-4)
    assert model.input_shape == (None, *shape) and model.output_shape == (None, 1)
    with pytest.raises(ConfigError, match=f'at least {BACKBONES[name].min_size}'):
        build_model(name, (BACKBONES[name].min_size - 1,) * 2 + (1,), weights=None)


def test_default_input_sizes():
    assert {n: b.default_size for n, b in BACKBONES.items()} == {'resnet50': 224, 'vgg16': 224, 'vgg19': 224, 'inception_v3': 299}


@pytest.fixture(scope='module')
def local_weights(tmp_path_factory):
    "A local 'pretrained' ResNet-50 notop weights file: random weights saved to a temporary .weights.h5."
    path = tmp_path_factory.mktemp('weights') / 'resnet50_local.weights.h5'
    keras.applications.ResNet50(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3)).save_weights(path)
    return str(path)


def test_freeze_options_and_bn_frozen_with_pretrained_weights(local_weights):
    model = build_resnet50((SIZE, SIZE, 1), weights=local_weights, head='dense512_bn', freeze='none')
    backbone = get_backbone(model)
    bns = [l for l in backbone.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert bns and not any(l.trainable for l in bns)
    assert {l.momentum for l in bns} == {0.99}                 # pretrained: Keras's BN untouched
    assert all(l.trainable for l in backbone.layers if l not in bns)
    assert model.get_layer('head_bn').trainable
    assert set_trainable_blocks(model, 'base') == [] and not backbone.trainable_weights
    names = set_trainable_blocks(model, 3)
    assert names == ['conv5_block3', 'conv5_block2', 'conv5_block1']
    trainable = {w.path.split('/')[0] for w in backbone.trainable_weights}
    assert trainable and all(n.startswith('conv5_') and not n.endswith('_bn') for n in trainable)
    assert 'conv5_block1_0_conv' in trainable          # the projection shortcut belongs to its block
    with pytest.raises(ConfigError, match="'base', 'none'"): set_trainable_blocks(model, 'all')
    with pytest.raises(ConfigError, match='0 to 16'): set_trainable_blocks(model, -1)


def test_random_init_trains_batchnorm(images):
    "weights=None: BatchNorm trains (a test that fails if BN stays frozen under random initialisation)."
    model = build_resnet50((SIZE, SIZE, 1), weights=None, freeze='none')
    backbone = get_backbone(model)
    bns = [l for l in backbone.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert len(bns) == 53 and all(l.trainable for l in bns) and {l.momentum for l in bns} == {0.9}
    assert len(model.trainable_weights) == len(model.weights) - 2 * len(bns)   # all but the moving mean/variance
    # freeze=2 from random init: the two top blocks train with their BatchNorm
    assert set_trainable_blocks(model, 2, train_bn=True) == ['conv5_block3', 'conv5_block2']
    assert any(w.path.startswith('conv5_block3_1_bn') for w in backbone.trainable_weights)
    set_trainable_blocks(model, 'none', train_bn=True)
    compile_model(model, 1e-3)
    before = [keras.ops.convert_to_numpy(b.moving_variance).copy() for b in bns]
    model.train_on_batch(images, np.array([0, 1, 0], 'float32'))
    moved = [not np.allclose(b0, keras.ops.convert_to_numpy(b.moving_variance)) for b0, b in zip(before, bns)]
    assert all(moved), f'{moved.count(False)} BatchNorm layers kept their initial statistics during fit'


def test_random_init_validation_predictions_not_constant():
    "After a few steps from random init and a BatchNorm refresh (what train.train does), validation predictions vary."
    rng = np.random.default_rng(0)
    x = rng.random((48, SIZE, SIZE, 1), dtype='float32') * 0.5
    y = (rng.random(48) < 0.5).astype('float32')
    x[y == 1, 10:20, 10:20] += 0.5                                  # a bright square: something to learn
    keras.utils.set_random_seed(0)
    model = compile_model(build_resnet50((SIZE, SIZE, 1), weights=None, freeze='none'), 1e-3)
    model.fit(x[:32], y[:32], batch_size=8, epochs=2, verbose=0)   # 8 steps
    lagging = keras.ops.convert_to_numpy(model(x[32:], training=False)).reshape(-1)
    assert refresh_batchnorm(model, [x[:16], x[16:32]]) == 2
    p = keras.ops.convert_to_numpy(model(x[32:], training=False)).reshape(-1)
    print('validation probabilities, moving statistics', np.round(np.sort(lagging), 3), 'refreshed', np.round(np.sort(p), 3))
    assert np.ptp(p) > 1e-3, f'constant validation predictions: {p[:5]}'
    assert np.mean((p < 1e-4) | (p > 1 - 1e-4)) < 0.5, f'saturated validation predictions: {p[:5]}'


@pytest.mark.slow  # test_train.py::test_fine_tune_config_phases_train_what_they_claim checks the same phases through train
def test_fine_tune_two_phases_keeps_bn_in_inference(images, local_weights):
    model = build_resnet50((SIZE, SIZE, 1), weights=local_weights, dropout=0.0)
    backbone = get_backbone(model)
    # called in training mode, the model still uses BN moving statistics (backbone called with training=False)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(images, training=True)),
                                  keras.ops.convert_to_numpy(model(images, training=False)))
    rng = np.random.default_rng(0)
    ds = tf.data.Dataset.from_tensor_slices((rng.random((8, SIZE, SIZE, 1), dtype='float32'),
                                             np.array([0, 1] * 4, 'float32'))).batch(4)
    snap = lambda: {w.path: w.numpy().copy() for w in backbone.weights}
    start = snap()
    hist = fine_tune(model, ds, ds, head_epochs=1, finetune_epochs=1, unfreeze_blocks=1, lr_head=1e-2,
                     lr_finetune=Triangular2CyclicalLearningRate(1e-3, 1e-2, 2), verbose=0)
    assert hist['head'].epoch == [0] and hist['finetune'].epoch == [1]
    assert {'val_auc', 'specificity', 'sensitivity'} <= set(hist['finetune'].history)
    end = snap()
    changed = {p for p in start if not np.array_equal(start[p], end[p])}
    assert changed, 'the top block did not train'
    assert all(p.startswith('conv5_block3_') and '_bn/' not in p for p in changed), sorted(changed)[:5]
    assert any('moving_mean' in p for p in start)        # the BN statistics were among the weights compared


def test_lr_find_leaves_model_and_optimizer_untouched(images):
    # VGG-16 (fast to trace) goes through the same path as ResNet-50: nested backbone, custom layer, partly frozen
    model = build_model('vgg16', (SIZE, SIZE, 1), weights=None, head='dense512_bn', freeze=1)
    compile_model(model, ExponentialCyclicalLearningRate(1e-4, 1e-2, 4, gamma=0.99))
    model.optimizer.build(model.trainable_variables)
    for v in model.optimizer.variables: v.assign(np.full(v.shape, 0.25, v.dtype) if v.dtype != 'int64' else np.full(v.shape, 3))
    weights = [w.numpy().copy() for w in model.weights]
    opt_state = [v.numpy().copy() for v in model.optimizer.variables]
    ds = tf.data.Dataset.from_tensor_slices((np.repeat(images, 2, 0), np.array([0, 1, 0, 1, 1, 0], 'float32'))).batch(3)
    res = lr_find(model, ds, min_lr=1e-5, max_lr=1e-1, num_steps=6, progress=False)
    for a, w in zip(weights, model.weights): np.testing.assert_array_equal(a, w.numpy())
    for a, v in zip(opt_state, model.optimizer.variables): np.testing.assert_array_equal(a, v.numpy())
    assert len(res.lrs) == len(res.losses) >= 2 and np.isfinite(res.losses).all()
    np.testing.assert_allclose(res.lrs[:2], [1e-5, 1e-5 * (1e4) ** (1 / 5)], rtol=1e-9)
    lo, hi = res.suggested_bounds
    assert hi == pytest.approx(res.lr_min_loss / 10) and lo == pytest.approx(hi / 4)
    assert res.plot() is not None


def test_lr_find_finds_the_divergence():
    "On a problem with a known shape the suggestion lands below the LR where the loss blows up."
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 4)).astype('float32'); y = (x @ np.array([1., -2., .5, 1.]) + rng.normal(size=512) > 0).astype('float32')
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(16, activation='relu'), keras.layers.Dense(1, activation='sigmoid')])
    model.compile(optimizer=keras.optimizers.SGD(momentum=0.9), loss='binary_crossentropy')
    res = lr_find(model, (x, y), min_lr=1e-5, max_lr=1e3, num_steps=150, progress=False)
    diverged_at = res.lrs[-1]
    print(f'{len(res.lrs)} steps, min loss at {res.lr_min_loss:.3g}, stopped at {diverged_at:.3g}, bounds {res.suggested_bounds}')
    assert res.smoothed_losses.min() < 0.8 * res.smoothed_losses[0]
    assert res.suggested_bounds[1] < res.lr_min_loss < diverged_at
    with pytest.raises(ConfigError, match='not compiled'):
        lr_find(keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)]), (x, y), num_steps=3)


def test_mixed_precision_policy_keeps_float32_output():
    assert use_mixed_precision(True) == ('mixed_float16' if tf.config.list_physical_devices('GPU') else 'float32')
    try:
        keras.mixed_precision.set_global_policy('mixed_float16')    # forced, to check the layer dtypes on CPU
        model = build_resnet50((SIZE, SIZE, 1), weights=None, head='avgpool_dense')
        assert get_backbone(model).get_layer('conv1_conv').compute_dtype == 'float16'
        assert model.get_layer('preprocess').compute_dtype == 'float32'
        assert model.get_layer('p_positive').compute_dtype == 'float32'
        assert model.output.dtype == 'float32'
    finally:
        assert use_mixed_precision(False) == 'float32'
    assert keras.mixed_precision.global_policy().name == 'float32'


MIRRORED = textwrap.dedent('''
    import json, os, sys
    os.environ['TF_CPP_MIN_LOG_LEVEL'] = '2'
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices('CPU')[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from breast_cancer.model import build_resnet50, compile_model, Triangular2CyclicalLearningRate
    strategy = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])
    model = build_resnet50((32, 32, 1), weights=None, freeze=1, strategy=strategy)
    compile_model(model, Triangular2CyclicalLearningRate(1e-3, 1e-2, 2), strategy=strategy)
    rng = np.random.default_rng(0)
    x, y = rng.random((8, 32, 32, 1), dtype='float32'), np.array([0, 1] * 4, 'float32')
    before = [w.numpy().copy() for w in model.trainable_weights]
    hist = model.fit(x, y, batch_size=8, epochs=2, verbose=0)  # 2 steps: the zero-gamma residual branches open on the first
    changed = sum(not np.array_equal(a, w.numpy()) for a, w in zip(before, model.trainable_weights))
    same = [w.path for a, w in zip(before, model.trainable_weights) if np.array_equal(a, w.numpy())]
    print(json.dumps(dict(replicas=strategy.num_replicas_in_sync, loss=hist.history['loss'][0], same=same,
                          changed=changed, trainable=len(before), iterations=int(model.optimizer.iterations.numpy()),
                          variable_type=type(model.trainable_weights[0].value).__name__)))
''')


def test_mirrored_strategy_two_logical_cpus_trains_a_step(tmp_path):
    script = tmp_path / 'mirrored.py'; script.write_text(MIRRORED)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    print(out)
    assert out['replicas'] == 2 and out['iterations'] == 2 and np.isfinite(out['loss'])
    # the head and every convolution of the unfrozen block updated. The residual branch starts closed (its last BatchNorm
    # has gamma 0), so after 2 steps the updates of the gammas at 1.0 before it can be below float32 resolution
    assert out['trainable'] > 2 and out['changed'] >= out['trainable'] - 2, out
    assert all(p.endswith('_bn/gamma') for p in out['same']), out['same']
    assert 'Mirrored' in out['variable_type']


def test_clr_modes_are_the_schema_choices():
    "Every `train.clr.mode` the schema allows has a schedule class, and no other mode does (issue 24: one source)."
    from breast_cancer.config import choices
    from breast_cancer.model import CLR_MODES, CyclicalLearningRate
    assert list(CLR_MODES) == list(choices('train.clr.mode'))
    assert all(issubclass(c, CyclicalLearningRate) for c in CLR_MODES.values())
