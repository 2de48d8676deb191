"""Histopathology loaders on fixtures that reproduce the BreakHis and IDC layouts (small real images), the real
BreakHis sample, the data-module entry points (load_dataset, cache_images with a stain normalizer), slide maps."""
import os, pickle, shutil
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from breast_cancer.core import ConfigError, DataError
from breast_cancer import data as bc_data
from breast_cancer.histo import (BREAKHIS_TUMOR_TYPES, idc_slide_map, load_breakhis, load_idc, parse_breakhis_names,
                                 plot_idc_slide_map)
from breast_cancer.wavelet import StainNormalizer, chain_transforms, stain_normalize
from breast_cancer.fixtures import make_idc_tree

SAMPLE_NAMES = sorted(n for n in os.listdir(Path(__file__).resolve().parents[1]/'breast_cancer'/'samples'/'breakhis-sample') if n.endswith('.png'))
FOLDER = {'A': 'adenosis', 'F': 'fibroadenoma', 'PT': 'phyllodes_tumor', 'TA': 'tubular_adenoma',
          'DC': 'ductal_carcinoma', 'LC': 'lobular_carcinoma', 'MC': 'mucinous_carcinoma', 'PC': 'papillary_carcinoma'}


def _small_copy(src: Path, dst: Path, size=(70, 46)):
    "A real BreakHis image shrunk 10x (still RGB PNG), so fixtures stay tiny but real."
    dst.parent.mkdir(parents=True, exist_ok=True)
    Image.open(src).convert('RGB').resize(size, Image.Resampling.BILINEAR).save(dst)


def _tree_rel(name: str) -> str:
    "Where the distributed BreaKHis_v1 tree keeps this file."
    p = parse_breakhis_names([name]).iloc[0]
    return (f'BreaKHis_v1/histology_slides/breast/{p.label}/SOB/{FOLDER[p.tumor_type]}/'
            f'SOB_{name[4]}_{p.tumor_type}_{p.slide_id}/{p.magnification}X/{name}')


@pytest.fixture(scope='module')
def flat_dir(tmp_path_factory, breakhis_sample):
    d = tmp_path_factory.mktemp('flat')
    for n in SAMPLE_NAMES: _small_copy(breakhis_sample/n, d/n)
    return d


@pytest.fixture(scope='module')
def tree_dir(tmp_path_factory, breakhis_sample):
    "The distributed layout, plus Folds.csv (2 folds, patient-level train/test) beside BreaKHis_v1."
    d = tmp_path_factory.mktemp('tree')
    rows = []
    patients = sorted({parse_breakhis_names([n]).slide_id[0] for n in SAMPLE_NAMES})
    for n in SAMPLE_NAMES:
        rel = _tree_rel(n); _small_copy(breakhis_sample/n, d/rel)
        slide = parse_breakhis_names([n]).slide_id[0]
        for fold in (1, 2):
            grp = 'test' if (patients.index(slide) + fold) % 3 == 0 else 'train'
            rows.append(dict(fold=fold, mag=int(n.split('-')[-2]), grp=grp, filename=rel))
    pd.DataFrame(rows).to_csv(d/'Folds.csv', index=False)
    return d


def test_real_sample(breakhis_sample):
    m = load_breakhis(breakhis_sample)
    bc_data.validate_manifest(m)
    assert len(m) == 12 and m['patient_id'].nunique() == 9
    assert m.groupby('label')['patient_id'].nunique().to_dict() == {'benign': 5, 'malignant': 4}
    assert m['label'].value_counts().to_dict() == {'benign': 8, 'malignant': 4}
    assert sorted(m.loc[m.patient_id == '14-25197', 'magnification']) == [40, 100, 200, 400]
    assert set(m['tumor_type']) == set(BREAKHIS_TUMOR_TYPES)          # the sample has one of every type
    assert m.loc[m.tumor_type == 'PT', 'tumor_name'].item() == 'phyllodes tumor'
    assert m['malignant'].dtype == 'boolean' and not m['abnormal'].eq(False).any()
    im = bc_data.read_image(m.loc[0, 'image_path'])
    assert im.shape == (460, 700, 3) and im.dtype == np.float32
    # the bundled labels.csv (written from the names independently) agrees
    lab = pd.read_csv(breakhis_sample/'labels.csv').assign(image_id=lambda d: d.filename.str[:-4]).set_index('image_id')
    assert (lab.loc[m.image_id, 'patient_id'].to_numpy() == m.patient_id.to_numpy()).all()
    assert (lab.loc[m.image_id, 'tumor_type'].to_numpy() == m.tumor_type.to_numpy()).all()


def test_flat_fixture_matches_real_sample(flat_dir, breakhis_sample):
    flat, real = load_breakhis(flat_dir), load_breakhis(breakhis_sample)
    pd.testing.assert_frame_equal(flat.drop(columns='image_path'), real.drop(columns='image_path'))
    assert all(p.startswith(str(flat_dir)) for p in flat.image_path)
    assert bc_data.read_image(flat.loc[0, 'image_path']).shape == (46, 70, 3)


@pytest.mark.parametrize('sub', ['', 'BreaKHis_v1', 'BreaKHis_v1/histology_slides', 'BreaKHis_v1/histology_slides/breast'])
def test_tree_from_any_ancestor(tree_dir, breakhis_sample, sub):
    m = load_breakhis(tree_dir/sub if sub else tree_dir)
    real = load_breakhis(breakhis_sample)
    assert len(m) == 12
    pd.testing.assert_frame_equal(m.drop(columns=['image_path', 'split', 'breakhis_fold']), real.drop(columns='image_path'))
    # the folder names agree with what the loader parsed from the file names
    for r in m.itertuples():
        parts = Path(r.image_path).parts
        assert parts[-2] == f'{r.magnification}X' and parts[-3].endswith(r.slide_id) and r.label in parts


def test_folds_csv(tree_dir):
    folds = pd.read_csv(tree_dir/'Folds.csv')
    for fold in (1, 2):
        m = load_breakhis(tree_dir/'BreaKHis_v1', fold=fold)
        want = folds[folds.fold == fold].assign(image_id=lambda d: d.filename.str.rsplit('/', n=1).str[-1].str[:-4])
        assert dict(zip(m.image_id, m.split)) == dict(zip(want.image_id, want.grp))
        assert set(m['breakhis_fold']) == {fold}
        # the published splits are by patient: nobody is on both sides
        assert not set(m.loc[m.split == 'train', 'patient_id']) & set(m.loc[m.split == 'test', 'patient_id'])
    assert 'split' not in load_breakhis(tree_dir, fold=None)
    assert 'split' not in load_breakhis(tree_dir, folds_csv=False)
    with pytest.raises(ConfigError, match=r'holds folds \[1, 2\]'): load_breakhis(tree_dir, fold=5)
    # patient_split keeps the official test set and carves val out of train by patient
    s = bc_data.patient_split(load_breakhis(tree_dir), val_size=0.2, seed=0)
    assert set(s.loc[s.split == 'test', 'image_id']) == set(folds[(folds.fold == 1) & (folds.grp == 'test')].filename.str.rsplit('/', n=1).str[-1].str[:-4])


def test_malformed_folds_csv(tree_dir, tmp_path):
    shutil.copytree(tree_dir/'BreaKHis_v1', tmp_path/'BreaKHis_v1')
    (tmp_path/'Folds.csv').write_text('fold,mag,group,filename\n1,40,train,x.png\n')
    with pytest.raises(DataError, match=r"Folds.csv: BreakHis folds file lacks column\(s\) \['grp'\]"): load_breakhis(tmp_path)
    (tmp_path/'Folds.csv').write_text('fold,mag,grp,filename\n1,40,training,x.png\n')
    with pytest.raises(DataError, match="column 'grp' must be train or test"): load_breakhis(tmp_path)


def test_magnification_filter(tree_dir):
    assert load_breakhis(tree_dir, magnification=40)['magnification'].eq(40).sum() == 9
    assert len(load_breakhis(tree_dir, magnification='100X')) == 1
    assert sorted(load_breakhis(tree_dir, magnification=['200x', 400]).magnification) == [200, 400]
    with pytest.raises(ConfigError, match='use 40, 100, 200 or 400'): load_breakhis(tree_dir, magnification='1000X')


def test_breakhis_bad_files(flat_dir, tmp_path):
    d = tmp_path/'flat'; shutil.copytree(flat_dir, d)
    (d/'SOB_B_DC-14-2523-40-010.png').write_bytes(b'')      # benign class with a malignant type
    (d/'thumbnail.png').write_bytes(b'')
    assert len(load_breakhis(d)) == 12                      # skipped with one warning
    with pytest.raises(DataError, match=r'2 file\(s\).*SOB_B_DC-14-2523-40-010.png'): load_breakhis(d, strict=True)
    (tmp_path/'empty').mkdir()
    with pytest.raises(DataError, match='no PNG images found'): load_breakhis(tmp_path/'empty')
    with pytest.raises(DataError, match='folder not found'): load_breakhis(tmp_path/'missing')


def test_load_dataset_entry_point(flat_dir):
    m = bc_data.load_dataset('breakhis')                    # the bundled sample
    assert len(m) == 12 and set(m.dataset) == {'breakhis'}
    assert len(bc_data.load_dataset('breakhis', flat_dir, magnification=40)) == 9


@pytest.fixture(scope='module')
def idc_tree(tmp_path_factory):
    return make_idc_tree(tmp_path_factory.mktemp('idc')/'IDC_regular_ps50_idx5', n_patients=3, patches_per_patient=24, seed=1)


def test_idc_tree_and_loader(idc_tree):
    m = load_idc(idc_tree)
    bc_data.validate_manifest(m)
    assert len(m) == 72 and m.patient_id.nunique() == 3 and set(m.dataset) == {'idc'}
    files = sorted(p for p in idc_tree.rglob('*.png'))
    assert len(files) == 72
    for p in files[:10]:                                    # folder, name and manifest agree
        row = m.set_index('image_id').loc[p.stem]
        assert p.parent.name == str(row.idc_class) and p.parent.parent.name == row.patient_id
        assert f'_x{row.x}_y{row.y}_' in p.name
    assert (m.label == np.where(m.idc_class == 1, 'malignant', 'benign')).all()
    assert m.groupby('patient_id').malignant.sum().tolist() == [7, 7, 7]     # round(0.3 * 24)
    im = bc_data.read_image(m.image_path[0])
    assert im.shape == (50, 50, 3) and im.dtype == np.float32 and im.std() > 0.02   # real tissue, not a flat colour
    assert bc_data.load_dataset('idc', idc_tree).equals(m)


def test_idc_kaggle_layout_and_bad_names(idc_tree, tmp_path):
    root = tmp_path/'kaggle'; shutil.copytree(idc_tree, root/'IDC_regular_ps50_idx5')
    for p in (root/'IDC_regular_ps50_idx5').iterdir(): shutil.copytree(p, root/p.name)   # the download holds every patient twice
    m = load_idc(root)
    assert len(m) == 72 and not m.image_path.str.contains('IDC_regular_ps50_idx5').any()   # one copy kept, deterministically
    patient = sorted(os.listdir(idc_tree))[0]
    bad0 = next((root/patient/'0').iterdir())
    shutil.copy(bad0, root/patient/'1'/bad0.name)            # class 0 patch inside the class-1 folder
    (root/patient/'0'/f'{patient}_idx5_x1_y1.png').touch()   # no class in the name
    assert len(load_idc(root)) == 72
    with pytest.raises(DataError, match=r'2 file\(s\)'): load_idc(root, strict=True)


def test_bench_small():
    from breast_cancer.bench import bench_load_idc
    r = bench_load_idc(n_files=2000, n_patients=4)
    assert r['n_files'] == 2000 and r['files_per_s'] > 0 and 400 < r['n_malignant'] < 750


def test_slide_map_on_predictions(idc_tree):
    m = load_idc(idc_tree)
    patient = m.patient_id.iloc[0]
    preds = pd.DataFrame({'dataset': 'idc', 'image_id': m.image_id, 'patient_id': m.patient_id, 'true_label': m.label,
                          'p_malignant': m.malignant.astype(float) * 0.8 + 0.1})
    truth, pred = idc_slide_map(preds, patient, 'true_label'), idc_slide_map(preds, patient)
    rows = m[m.patient_id == patient]
    assert np.nansum(truth.to_numpy()) == rows.malignant.sum()
    r = rows.iloc[3]
    assert pred.loc[r.y // 50 * 50, r.x // 50 * 50] == pytest.approx(0.9 if r.malignant else 0.1)
    fig = plot_idc_slide_map(preds.assign(image_path=m.image_path), patient)
    assert len(fig.axes) == 4                                # tissue, truth, prediction + its colour bar


def test_stain_normalizer_as_cache_transform(breakhis_sample, tmp_path):
    m = load_breakhis(breakhis_sample).head(3)
    target = m.image_path.iloc[2]
    sn = StainNormalizer('reinhard', target=target)
    sn2 = pickle.loads(pickle.dumps(sn))
    assert sn2.cache_key == sn.cache_key and StainNormalizer('macenko', target=target).cache_key != sn.cache_key
    cached = bc_data.cache_images(m, size=64, transform=sn, cache_root=tmp_path, workers=1, progress=False)
    plain = bc_data.cache_images(m, size=64, transform=None, cache_root=tmp_path, workers=1, progress=False)
    a, b = bc_data.load_cached(cached.cache_path[0]), bc_data.load_cached(plain.cache_path[0])
    assert a.shape == b.shape == (42, 64, 3) and not np.allclose(a, b)
    src = bc_data.read_image(m.image_path[0])
    np.testing.assert_allclose(a.mean((0, 1)), bc_data.resize_longer(sn(src), 64).mean((0, 1)), atol=2e-3)
    np.testing.assert_array_equal(stain_normalize(src, target, 'reinhard'), sn(src))


@pytest.mark.parametrize('preset,dataset', [('breakhis_resnet50', 'breakhis'), ('idc_resnet50', 'idc')])
def test_presets(preset, dataset):
    from breast_cancer.train import load_config
    c = load_config(preset)
    assert c.task == 'binary' and c.name == preset and [d['name'] for d in c.datasets] == [dataset]
    assert c.data.channels == 3 and c.model.backbone == 'resnet50' and c.model.head == 'gap' and c.model.weights == 'imagenet'
    a = c.train.augment
    assert a.enabled and a.rotation == 90 and a.flip == 'both' and a.zoom > 0 and a.shear > 0 and a.fill_mode == 'reflect'
    assert c.wavelet is None
    if dataset == 'breakhis': assert c.train.class_imbalance == 'oversample' and c.data.image_size == 224
    else: assert c.data.cache_size == 50 and c.data.image_size >= 96


def test_breakhis_preset_manifest():
    "The preset's dataset options reach load_breakhis through train.load_manifest (bundled sample: no Folds.csv)."
    from breast_cancer.train import load_config, load_manifest
    c = load_config('breakhis_resnet50')
    m = load_manifest(c)
    assert len(m) == 12 and set(m.label) == {'benign', 'malignant'} and 'split' not in m
    m40 = load_manifest(c.replace(**{'datasets': [{'name': 'breakhis', 'options': {'magnification': 40}}]}))
    assert len(m40) == 9


def test_stain_then_wavelet_chain_in_process_pool(idc_tree, tmp_path):
    "A StainNormalizer chained with a channel-wise WaveletPreprocessor caches RGB patches in worker processes."
    from breast_cancer.wavelet import WaveletPreprocessor
    m = load_idc(idc_tree).head(4)
    sn = StainNormalizer('macenko', target=m.image_path[1])
    wp = WaveletPreprocessor(wavelet='db2', level=2)
    chain = chain_transforms(sn, wp)
    out = bc_data.cache_images(m, size=None, transform=chain, cache_root=tmp_path, workers=2, progress=False)
    got = bc_data.load_cached(out.cache_path[0])
    want = wp(sn(bc_data.read_image(m.image_path[0])))
    assert got.shape == (50, 50, 3)
    np.testing.assert_allclose(got, want, atol=0.5 / 255 + 1e-6)   # the cache keeps 8 bits
    again = bc_data.cache_images(m, size=None, transform=chain_transforms(StainNormalizer('reinhard', target=m.image_path[1]), wp),
                                 cache_root=tmp_path, workers=1, progress=False)
    assert set(again.cache_path).isdisjoint(out.cache_path)   # another stain method is another cache entry
