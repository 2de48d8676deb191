"""Augmentation on the accelerator (issue 26 item 2): the XLA-safe warp equals TensorFlow's kernel, the device path gives the
tf.data path's augmentation for the same seed, epoch and position, and the train_step override of `install_device_augmentation`
feeds the model exactly that, under XLA and several steps per execution, and never at validation or prediction time."""
import numpy as np
import pytest
import keras
import tensorflow as tf
from breast_cancer.config import apply_overrides
from breast_cancer.core import seed_everything
from breast_cancer.augment import (_affine_params, augment_batch, batch_seed, device_augment, install_device_augmentation, scale_and_augment,
                                   to_unit_float, warp_affine)

STRONG = dict(enabled=True, flip='both', rotation=90.0, zoom=0.5, shear=30.0, random_crop=True, crop_min=0.5, crop_max=1.0)

@pytest.fixture(scope='module')
def config():
    return apply_overrides('demo', ['seed=11', 'train.augment.place=device', 'train.augment.rotation=45', 'train.augment.shear=10'])

def _uint8(shape, seed):
    return tf.cast(tf.random.stateless_uniform(shape, seed, 0, 256, dtype=tf.int32), tf.uint8)

@pytest.mark.parametrize('fill_mode', ['constant', 'reflect', 'nearest', 'wrap'])
def test_warp_affine_equals_the_raw_op(fill_mode):
    warp = tf.function(lambda im, t, fill: warp_affine(im, t, fill_mode, fill), jit_compile=True)
    for s in range(4):
        images = tf.random.stateless_uniform((3, 32, 32, 2), (s, 9))
        transforms = _affine_params(3, (32, 32), {**STRONG, 'fill_mode': fill_mode}, tf.constant([s, 5], tf.int64))
        transforms *= [1.0 + 0.4 * s, 1.0 + 0.4 * s, 1, 1.0 + 0.4 * s, 1.0 + 0.4 * s, 1, 0, 0]   # up to 2.2x: far outside
        for fill in (0.0, 0.5):
            ref = tf.raw_ops.ImageProjectiveTransformV3(images=images, transforms=transforms, output_shape=[32, 32],
                                                        fill_value=fill, interpolation='BILINEAR', fill_mode=fill_mode.upper())
            np.testing.assert_allclose(warp_affine(images, transforms, fill_mode, fill).numpy(), ref.numpy(), atol=1e-4)
            np.testing.assert_allclose(warp(images, transforms, fill).numpy(), ref.numpy(), atol=1e-4)   # compiled by XLA

# 8-bit batches are warped in 8 bits (truncated, as ImageProjectiveTransformV3 does): the float rounding of the two warps
# may put a pixel on either side of a grey level, so they agree to one grey level; 16-bit batches are warped in float32
GREY = {tf.uint8: 1 / 255 + 1e-6, tf.uint16: 1e-5}

@pytest.mark.parametrize('dtype', [tf.uint8, tf.uint16])
def test_device_augment_equals_the_tf_data_path(config, dtype):
    aug = config.train.augment
    x = tf.cast(tf.random.stateless_uniform((4, 32, 32, 1), (3, 3), 0, dtype.max + 1, dtype=tf.int64), dtype)
    step = tf.function(lambda x, e, p: device_augment(x, aug, config.seed, e, p), jit_compile=True)
    for epoch, position in [(0, 0), (0, 4), (3, 8), (7, 1000)]:
        cpu = scale_and_augment(x, aug, batch_seed(config.seed, epoch, position))   # what tf.data feeds
        assert np.abs(cpu.numpy() - to_unit_float(x).numpy()).max() > 0.1   # it does augment
        np.testing.assert_allclose(device_augment(x, aug, config.seed, epoch, position).numpy(), cpu.numpy(), atol=GREY[dtype])
        np.testing.assert_allclose(step(x, tf.constant(epoch, tf.int64), tf.constant(position, tf.int64)).numpy(), cpu.numpy(),
                                   atol=GREY[dtype])

def test_device_augment_disabled_only_scales(config):
    aug = {**config.train.augment, 'enabled': False}
    x = _uint8((2, 32, 32, 1), (1, 1))
    np.testing.assert_array_equal(device_augment(x, aug, config.seed, 1, 0).numpy(), x.numpy() / np.float32(255))

class Probe(keras.layers.Layer):
    "Records every training input in `seen` (in call order) and the last inference input in `inferred`."
    def build(self, shape):
        self.seen = self.add_weight(shape=(8, 4, *shape[1:]), initializer='zeros', trainable=False)
        self.inferred = self.add_weight(shape=(4, *shape[1:]), initializer='zeros', trainable=False)
        self.calls = self.add_weight(shape=(), initializer='zeros', trainable=False, dtype='int32')
    def call(self, x, training=False):
        if training:
            self.seen.assign(tf.tensor_scatter_nd_update(self.seen.value, tf.reshape(self.calls.value, [1, 1]), x[None]))
            self.calls.assign_add(1)
        else: self.inferred.assign(x)
        return x

def _model(optimizer, jit, spe):
    seed_everything(0, deterministic=False)   # also turns off op determinism an earlier test may have left on (it stops XLA)
    model = keras.Sequential([keras.Input((32, 32, 1)), Probe(), keras.layers.Conv2D(2, 3),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1, activation='sigmoid')])
    opt = {'sgd': lambda: keras.optimizers.SGD(0.01),
           'accumulate': lambda: keras.optimizers.SGD(0.01, gradient_accumulation_steps=2),   # iterations counts updates
           'overflow': lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.01), initial_scale=3e38)}[optimizer]()
    model.compile(opt, 'binary_crossentropy', jit_compile=jit, steps_per_execution=spe)
    return model

# each optimizer kind once, and XLA and several steps per call each on and off (not the full 12-way product: CI time)
@pytest.mark.parametrize('optimizer, jit, spe', [('sgd', False, 1), ('sgd', True, 2), ('accumulate', False, 2), ('overflow', True, 1)])
def test_install_feeds_the_step_the_tf_data_augmentation(config, jit, spe, optimizer):
    model, bs = _model(optimizer, jit, spe), 4
    images, val = _uint8((8, 32, 32, 1), (2, 2)), tf.random.stateless_uniform((4, 32, 32, 1), (5, 5))
    train = tf.data.Dataset.from_tensor_slices((images, tf.constant([0., 1.] * 4), tf.range(1., 9.))).batch(bs)  # with weights
    callback = install_device_augmentation(model, config, batch_size=bs)
    model.fit(train, epochs=3, initial_epoch=1, validation_data=(val, tf.ones(4)), callbacks=[callback], verbose=0)
    seen = model.layers[0].seen.numpy()
    assert int(model.layers[0].calls.numpy()) == 4   # 2 epochs x 2 steps
    for i, (epoch, step) in enumerate([(1, 0), (1, 1), (2, 0), (2, 1)]):
        position = step * bs
        expected = scale_and_augment(images[position:position + bs], config.train.augment, batch_seed(config.seed, epoch, position))
        np.testing.assert_allclose(seen[i], expected.numpy(), atol=GREY[images.dtype], err_msg=f'epoch {epoch} step {step}')
    np.testing.assert_array_equal(model.layers[0].inferred.numpy(), val.numpy())   # validation: not augmented
    assert 'train_step' not in vars(model)   # the override is gone when training ends

def test_no_augmentation_in_evaluate_and_predict(config):
    model = _model('sgd', False, 1)
    install_device_augmentation(model, config, batch_size=4)   # installed, and left in place on purpose
    x = tf.random.stateless_uniform((4, 32, 32, 1), (6, 6))
    model.evaluate(x, tf.ones(4), batch_size=4, verbose=0)
    np.testing.assert_array_equal(model.layers[0].inferred.numpy(), x.numpy())
    model.layers[0].inferred.assign(tf.zeros_like(x))
    model.predict(x, batch_size=4, verbose=0)
    np.testing.assert_array_equal(model.layers[0].inferred.numpy(), x.numpy())

def test_removed_override_trains_on_plain_batches(config):
    model = _model('sgd', False, 1)
    callback = install_device_augmentation(model, config, batch_size=4)
    x = to_unit_float(_uint8((4, 32, 32, 1), (8, 8)))
    callback.remove(); callback.remove()   # idempotent
    model.fit(x, tf.ones(4), batch_size=4, epochs=1, shuffle=False, verbose=0)
    np.testing.assert_array_equal(model.layers[0].seen.numpy()[0], x.numpy())
