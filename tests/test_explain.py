"""Explanations across modules: Grad-CAM and saliency reach inside the nested ResNet-50 that model.build_resnet50 builds."""
import numpy as np
import pytest

from breast_cancer.core import ConfigError
from breast_cancer import explain as EX


def test_grad_cam_on_model_module_resnet50():
    "The model engineer's ResNet-50 wraps keras.applications.ResNet50 as a nested model: Grad-CAM must reach inside."
    model_mod = pytest.importorskip('breast_cancer.model')
    model = model_mod.build_resnet50(input_shape=(32, 32, 1), weights=None)
    path = EX.find_last_conv(model)
    assert path[-1].name == 'conv5_block3_3_conv' and len(path) == 3
    img = np.random.default_rng(0).random((32, 32)).astype('float32')
    cam, sal = EX.grad_cam(model, img), EX.saliency_map(model, img)
    assert cam.shape == sal.shape == (32, 32)
    assert np.isfinite(cam).all() and cam.min() >= 0 and cam.max() <= 1
    assert sal.max() == pytest.approx(1.0) and sal.min() >= 0
    named = EX.grad_cam(model, img, layer_name='conv4_block1_1_conv')
    assert named.shape == (32, 32)
    with pytest.raises(ConfigError, match="no layer named 'nope'"): EX.grad_cam(model, img, layer_name='nope')
