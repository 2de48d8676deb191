"""Scaling out on CPU: `mirrored` over two logical CPU devices, and two local `multi_worker` processes started by the
launcher — killed after one epoch, restarted, resumed — that end with identical weights, a falling loss and one run
folder. Each worker is a fresh Python process (collective ops are set up at startup); models are tiny (small_cnn, 32 px)."""
import json, os, re, subprocess, sys
from pathlib import Path
import numpy as np, pandas as pd, pytest
import keras
from breast_cancer import data as bc_data, distribute as D, train as T

TINY = {'name': 'tinymw', 'task': 'binary', 'wavelet': None, 'model': {'weights': None},
        'data': {'image_size': 32, 'val_size': 0.2, 'test_size': 0.2, 'max_images': 80},
        'train': {'epochs': 4, 'batch_size': 8, 'steps_per_epoch': 3, 'restore_best': False,
                  'optimizer': 'adam', 'clr': {'initial_learning_rate': 0.003, 'maximal_learning_rate': 0.003}}}

# A worker: the real run_from_config with model.small_cnn; DIE_AFTER_EPOCH makes worker 1 kill itself (SIGKILL) there.
WORKER = '''
import json, os, signal, sys
import keras
from breast_cancer import cascade, model
class Die(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if str(epoch) == os.environ.get('DIE_AFTER_EPOCH') and json.loads(os.environ['TF_CONFIG'])['task']['index'] == 1:
            os.kill(os.getpid(), signal.SIGKILL)
train = cascade.train
cascade.train = lambda *a, callbacks=None, **kw: train(*a, callbacks=[Die()] + list(callbacks or []), **kw)
if __name__ == '__main__':
    build = lambda c: model.small_cnn((c.data.image_size, c.data.image_size, c.data.channels))
    print('RUN', cascade.run_from_config(sys.argv[1], run_dir=sys.argv[2], build=build, verbose=0), flush=True)
'''

def precache(config):
    "Fill the cache in this process (workers=1), so that the workers only read it."
    c = T.load_config(config)
    bc_data.cache_images(T.load_manifest(c), size=T._cache_size(c), transform=T.image_transform(c), workers=1, progress=False)

def launch(tmp_path, cfg, run_dir, n=2, **env):
    "Run the launcher in a child process (as `breast-cancer train --workers` does); returns (exit code, output)."
    code = ('import sys; from breast_cancer.distribute import launch_workers; '
            f'sys.exit(launch_workers([sys.executable, {str(tmp_path/"worker.py")!r}, {str(cfg)!r}, {str(run_dir)!r}], {n}))')
    p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    return p.returncode, p.stdout + p.stderr


@pytest.fixture(scope='module')
def resumed(isolated_dirs, tmp_path_factory):
    "Two workers killed after epoch 1 (worker 1 dies), then the same job started again: both outputs and the run folder."
    tmp = tmp_path_factory.mktemp('mw')
    (tmp/'worker.py').write_text(WORKER)
    cfg = tmp/'tiny.yaml'; cfg.write_text(T.load_config(TINY).to_yaml())
    precache(cfg)
    run_dir = tmp/'run'
    first = launch(tmp, cfg, run_dir, DIE_AFTER_EPOCH='1')
    history_after_kill = pd.read_csv(run_dir/'stage2'/'history.csv') if (run_dir/'stage2'/'history.csv').exists() else None
    second = launch(tmp, cfg, run_dir)
    return {'first': first, 'second': second, 'run_dir': run_dir, 'history_after_kill': history_after_kill}


def test_killed_worker_stops_the_job_and_restart_resumes(resumed):
    rc, out = resumed['first']
    assert rc != 0 and 'a worker exited with code -9: stopping the others' in out, out[-3000:]
    assert resumed['history_after_kill']['epoch'].tolist() == [0, 1]          # the chief saved epochs 0 and 1
    rc, out = resumed['second']
    assert rc == 0, out[-3000:]
    assert 'stage2: resuming from the backup' in out                          # not from scratch
    hist = pd.read_csv(resumed['run_dir']/'stage2'/'history.csv')
    assert hist['epoch'].tolist() == [0, 1, 2, 3]                              # epochs 2 and 3 appended, none repeated


def test_workers_end_with_identical_weights_and_loss_goes_down(resumed):
    rc, out = resumed['second']
    sums = dict(re.findall(r'\[worker \d\] .*worker (\d): weights ([0-9a-f]{16})', out))
    assert set(sums) == {'0', '1'} and sums['0'] == sums['1'], out[-3000:]   # both finished, with the same weights
    saved = keras.saving.load_model(resumed['run_dir']/'stage2'/'model.keras', compile=False)
    assert D.weights_checksum(saved) == sums['0']                              # and the chief saved exactly those
    loss = json.loads((resumed['run_dir']/'stage2'/'history.json').read_text())['loss']
    assert loss[-1] < loss[0], loss


def test_only_the_chief_writes_run_files(resumed):
    rc, out = resumed['second']
    runs = re.findall(r'\[worker (\d)\] RUN (\S+)', out)
    assert dict(runs)['0'] == str(resumed['run_dir'])
    assert not Path(dict(runs)['1']).exists()                                  # worker 1 wrote into a temporary folder, now gone
    files = sorted(str(p.relative_to(resumed['run_dir'])) for p in resumed['run_dir'].rglob('*')
                   if p.is_file() and p.name != '.lock' and 'tensorboard' not in p.parts)   # the run lock and TensorBoard logs aside
    assert files == ['cascade/cascade.json', 'cascade/config.yaml', 'cascade/stage2.keras', 'config.yaml', 'metadata.json',
                     'predictions.csv', 'split.csv', 'stage2/checkpoints/best.json', 'stage2/checkpoints/best.keras',
                     'stage2/done.json', 'stage2/history.csv', 'stage2/history.json', 'stage2/model.keras', 'summary.csv']
    md = json.loads((resumed['run_dir']/'metadata.json').read_text())['distribute']
    assert (md['resolved'], md['workers'], md['replicas'], md['global_batch_size']) == ('multi_worker', 2, 2, 16)


MIRRORED = '''
import json, sys
from breast_cancer import distribute as D, train as T, model
if __name__ == '__main__':  # a cache fill with several processes re-imports this script in each of them
    D.split_cpu(2)
    c = T.load_config(sys.argv[1])
    m = T.cache_manifest(T.load_manifest(c), c, progress=False)
    with D.distribute_scope(c): net = model.small_cnn((c.data.image_size, c.data.image_size, c.data.channels))
    h = T.train(net, m, c, run_dir=sys.argv[2], stage='stage2', verbose=0)   # task binary: benign vs malignant, the stage-2 target
    print(json.dumps({'replicas': len(net.trainable_variables[0].value.values), 'steps': int(net.optimizer.iterations.numpy()),
                      'loss': h.history['loss'], 'strategy': type(net.distribute_strategy).__name__}))
'''

def test_mirrored_on_two_logical_cpus_trains_the_demo_config(isolated_dirs, tmp_path, repo_root):
    c = T.load_config(repo_root/'configs'/'demo.yaml').replace(**{
        'distribute.strategy': 'mirrored', 'data.max_images': 40, 'train.epochs': 1, 'train.steps_per_epoch': 3,
        'train.validation_steps': 1, 'train.batch_size': 4, 'task': 'binary'})
    cfg = tmp_path/'demo.yaml'; cfg.write_text(c.to_yaml()); precache(c)
    (tmp_path/'mirrored.py').write_text(MIRRORED)
    p = subprocess.run([sys.executable, str(tmp_path/'mirrored.py'), str(cfg), str(tmp_path/'run')], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res['strategy'] == 'MirroredStrategy' and res['replicas'] == 2      # every variable lives on both devices
    assert res['steps'] == 3 and np.isfinite(res['loss']).all()
    md = json.loads((tmp_path/'run'/'metadata.json').read_text())['distribute']
    assert (md['replicas'], md['batch_size_per_replica'], md['global_batch_size']) == (2, 4, 8)


# ---------------------------------------------------------------- issue 25: clean-up after a killed launcher, a bound port
def _alive(pid: int) -> bool:
    "Whether a process runs (a zombie waiting for its reaper does not)."
    try: return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[-1].split()[0] != 'Z'
    except (FileNotFoundError, ProcessLookupError): return False

@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='PR_SET_PDEATHSIG is Linux only')
def test_workers_die_with_a_killed_launcher_and_its_root_goes_next_time(tmp_path, monkeypatch):
    "kill -9 the launcher: its workers get SIGTERM (PR_SET_PDEATHSIG); the next launcher removes the root it left."
    import signal, tempfile, time
    code = ('import sys; from breast_cancer.distribute import launch_workers; '
            'sys.exit(launch_workers([sys.executable, "-c", "import time; time.sleep(300)"], 2))')
    p = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True, env={**os.environ, 'TMPDIR': str(tmp_path)})
    pids = [int(p.stdout.readline().split()[-1]) for _ in range(2)]            # "[launcher] worker i: pid N"
    try:
        assert len(list(tmp_path.glob('breast-cancer-workers-*'))) == 1
        p.kill(); p.wait()
        deadline = time.time() + 20
        while any(map(_alive, pids)) and time.time() < deadline: time.sleep(0.2)
        assert not any(map(_alive, pids)), 'the workers outlived their launcher'
        assert len(list(tmp_path.glob('breast-cancer-workers-*'))) == 1         # kill -9: no chance to clean up
        monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
        assert D.launch_workers([sys.executable, '-c', 'pass'], 1) == 0
        assert not list(tmp_path.glob('breast-cancer-workers-*'))                # the stale root went, and the new one
    finally:
        for pid in pids:
            if _alive(pid): os.kill(pid, signal.SIGKILL)


def test_a_bound_worker_port_is_an_error_naming_the_port():
    "A worker whose TF_CONFIG port is taken stops with a ConfigError naming the port, not a gRPC traceback from TensorFlow."
    import socket
    with socket.socket() as busy:
        busy.bind(('127.0.0.1', 0)); busy.listen(); port = busy.getsockname()[1]
        tf_config = {'cluster': {'worker': [f'127.0.0.1:{port}', '127.0.0.1:1']}, 'task': {'type': 'worker', 'index': 0}}
        code = ("from breast_cancer import distribute as D; from breast_cancer.config import load_config\n"
                "from breast_cancer.core import BreastCancerError\n"
                "try: D.distribute_strategy(load_config({'distribute': {'strategy': 'multi_worker'}}))\n"
                "except BreastCancerError as e: print('ERROR', type(e).__name__, e)")
        try: p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                                env={**os.environ, 'TF_CONFIG': json.dumps(tf_config)})
        except subprocess.TimeoutExpired: pytest.fail('the worker hung on the bound port')
    assert f'ERROR ConfigError worker 0: port {port} (from TF_CONFIG) is already in use on this machine' in p.stdout, p.stdout + p.stderr[-2000:]


# ---------------------------------------------------------------- issue 26: the config's precision and compilation settings
FAST_WORKER = '''
import json
import numpy as np, tensorflow as tf, keras
from breast_cancer import distribute as D, model
if __name__ == '__main__':
    s = tf.distribute.MultiWorkerMirroredStrategy()
    with s.scope(): net = model.small_cnn((32, 32, 1), mixed_precision=True)
    model.compile_model(net, 0.01, jit_compile=True, steps_per_execution=2)
    rng = np.random.default_rng(0)
    x, y = rng.random((32, 32, 32, 1), dtype='float32'), (rng.random(32) < 0.5).astype('float32')
    ds = s.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(8))
    h = D.fit_distributed(net, ds, epochs=2, steps_per_epoch=3, verbose=0)
    print('RESULT', json.dumps({'weights': D.weights_checksum(net), 'iterations': int(net.optimizer.iterations.numpy()),
                                'optimizer': type(net.optimizer).__name__, 'loss': h.history['loss'],
                                'output': str(net.output.dtype), 'jit': bool(net.jit_compile)}), flush=True)
'''

def test_multi_worker_step_with_mixed_precision_xla_and_two_steps_per_call(tmp_path):
    (tmp_path/'worker.py').write_text(FAST_WORKER)
    code = ('import sys; from breast_cancer.distribute import launch_workers; '
            f'sys.exit(launch_workers([sys.executable, {str(tmp_path/"worker.py")!r}], 2))')
    p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    res = [json.loads(r) for r in re.findall(r'\[worker \d\] RESULT (.*)', out)]
    assert len(res) == 2 and res[0]['weights'] == res[1]['weights'], out[-3000:]   # the workers agree
    for r in res:
        assert (r['optimizer'], r['output'], r['jit'], r['iterations']) == ('LossScaleOptimizer', 'float32', True, 6)  # 2 + 1 per epoch
        assert np.isfinite(r['loss']).all()
