"""External validation (issue 27 item 1) as a user meets it: `breast-cancer evaluate --run RUN --dataset NAME --data-root DIR`
on a second mini-MIAS folder with a deliberate intensity shift gives an 'external' section and a row in summary.md, with the
run's own thresholds (never re-chosen on the new data unless asked), and a clear error for mismatched inputs."""
import functools, json
import yaml
from breast_cancer.cli import main
from breast_cancer.rundir import RunDir


def test_evaluate_external_from_the_command_line(tmp_path, isolated_dirs, monkeypatch, capsys):
    import breast_cancer.cascade as C
    from breast_cancer.data import load_mias
    from breast_cancer.external import shifted_site
    monkeypatch.setattr(C, 'run_from_config', functools.partial(C.run_from_config, build=C.small_stage))   # a tiny stand-in network
    cfg = tmp_path/'tiny.yaml'
    cfg.write_text(yaml.safe_dump({'name': 'tiny', 'data': {'image_size': 32, 'val_size': 0.2, 'test_size': 0.3, 'max_images': 80},
                                   'wavelet': None, 'model': {'weights': None},
                                   'train': {'epochs': 1, 'batch_size': 8, 'steps_per_epoch': 2, 'validation_steps': 1}}))
    run = RunDir(tmp_path/'run')
    assert main(['train', '--config', str(cfg), '--run-dir', str(run.path)]) == 0
    test_ids = run.read_split().query("split == 'test'")['image_id']
    mias = load_mias()
    site = shifted_site(mias[mias.image_id.isin(test_ids)], tmp_path/'site-b')
    saved = json.loads(json.dumps(C.Cascade.load(run.path).__dict__, default=str))
    capsys.readouterr()
    reports = tmp_path/'reports'
    assert main(['evaluate', '--run', str(run.path), '--dataset', 'mias', '--data-root', str(site), '--n-boot', '200',
                 '--reports', str(reports)]) == 0
    out = capsys.readouterr().out
    assert 'External validation: mias-site-b (evaluation: external)' in out and "the run's own" in out
    rec = json.loads(run.external('mias-site-b').external_record.read_text())
    assert rec['thresholds'] == [saved['threshold1'], saved['threshold2']] and rec['thresholds_source'] == 'run'
    assert rec['stages']['stage1']['status'] == 'ok' and rec['stages']['stage1']['n'] == len(test_ids)
    summary = (reports/'summary.md').read_text()
    assert '## External validation (evaluation: external)' in summary and '| external | run | mias-site-b |' in summary
    # asked to: thresholds re-chosen on a calibration part of the new patients, which are then left out
    assert main(['evaluate', '--run', str(run.path), '--dataset', 'mias', '--data-root', str(site), '--n-boot', '200',
                 '--name', 'rechosen', '--rechoose', '0.5', '--reports', str(reports)]) == 0
    rec = json.loads(run.external('rechosen').external_record.read_text())
    assert rec['thresholds_source'].startswith('re-chosen') and rec['stages']['stage1']['n'] < len(test_ids)
    # mismatched inputs: a mammography run on histopathology slides, in one line
    assert main(['evaluate', '--run', str(run.path), '--dataset', 'breakhis']) != 0
    err = capsys.readouterr().err
    assert 'modality differs' in err and 'Traceback' not in err
