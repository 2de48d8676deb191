"""Integration tests of the mammography loaders (breast_cancer.mammo) on fixture trees that reproduce the real layouts:
dispatch through data.load_dataset, read_image on every file a manifest names, patient splits, the image cache."""
import shutil, warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from breast_cancer.core import DataError
from breast_cancer import data, mammo
from breast_cancer.mammo import load_cbis_ddsm, load_ddsm, load_cmmd, read_cbis_csv, mask_bbox, ddsm_lesion_mask
from breast_cancer.fixtures import make_cbis_fixture, make_ddsm_fixture, make_cmmd_fixture, CBIS_FIXTURE_ROWS


def quiet(f, *a, **kw):
    "Call f with warnings silenced (the fixtures trigger the official-split and unmatched-image warnings on purpose)."
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return f(*a, **kw)


@pytest.fixture(scope='module')
def trees(tmp_path_factory):
    "One fixture tree per layout, built once for the module (tests that damage a tree build their own)."
    t = tmp_path_factory.mktemp('mammo')
    return dict(csv=make_cbis_fixture(t/'csv', 'csv'), tcia=make_cbis_fixture(t/'tcia', 'tcia'),
                jpeg=make_cbis_fixture(t/'jpeg', 'jpeg'), ddsm=make_ddsm_fixture(t/'ddsm'), cmmd=make_cmmd_fixture(t/'cmmd'))


def test_fixture_csvs_have_the_real_quirks(trees):
    mass = (trees['csv']/'mass_case_description_train_set.csv').read_text()
    calc = (trees['csv']/'calc_case_description_train_set.csv').read_text()
    assert 'breast_density' in mass.splitlines()[0] and 'breast density' in calc.splitlines()[0]
    assert 'calc type' in calc.splitlines()[0] and 'mass shape' in mass.splitlines()[0]
    assert '.dcm\n"' in mass                       # a newline inside the quoted path cell
    assert 'BENIGN_WITHOUT_CALLBACK' in calc
    df = read_cbis_csv(trees['csv']/'mass_case_description_train_set.csv')
    assert not df['roi_csv_path'].str.contains(r'\s').any()


@pytest.mark.parametrize('name', ['cbis_ddsm', 'ddsm', 'cmmd'])
def test_load_dataset_dispatches_to_mammo(trees, name):
    root = {'cbis_ddsm': trees['tcia'], 'ddsm': trees['ddsm'], 'cmmd': trees['cmmd']}[name]
    direct = quiet({'cbis_ddsm': load_cbis_ddsm, 'ddsm': load_ddsm, 'cmmd': load_cmmd}[name], root)
    via = quiet(data.load_dataset, name, root)
    pd.testing.assert_frame_equal(via, direct)
    data.validate_manifest(via)
    assert (via['dataset'] == name).all()


def test_cbis_layouts_agree_and_every_file_reads(trees):
    per = {lay: quiet(load_cbis_ddsm, trees[lay], per='abnormality') for lay in ('csv', 'tcia', 'jpeg')}
    keys = ['image_id', 'patient_id', 'label', 'split', 'pathology', 'laterality', 'view', 'assessment', 'subtlety']
    for lay in ('tcia', 'jpeg'): pd.testing.assert_frame_equal(per[lay][keys], per['csv'][keys])
    for lay, df in per.items():
        assert len(df) == len(CBIS_FIXTURE_ROWS) == 8
        for r in df.itertuples():
            full, crop, mask = data.read_image(r.image_path), data.read_image(r.roi_path), data.read_image(r.mask_path)
            assert full.shape == mask.shape == (64, 48) and crop.shape == (16, 16), (lay, r.image_id)


def test_cbis_masks_sit_on_their_lesions(trees):
    "The mask of each abnormality (also the row whose CSV swapped crop and mask) is centred on the lesion the fixture drew."
    where = {f"{k.capitalize()}-{'Training' if s == 'train' else 'Test'}_{p}_{side}_{v}_{a}": (r, c)
             for k, s, p, side, v, a, *_, (r, c, _rad) in CBIS_FIXTURE_ROWS}
    for lay in ('csv', 'tcia', 'jpeg'):
        df = quiet(load_cbis_ddsm, trees[lay], per='abnormality')
        for r in df.itertuples():
            r0, c0, r1, c1 = mask_bbox(data.read_image(r.mask_path))
            assert abs((r0 + r1 - 1) / 2 - where[r.image_id][0]) <= 1 and abs((c0 + c1 - 1) / 2 - where[r.image_id][1]) <= 1, (lay, r.image_id)
            crop = data.read_image(r.roi_path)
            assert crop[4:12, 4:12].mean() > crop.mean() * 0.95    # the blob is in the middle of its crop


def test_cbis_per_image_labels_and_lesions(trees):
    df = quiet(load_cbis_ddsm, trees['jpeg'])
    assert len(df) == 7 and df['image_id'].is_unique
    assert df['label'].value_counts().to_dict() == {'malignant': 4, 'benign': 3}
    two = df.set_index('image_id').loc['Mass-Training_P_00004_RIGHT_CC']
    assert two.label == 'malignant' and [l['abnormality_id'] for l in two.lesions] == [1, 2]
    assert [l['severity'] for l in two.lesions] == ['B', 'M']
    assert set(df['split']) == {'train', 'test'}
    assert set(quiet(load_cbis_ddsm, trees['jpeg'], abnormality='calc')['abnormality_type']) == {'calcification'}


def test_cbis_official_split_overlap_is_reported(trees):
    with pytest.warns(UserWarning, match='1 patient\\(s\\) are in both the official train and test'):
        df = load_cbis_ddsm(trees['csv'])
    fresh = data.patient_split(df, seed=3, keep_official=False, stratify=None)
    data.check_patient_leakage(fresh)
    with pytest.raises(DataError, match=r"cbis_ddsm: the dataset's own split puts 1 patient\(s\) in more than one part"):
        data.patient_split(df, seed=3, stratify=None)   # kept as published, it would leak: training refuses it
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        dropped = data.load_dataset('cbis_ddsm', trees['csv'], official_split=False)
    data.check_patient_leakage(data.patient_split(dropped, seed=3, stratify=None))


def test_cbis_csv_dir_elsewhere(trees, tmp_path):
    for p in trees['csv'].glob('*.csv'): shutil.copy(p, tmp_path)
    a = quiet(load_cbis_ddsm, trees['csv'], csv_dir=tmp_path)
    assert len(a) == 7
    with pytest.raises(DataError, match='no CBIS-DDSM case-description CSV'):
        load_cbis_ddsm(trees['csv'], csv_dir=tmp_path/'empty')


def test_cbis_missing_files_one_summary(tmp_path):
    root = make_cbis_fixture(tmp_path/'cbis', 'tcia')
    shutil.rmtree(root/'CBIS-DDSM'/'Mass-Training_P_00004_RIGHT_CC_2')      # the ROI series of one abnormality
    shutil.rmtree(root/'CBIS-DDSM'/'Calc-Test_P_00001_LEFT_CC')             # one full mammogram
    with pytest.raises(DataError) as e: quiet(load_cbis_ddsm, root, per='abnormality')
    msg = str(e.value)
    assert '3 files not found' in msg   # crop + mask + full mammogram
    assert 'Mass-Training_P_00004_RIGHT_CC_2' in msg and "missing='drop'" in msg
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        df = load_cbis_ddsm(root, per='abnormality', missing='drop')
    assert sum('not found' in str(x.message) for x in w) == 1
    assert len(df) == 6
    img = quiet(load_cbis_ddsm, root, missing='drop')                       # per image, crops are optional
    assert len(img) == 6
    two = img.set_index('image_id').loc['Mass-Training_P_00004_RIGHT_CC']
    assert two.lesions[1]['roi_path'] is None and two.lesions[0]['roi_path'] is not None


def test_cbis_corrupt_dicom_names_file(tmp_path):
    root = make_cbis_fixture(tmp_path/'cbis', 'csv')
    bad = next(p for p in sorted(root.rglob('000001.dcm')))
    bad.write_bytes(b'not a dicom at all')
    with pytest.raises(DataError, match=bad.name):
        quiet(load_cbis_ddsm, root)


def test_cbis_bad_pathology_names_line(tmp_path):
    root = make_cbis_fixture(tmp_path/'cbis', 'csv')
    p = root/'calc_case_description_test_set.csv'
    p.write_text(p.read_text().replace('MALIGNANT', 'UNKNOWN'))
    with pytest.raises(DataError, match=r"calc_case_description_test_set.csv: line\(s\) \[2\] have pathology \['UNKNOWN'\]"):
        load_cbis_ddsm(root)


def test_ddsm_counts_masks_and_scaling(trees):
    df = load_ddsm(trees['ddsm'])
    assert df['label'].value_counts().to_dict() == {'normal': 11, 'benign': 3, 'malignant': 2}
    assert df.groupby('patient_id')['label'].apply(lambda s: (s != 'normal').sum()).to_dict() == {'A_0001': 0, 'B_3024': 2, 'C_0002': 2, 'D_4001': 1}
    for r in df[df.abnormal].itertuples():
        img = data.read_image(r.image_path)
        for l in r.lesions:
            m = ddsm_lesion_mask(l, img.shape)
            assert m.any() and img[m].mean() > img[~m & (img > 0.05)].mean() + 0.05, (r.image_id, l['abnormality_id'])
            assert mask_bbox(m) == tuple(l['bbox']) or r.image_id.startswith('B_'), r.image_id   # exact at scale 1
    normal = df[~df.abnormal]
    assert normal['lesions'].map(len).eq(0).all() and normal['malignant'].isna().all()


def test_ddsm_unproven_and_missing_overlay(tmp_path):
    root = make_ddsm_fixture(tmp_path/'ddsm')
    ov = root/'cases/benign_without_callbacks/benign_without_callback_01/case4001/D_4001_1.LEFT_MLO.OVERLAY'
    ov.write_text(ov.read_text().replace('BENIGN_WITHOUT_CALLBACK', 'UNPROVEN'))
    with pytest.warns(UserWarning, match='1 image\\(s\\) whose only abnormalities are UNPROVEN'):
        assert len(load_ddsm(root)) == 15
    (root/'cases/cancers/cancer_01/case0002/C_0002_1.LEFT_CC.OVERLAY').unlink()
    with pytest.raises(DataError, match='C_0002_1.LEFT_CC.OVERLAY'):
        quiet(load_ddsm, root)


def test_cmmd_matching_and_policies(tmp_path):
    root = make_cmmd_fixture(tmp_path/'c')
    with pytest.warns(UserWarning, match='2 image\\(s\\) of a breast with no row'):
        df = load_cmmd(root, tmp_path/'c'/'CMMD_clinicaldata_revision.xlsx')
    assert len(df) == 8 and set(df['patient_id']) == {'D1-0001', 'D1-0002', 'D2-0001'}
    assert (df.groupby(['patient_id', 'laterality'])['label'].first().to_dict() ==
            {('D1-0001', 'L'): 'benign', ('D1-0002', 'R'): 'malignant', ('D2-0001', 'L'): 'malignant', ('D2-0001', 'R'): 'benign'})
    assert df['view'].value_counts().to_dict() == {'CC': 4, 'MLO': 4}
    shutil.rmtree(root/'D1-0002')                                          # a spreadsheet row without images
    with pytest.raises(DataError, match='(?s)CMMD: 1 file not found.*D1-0002 R'):
        quiet(load_cmmd, root)
    assert len(quiet(load_cmmd, root, missing='drop')) == 6


def test_splits_never_leak_on_any_fixture(trees):
    dfs = [quiet(load_cbis_ddsm, trees['tcia']), load_ddsm(trees['ddsm']), quiet(load_cmmd, trees['cmmd'])]
    for df in dfs:
        for seed in range(4):
            s = data.patient_split(df, test_size=0.3, val_size=0.0, seed=seed, stratify=None, keep_official=False)
            data.check_patient_leakage(s)
            again = data.patient_split(df, test_size=0.3, val_size=0.0, seed=seed, stratify=None, keep_official=False)
            assert s['split'].tolist() == again['split'].tolist()


def test_cache_images_on_dicom_and_png_fixtures(trees, tmp_path):
    df = pd.concat([quiet(load_cmmd, trees['cmmd']).head(3), load_ddsm(trees['ddsm']).head(3)], ignore_index=True)
    cached = data.cache_images(df, size=32, cache_root=tmp_path, workers=1, progress=False)
    for p in cached['cache_path']:
        a = data.load_cached(p)
        assert a.shape == (32, 24) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1


def test_cbis_tcia_tree_inside_nbia_manifest_folder(tmp_path):
    "The NBIA Data Retriever writes <dest>/manifest-<id>/CBIS-DDSM/...; passing <dest> finds it."
    root = make_cbis_fixture(tmp_path/'dest', 'tcia')
    (root/'manifest-1600709154662').mkdir()
    (root/'CBIS-DDSM').rename(root/'manifest-1600709154662'/'CBIS-DDSM')
    df = quiet(load_cbis_ddsm, root, per='abnormality')
    assert len(df) == 8 and df['image_path'].str.contains('manifest-1600709154662').all()


def test_lesions_fit_the_shared_figures(trees):
    "The lesion dicts of the mammography loaders are drawn by data.show_lesions (row/col/radius or bbox)."
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    ddsm = load_ddsm(trees['ddsm'])
    fig = data.show_lesions(ddsm, n=3)
    assert sum(len(ax.patches) for ax in fig.axes) == 4     # D_4001 LEFT_MLO, B_3024 RIGHT_CC (two lesions), B_3024 RIGHT_MLO
    plt.close(fig)
    cmmd = quiet(load_cmmd, trees['cmmd'])
    fig = data.show_examples(cmmd, n=2)
    labels = [l for l in data.LABELS if (cmmd.label == l).any()]
    assert len(labels) >= 2 and len(fig.axes) == 2 * len(labels)        # one row per label present, n=2 columns
    drawn = [ax for ax in fig.axes if ax.images]
    counts = cmmd.label.value_counts()
    assert sorted(ax.get_title().split(':')[0] for ax in drawn) == sorted(l for l in labels for _ in range(min(2, counts[l])))
    paths = cmmd.set_index('image_id').image_path
    for ax in drawn:                                                     # each panel shows the image its title names
        lab, image_id = ax.get_title().split(': ')
        np.testing.assert_allclose(ax.images[0].get_array(), data.read_image(paths[image_id]), atol=1e-6)
        assert cmmd.set_index('image_id').label[image_id] == lab
    plt.close(fig)


def test_ddsm_gzipped_overlay_and_pngfiles_folder(tmp_path):
    "Two layouts seen in the wild: gzipped overlays, and the PNGs in a PNGFiles/ sub-folder of the case."
    import gzip
    root = make_ddsm_fixture(tmp_path/'ddsm')
    case = root/'cases/cancers/cancer_01/case0002'
    ov = case/'C_0002_1.LEFT_CC.OVERLAY'
    (case/'C_0002_1.LEFT_CC.OVERLAY.gz').write_bytes(gzip.compress(ov.read_bytes())); ov.unlink()
    (case/'PNGFiles').mkdir()
    for p in case.glob('*.png'): p.rename(case/'PNGFiles'/p.name)
    df = load_ddsm(root).set_index('image_id')
    assert df.loc['C_0002_1.LEFT_CC', 'label'] == 'malignant' and '/PNGFiles/' in df.loc['C_0002_1.LEFT_CC', 'image_path']
    assert df.loc['C_0002_1.LEFT_CC', 'lesions'][0]['bbox'] == [22, 6, 39, 23]
