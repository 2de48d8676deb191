"""A plain install, as a pip or Colab user gets it: build the wheel of this checkout, install it WITHOUT extras into a
fresh virtual environment (no system site-packages, so a missing runtime requirement fails here), then use it from an
empty folder: import every module, run the CLI, load every preset by name, load the bundled samples, and execute EVERY
notebook of the docs site, every cell (`notest` and `slow` included, as Colab's "Run all"), with only that notebook file
present. `BREAST_CANCER_QUICK_DOCS=1` runs the few long cells (benchmarks, learning curves) at reduced sizes; each
notebook's wall time is printed in the test output.

pip fetches the dependencies from the package index (or its cache; set PIP_NO_INDEX=1 and PIP_FIND_LINKS=<wheelhouse>
to run it offline). The environment is built once per session and takes a few minutes (measured in the report)."""
import ast, json, os, re, shutil, subprocess, sys, time, venv
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
_NOT_SOURCE = {'.git', '.venv', 'venv', 'build', 'dist', 'runs', 'reports', '_docs', '_proc', '.quarto', '__pycache__',
               '.ipynb_checkpoints', '.pytest_cache', '.whl', '.gl'}

def _ignore(folder, names):
    "What copytree leaves out: virtual environments, run products, the image cache, build leftovers."
    return [n for n in names if n in _NOT_SOURCE or n.endswith('.egg-info') or (n == 'cache' and Path(folder).name == 'data')]

def plain_env(venv_dir: Path) -> dict:
    "The environment of a user who activated `venv_dir`: nothing of this checkout or of our settings leaks in."
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('BREAST_CANCER_', 'PYTHON', 'VIRTUAL_ENV', 'JUPYTER', 'CONDA'))}
    env.update(PATH=f"{venv_dir/'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv_dir),
               MPLBACKEND='Agg', TF_CPP_MIN_LOG_LEVEL='2', PYTHONUNBUFFERED='1', PIP_DISABLE_PIP_VERSION_CHECK='1')
    return env

def run(cmd, cwd, env, timeout=1800) -> subprocess.CompletedProcess:
    "Run `cmd`; fail with the tail of its output when it exits non-zero."
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res

def build_plain_venv(tmp: Path) -> tuple[Path, dict]:
    "Build the wheel from a copy of this checkout and install it into a fresh venv under `tmp`; (venv python, seconds)."
    times = {}
    t0 = time.perf_counter()
    src = tmp/'src'; shutil.copytree(ROOT, src, ignore=_ignore)  # build from a copy: nothing is written into the checkout
    env = {**os.environ, 'BREAST_CANCER_TF': os.environ.get('BREAST_CANCER_TF', 'tensorflow-cpu')}  # setup.py reads it at build time
    run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '-w', tmp/'dist', src], cwd=tmp, env=env)
    wheel, = (tmp/'dist').glob('breast_cancer-*.whl')
    times['build_wheel_s'] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    venv.create(tmp/'venv', with_pip=True, clear=True)  # no system site-packages: a missing requirement must fail
    py = tmp/'venv'/'bin'/'python'
    run([py, '-m', 'pip', 'install', '-q', wheel], cwd=tmp, env=plain_env(tmp/'venv'))
    times['install_s'] = round(time.perf_counter() - t0, 1)
    return py, times

_RUNNER = r'''
import re, sys, time, json, nbformat
from nbclient import NotebookClient
from breast_cancer.report import CurrentPythonKernelManager
path, out, skip_flags = sys.argv[1], sys.argv[2], sys.argv[3].split(',') if sys.argv[3] else []
nb = nbformat.read(path, as_version=4)
flag = re.compile(r'^#\|\s*(' + '|'.join(map(re.escape, skip_flags)) + r')\s*$', re.M) if skip_flags else None
skipped = [c for c in nb.cells if flag and c.cell_type == 'code' and flag.search(c.source)]
nb.cells = [c for c in nb.cells if c not in skipped]
t0 = time.perf_counter()
NotebookClient(nb, timeout=1200, kernel_name='python3', kernel_manager_class=CurrentPythonKernelManager,
               resources={'metadata': {'path': '.'}}).execute()
nbformat.write(nb, out)
print(json.dumps({'seconds': round(time.perf_counter() - t0, 1), 'cells': len(nb.cells), 'skipped': len(skipped)}))
'''

def run_notebook_alone(py: Path, notebook: Path, workdir: Path, skip_flags=('notest', 'slow'), timeout=3600, env_extra=None) -> dict:
    "Execute `notebook` with the venv of `py`, in `workdir` holding only a copy of it; cells flagged `skip_flags` are left out."
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(notebook, workdir/notebook.name)
    (workdir.parent/'runner.py').write_text(_RUNNER)
    env = {**plain_env(py.parent.parent), **(env_extra or {})}
    env['JUPYTER_DATA_DIR'] = str(workdir.parent/'jupyter-data')  # no kernelspec of this machine's user is consulted
    t0 = time.perf_counter()
    res = run([py, workdir.parent/'runner.py', notebook.name, notebook.stem + '.out.ipynb', ','.join(skip_flags)],
              cwd=workdir, env=env, timeout=timeout)
    return {**json.loads(res.stdout.strip().splitlines()[-1]), 'wall_s': round(time.perf_counter() - t0, 1)}

def setup_cell_specs(notebook: Path) -> dict:
    "The pip specs the notebook's setup cell installs, by the module whose absence triggers them."
    first = next(''.join(c['source']) for c in json.loads(notebook.read_text())['cells'] if c['cell_type'] == 'code')
    return ast.literal_eval(re.search(r'^_need = (\{.*?\}) *(#[^\n]*)?\n', first, re.S | re.M).group(1))

@pytest.fixture(scope='module')
def plain(tmp_path_factory):
    "A fresh venv with the wheel installed without extras: (python, timings)."
    tmp = tmp_path_factory.mktemp('plain_install')
    py, times = build_plain_venv(tmp)
    print(f'\nplain install: {times}')
    return py, times

def test_plain_install_works_from_an_empty_folder(plain, tmp_path):
    "Every module imports, the CLI runs, every preset loads by name, both samples load; outputs default to the folder."
    py, _ = plain
    env = plain_env(py.parent.parent)
    run([py, '-m', 'pip', 'check'], cwd=tmp_path, env=env)  # every requirement of every installed package is there
    probe = '''
import importlib, json, pkgutil, breast_cancer
mods = sorted(m.name for m in pkgutil.iter_modules(breast_cancer.__path__) if not m.name.startswith('_'))
for m in mods: importlib.import_module('breast_cancer.' + m)
from breast_cancer.config import load_config, presets
from breast_cancer.core import cache_dir, project_root, reports_dir, runs_dir
from breast_cancer.data import load_mias
from breast_cancer.histo import load_breakhis
print(json.dumps({'modules': mods, 'presets': {n: load_config(n).name for n in presets()},
                  'demo_by_old_path': load_config('configs/demo.yaml') == load_config('demo'),
                  'mias': load_mias().label.value_counts().to_dict(), 'breakhis': len(load_breakhis()),
                  'file': breast_cancer.__file__, 'root': str(project_root()),
                  'dirs': [str(runs_dir()), str(reports_dir()), str(cache_dir())]}))
'''
    out = json.loads(run([py, '-c', probe], cwd=tmp_path, env=env).stdout.strip().splitlines()[-1])
    assert out['modules'] == sorted(p.stem for p in (ROOT/'breast_cancer').glob('*.py') if not p.stem.startswith('_'))
    assert set(out['presets']) == {p.stem for p in (ROOT/'breast_cancer'/'configs').glob('*.yaml')} >= {'demo', 'paper_resnet50_cascade'}
    assert out['presets']['demo'] == 'demo' and out['demo_by_old_path']
    assert out['mias'] == {'normal': 207, 'benign': 63, 'malignant': 52} and out['breakhis'] == 12  # from the wheel's samples
    assert Path(out['file']).is_relative_to(py.parent.parent) and out['root'] == 'None'  # the installed copy, not the clone
    assert out['dirs'] == [str(tmp_path/'runs'), str(tmp_path/'reports'), str(tmp_path/'data'/'cache')]
    cli = py.parent/'breast-cancer'
    assert 'configs' in run([cli, '--help'], cwd=tmp_path, env=env).stdout
    assert run([cli, 'configs', 'show', 'paper_resnet50_cascade'], cwd=tmp_path, env=env).stdout == \
        (ROOT/'breast_cancer'/'configs'/'paper_resnet50_cascade.yaml').read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # loading wrote nothing

@pytest.fixture(scope='module')
def plain_nbdev(plain):
    "The plain install plus what a notebook's setup cell adds on a bare runtime (nbdev, pinned), installed once."
    py, _ = plain
    run([py, '-m', 'pip', 'install', '-q', *setup_cell_specs(ROOT/'nbs'/'00_core.ipynb')['nbdev']], cwd=py.parent, env=plain_env(py.parent.parent))
    return py

# Every notebook runs alone, every cell (`notest` and `slow` included): Colab's "Run all" runs them all. The env variable
# below makes the few long cells (benchmarks, learning curves) run at reduced sizes; each such cell says so in its output.
QUICK_ENV = {'BREAST_CANCER_QUICK_DOCS': '1'}

def notebook_alone_after_plain_install(py: Path, tmp_path, name: str) -> dict:
    "Run nbs/`name` alone, every cell, in an empty folder with the plain install; check it wrote only its outputs."
    notebook = ROOT/'nbs'/name
    res = run_notebook_alone(py, notebook, tmp_path/'work', skip_flags=(), env_extra=QUICK_ENV)
    written = {p.relative_to(tmp_path/'work').parts[0] for p in (tmp_path/'work').rglob('*')}
    assert written <= {notebook.name, notebook.stem + '.out.ipynb', 'data', 'runs', 'reports'}, written
    return res

_SETUP_CELL = re.compile(r"^#\| hide\n# Setup \(Colab.*\nfrom breast_cancer\.core import setup_runtime\nsetup_runtime\(\);?$", re.S)

def _doc_notebooks() -> list[str]:
    "Every notebook of the docs site: all of nbs/ (tour, fixtures and tutorials included) except nbdev's ignored `_*` files."
    return sorted(p.relative_to(ROOT/'nbs').as_posix() for p in (ROOT/'nbs').rglob('*.ipynb')
                  if '.ipynb_checkpoints' not in p.parts and not p.name.startswith('_'))

ALONE_WORKERS = 2   # notebooks run two at a time: each is mostly one kernel's single-threaded Python, so the 2 cores overlap them

@pytest.fixture(scope='module')
def notebooks_alone(plain_nbdev, tmp_path_factory):
    "Every docs notebook started alone (`notebook_alone_after_plain_install`), two at a time; {name: Future}."
    from concurrent.futures import Future, ThreadPoolExecutor
    with ThreadPoolExecutor(1) as one:   # the tour first, alone: its time limit is for an idle machine (a failure stays its own)
        tour = one.submit(notebook_alone_after_plain_install, plain_nbdev, tmp_path_factory.mktemp('alone'), 'tour.ipynb')
    pool = ThreadPoolExecutor(ALONE_WORKERS)
    names = sorted((n for n in _doc_notebooks() if n != 'tour.ipynb'), key=lambda n: -(ROOT/'nbs'/n).stat().st_size)  # long ones first
    futures = {'tour.ipynb': tour} | {n: pool.submit(notebook_alone_after_plain_install, plain_nbdev, tmp_path_factory.mktemp('alone'), n)
                                       for n in names}
    yield futures
    pool.shutdown(cancel_futures=True)

@pytest.mark.parametrize('name', _doc_notebooks())
def test_every_notebook_runs_alone_every_cell_after_a_plain_install(notebooks_alone, name, capsys):
    "Each docs page alone in an empty folder, all cells, as Colab's Run all; its wall time goes into the test output."
    res = notebooks_alone[name].result()
    with capsys.disabled():
        print(f"\n  alone, every cell: {name:<34} {res['wall_s']:7.1f} s wall, {res['seconds']:7.1f} s executing {res['cells']} cells", flush=True)
    assert res['cells'] >= 3 and res['skipped'] == 0
    if name == 'tour.ipynb':
        assert res['wall_s'] < 180, f"the tour took {res['wall_s']} s: it must run in under 3 minutes on 2 cores"

def test_the_notebook_check_covers_every_page():
    "The parametrized check below sees the pages added by the restructuring (and would see any new one)."
    assert {'tour.ipynb', 'fixtures.ipynb', '00b_rundir.ipynb', '01c_io.ipynb', '01d_cache.ipynb', '04a_distribute.ipynb',
            '05a_metrics.ipynb', '06b_audit.ipynb', 'tutorials/colab_cbis_ddsm.ipynb'} <= set(_doc_notebooks())

@pytest.mark.parametrize('notebook', _doc_notebooks())
def test_every_notebook_starts_with_the_setup_cell_and_a_badge(notebook):
    "The first code cell readies a bare runtime (Colab), a badge opens the page on Colab, no cell reaches outside (fix: .ci/notebook_setup_cell.py)."
    nb = json.loads((ROOT/'nbs'/notebook).read_text())
    cells = [''.join(c['source']) for c in nb['cells']]
    first_code = next(s for c, s in zip(nb['cells'], cells) if c['cell_type'] == 'code')
    assert _SETUP_CELL.match(first_code), f'{notebook}: the first code cell is not the setup cell:\n{first_code[:300]}'
    assert any(f'colab.research.google.com/github/' in s and f'/nbs/{notebook})' in s for s in cells), f'{notebook}: no Colab badge'
    for s in cells:
        assert not re.search(r"\.\./shared|/work/|\.\./data/", s), f'{notebook}: a cell reaches outside:\n{s[:300]}'
