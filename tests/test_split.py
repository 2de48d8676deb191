"""Frozen splits (issue 27 item 5): `breast-cancer split` writes the patient split a config trains on, with its excluded
images and why; `data.split_file` makes a run reuse such a file instead of drawing one, refuses a patient in two parts,
and records the file's SHA-256 in metadata.json. Cheap real path: load_manifest + ensure_split + init_run_dir, no training."""
import json, re
from pathlib import Path
import pandas as pd, pytest

from breast_cancer.cli import main
from breast_cancer.core import DataError, file_sha256
from breast_cancer.rundir import RunDir
from breast_cancer import train as T


def _run(config, run_dir) -> Path:
    "The run folder a `train` would start: the split it trains on (ensure_split) and its metadata, without training."
    return T.init_run_dir(config, T.ensure_split(T.load_manifest(config), config), run_dir=run_dir)


def test_split_file_reproduces_another_runs_split(tmp_path):
    first = T.load_config('demo')
    a = _run(first, tmp_path/'a')
    drawn = T.ensure_split(T.load_manifest(first), first.replace(seed=7))
    assert (drawn['split'].to_numpy() != RunDir(a).read_split()['split'].to_numpy()).any()   # another seed draws another split...
    second = first.replace(seed=7, **{'data.split_file': str(RunDir(a).split_file)})
    b = _run(second, tmp_path/'b')
    assert RunDir(b).split_file.read_bytes() == RunDir(a).split_file.read_bytes()        # ...but the frozen one is reused exactly
    md = json.loads(RunDir(b).metadata_file.read_text())
    assert md['split_file'] == {'path': str(RunDir(a).split_file), 'sha256': file_sha256(RunDir(a).split_file)}
    assert 'split_file' not in json.loads(RunDir(a).metadata_file.read_text())


def test_cli_split_with_exclusions_is_reused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # a fresh folder: the relative --out lands here
    assert main(['split', '--config', 'demo', '--out', 'x.csv']) == 0
    full = pd.read_csv(tmp_path/'x.csv')
    assert list(full.columns) == ['dataset', 'image_id', 'patient_id', 'split', 'exclusion', 'reason']
    assert (len(full), int(full['exclusion'].sum()), int(full['reason'].notna().sum())) == (322, 0, 0)
    assert full.groupby('patient_id')['split'].nunique().max() == 1
    c = T.load_config('demo').replace(**{'data.max_images': 40})
    assert main(['split', '--config', 'demo', '--set', 'data.max_images=40', '--out', 'small.csv']) == 0
    small = pd.read_csv(tmp_path/'small.csv')
    assert int(small['exclusion'].sum()) == 282 and small.loc[small['exclusion'], 'reason'].str.contains('max_images=40').all()
    # the same 40 images in the same parts, from the full manifest (no max_images): the file's exclusions are dropped
    reused = T.ensure_split(T.load_manifest(T.load_config('demo')), T.load_config('demo').replace(**{'data.split_file': 'small.csv'}))
    kept = small[~small['exclusion']]
    assert dict(zip(reused['image_id'], reused['split'])) == dict(zip(kept['image_id'], kept['split']))
    assert dict(zip(reused['image_id'], reused['split'])) == dict(zip(*T.ensure_split(T.load_manifest(c), c)[['image_id', 'split']].T.values))


def test_split_file_with_a_patient_in_two_parts_is_refused(tmp_path):
    c = T.load_config('demo')
    m = T.ensure_split(T.load_manifest(c), c)
    who = m['patient_id'].iloc[0]
    rows = m.index[m['patient_id'] == who]
    assert len(rows) == 2
    m.loc[rows, 'split'] = ['train', 'test']
    m[['image_id', 'patient_id', 'split']].to_csv(tmp_path/'leaky.csv', index=False)   # no dataset column: matched by image_id
    with pytest.raises(DataError, match=rf"leaky.csv: 1 patient\(s\) appear in more than one split: {re.escape(who)}"):
        T.ensure_split(T.load_manifest(c), c.replace(**{'data.split_file': str(tmp_path/'leaky.csv')}))


@pytest.mark.parametrize('text, message', [
    (None, 'cannot read split file'),
    ('', 'cannot read split file'),
    ('image_id,split\n', 'has no rows'),
    ('image_id,part\nmdb001,train\n', 'is not a split file'),
    ('image_id,split\nmdb001,holdout\n', "column 'split' must be one of train, val, test"),
    ('image_id,split\nmdb001,train\n', 'has no split for 321 row(s)'),
])
def test_missing_or_malformed_split_file_is_named(tmp_path, text, message):
    f = tmp_path/'frozen.csv'
    if text is not None: f.write_text(text)
    c = T.load_config('demo').replace(**{'data.split_file': str(f)})
    with pytest.raises(DataError, match='frozen.csv') as e: T.ensure_split(T.load_manifest(c), c)
    assert message in str(e.value)
    assert main(['split', '--config', 'demo', '--set', f'data.split_file={f}', '--out', str(tmp_path/'o.csv')]) == 2
