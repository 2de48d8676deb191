"""Wavelet preprocessing across modules and processes: reconstruction, denoising on real mini-MIAS films, errors,
serialisation into the run config, the process-pool image cache, scikit-image parity and the benchmark entry point."""
import math, pickle, subprocess, sys
import numpy as np
import pywt
import pytest
import yaml
from skimage.metrics import peak_signal_noise_ratio as psnr
from skimage.restoration import denoise_wavelet

from breast_cancer.core import ConfigError, DataError
from breast_cancer.data import load_mias, read_image, load_cached
from breast_cancer.wavelet import (DEFAULT_GAINS, WaveletPreprocessor, lesion_contrast, preprocess_manifest,
                                   wavelet_decompose, wavelet_denoise, wavelet_enhance)

COMBOS = [(m, md) for m in ('BayesShrink', 'VisuShrink') for md in ('soft', 'hard')]


@pytest.fixture(scope='module')
def mias():
    return load_mias()


@pytest.fixture(scope='module')
def film(mias):
    "A real bundled 256-px mini-MIAS film (mdb028, malignant circumscribed mass)."
    return read_image(mias.set_index('image_id').loc['mdb028'].image_path)


def _noisy(img, sigma, seed=0):
    return (img + np.random.default_rng(seed).normal(0, sigma, img.shape)).astype(np.float32)


@pytest.mark.parametrize('wavelet', ['haar', 'db1', 'db2', 'db4', 'db8', 'db20', 'sym8', 'coif3', 'bior4.4'])
@pytest.mark.parametrize('shape', [(256, 256), (255, 301), (512, 97), (97, 512, 3)])
def test_perfect_reconstruction(wavelet, shape):
    img = np.random.default_rng(0).random(shape, dtype=np.float32)
    level = min(3, pywt.dwt_max_level(min(shape[:2]), pywt.Wavelet(wavelet).dec_len))
    out = wavelet_denoise(img, wavelet=wavelet, level=level, method=None)
    assert out.shape == img.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, img, atol=5e-6)


def test_reconstruction_of_real_film_every_level(film):
    for level in range(1, 6):
        np.testing.assert_allclose(wavelet_denoise(film, level=level, method=None), film, atol=3e-6)


def test_full_field_size_stays_float32():
    "A full-field mammogram size (odd, non-square): float32 in, float32 out, same shape, no float64 anywhere in the result."
    img = np.random.default_rng(1).random((3001, 4999), dtype=np.float32)
    out = WaveletPreprocessor(enhance=True)(img)
    assert out.shape == img.shape and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1


@pytest.mark.parametrize('sigma', [0.01, 0.02, 0.05, 0.1, 0.2])
def test_denoise_raises_psnr_at_every_noise_level(film, sigma):
    noisy = _noisy(film, sigma)
    before = psnr(film, noisy, data_range=1)
    for level in (1, 2, 3, 4):   # the default rule (BayesShrink, soft) helps at every decomposition depth
        gain = psnr(film, wavelet_denoise(noisy, level=level), data_range=1) - before
        assert gain > 2.0, (sigma, level, gain)
    if sigma >= 0.05:             # at clear noise every rule and mode helps by at least 3 dB
        for method, mode in COMBOS:
            gain = psnr(film, wavelet_denoise(noisy, method=method, mode=mode), data_range=1) - before
            assert gain > 3.0, (sigma, method, mode, gain)


def test_more_noise_more_gain(film):
    gains = [psnr(film, wavelet_denoise(_noisy(film, s)), data_range=1) - psnr(film, _noisy(film, s), data_range=1)
             for s in (0.01, 0.05, 0.2)]
    assert gains[0] < gains[1] < gains[2]


def test_sigma_estimate_is_used(film):
    "sigma=None estimates the true σ: the result is close to passing the true σ, and far from a wrong one."
    noisy = _noisy(film, 0.05)
    est, true, wrong = (wavelet_denoise(noisy, sigma=s) for s in (None, 0.05, 0.005))
    assert psnr(true, est, data_range=1) > 40 and psnr(true, wrong, data_range=1) < 35


def test_rules_and_modes_work_and_differ(film):
    noisy = _noisy(film, 0.05)
    outs = [wavelet_denoise(noisy, method=m, mode=md) for m, md in COMBOS]
    assert all(o.dtype == np.float32 and o.shape == film.shape for o in outs)
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert np.abs(outs[i] - outs[j]).max() > 1e-3, (COMBOS[i], COMBOS[j])


@pytest.mark.parametrize('method,mode', COMBOS)
def test_matches_skimage(film, method, mode):
    noisy = _noisy(film[:251, :233], 0.05)   # odd, non-square
    ref = denoise_wavelet(noisy, sigma=0.05, wavelet='db4', mode=mode, wavelet_levels=4, method=method, rescale_sigma=False)
    assert psnr(ref, wavelet_denoise(noisy, method=method, mode=mode, sigma=0.05), data_range=1) > 60
    rgb = np.stack([noisy, noisy[::-1], noisy * 0.5], -1)
    ref = denoise_wavelet(rgb, sigma=0.05, wavelet='db4', mode=mode, wavelet_levels=4, method=method, rescale_sigma=False,
                          channel_axis=-1, convert2ycbcr=False)
    assert psnr(ref, wavelet_denoise(rgb, method=method, mode=mode, sigma=0.05), data_range=1) > 60


def test_histopathology_rgb(breakhis_sample):
    img = read_image(sorted(breakhis_sample.glob('**/*.png'))[0])
    assert img.ndim == 3 and img.shape[-1] == 3
    out = WaveletPreprocessor(enhance=True)(img)
    assert out.shape == img.shape and out.dtype == np.float32
    np.testing.assert_allclose(out[..., 2], WaveletPreprocessor(enhance=True)(img[..., 2]), atol=1e-6)


@pytest.mark.parametrize('call,err,message', [
    (lambda im: wavelet_denoise(im, wavelet='db99'), ConfigError, "unknown wavelet 'db99'"),
    (lambda im: wavelet_denoise(im, wavelet='morl'), ConfigError, "pywt.wavelist(kind='discrete')"),
    (lambda im: wavelet_denoise(im, level=6), ConfigError, 'at most 5'),
    (lambda im: wavelet_denoise(im[:40, :300], wavelet='db20', level=2), ConfigError, "40×256 image with 'db20'"),
    (lambda im: wavelet_denoise(im, level=0), ConfigError, 'positive integer'),
    (lambda im: wavelet_denoise(im, level=2.5), ConfigError, 'positive integer'),
    (lambda im: wavelet_denoise(im, method='SureShrink'), ConfigError, "method='SureShrink' is unknown"),
    (lambda im: wavelet_denoise(im, mode='garrote'), ConfigError, "mode='garrote' is unknown: use one of 'soft', 'hard'"),
    (lambda im: wavelet_denoise(im, sigma=float('nan')), ConfigError, 'sigma must be a finite number'),
    (lambda im: wavelet_denoise(np.where(im > 0.5, np.nan, im)), DataError, 'NaN or inf pixel'),
    (lambda im: wavelet_denoise(np.where(im > 0.5, np.inf, im)), DataError, 'NaN or inf pixel'),
    (lambda im: wavelet_denoise(im[None]), DataError, 'got shape (1, 256, 256)'),
    (lambda im: wavelet_denoise(im[0]), DataError, '2-D greyscale (H, W) or a colour (H, W, 3)'),
    (lambda im: wavelet_denoise(np.zeros((0, 5))), DataError, 'empty image'),
    (lambda im: wavelet_enhance(im, gains=(1, 2)), ConfigError, 'gains has 2 values but level=4'),
    (lambda im: wavelet_decompose(np.stack([im] * 3, -1)), DataError, 'one 2-D channel'),
    (lambda im: WaveletPreprocessor(wavelet='daub4'), ConfigError, "unknown wavelet 'daub4'"),
    (lambda im: WaveletPreprocessor(method='bayes'), ConfigError, "method='bayes' is unknown"),
    (lambda im: WaveletPreprocessor(sigma=-0.1), ConfigError, 'sigma must be a finite number'),
    (lambda im: WaveletPreprocessor(level=3, enhance=DEFAULT_GAINS), ConfigError, 'gains has 4 values but level=3'),
    (lambda im: WaveletPreprocessor.from_dict({'wavelets': 'db4'}), ConfigError, "unknown wavelet setting(s) ['wavelets']"),
])
def test_bad_input_raises_clear_error(film, call, err, message):
    with pytest.raises(err) as e: call(film)
    assert message in str(e.value)


def test_nan_message_names_the_pixel(film):
    bad = film.copy(); bad[17, 42] = np.nan
    with pytest.raises(DataError, match=r'1 NaN or inf pixel\(s\), the first at \(17, 42\)'): WaveletPreprocessor()(bad)


def test_every_daubechies_wavelet_is_accepted(film):
    for n in range(1, 21):
        p = WaveletPreprocessor(wavelet=f'db{n}', level=2)
        assert p(film).shape == film.shape


def test_preprocessor_config_round_trip(tmp_path):
    p = WaveletPreprocessor(wavelet='sym8', level=3, method='VisuShrink', mode='hard', sigma=0.01, enhance=(2, 1.5, 1))
    cfg = tmp_path / 'config.yaml'
    cfg.write_text(yaml.safe_dump({'preprocessing': p.to_dict()}))
    back = WaveletPreprocessor.from_dict(yaml.safe_load(cfg.read_text())['preprocessing'])
    assert back == p and back.cache_key == p.cache_key
    assert pickle.loads(pickle.dumps(p)) == p
    d = WaveletPreprocessor(enhance=True).to_dict()
    assert d['enhance'] == list(DEFAULT_GAINS)                  # the config records the gains, not just "True"
    assert WaveletPreprocessor.from_dict({'method': None}).method is None


def test_cache_key_changes_with_every_setting_and_is_stable_across_processes():
    variants = [{}, dict(wavelet='db8'), dict(level=3), dict(method='VisuShrink'), dict(method=None), dict(mode='hard'),
                dict(sigma=0.02), dict(enhance=True), dict(enhance=(3, 2, 1.5, 2.4))]
    keys = [WaveletPreprocessor(**v).cache_key for v in variants]
    assert len(set(keys)) == len(keys) and all(isinstance(k, str) and k for k in keys)
    code = "from breast_cancer.wavelet import WaveletPreprocessor as W; print(W(enhance=True).cache_key)"
    other = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == WaveletPreprocessor(enhance=True).cache_key


def test_enhancement_keeps_range_and_gain_one_is_identity(film):
    out = wavelet_enhance(film)
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    np.testing.assert_allclose(wavelet_enhance(film, gains=1.0, method=None), film, atol=3e-6)
    assert np.abs(out - wavelet_denoise(film)).max() > 0.05   # the default gains do something


def calc_circles(info_txt) -> int:
    "Calcification circles with a centre, counted straight from MIAS Info.txt (CALC rows with x, y and radius)."
    return sum(1 for line in open(info_txt) if line.split()[2:3] == ['CALC'] and len(line.split()) >= 7)


def sign_test_p(ratios) -> float:
    "One-sided sign test: P(at least this many ratios > 1) when each is above or below 1 with probability 1/2."
    n, k = len(ratios), int((np.asarray(ratios) > 1).sum())
    return sum(math.comb(n, j) for j in range(k, n + 1)) / 2 ** n


def test_enhancement_raises_calcification_peak_cnr_full_res(shared_data):
    """On the full-resolution films, the default gains make calcifications stand out more (peak CNR). The bounds are not
    read off the output: every circle of Info.txt is measured, and "no effect" is rejected by a 1% one-sided sign test."""
    m = load_mias(shared_data / 'mini-mias')
    ratios = []
    for f in m[m.abnormality_type.fillna('').str.contains('CALC')].itertuples():
        img = read_image(f.image_path); enh = wavelet_enhance(img)
        ratios += [lesion_contrast(enh, l['row'], l['col'], l['radius'])['peak_cnr'] /
                   lesion_contrast(img, l['row'], l['col'], l['radius'])['peak_cnr']
                   for l in f.lesions if l['type'] == 'CALC' and l['row'] is not None]
    ratios = np.array(ratios)
    assert len(ratios) == calc_circles(shared_data / 'mini-mias' / 'Info.txt')
    assert sign_test_p(ratios) < 0.01 and np.median(ratios) > 1, (sign_test_p(ratios), np.median(ratios))


def test_each_gain_reaches_its_own_level():
    """A Haar image built from known detail coefficients (a different energy at each level): after enhancement with
    method=None, the detail energy of level j is multiplied by gain_j squared and no other level changes."""
    rng, n, level = np.random.default_rng(0), 64, 4
    sd = {1: 0.004, 2: 0.008, 3: 0.016, 4: 0.032}                          # detail coefficient sd per level, finest = 1
    coeffs = [np.full((n >> level, n >> level), 0.5 * 2 ** level)]       # Haar approximation of a 0.5 grey image
    for j in range(level, 0, -1):                                        # pywt order: coarsest details first
        coeffs.append(tuple(rng.normal(0, sd[j], (n >> j, n >> j)) for _ in range(3)))
    image = pywt.waverec2(coeffs, 'db1').astype(np.float32)
    assert 0 < image.min() and image.max() < 1                           # no clipping anywhere below
    def energy(img):
        "Detail energy per level, finest first."
        return np.array([sum(float(np.sum(b.astype(np.float64) ** 2)) for b in bands)
                         for bands in pywt.wavedec2(img.astype(np.float64), 'db1', level=level)[:0:-1]])
    before = energy(image)
    np.testing.assert_allclose(before, [sum(float(np.sum(b ** 2)) for b in coeffs[level + 1 - j]) for j in range(1, level + 1)], rtol=1e-4)
    for j in range(level):                                               # one level at a time
        gains = tuple(2.0 if i == j else 1.0 for i in range(level))
        np.testing.assert_allclose(energy(wavelet_enhance(image, 'db1', level, gains, method=None)) / before,
                                   [4.0 if i == j else 1.0 for i in range(level)], rtol=1e-3, err_msg=str(gains))
    expected = np.square(DEFAULT_GAINS)                                  # the defaults, and through the preprocessor
    np.testing.assert_allclose(energy(wavelet_enhance(image, 'db1', level, method=None)) / before, expected, rtol=1e-3)
    prep = WaveletPreprocessor(wavelet='db1', level=level, method=None, enhance=True)
    np.testing.assert_allclose(energy(prep(image)) / before, expected, rtol=1e-3)


def test_preprocess_manifest_process_pool_and_cache_reuse(mias, tmp_path):
    manifest = mias.head(4)
    prep = WaveletPreprocessor(enhance=True)
    out = preprocess_manifest(manifest, prep, size=None, workers=2, cache_root=tmp_path, progress=False)
    assert out.cache_path.notna().all()
    for row in out.itertuples():
        np.testing.assert_allclose(load_cached(row.cache_path), prep(read_image(row.image_path)), atol=0.5/255 + 1e-6)  # the cache keeps 8 bits
    mtimes = [p.stat().st_mtime_ns for p in map(__import__('pathlib').Path, out.cache_path)]
    again = preprocess_manifest(manifest, prep.to_dict(), workers=2, cache_root=tmp_path, progress=False)
    assert list(again.cache_path) == list(out.cache_path)
    assert [p.stat().st_mtime_ns for p in map(__import__('pathlib').Path, again.cache_path)] == mtimes  # reused, not redone
    plain = preprocess_manifest(manifest, WaveletPreprocessor(), workers=1, cache_root=tmp_path, progress=False)
    assert not set(plain.cache_path) & set(out.cache_path)                 # new settings, new files
    with pytest.raises(ConfigError, match='must be a WaveletPreprocessor'): preprocess_manifest(manifest, 'db4')


def test_bench_returns_numbers():
    from breast_cancer.bench import bench_wavelet
    r = bench_wavelet(n_images=2, size=128, workers=2, repeats=1, verbose=False)
    for k in ('ours_ips_1core', 'skimage_ips_1core', 'ours_ips_pool_1', 'ours_ips_all_cores', 'speed_ratio', 'scaling_efficiency'):
        assert r[k] > 0, k
    assert r['dtype'] == 'float32' and r['psnr_gap_db'] < 0.5 and r['psnr_ours'] > r['psnr_noisy'] + 2


def test_cli_runs_benchmark(repo_root):
    "`breast-cancer bench wavelet` (it replaced `python -m breast_cancer.wavelet`) prints the numbers."
    res = subprocess.run([sys.executable, '-c', 'import sys; from breast_cancer.cli import main; sys.exit(main())', 'bench', 'wavelet',
                          '--n', '2', '--size', '128', '--workers', '1'], capture_output=True, text=True, cwd=repo_root, timeout=300)
    assert res.returncode == 0, res.stderr
    assert 'speed ratio' in res.stdout and 'scaling efficiency' in res.stdout and 'PSNR vs clean' in res.stdout


def test_bench_images_fall_back_to_bundled_then_synthetic(monkeypatch, repo_root, tmp_path):
    import breast_cancer.bench as wl
    monkeypatch.setenv('BREAST_CANCER_DATA', str(repo_root / 'data'))          # only the bundled 256-px sample
    images, source = wl._bench_images(2, 300)
    assert source == 'bundled 256-px mini-MIAS, resized to 300 px'
    assert [im.shape for im in images] == [(300, 300)] * 2 and images[0].dtype == np.float32 and images[0].max() > 0.5
    monkeypatch.setenv('BREAST_CANCER_DATA', str(tmp_path))                    # nothing at all: no download, and no
    def no_sample(name): raise DataError(f'no bundled sample {name}')           # package sample (it ships in the wheel)
    monkeypatch.setattr(wl, 'sample_dir', no_sample)
    images, source = wl._bench_images(3, 64)
    assert source == 'synthetic' and len(images) == 3 and images[0].shape == (64, 64)


def test_plot_wavelet_examples_on_mias(mias, tmp_path):
    "Before / after / difference for two real films, saved as a PNG (moved here from the evaluate tests with the function)."
    from breast_cancer.wavelet import plot_wavelet_examples
    fig = plot_wavelet_examples(mias.head(10), WaveletPreprocessor(), n=2)
    assert len(fig.axes) == 6
    fig.savefig(tmp_path / 'w.png'); assert (tmp_path / 'w.png').stat().st_size > 10_000
