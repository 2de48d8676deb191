"""The papers' protocols side by side (issue 27 item 4): the three splits of one manifest, the leakage audit's verdict on
each, and the classical baseline's table with patient-bootstrap CIs. Cheap: part of the bundled mini-MIAS, no training."""
import pandas as pd

from breast_cancer.config import load_config
from breast_cancer.data import load_dataset
from breast_cancer.protocols import PROTOCOLS, audit_verdict, compare_protocols, protocol_split


def _crossing(split: pd.DataFrame, unit: str) -> int:
    "How many values of `unit` (a patient, a source film) have rows in more than one part of the split."
    return int((split.groupby(unit)['split'].nunique() > 1).sum())


def test_leaky_protocols_cross_and_the_audit_flags_them(mias_sample, tmp_path):
    cfg, films = load_config('demo'), load_dataset('mias', mias_sample).head(40)   # 40 films of 20 women
    split = {p: protocol_split(films, p, cfg, tmp_path/'copies', k=3) for p in PROTOCOLS}
    assert _crossing(split['patient'], 'patient_id') == 0
    assert _crossing(split['image'], 'patient_id') > 0                     # a woman's two breasts on both sides
    copies = split['augment_then_split']
    assert len(copies) == 3 * len(films) and _crossing(copies, 'source_image') > 0   # copies of one film on both sides
    verdict = {p: audit_verdict(s) for p, s in split.items()}
    assert verdict['patient'] == (False, 'clean: no patient, identical file or near-duplicate across splits')
    assert verdict['image'][0] and verdict['image'][1].startswith('LEAK: ')
    assert verdict['augment_then_split'][0] and 'patient(s) on both sides' in verdict['augment_then_split'][1]


def test_baseline_table_has_the_three_protocols_with_cis():
    cfg = load_config('demo').replace(**{'data.max_images': 48})
    table = compare_protocols(cfg, models=('baseline',), n_boot=50, k=2, log=None)
    assert list(table['protocol']) == list(PROTOCOLS) and set(table['model']) == {'baseline'}
    assert list(table['leak']) == [False, True, True]
    assert ((table['auc_lower'] <= table['auc']) & (table['auc'] <= table['auc_upper'])).all()
    assert table['AUC [95% CI]'].str.match(r'^0\.\d{3} \[0\.\d{3}, [01]\.\d{3}\]$').all()
    assert (table['published accuracy'] == 0.987).all()
