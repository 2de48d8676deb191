"""Issue 26 item 1: `train.mixed_precision`, `train.xla` and `train.steps_per_execution` resolved by
`model.precision_settings`, applied by `build_model`/`small_cnn` (a policy scoped to the build, a float32 output) and
`compile_model` (jit_compile, steps_per_execution, Keras's own loss scaling). GPUs are mocked; everything runs on the CPU."""
import logging
from unittest import mock
import numpy as np
import pytest
import keras
import tensorflow as tf
from breast_cancer import model as M
from breast_cancer.core import seed_everything
from breast_cancer.config import load_config

SIZE = 32


@pytest.fixture
def config():
    return load_config('demo').replace(**{'data.image_size': SIZE})


def fake_gpus(*caps):
    "TensorFlow's device query patched: one GPU per compute capability."
    gpus = [tf.config.PhysicalDevice(f'/physical_device:GPU:{i}', 'GPU') for i in range(len(caps))]
    details = {g.name: {'compute_capability': cc} for g, cc in zip(gpus, caps)}
    return mock.patch.multiple(tf.config, list_physical_devices=lambda kind=None: gpus if kind == 'GPU' else [],
                               experimental=mock.Mock(get_device_details=lambda g: details[g.name]))


def test_auto_on_this_cpu_is_float32_with_a_reason(config):
    if tf.config.list_physical_devices('GPU'): pytest.skip('this machine has a GPU')
    s = M.precision_settings(config)
    assert s == {'mixed_precision': False, 'mixed_precision_reason': 'auto: no GPU, float32 on the CPU',
                 'xla': False, 'xla_reason': 'false in the config', 'steps_per_execution': 1}


@pytest.mark.parametrize('cap,on', [((8, 0), True), ((7, 0), True), ((6, 1), False)])
def test_auto_follows_the_compute_capability(config, cap, on):
    with fake_gpus(cap): s = M.precision_settings(config)
    assert s['mixed_precision'] is on
    assert f'{cap[0]}.{cap[1]}' in s['mixed_precision_reason']


def test_auto_takes_the_weakest_gpu(config):
    with fake_gpus((8, 0), (6, 1)): assert M.precision_settings(config)['mixed_precision'] is False


def test_true_on_a_cpu_is_honoured_and_says_it_is_slower(config):
    with fake_gpus():
        s = M.precision_settings(config.replace(**{'train.mixed_precision': True}))
    assert s['mixed_precision'] is True and 'slower than float32' in s['mixed_precision_reason']


def test_true_falls_back_with_a_logged_reason_where_float16_fails(config, monkeypatch, caplog):
    monkeypatch.setattr(M, '_float16_trains', lambda: 'InternalError: no float16 kernel')
    monkeypatch.setattr(M, '_xla_compiles', lambda: 'InvalidArgumentError: no XLA device')
    c = config.replace(**{'train.mixed_precision': True, 'train.xla': True, 'train.deterministic': False})
    with fake_gpus(), caplog.at_level(logging.WARNING, logger='breast_cancer'): s = M.precision_settings(c)
    assert (s['mixed_precision'], s['xla']) == (False, False)
    assert 'no float16 kernel' in s['mixed_precision_reason'] and 'no XLA device' in s['xla_reason']
    assert any('no float16 kernel' in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_each_outcome_is_logged_once(config, caplog):
    c = config.replace(**{'train.steps_per_execution': 3})
    with caplog.at_level(logging.INFO, logger='breast_cancer'):
        for _ in range(3): M.precision_settings(c)
    assert sum('steps_per_execution 3' in r.getMessage() for r in caplog.records) <= 1   # 0 if an earlier test logged it


def test_xla_with_op_determinism_falls_back(config):
    s = M.precision_settings(config.replace(**{'train.xla': True, 'train.deterministic': True}))
    assert s['xla'] is False and 'train.deterministic: false' in s['xla_reason']


def test_mixed_build_keeps_the_output_float32_and_the_global_policy():
    assert keras.mixed_precision.global_policy().name == 'float32'
    net = M.build_model('resnet50', (SIZE, SIZE, 1), weights=None, freeze='none', mixed_precision=True)
    assert keras.mixed_precision.global_policy().name == 'float32'
    assert M.get_backbone(net).get_layer('conv1_conv').compute_dtype == 'float16'
    assert net.get_layer('preprocess').compute_dtype == 'float32'
    assert net.get_layer('p_positive').compute_dtype == 'float32' and net.output.dtype == 'float32'
    assert M.build_model('resnet50', (SIZE, SIZE, 1), weights=None).get_layer('p_positive').compute_dtype == 'float32'
    M.compile_model(net, 1e-3)
    assert isinstance(net.optimizer, keras.optimizers.LossScaleOptimizer)      # Keras's own dynamic loss scaling
    assert float(net.optimizer.scale_loss(1.0)) > 1
    assert not isinstance(M.compile_model(M.small_cnn((SIZE, SIZE, 1)), 1e-3).optimizer, keras.optimizers.LossScaleOptimizer)


def test_xla_and_mixed_precision_train_small_cnn_on_the_cpu(config, caplog):
    c = config.replace(**{'train.mixed_precision': True, 'train.xla': True, 'train.deterministic': False,
                          'train.steps_per_execution': 2})
    seed_everything(0, deterministic=False)   # as training does: an earlier test may have turned op determinism on
    with caplog.at_level(logging.INFO, logger='breast_cancer'): s = M.precision_settings(c)
    net = M.small_cnn((SIZE, SIZE, 1), mixed_precision=s['mixed_precision'])
    assert keras.mixed_precision.global_policy().name == 'float32'
    M.compile_model(net, 1e-2, metrics=[], jit_compile=s['xla'], steps_per_execution=s['steps_per_execution'])
    if s['xla']: assert net.jit_compile is True
    else: assert any(s['xla_reason'] in r.getMessage() for r in caplog.records)    # fell back, and said why
    assert net.steps_per_execution == 2
    assert isinstance(net.optimizer, keras.optimizers.LossScaleOptimizer) is s['mixed_precision']
    rng = np.random.default_rng(0)
    x, y = rng.random((8, SIZE, SIZE, 1), dtype='float32'), np.array([0, 1] * 4, 'float32')
    hist = net.fit(x, y, batch_size=4, epochs=1, verbose=0)           # 2 steps, one call
    assert int(net.optimizer.iterations.numpy()) == 2 and np.isfinite(hist.history['loss'][0])
    assert net.predict(x[:2], verbose=0).dtype == np.float32
