"""Issue 16 (no silent NaNs, a cache that notices damage, named errors, 12-bit PNGs) and issue 17 (dataset-scale
cache: sharding, wavelet.at, interrupted fills, `breast-cancer bench cache-scale`). Each test fails on the code before them."""
import logging, os, signal, subprocess, sys, textwrap, time
from pathlib import Path
import numpy as np, pandas as pd, pytest
from PIL import Image
from breast_cancer.core import ConfigError, DataError
from breast_cancer.cache import cache_images, cache_file_problem, load_cached, transform_and_resize
from breast_cancer.data import load_mias, make_manifest
from breast_cancer.io import read_image, resize_longer, write_dicom, write_pgm

CLI = 'import sys; from breast_cancer.cli import main; sys.exit(main(sys.argv[1:]))'

def _manifest(paths, dataset='t'):
    return make_manifest([dict(image_id=Path(p).stem, image_path=str(p), patient_id=f'p{k}', label='normal')
                          for k, p in enumerate(paths)], dataset)

@pytest.fixture
def nan_tiff(tmp_path):
    "A float TIFF with one NaN pixel and one inf pixel among ordinary values."
    a = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8); a[2, 3] = np.nan; a[5, 5] = np.inf
    Image.fromarray(a, mode='F').save(tmp_path / 'film.tif')
    return tmp_path / 'film.tif'

# ---------------------------------------------------------------- issue 16, item 2: no silent NaNs
def test_nan_pixel_is_an_error_naming_the_file(nan_tiff):
    # before: min/max saw NaN and the whole image came back as zeros
    with pytest.raises(DataError, match=r'film\.tif: 2 NaN or infinite pixel\(s\), the first at \(2, 3\).*data\.nonfinite'):
        read_image(nan_tiff)

def test_nonfinite_options_keep_the_rest_of_the_image(nan_tiff):
    a = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    z, c = read_image(nan_tiff, nonfinite='zero'), read_image(nan_tiff, nonfinite='clip')
    keep = np.ones((8, 8), bool); keep[2, 3] = keep[5, 5] = False
    np.testing.assert_allclose(z[keep], a[keep], atol=1e-6); np.testing.assert_allclose(c[keep], a[keep], atol=1e-6)
    assert (z[2, 3], z[5, 5], c[2, 3], c[5, 5]) == (0, 0, 0, 1)

def test_inf_pixel_never_reaches_the_cache(tmp_path, nan_tiff):
    # before: with no transform, the inf pixel put NaN into the cached .npy
    m = _manifest([nan_tiff])
    with pytest.raises(DataError, match='film.tif: 2 NaN or infinite'): cache_images(m, cache_root=tmp_path / 'c', workers=1, progress=False)
    assert not list((tmp_path / 'c').rglob('*.npy'))
    out = cache_images(m, cache_root=tmp_path / 'c', workers=1, progress=False, nonfinite='clip')
    assert np.isfinite(load_cached(out.cache_path[0])).all()

def test_config_key_data_nonfinite():
    from breast_cancer.config import load_config
    assert load_config({}).data.nonfinite == 'error'
    assert load_config({'data': {'nonfinite': 'zero'}}).data.nonfinite == 'zero'
    with pytest.raises(ConfigError, match=r"data\.nonfinite.*'error', 'zero', 'clip'"): load_config({'data': {'nonfinite': 'nan'}})

# ---------------------------------------------------------------- item 6: the decompression bomb names the file
def test_decompression_bomb_names_the_file(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / 'bomb.png')
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 100)  # 1,600 pixels > 2 x 100: Pillow's DecompressionBombError
    with pytest.raises(DataError, match=r'bomb\.png: refusing to decode .*MAX_IMAGE_PIXELS'): read_image(tmp_path / 'bomb.png')

# ---------------------------------------------------------------- item 7: 12-bit data in 16-bit PNGs
def test_twelve_bit_png_is_scaled_to_full_range(tmp_path):
    px = np.array([[0, 1000], [2048, 4095]], np.uint16)  # a DDSM conversion: 12 bits stored in 16
    Image.fromarray(px).save(tmp_path / 'ddsm.png')
    x = read_image(tmp_path / 'ddsm.png')
    assert x.max() == 1.0 and np.allclose(x, px / 4095, atol=1e-6)  # before: max 0.0625

# ---------------------------------------------------------------- item 5: a cache that notices damage
@pytest.fixture
def pgms(tmp_path):
    rng = np.random.default_rng(0)
    return _manifest([write_pgm(tmp_path / f'im{k}.pgm', rng.integers(0, 256, (48, 40), dtype=np.uint8)) for k in range(4)])

def test_truncated_cache_file_is_rebuilt_with_a_warning(pgms, tmp_path, caplog):
    a = cache_images(pgms, size=32, cache_root=tmp_path / 'c', workers=1, progress=False)
    good = Path(a.cache_path[2]).read_bytes(); Path(a.cache_path[2]).write_bytes(good[:-40])
    with caplog.at_level(logging.WARNING, logger='breast_cancer.cache'):
        b = cache_images(pgms, size=32, cache_root=tmp_path / 'c', workers=1, progress=False)
    assert Path(b.cache_path[2]).read_bytes() == good  # before: the truncated file was kept and training failed later
    assert [r.message for r in caplog.records if 'is damaged' in r.message and a.cache_path[2] in r.message]

def test_damaged_file_inside_the_pipeline_is_a_data_error(pgms, tmp_path):
    from breast_cancer import train as T
    c = T.load_config({'name': 't', 'data': {'image_size': 32}, 'wavelet': None, 'model': {'weights': None}})
    m = cache_images(pgms, size=32, cache_root=tmp_path / 'c', workers=1, progress=False)
    Path(m.cache_path[1]).write_bytes(Path(m.cache_path[1]).read_bytes()[:-40])
    with pytest.raises(DataError, match=rf"{Path(m.cache_path[1]).name} \(.*truncated.*breast-cancer prepare"):
        ds = T.make_dataset(m, c, labels=False)
        for _ in ds: pass  # before: a raw tf.errors.InvalidArgumentError from the graph

def test_prepare_verify_rebuilds_a_nan_file(tmp_path, isolated_dirs, mias_sample):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text(textwrap.dedent(f"""\
        name: verify
        datasets: [{{name: mias, root: {mias_sample}}}]
        data: {{image_size: 32, max_images: 6}}
        wavelet: null
        model: {{weights: null}}"""))
    env = {**os.environ, 'BREAST_CANCER_CACHE': str(isolated_dirs / 'cache')}
    run = lambda *a: subprocess.run([sys.executable, '-c', CLI, *a], capture_output=True, text=True, env=env, timeout=300)
    from breast_cancer.cascade import prepare
    from breast_cancer.config import load_config
    m = prepare(load_config(cfg))
    x = load_cached(m.cache_path[0]).copy(); x[3, 3] = np.nan; np.save(m.cache_path[0], x)  # a valid header: only --verify sees it
    r = run('prepare', '--config', str(cfg), '--verify')
    assert r.returncode == 0, r.stderr
    assert f'verified and cached {len(m)} images' in r.stdout and 'holds NaN' in r.stderr
    assert np.isfinite(load_cached(m.cache_path[0])).all()

# ---------------------------------------------------------------- issue 17: sharding, wavelet.at, Ctrl-C
def test_cache_is_sharded(pgms, tmp_path):
    out = cache_images(pgms, size=32, cache_root=tmp_path / 'c', workers=1, progress=False)
    assert all(Path(p).parent.parent == tmp_path / 'c' / 't' and len(Path(p).parent.name) == 2 for p in out.cache_path)

def test_wavelet_at_model_runs_after_resizing(tmp_path, mias_sample):
    from breast_cancer.wavelet import WaveletPreprocessor
    m = load_mias(mias_sample).head(2)
    src, mdl = WaveletPreprocessor(enhance=True, level=3, at='source'), WaveletPreprocessor(enhance=True, level=3, at='model')
    a = cache_images(m, size=128, transform=src, cache_root=tmp_path / 'c', workers=1, progress=False)
    b = cache_images(m, size=128, transform=mdl, cache_root=tmp_path / 'c', workers=1, progress=False)
    img = read_image(m.image_path.iloc[0])
    grey = 0.5 / 255 + 1e-6   # an 8-bit source is cached as uint8: within half a grey level
    np.testing.assert_allclose(load_cached(a.cache_path[0]), resize_longer(src(img), 128), atol=grey)
    np.testing.assert_allclose(load_cached(b.cache_path[0]), np.clip(mdl(resize_longer(img, 128)), 0, 1), atol=grey)
    assert a.cache_path[0] != b.cache_path[0]
    assert WaveletPreprocessor().at == 'model' and WaveletPreprocessor.from_dict({'at': 'source'}).to_dict()['at'] == 'source'

FILL = """
import sys, time
from breast_cancer import cache, data
class Slow:
    cache_key = 'slow-v1'
    def __call__(self, a): time.sleep(1.0); return a
m = data.load_mias(sys.argv[1]).head(40)  # 40 s uninterrupted (20 s on 2 workers): a loaded CI machine still interrupts it midway
print('start', flush=True)
cache.cache_images(m, size=32, transform=Slow(), cache_root=sys.argv[2], workers=int(sys.argv[3]), progress=False)
"""

@pytest.mark.parametrize('window', [None, (30000, 20000)])
def test_cache_of_16_bit_films_equals_read_then_resize(tmp_path, window):
    # the pool reads 16-bit films straight to the cache size (read_resized): the same pixels as read_image then resize,
    # with and without a window that clips, with no transform and with the wavelet at `model`
    from breast_cancer.wavelet import WaveletPreprocessor
    px = np.random.default_rng(0).integers(500, 60000, (900, 560)).astype(np.uint16)
    films = [write_dicom(tmp_path / f'f{k}.dcm', px[::-1] if k else px, window=window) for k in range(2)]
    Image.fromarray(px).save(tmp_path / 'f.png'); films.append(tmp_path / 'f.png')
    for tf in (None, WaveletPreprocessor(level=3, at='model')):
        out = cache_images(_manifest(films), size=96, transform=tf, cache_root=tmp_path / 'c', workers=2, progress=False)
        for f, c in zip(films, out.cache_path):
            want = transform_and_resize(read_image(f), 96, tf)
            np.testing.assert_allclose(load_cached(c), want, atol=1e-5 + 0.5 / 65535)   # cached as uint16

@pytest.mark.parametrize('workers', [1, 2])
def test_ctrl_c_keeps_finished_files_and_resumes(tmp_path, mias_sample, workers):
    (tmp_path / 'fill.py').write_text(FILL)
    root = tmp_path / 'c'
    p = subprocess.Popen([sys.executable, str(tmp_path / 'fill.py'), str(mias_sample), str(root), str(workers)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))   # a background CI job inherits SIGINT ignored
    assert p.stdout.readline().strip() == 'start'
    deadline = time.time() + 60
    while len(list(root.rglob('*.npy'))) < 3 and time.time() < deadline: time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group, as in a terminal
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and 'KeyboardInterrupt' in err
    done = list(root.rglob('*.npy'))
    assert 3 <= len(done) < 40
    assert not [f for f in root.rglob('*') if f.is_file() and f.suffix != '.npy']  # nothing half-written
    assert all(cache_file_problem(f, 32) is None for f in done)
    m = load_mias(mias_sample).head(40)
    out = cache_images(m, size=32, transform=_Slow(), cache_root=root, workers=1, progress=False)
    assert _Slow.calls == 40 - len(done)  # the rerun computed only the missing images
    assert all(cache_file_problem(f, 32) is None for f in out.cache_path)

class _Slow:  # the same cache_key as the script's transform, counting calls
    cache_key, calls = 'slow-v1', 0
    def __call__(self, a): type(self).calls += 1; return a

@pytest.fixture(autouse=True)
def _reset_slow(): _Slow.calls = 0

def test_bench_cache_cli_prints_same_run_ratios(tmp_path):
    r = subprocess.run([sys.executable, '-c', CLI, 'bench', 'cache-scale', '--n', '40', '--size', '256', '--films', '1',
                        '--workers', '1', '--film-shape', '240x150'], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    for s in ('× decode (target <= 2)', 'source / model', 'scaling efficiency', 'memory-bound NumPy work', '/s (target >= 2,000)', 'the float32 image', 'load average'):
        assert s in r.stdout, (s, r.stdout)


# ---------------------------------------------------------------- issue 26, item 3: the cache in the source's bit depth
def _source(kind, tmp_path, mias_sample):
    "An 8-bit PNG (mini-MIAS), a 12-bit-in-16 PGM, or a 16-bit DICOM film; and the dtype the cache must store it in."
    rng = np.random.default_rng(1)
    if kind == 'png8': return mias_sample / 'mdb001.png', np.uint8
    if kind == 'pgm16': return write_pgm(tmp_path / 'f.pgm', rng.integers(0, 4096, (90, 61)).astype(np.uint16), maxval=4095), np.uint16
    return write_dicom(tmp_path / 'f.dcm', rng.integers(500, 60000, (90, 61)).astype(np.uint16)), np.uint16

@pytest.mark.parametrize('kind', ['png8', 'pgm16', 'dicom16'])
@pytest.mark.parametrize('fit', [None, 'pad', 'stretch'])
def test_cache_in_the_source_bit_depth_within_one_grey_level(tmp_path, mias_sample, kind, fit):
    "Before: float32, 4 bytes a pixel. Now uint8 (a quarter of the bytes) or uint16 (half), within one grey level of the float32 result."
    from breast_cancer.cache import cache_layout, fit_square
    src, dtype = _source(kind, tmp_path, mias_sample)
    p = cache_images(_manifest([src]), size=32, fit=fit, cache_root=tmp_path / 'c', workers=1, progress=False).cache_path[0]
    want = transform_and_resize(read_image(src), 32)          # what the float32 cache held
    if fit is not None: want = fit_square(want, 32, fit)       # ... and what the pipeline then made of it
    stored = np.load(p)
    assert stored.dtype == dtype and stored.shape == want.shape == ((32, 32) if fit else want.shape)
    assert np.abs(load_cached(p) - want).max() * np.iinfo(dtype).max <= 1
    assert (os.path.getsize(p) - cache_layout(p).offset) * (4 // np.dtype(dtype).itemsize) == want.size * 4   # 1/4 or 1/2 of float32

def test_old_float32_cache_files_are_never_read(tmp_path, mias_sample):
    "The key carries the cache format: the file an earlier version wrote (float32, under the old key) is not the one read now."
    import hashlib
    src = mias_sample / 'mdb001.png'; st = os.stat(src)
    old_key = hashlib.sha256(f'{os.path.abspath(src)}|{st.st_size}|{st.st_mtime_ns}|32|none'.encode()).hexdigest()[:20]
    p = cache_images(_manifest([src]), size=32, cache_root=tmp_path / 'c', workers=1, progress=False).cache_path[0]
    assert old_key not in p and np.load(p).dtype == np.uint8

def test_fit_needs_a_size_and_a_known_mode(tmp_path, mias_sample):
    m = _manifest([mias_sample / 'mdb001.png'])
    with pytest.raises(ConfigError, match="fit='square': give one of 'pad', 'stretch' with a size"):
        cache_images(m, size=32, fit='square', cache_root=tmp_path / 'c', workers=1, progress=False)
    with pytest.raises(ConfigError, match="fit='pad': give one of"): cache_images(m, fit='pad', cache_root=tmp_path / 'c')
