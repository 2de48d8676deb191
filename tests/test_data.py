"""breast_cancer.data (with io and cache): manifest contract, read_image on every format, load_mias on real and quirky trees."""
import numpy as np, pandas as pd, pytest
from PIL import Image
from breast_cancer.core import DataError, ConfigError
from breast_cancer.data import LABELS, MANIFEST_COLUMNS, OPTIONAL_COLUMNS, make_manifest, validate_manifest, load_mias
from breast_cancer.io import read_image, write_pgm, write_dicom
from breast_cancer.fixtures import make_mias_tree, make_mias_archive

MIAS_COUNTS = {'normal': 207, 'benign': 63, 'malignant': 52}

# ---------------------------------------------------------------- fixtures
@pytest.fixture
def mias_tree(tmp_path):
    "A tiny MIAS tree with a header line, a multi-lesion film, an mdb059-like and a *NOTE 3* line (128-px PGMs)."
    return make_mias_tree(tmp_path / 'mias', size=128)

# ---------------------------------------------------------------- manifest
def test_contract_names():
    assert LABELS == ('normal', 'benign', 'malignant')
    assert MANIFEST_COLUMNS == ('dataset', 'image_id', 'image_path', 'patient_id', 'label', 'abnormal', 'malignant')
    for c in ('laterality', 'view', 'density', 'abnormality_type', 'lesions', 'roi_path', 'mask_path', 'assessment',
              'subtlety', 'split'): assert c in OPTIONAL_COLUMNS

def test_make_manifest_from_dataframe_keeps_extras(tmp_path):
    df = pd.DataFrame(dict(image_id=[1, 2], image_path=['a.png', 'b.png'], patient_id=[7, 7],
                           label=['BENIGN', ' malignant '], magnification=[40, 100]))
    m = make_manifest(df, 'x')
    assert m.image_id.tolist() == ['1', '2'] and m.patient_id.tolist() == ['7', '7']
    assert m.label.tolist() == ['benign', 'malignant'] and m.columns[-1] == 'magnification'
    assert all(p.startswith('/') for p in m.image_path) and m.malignant.tolist() == [False, True]

def test_validate_names_bad_rows():
    m = make_manifest([dict(image_id=f'i{k}', image_path=f'/x/{k}.png', patient_id='p', label='normal') for k in range(3)], 'x')
    bad = m.copy(); bad.loc[1, 'label'] = 'cancerous'
    with pytest.raises(DataError, match=r"i1='cancerous'"): validate_manifest(bad)
    bad = m.copy(); bad.loc[2, 'patient_id'] = None
    with pytest.raises(DataError, match=r"'patient_id' is empty .*i2"): validate_manifest(bad)
    bad = m.copy(); bad['split'] = ['train', 'test', 'holdout']
    with pytest.raises(DataError, match='holdout'): validate_manifest(bad)
    bad = m.copy(); bad['abnormal'] = True
    with pytest.raises(DataError, match="'abnormal' disagrees"): validate_manifest(bad)

# ---------------------------------------------------------------- read_image
def test_read_image_formats(tmp_path):
    a8 = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    assert np.allclose(read_image(write_pgm(tmp_path / 'a.pgm', a8)), a8 / 255)
    a16 = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    r = read_image(write_pgm(tmp_path / 'b.pgm', a16))
    assert r.dtype == np.float32 and np.allclose(r, a16 / 65535, atol=1e-6)
    Image.fromarray(a16).save(tmp_path / 'c.png')
    assert np.allclose(read_image(tmp_path / 'c.png'), a16 / 65535, atol=1e-6)
    Image.fromarray(np.stack([a8, a8 // 2, a8 // 4], -1)).save(tmp_path / 'd.png')
    rgb = read_image(tmp_path / 'd.png')
    assert rgb.shape == (3, 4, 3) and np.allclose(rgb[..., 1], (a8 // 2) / 255)

def test_read_dicom_rescale_window_monochrome1(tmp_path):
    px = np.array([[0, 100, 200], [300, 400, 500]], np.uint16)
    # rescale: value = 4*px - 1000 -> -1000..1000; window centre 0, width 1000 (LINEAR) shows -500..500
    got = read_image(write_dicom(tmp_path / 'a.dcm', px, 'MONOCHROME1', slope=4, intercept=-1000, window=(0, 1000)))
    v = px * 4.0 - 1000
    want = 1 - np.clip((v - (0 - 0.5)) / (1000 - 1) + 0.5, 0, 1)
    assert got.dtype == np.float32 and got.shape == (2, 3)
    assert np.allclose(got, want, atol=1e-4)
    assert got[0, 0] == 1.0 and got[1, 2] == 0.0  # MONOCHROME1: the lowest value is white
    plain = read_image(write_dicom(tmp_path / 'b.dcm', px))
    assert np.allclose(plain, px / 500)

def _lut_sequence(values, first=0):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    item = Dataset(); item.LUTDescriptor = [len(values), first, 16]; item.LUTData = np.asarray(values, '<u2').tobytes()
    return Sequence([item])

@pytest.mark.parametrize('lut', ['ModalityLUTSequence', 'VOILUTSequence'])
def test_read_dicom_monochrome1_with_a_lut(tmp_path, lut):
    "A MONOCHROME1 film with a (non-linear) modality or VOI LUT is inverted too: its lowest stored value is white."
    stored = np.arange(8, dtype=np.uint16).reshape(2, 4)
    curve = np.array([0, 10, 40, 90, 160, 250, 360, 490])
    m1 = read_image(write_dicom(tmp_path / 'm1.dcm', stored, 'MONOCHROME1', **{lut: _lut_sequence(curve)}))
    m2 = read_image(write_dicom(tmp_path / 'm2.dcm', stored, 'MONOCHROME2', **{lut: _lut_sequence(curve)}))
    assert np.allclose(m2.ravel(), curve / 490, atol=1e-6)
    assert np.allclose(m1.ravel(), 1 - curve / 490, atol=1e-6)
    assert m1[0, 0] > 0.999 and m1[1, 3] < 1e-6   # the lowest stored value is white

def test_unreadable_file_is_not_called_corrupt(tmp_path, monkeypatch):
    "A file the user may not read: the error says unreadable (permissions), for PNG and DICOM alike."
    import builtins
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / 'locked.png')
    write_dicom(tmp_path / 'locked.dcm', np.zeros((4, 4), np.uint16))
    real_open = builtins.open
    def refuse(f, *a, **k):   # root may read anything, so the OS's refusal is played here
        if 'locked' in str(f): raise PermissionError(13, 'Permission denied', str(f))
        return real_open(f, *a, **k)
    monkeypatch.setattr(builtins, 'open', refuse)
    for f in (tmp_path / 'locked.png', tmp_path / 'locked.dcm'):
        with pytest.raises(DataError, match='unreadable for this user, not corrupt') as e: read_image(f)
        assert str(f) in str(e.value) and 'corrupt or' not in str(e.value)

def test_read_image_errors_name_the_file(tmp_path):
    (tmp_path / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n' + bytes(range(200)))
    with pytest.raises(DataError, match='broken.png'): read_image(tmp_path / 'broken.png')
    with pytest.raises(DataError, match='image not found: .*gone.jpg'): read_image(tmp_path / 'gone.jpg')
    write_dicom(tmp_path / 'x.dcm', np.zeros((8, 8), np.uint16))
    (tmp_path / 'cut.dcm').write_bytes((tmp_path / 'x.dcm').read_bytes()[:-60])
    with pytest.raises(DataError, match='cut.dcm'): read_image(tmp_path / 'cut.dcm')

# ---------------------------------------------------------------- load_mias
def _check_mias_counts(m):
    assert len(m) == 322 and m.patient_id.nunique() == 161
    assert m.label.value_counts().to_dict() == MIAS_COUNTS
    assert (m.groupby('patient_id').size() == 2).all()
    assert m.lesions.map(len).sum() == 330 - 207  # every abnormal line is kept
    validate_manifest(m)

def test_load_mias_bundled_counts(mias_sample):
    m = load_mias(mias_sample); _check_mias_counts(m)
    r = m.set_index('image_id').loc['mdb005', 'lesions']  # 'mdb005 F CIRC B 477 133 30' and '... 500 168 26'
    assert [(l['row'], l['col'], l['radius']) for l in r] == [((1024 - 133) / 4, 477 / 4, 30 / 4), ((1024 - 168) / 4, 500 / 4, 26 / 4)]

def test_load_mias_full_resolution_counts(shared_data):
    m = load_mias(shared_data / 'mini-mias'); _check_mias_counts(m)
    l = m.set_index('image_id').loc['mdb001', 'lesions'][0]
    assert (l['row'], l['col'], l['radius']) == (1024 - 425, 535, 197)

def test_load_mias_quirks(mias_tree):
    m = load_mias(mias_tree).set_index('image_id')
    assert m.label.tolist() == ['benign', 'normal', 'malignant', 'benign', 'malignant', 'normal']
    assert m.patient_id.tolist() == ['mdb001+mdb002'] * 2 + ['mdb003+mdb004'] * 2 + ['mdb005+mdb006'] * 2
    assert [l['severity'] for l in m.loc['mdb003', 'lesions']] == ['B', 'M']
    assert m.loc['mdb004', 'lesions'] == [dict(type='CIRC', severity='B', row=None, col=None, radius=None, x=None, y=None)]
    assert m.loc['mdb005', 'lesions'][0]['note'] == '*NOTE 3*'
    assert m.loc['mdb001', 'lesions'][0]['row'] == pytest.approx((1024 - 425) / 8)
    assert m.density.tolist()[:3] == ['fatty-glandular', 'fatty-glandular', 'dense-glandular']

def test_load_mias_without_header_and_png(tmp_path):
    a = load_mias(make_mias_tree(tmp_path / 'a', ext='png', header=False))
    b = load_mias(make_mias_tree(tmp_path / 'b'))
    assert a.label.tolist() == b.label.tolist() and a.image_path[0].endswith('mdb001.png')

def test_load_mias_missing_and_corrupt(mias_tree):
    (mias_tree / 'mdb003.pgm').write_bytes(b'P5\n128 128\n255\n' + bytes(100))  # truncated
    with pytest.raises(DataError, match='mdb003.pgm'): load_mias(mias_tree)
    (mias_tree / 'mdb006.pgm').unlink()
    with pytest.raises(DataError, match='mdb006.pgm'): load_mias(mias_tree)
    with pytest.raises(DataError, match='download mias'): load_mias(mias_tree / 'nowhere')

# ---------------------------------------------------------------- splits
from breast_cancer.data import patient_split, patient_kfold, save_split, load_split, check_patient_leakage

def _synthetic_manifest(n_patients=60, seed=0):
    "Many images per patient (1-12) and unbalanced labels (70 % normal patients, few malignant)."
    rng = np.random.default_rng(seed); rows = []
    for p in range(n_patients):
        plabel = rng.choice(LABELS, p=[0.7, 0.2, 0.1])
        for k in range(int(rng.integers(1, 13))):
            lab = plabel if plabel == 'normal' or k % 3 else 'normal'  # abnormal patients also have normal films
            rows.append(dict(image_id=f'p{p}_{k}', image_path=f'/x/p{p}_{k}.png', patient_id=f'p{p}', label=lab))
    return make_manifest(rows, 'synthetic')

@pytest.fixture(scope='module')
def mias_manifest(mias_sample): return load_mias(mias_sample)

@pytest.fixture(params=['mias', 'synthetic'])
def manifest(request, mias_manifest):
    return mias_manifest.copy() if request.param == 'mias' else _synthetic_manifest()

@pytest.mark.parametrize('seed', [0, 1, 7, 42])
def test_patient_split_never_leaks(manifest, seed):
    s = patient_split(manifest, test_size=0.2, val_size=0.1, seed=seed)
    assert s.groupby('patient_id').split.nunique().max() == 1
    check_patient_leakage(s)
    assert set(s.split) == {'train', 'val', 'test'}
    frac = s.split.value_counts(normalize=True)
    assert 0.1 < frac['test'] < 0.3 and 0.03 < frac['val'] < 0.2, frac
    for lab in ('normal', 'malignant'):  # every part sees the minority classes
        assert (s[s.label == lab].split.value_counts() > 0).all()
    assert s.drop(columns='split').equals(manifest)  # nothing else changed
    assert patient_split(manifest, seed=seed).split.tolist() == s.split.tolist()

@pytest.mark.parametrize('seed', [0, 3])
def test_patient_kfold_never_leaks(manifest, seed):
    f = patient_kfold(manifest, n_splits=5, seed=seed)
    assert f.groupby('patient_id').fold.nunique().max() == 1 and sorted(f.fold.unique()) == [0, 1, 2, 3, 4]
    share = pd.crosstab(f.fold, f.label, normalize='index')
    assert (share - manifest.label.value_counts(normalize=True)).abs().max().max() < 0.15  # stratified

def test_split_stratifies_better_than_chance():
    m = _synthetic_manifest(200, seed=1)
    overall = (m.label == 'malignant').mean()
    dev = [abs((s[s.split == 'test'].label == 'malignant').mean() - overall)
           for s in (patient_split(m, seed=k) for k in range(5))]
    assert max(dev) < 0.05, dev

def test_official_split_kept_and_leaky_one_refused(tmp_path):
    "A dataset's own split is kept; one that puts a patient on both sides is refused when the split is built (so `train` stops)."
    from breast_cancer.config import load_config
    from breast_cancer.train import ensure_split
    m = _synthetic_manifest()
    pid = m.patient_id.str[1:].astype(int)
    m['split'] = np.where(pid % 4 == 0, 'test', 'train')
    s = patient_split(m, seed=0)
    assert (s.split[m.split == 'test'] == 'test').all() and set(s.split[m.split == 'train']) == {'train', 'val'}
    k = patient_kfold(m)
    assert (k.fold[m.split == 'test'] == -1).all() and k.fold[m.split == 'train'].between(0, 4).all()
    m.loc[m.index[m.patient_id == 'p1'][:1], 'split'] = 'test'  # the published split leaks patient p1
    with pytest.raises(DataError, match=r"synthetic: the dataset's own split puts 1 patient\(s\) in more than one part \(p1 in \['test', 'train'\]\)"):
        patient_split(m, seed=0)
    with pytest.raises(DataError, match=r'p1 in .*official_split: false'): ensure_split(m, load_config('demo'))
    check_patient_leakage(patient_split(m, keep_official=False))

def test_split_roundtrip_and_mismatch(tmp_path, mias_sample):
    m = load_mias(mias_sample)
    s = patient_kfold(patient_split(m, seed=5), seed=5)
    path = save_split(s, tmp_path / 'split.csv')
    back = load_split(m, path)
    assert back.split.tolist() == s.split.tolist() and back.fold.tolist() == s.fold.tolist()
    with pytest.raises(DataError, match='no split for 22 row'): load_split(m, save_split(s.iloc[22:], tmp_path / 'p.csv'))
    other = m.assign(patient_id=m.image_id)
    with pytest.raises(DataError, match='patient ids changed'): load_split(other, path)
    (tmp_path / 'junk.csv').write_text('a,b\n1,2\n')
    with pytest.raises(DataError, match='not a split file'): load_split(m, tmp_path / 'junk.csv')

def test_split_bad_arguments(mias_sample):
    m = load_mias(mias_sample)
    with pytest.raises(ConfigError, match='sum to less than 1'): patient_split(m, 0.6, 0.5)
    with pytest.raises(ConfigError, match='no column'): patient_split(m, stratify='birads')
    with pytest.raises(DataError, match='cannot make 5 folds'): patient_kfold(m.head(4))

# ---------------------------------------------------------------- image cache
import os, time
from breast_cancer.cache import cache_images, load_cached
from breast_cancer.data import load_csv, load_folder, load_dataset, get_loader, DATASETS

class Gamma:
    "A picklable transform with a cache_key, like WaveletPreprocessor."
    def __init__(self, g): self.g = g; self.cache_key = f'gamma-{g}'
    def __call__(self, a): return a ** self.g

@pytest.fixture
def small_set(tmp_path):
    "Five 8-bit PGMs of 40x30 px (not square) in a manifest."
    rng = np.random.default_rng(0); rows = []
    for k in range(5):
        p = write_pgm(tmp_path / f'img{k}.pgm', rng.integers(0, 256, (30, 40), dtype=np.uint8))
        rows.append(dict(image_id=f'img{k}', image_path=str(p), patient_id=f'p{k}', label=LABELS[k % 3]))
    return make_manifest(rows, 'tiny')

def test_cache_process_pool_reuse_and_invalidation(small_set, tmp_path):
    root = tmp_path / 'cache'
    a = cache_images(small_set, size=20, transform=Gamma(2.0), cache_root=root, workers=2, progress=False)
    assert a.drop(columns='cache_path').equals(small_set) and a.cache_path.map(os.path.exists).all()
    def expected(k, g):  # transform at source resolution, then Lanczos to a longer side of 20
        im = Image.fromarray((read_image(small_set.image_path[k]) ** g).astype(np.float32), mode='F')
        return np.clip(np.asarray(im.resize((20, 15), Image.Resampling.LANCZOS)), 0, 1)
    x = load_cached(a.cache_path[1])
    assert x.shape == (15, 20) and x.dtype == np.float32 and np.allclose(x, expected(1, 2.0), atol=0.5 / 255 + 1e-6)  # 8-bit: uint8
    mtimes = [os.stat(p).st_mtime_ns for p in a.cache_path]
    time.sleep(0.01)
    b = cache_images(small_set, size=20, transform=Gamma(2.0), cache_root=root, workers=2, progress=False)
    assert b.cache_path.tolist() == a.cache_path.tolist() and [os.stat(p).st_mtime_ns for p in b.cache_path] == mtimes
    c = cache_images(small_set, size=20, transform=Gamma(0.5), cache_root=root, workers=1, progress=False)
    assert not set(c.cache_path) & set(a.cache_path)
    assert np.allclose(load_cached(c.cache_path[1]), expected(1, 0.5), atol=0.5 / 255 + 1e-6)
    d = cache_images(small_set, size=10, transform=Gamma(2.0), cache_root=root, workers=1, progress=False)
    assert load_cached(d.cache_path[0]).shape == (8, 10)
    # touching a source recomputes that image only
    src = small_set.image_path[3]; st = os.stat(src); os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    e = cache_images(small_set, size=20, transform=Gamma(2.0), cache_root=root, workers=1, progress=False)
    assert [p1 == p2 for p1, p2 in zip(e.cache_path, a.cache_path)] == [True, True, True, False, True]
    assert not list(root.rglob('*.tmp'))  # atomic writes leave nothing behind

def test_cache_errors(small_set, tmp_path):
    (Path(small_set.image_path[2])).write_bytes(b'P5\n40 30\n255\n' + bytes(10))  # truncated
    with pytest.raises(DataError, match=r'1 image\(s\) could not be cached .*img2.pgm'):
        cache_images(small_set, size=16, cache_root=tmp_path / 'c', workers=2, progress=False)
    assert len(list((tmp_path / 'c').rglob('*.npy'))) == 4  # the good ones were kept
    with pytest.raises(ConfigError, match='cache_key'): cache_images(small_set, transform=np.sqrt, cache_root=tmp_path / 'c')
    os.unlink(small_set.image_path[0])
    with pytest.raises(DataError, match=r'1 image\(s\) of the manifest are missing: .*img0.pgm'):
        cache_images(small_set, cache_root=tmp_path / 'c')
    (tmp_path / 'junk.npy').write_bytes(b'junk')
    with pytest.raises(DataError, match='junk.npy'): load_cached(tmp_path / 'junk.npy')

# ---------------------------------------------------------------- generic loaders and the registry
from pathlib import Path

def test_load_folder_with_splits_and_patients(tmp_path, small_set):
    for split in ('train', 'test'):
        for lab in ('benign', 'Malignant'):
            d = tmp_path / 'kaggle' / split / lab; d.mkdir(parents=True)
            for k in range(2): (d / f'P_{k}{split[1]}_{lab}_{k}.pgm').write_bytes(Path(small_set.image_path[k]).read_bytes())
    m = load_folder(tmp_path / 'kaggle', patient_id=r'P_(\d+\w)_')
    assert len(m) == 8 and set(m.split) == {'train', 'test'} and m.label.value_counts().to_dict() == {'benign': 4, 'malignant': 4}
    assert sorted(m.patient_id.unique()) == ['0e', '0r', '1e', '1r']
    with pytest.raises(DataError, match='does not match'): load_folder(tmp_path / 'kaggle', patient_id=r'Q(\d)')

def test_load_csv_relative_paths_and_label_map(tmp_path, small_set):
    pd.DataFrame(dict(file=[os.path.basename(p) for p in small_set.image_path], y=[0, 1, 1, 0, 1],
                      case=['a', 'a', 'b', 'c', 'c'], age=[50, 50, 61, 70, 70])).to_csv(tmp_path / 'labels.csv', index=False)
    m = load_csv(tmp_path / 'labels.csv', image_col='file', label_col='y', patient_col='case', label_map={0: 'benign', 1: 'malignant'})
    assert m.label.tolist() == ['benign', 'malignant', 'malignant', 'benign', 'malignant'] and 'age' in m
    assert m.image_path.tolist() == small_set.image_path.tolist() and m.patient_id.tolist() == ['a', 'a', 'b', 'c', 'c']

def test_load_dataset_registry(mias_sample, tmp_path, monkeypatch):
    assert set(DATASETS) == {'mias', 'cbis_ddsm', 'ddsm', 'cmmd', 'breakhis', 'idc', 'csv', 'folder'}
    assert DATASETS['cbis_ddsm']['loader'] == 'breast_cancer.mammo:load_cbis_ddsm'
    assert {k for k, d in DATASETS.items() if d['sample']} == {'mias', 'breakhis'}
    assert len(load_dataset('MIAS')) == 322 and get_loader('mias') is load_mias
    with pytest.raises(ConfigError, match='known datasets: mias, cbis_ddsm, ddsm, cmmd, breakhis, idc, csv, folder'):
        load_dataset('inbreast')
    monkeypatch.setenv('BREAST_CANCER_DATA', str(tmp_path))
    with pytest.raises(DataError, match=r'breast-cancer download cmmd'): load_dataset('cmmd')
    assert len(load_dataset('mias')) == 322  # a private data_dir still finds the sample shipped inside the package
    make_mias_tree(tmp_path / 'mini-mias')
    assert len(load_dataset('mias')) == 6  # data_dir()/mini-mias (where download puts it) wins over the bundled sample


# ---------------------------------------------------------------- download
import hashlib, io, tarfile
from breast_cancer.fetch import download, checksums_file, MIAS_URL
from breast_cancer.io import safe_extract, verify_checksums, read_checksums

def _tar(path, members):
    "A .tar.gz from (TarInfo kwargs, bytes) pairs."
    with tarfile.open(path, 'w:gz') as tar:
        for kw, payload in members:
            ti = tarfile.TarInfo(kw.pop('name')); [setattr(ti, k, v) for k, v in kw.items()]
            ti.size = len(payload) if ti.isfile() else 0
            tar.addfile(ti, io.BytesIO(payload) if ti.isfile() else None)
    return path

@pytest.fixture
def mias_archive(tmp_path, mias_sample, monkeypatch):
    "A fake all-mias.tar.gz (4 PGMs + Info.txt) with its own checksum list under a private data_dir()."
    arc, sums = make_mias_archive(tmp_path / 'all-mias.tar.gz', mias_sample)
    (tmp_path / 'data' / 'checksums').mkdir(parents=True)
    (tmp_path / 'data' / 'checksums' / 'mias.sha256').write_text(''.join(f'{h}  {n}\n' for n, h in sums.items()))
    monkeypatch.setenv('BREAST_CANCER_DATA', str(tmp_path / 'data'))
    return arc, sums

def test_download_mias_from_local_archive(mias_archive, tmp_path, capsys):
    arc, sums = mias_archive
    dest = download('mias', url=arc.as_uri(), progress=False)
    assert dest == tmp_path / 'data' / 'mini-mias'
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in dest.glob('*.pgm')} == sums
    m = load_mias(dest)
    assert len(m) == 4 and m.lesions[0][0]['row'] == (1024 - 425) / 4  # PGMs of 256 px: scaled coordinates
    assert not list((tmp_path / 'data').glob('*.tar.gz')) and not list((tmp_path / 'data').glob('.*'))  # no leftovers
    assert download('mias', url='http://127.0.0.1:9/never-used', progress=False) == dest  # already there and verified
    assert download('mias', tmp_path / 'again', url=str(arc), progress=False, keep_archive=True).is_dir()  # a local path works too
    assert (tmp_path / 'again.all-mias.tar.gz').exists()

def test_download_refuses_wrong_checksum(mias_archive, tmp_path, mias_sample):
    bad, _ = make_mias_archive(tmp_path / 'bad.tar.gz', mias_sample, corrupt='mdb003.pgm')
    with pytest.raises(DataError, match=r'0 file\(s\) missing .* 1 with a wrong SHA-256 \(mdb003.pgm\)'):
        download('mias', tmp_path / 'out', url=str(bad), progress=False)
    assert not (tmp_path / 'out').exists()
    short, _ = make_mias_archive(tmp_path / 'short.tar.gz', mias_sample, n=3)
    with pytest.raises(DataError, match=r'1 file\(s\) missing \(mdb004.pgm\)'): download('mias', tmp_path / 'out', url=str(short), progress=False)

@pytest.mark.parametrize('member, why', [
    (dict(name='../../evil.pgm'), 'path with ..'),
    (dict(name='/etc/evil.pgm'), 'absolute path'),
    (dict(name='mdb001.pgm', type=tarfile.SYMTYPE, linkname='/etc/passwd'), "link to '/etc/passwd'"),
    (dict(name='hard', type=tarfile.LNKTYPE, linkname='Info.txt'), "link to 'Info.txt'"),
    (dict(name='dev', type=tarfile.CHRTYPE), 'special file')])
def test_safe_extract_refuses_malicious_members(tmp_path, member, why):
    arc = _tar(tmp_path / 'evil.tar.gz', [(dict(name='Info.txt'), b'mdb001 G NORM\n'), (member, b'evil')])
    with pytest.raises(DataError, match=why): safe_extract(arc, tmp_path / 'out')
    assert not (tmp_path / 'out').exists() and not (tmp_path.parent / 'evil.pgm').exists()

def test_download_malicious_archive_leaves_nothing(mias_archive, tmp_path, mias_sample):
    evil, _ = make_mias_archive(tmp_path / 'evil.tar.gz', mias_sample, evil='../../escape.txt')
    with pytest.raises(DataError, match='unsafe member'): download('mias', tmp_path / 'd' / 'out', url=str(evil), progress=False)
    assert not list(tmp_path.rglob('escape.txt')) and not (tmp_path / 'd' / 'out').exists()

def test_download_without_network_says_what_to_do(mias_archive, tmp_path):
    with pytest.raises(DataError, match=r'could not reach http://127.0.0.1:9/all-mias.tar.gz .*check your connection, or download it by hand to'):
        download('mias', tmp_path / 'x', url='http://127.0.0.1:9/all-mias.tar.gz', progress=False)
    with pytest.raises(DataError, match='not a readable tar'):
        (tmp_path / 'junk.tar.gz').write_bytes(b'<html>proxy login</html>')
        download('mias', tmp_path / 'x', url=str(tmp_path / 'junk.tar.gz'), progress=False)

@pytest.mark.parametrize('name', ['cbis_ddsm', 'cmmd', 'ddsm', 'breakhis', 'idc'])
def test_download_registered_prints_instructions(name, capsys, tmp_path):
    assert download(name, tmp_path / name) is None
    out = capsys.readouterr().out
    assert 'http' in out and str(tmp_path / name) in out and f"load_dataset('{name}')" in out
    with pytest.raises(ConfigError, match='known datasets: mias, cbis_ddsm'): download('inbreast')

def test_shipped_checksums(repo_root):
    sums = read_checksums(checksums_file('mias'))
    assert len(sums) == 322 and sums['mdb322.pgm'] == read_checksums(repo_root / 'data/checksums/mias.sha256')['mdb322.pgm']
    assert MIAS_URL.startswith('http') and MIAS_URL.endswith('/all-mias.tar.gz')   # no public host name in the tests

def test_real_pgms_verify(repo_root, shared_data):
    sums = read_checksums(repo_root / 'data/checksums/mias.sha256')
    found = verify_checksums(shared_data / 'mini-mias' / 'pgm_samples', {n: sums[n] for n in ('mdb001.pgm', 'mdb002.pgm')})
    assert sorted(found) == ['mdb001.pgm', 'mdb002.pgm']
    assert read_image(found['mdb001.pgm']).shape == (1024, 1024)
    assert np.array_equal(read_image(found['mdb001.pgm']), read_image(shared_data / 'mini-mias' / 'mdb001.png'))

def test_package_copy_of_checksums_matches(repo_root):
    "breast_cancer/checksums/mias.sha256 (for pip installs, e.g. Colab) must equal data/checksums/mias.sha256."
    assert (repo_root / 'breast_cancer/checksums/mias.sha256').read_bytes() == (repo_root / 'data/checksums/mias.sha256').read_bytes()

# ---------------------------------------------------------------- across modules
def test_every_registered_loader_resolves():
    for name in DATASETS: assert callable(get_loader(name)), name

def test_mias_split_then_cache_end_to_end(mias_sample, tmp_path):
    "load -> patient split -> cache at 64 px with 2 processes -> the cached arrays are the resized source images."
    m = patient_split(load_mias(mias_sample), seed=2).groupby('split').head(8)
    c = cache_images(m, size=64, cache_root=tmp_path, workers=2, progress=False)
    assert c.split.tolist() == m.split.tolist() and c.cache_path.is_unique
    for r in c.head(3).itertuples():
        x = load_cached(r.cache_path)
        assert x.shape == (64, 64) and 0 <= x.min() and x.max() <= 1
        assert abs(float(x.mean()) - float(read_image(r.image_path).mean())) < 0.01

def test_load_csv_reads_a_saved_manifest(mias_sample, tmp_path):
    m = load_mias(mias_sample)
    m.to_csv(tmp_path / 'manifest.csv', index=False)
    back = load_csv(tmp_path / 'manifest.csv', dataset='mias')
    assert back.lesions.tolist() == m.lesions.tolist() and back.label.tolist() == m.label.tolist()
    assert back.malignant.isna().sum() == 207 and back.patient_id.nunique() == 161

def test_load_mias_accepts_the_parent_of_an_unpacked_folder(tmp_path):
    make_mias_tree(tmp_path / 'download' / 'all-mias')
    m = load_mias(tmp_path / 'download')
    assert len(m) == 6 and '/all-mias/' in m.image_path[0]


# ---------------------------------------------------------------- hostile input (issue 25)
def test_one_file_with_two_labels_is_refused(tmp_path, small_set):
    "The same image listed twice (under two ids) with two labels: refused, naming the file and both labels."
    f = small_set.image_path[0]
    pd.DataFrame(dict(image_id=['a', 'b'], image_path=[f, f], label=['benign', 'malignant'], patient_id=['p', 'p'])).to_csv(tmp_path / 'twice.csv', index=False)
    with pytest.raises(DataError, match=rf"{f}: one image file with two labels, 'benign' \(a\), 'malignant' \(b\)"):
        load_csv(tmp_path / 'twice.csv')

def test_unknown_or_empty_label_is_named(tmp_path, small_set):
    f = small_set.image_path[0]
    pd.DataFrame(dict(image_path=[f, f], label=['cancerous', 'normal'], patient_id=['p', 'q'], image_id=['a', 'b'])).to_csv(tmp_path / 'u.csv', index=False)
    with pytest.raises(DataError, match=r"u.csv: unknown label value\(s\) \['cancerous'\]; known: normal, benign, malignant, and the spellings norm"):
        load_csv(tmp_path / 'u.csv')
    pd.DataFrame(dict(image_path=[f, f], label=['benign', None], patient_id=['p', 'q'], image_id=['a', 'b'])).to_csv(tmp_path / 'e.csv', index=False)
    with pytest.raises(DataError, match=r'e.csv: the label is empty in 1 row\(s\), e.g. data row 2'): load_csv(tmp_path / 'e.csv')

def test_dataset_root_symlink_loops_and_filesystem_root(tmp_path):
    "A root of / is refused at once (no scan of every disk); symbolic links that loop are walked once."
    for name in ('idc', 'breakhis', 'folder', 'cmmd'):
        with pytest.raises(DataError, match=f"{name}: root '/' is the file-system root"): load_dataset(name, '/')
    from breast_cancer.histo import load_idc
    from breast_cancer.fixtures import make_idc_tree
    root = make_idc_tree(tmp_path / 'idc')
    n = len(load_idc(root))
    first = next(p for p in root.iterdir() if p.is_dir())
    os.symlink('..', first / 'up'); os.symlink(root, first / 'again')
    assert len(load_idc(root)) == n

def test_save_split_writes_formula_like_ids_safely(tmp_path, mias_sample):
    m = load_mias(mias_sample).head(20)
    s = patient_split(m, seed=0).assign(image_id=lambda d: ['=cmd|x'] + list(d.image_id[1:]))
    f = save_split(s, tmp_path / 'split.csv')
    assert "'=cmd|x" in f.read_text() and load_split(s, f).split.tolist() == s.split.tolist()

def test_prepare_verify_checks_shape_and_channels(small_set, tmp_path):
    "A cache file of the right longer side but the wrong channels or aspect passes the quick check; --verify rebuilds it."
    from breast_cancer.cache import cache_file_problem
    a = cache_images(small_set, size=20, cache_root=tmp_path / 'c', workers=1, progress=False)
    np.save(a.cache_path[0], np.zeros((15, 20, 3), np.float32)); np.save(a.cache_path[1], np.zeros((20, 20), np.float32))
    assert cache_file_problem(a.cache_path[0], 20) is None   # the longer side is right
    cache_images(small_set, size=20, cache_root=tmp_path / 'c', workers=1, progress=False, verify=True)
    assert [load_cached(p).shape for p in a.cache_path[:2]] == [(15, 20), (15, 20)]
